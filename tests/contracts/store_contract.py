"""The ArtifactStore contract. Subclass `StoreContract` as ``Test...``, provide a
``store`` fixture, and implement `tamper` (overwrite a stored object behind the store's
back) and `object_keys` (every raw object key, to check what was written)."""

from __future__ import annotations

import pytest

from modelguard.errors import IntegrityError, InvalidInput, NotFound
from modelguard.store.base import ArtifactRef, ArtifactStore, blob_key, digest

BAD_KEYS = [
    "",
    "../escape.json",
    "audits/../../escape.json",
    "..",
    "/etc/passwd",
    "audits//a.json",
    "./a.json",
    "audits/.",
    "a\\..\\b",
    "nul\x00byte",
]


class StoreContract:
    def tamper(self, store: ArtifactStore, key: str, data: bytes) -> None:
        raise NotImplementedError

    def object_keys(self, store: ArtifactStore) -> list[str]:
        raise NotImplementedError

    # -- blobs ------------------------------------------------------------------------------

    def test_blob_roundtrip(self, store: ArtifactStore) -> None:
        data = b"\x00weights\xff" * 100
        ref = store.put_blob(data, media_type="application/x-safetensors")
        assert ref == ArtifactRef(
            sha256=digest(data),
            key=blob_key(digest(data)),
            size=len(data),
            media_type="application/x-safetensors",
        )
        assert store.get_blob(ref) == data
        assert store.get_blob(ref.sha256) == data
        assert store.has_blob(ref.sha256)

    def test_empty_blob(self, store: ArtifactStore) -> None:
        ref = store.put_blob(b"")
        assert ref.size == 0 and store.get_blob(ref) == b""

    def test_put_is_idempotent(self, store: ArtifactStore) -> None:
        first = store.put_blob(b"same bytes")
        second = store.put_blob(b"same bytes")
        assert first == second
        assert self.object_keys(store).count(first.key) == 1
        assert [k for k in self.object_keys(store) if k.startswith("blobs/")] == [first.key]
        assert store.get_blob(first) == b"same bytes"

    def test_corrupted_blob_is_refused(self, store: ArtifactStore) -> None:
        ref = store.put_blob(b"original model")
        self.tamper(store, ref.key, b"backdoored model")
        with pytest.raises(IntegrityError, match=ref.key):
            store.get_blob(ref)
        # putting the original again repairs it
        assert store.put_blob(b"original model") == ref
        assert store.get_blob(ref) == b"original model"

    def test_same_size_corruption_is_refused(self, store: ArtifactStore) -> None:
        ref = store.put_blob(b"AAAA")
        self.tamper(store, ref.key, b"AAAB")
        with pytest.raises(IntegrityError):
            store.get_blob(ref.sha256)

    def test_missing_blob(self, store: ArtifactStore) -> None:
        absent = "0" * 64
        assert not store.has_blob(absent)
        with pytest.raises(NotFound):
            store.get_blob(absent)

    def test_malformed_digest_is_refused(self, store: ArtifactStore) -> None:
        for bad in ("", "abc", "../" + "0" * 61, "Z" * 64):
            with pytest.raises(InvalidInput):
                store.get_blob(bad)
            with pytest.raises(InvalidInput):
                store.has_blob(bad)

    # -- documents ------------------------------------------------------------------------

    def test_docs_put_get_overwrite_list_delete(self, store: ArtifactStore) -> None:
        store.put_doc("audits/a1.json", b'{"state": "running"}')
        store.put_doc("audits/a2.json", b"{}")
        store.put_doc("carriers/c1.json", b"{}")
        assert store.get_doc("audits/a1.json") == b'{"state": "running"}'
        store.put_doc("audits/a1.json", b'{"state": "done"}')
        assert store.get_doc("audits/a1.json") == b'{"state": "done"}'
        assert store.list_docs("audits/") == ["audits/a1.json", "audits/a2.json"]
        assert store.list_docs("audits/a1") == ["audits/a1.json"]
        assert store.list_docs("") == ["audits/a1.json", "audits/a2.json", "carriers/c1.json"]
        assert store.list_docs("missing/") == []
        store.delete_doc("audits/a1.json")
        with pytest.raises(NotFound):
            store.get_doc("audits/a1.json")
        store.delete_doc("audits/a1.json")  # absent: no error
        assert store.list_docs("audits/") == ["audits/a2.json"]

    def test_docs_and_blobs_do_not_mix(self, store: ArtifactStore) -> None:
        ref = store.put_blob(b"blob")
        store.put_doc("x.json", b"doc")
        assert store.list_docs("") == ["x.json"]
        assert store.has_blob(ref.sha256)

    def test_missing_doc(self, store: ArtifactStore) -> None:
        with pytest.raises(NotFound):
            store.get_doc("audits/none.json")

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_path_traversal_is_refused(self, store: ArtifactStore, key: str) -> None:
        with pytest.raises(InvalidInput):
            store.put_doc(key, b"x")
        with pytest.raises(InvalidInput):
            store.get_doc(key)
        with pytest.raises(InvalidInput):
            store.delete_doc(key)

    def test_list_prefix_traversal_is_refused(self, store: ArtifactStore) -> None:
        with pytest.raises(InvalidInput):
            store.list_docs("../")
        with pytest.raises(InvalidInput):
            store.list_docs("/abs")

    def test_ping(self, store: ArtifactStore) -> None:
        store.ping()
