"""The ArtifactStore contract against `LocalStore`, plus its on-disk guarantees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelguard.errors import InvalidInput
from modelguard.store import make_store
from modelguard.store.base import ArtifactStore
from modelguard.store.local import LocalStore
from tests.contracts.store_contract import StoreContract


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store")

    def tamper(self, store: ArtifactStore, key: str, data: bytes) -> None:
        assert isinstance(store, LocalStore)
        (store.root / key).write_bytes(data)

    def object_keys(self, store: ArtifactStore) -> list[str]:
        assert isinstance(store, LocalStore)
        return sorted(
            p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()
        )


def test_layout_and_no_temp_files_left(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ref = store.put_blob(b"abc")
    store.put_doc("audits/a.json", b"{}")
    assert (tmp_path / ref.key).read_bytes() == b"abc"
    assert (tmp_path / "docs" / "audits" / "a.json").read_bytes() == b"{}"
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []


def test_failed_write_keeps_the_old_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    store.put_doc("a.json", b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.put_doc("a.json", b"new")
    monkeypatch.undo()
    assert store.get_doc("a.json") == b"old"
    assert list(tmp_path.rglob(".tmp-*")) == []


def test_symlinked_root_is_usable(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = LocalStore(tmp_path / "link")
    store.put_doc("a.json", b"{}")
    assert store.list_docs("") == ["a.json"]


def test_make_store(tmp_path: Path) -> None:
    assert isinstance(make_store("local", root=tmp_path), LocalStore)
    with pytest.raises(InvalidInput):
        make_store("local")
    with pytest.raises(InvalidInput):
        make_store("ftp")
