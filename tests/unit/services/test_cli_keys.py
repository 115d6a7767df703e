"""`modelguard keys rewrap`: after a rotation, every data key moves to the active key."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelguard.services.cli import main
from modelguard.store.encryption import EnvelopeCipher, Keyring, unpack
from modelguard.store.local import LocalStore
from tests.unit.shared.store.keyrings import new_key, write_keyring


def test_keys_rewrap_after_a_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keyring_file = tmp_path / "keyring.json"
    p1, p2 = new_key(), new_key()
    write_keyring(keyring_file, {"platform": ("p1", {"p1": p1})})
    store = LocalStore(tmp_path / "store", EnvelopeCipher(Keyring.load(keyring_file)))
    ref = store.put_blob(b"model bytes")
    store.put_doc("audits/a.json", b"{}")
    write_keyring(keyring_file, {"platform": ("p2", {"p1": p1, "p2": p2})})
    monkeypatch.setenv("MODELGUARD_STORE", "local")
    monkeypatch.setenv("MODELGUARD_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("MODELGUARD_ENCRYPT_ARTIFACTS", "true")
    monkeypatch.setenv("MODELGUARD_ENCRYPTION_KEYRING_FILE", str(keyring_file))

    assert main(["keys", "rewrap"]) == 0

    assert "2 objects: 2 rewrapped, 0 already under the active key" in capsys.readouterr().out
    envelope, _ = unpack(ref.key, (tmp_path / "store" / ref.key).read_bytes())
    assert envelope is not None and envelope.kek_id == "p2"
    assert main(["keys", "rewrap"]) == 0
    assert "2 already under the active key" in capsys.readouterr().out


def test_keys_rewrap_reports_lost_keys_and_refuses_when_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keyring_file = tmp_path / "keyring.json"
    write_keyring(keyring_file, {"platform": ("p1", {"p1": new_key()})})
    store = LocalStore(tmp_path / "store", EnvelopeCipher(Keyring.load(keyring_file)))
    ref = store.put_blob(b"model bytes")
    write_keyring(keyring_file, {"platform": ("p2", {"p2": new_key()})})  # p1 dropped
    monkeypatch.setenv("MODELGUARD_STORE", "local")
    monkeypatch.setenv("MODELGUARD_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("MODELGUARD_ENCRYPTION_KEYRING_FILE", str(keyring_file))
    monkeypatch.setenv("MODELGUARD_ENCRYPT_ARTIFACTS", "false")
    assert main(["keys", "rewrap"]) == 2
    assert "encryption is off" in capsys.readouterr().err

    monkeypatch.setenv("MODELGUARD_ENCRYPT_ARTIFACTS", "true")
    assert main(["keys", "rewrap"]) == 3
    captured = capsys.readouterr()
    assert "1 failed" in captured.out
    assert ref.key in captured.err.replace("\n", "")
