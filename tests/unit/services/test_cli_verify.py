"""`modelguard verify FILE [--signature SIG] [--public-key KEY]` offline, with only the
public key (issue 19): exit 0 for a valid signature, 1 refused (a changed byte, another
key's signature, a malformed one), 2 for a missing file, signature or key; and `modelguard
public-key` for the embedded stack's key."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelguard.services.cli import main
from modelguard.signing import DEVELOPMENT_KEY_ID, Signer, signature_path

REPO = Path(__file__).resolve().parents[3]
MODEL = b"safetensors header and weights of a repaired model" * 40


@pytest.fixture(autouse=True)
def _no_cli_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MODELGUARD_"):
            monkeypatch.delenv(name)


@pytest.fixture()
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture()
def download(tmp_path: Path, signer: Signer) -> Path:
    """A repaired model as `modelguard audit report` leaves it: the file and FILE.sig."""
    path = tmp_path / "repaired-model.safetensors"
    path.write_bytes(MODEL)
    signature = signer.sign(hashlib.sha256(MODEL).hexdigest(), "repaired-model")
    signature_path(path).write_text(signature + "\n")
    return path


@pytest.fixture()
def public_key(tmp_path: Path, signer: Signer) -> Path:
    path = tmp_path / "modelguard.pub.pem"
    path.write_text(signer.public_key_pem)
    return path


def test_a_valid_signature_exits_0_with_what_it_vouches_for(
    download: Path, public_key: Path, signer: Signer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(download), "--public-key", str(public_key)]) == 0
    out = capsys.readouterr().out
    assert f"valid: {download} is the repaired-model sha256" in out
    assert signer.key_id in out


def test_a_changed_byte_exits_1(
    download: Path, public_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = bytearray(MODEL)
    changed[-1] ^= 0x01
    download.write_bytes(bytes(changed))
    assert main(["verify", str(download), "--public-key", str(public_key)]) == 1
    assert "the file changed" in capsys.readouterr().err


def test_another_key_exits_1(
    download: Path, tmp_path: Path, signer: Signer, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pub.pem"
    other.write_text(Signer.generate().public_key_pem)
    assert main(["verify", str(download), "--public-key", str(other)]) == 1
    err = "".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert f"{download.name}:artifact" in err and f"madewithkey{signer.key_id}" in err


def test_a_malformed_signature_exits_1(
    download: Path, public_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbled = tmp_path / "garbled.sig"
    garbled.write_text(signature_path(download).read_text().replace('"ed25519"', '"hmac"'))
    args = ["verify", str(download), "--signature", str(garbled), "--public-key"]
    assert main([*args, str(public_key)]) == 1
    assert "malformed" in capsys.readouterr().err


def test_missing_inputs_exit_2_with_what_to_give(
    download: Path, public_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(download)]) == 2
    assert "--public-key" in capsys.readouterr().err
    unsigned = tmp_path / "report.json"
    unsigned.write_text("{}")
    assert main(["verify", str(unsigned), "--public-key", str(public_key)]) == 2
    assert "no signature" in capsys.readouterr().err
    missing = ["verify", str(tmp_path / "gone.bin"), "--public-key", str(public_key)]
    assert main(missing) == 2
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("hello")
    assert main(["verify", str(download), "--public-key", str(not_a_key)]) == 2
    assert "not a PEM key" in capsys.readouterr().err


def test_the_public_key_may_come_from_the_cli_setting(
    download: Path, public_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELGUARD_CLI_PUBLIC_KEY_FILE", str(public_key))
    assert main(["verify", str(download)]) == 0


def test_verify_runs_as_a_command_without_any_server(download: Path, public_key: Path) -> None:
    """The installed command, in a process of its own with no ModelGuard settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELGUARD_")}
    command = [sys.executable, "-m", "modelguard.services.cli", "verify", str(download)]
    valid = subprocess.run(
        [*command, "--public-key", str(public_key)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert valid.returncode == 0, valid.stderr
    assert "valid:" in valid.stdout
    download.write_bytes(MODEL + b"\0")
    refused = subprocess.run(
        [*command, "--public-key", str(public_key)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1
    assert "invalid signature" in refused.stderr


def test_public_key_of_the_embedded_stack(
    tmp_path: Path,
    signer: Signer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No --target: the public half of this machine's signing key, no server started."""
    assert main(["public-key"]) == 0
    printed = capsys.readouterr()
    assert printed.out == Signer.development().public_key_pem
    assert DEVELOPMENT_KEY_ID in printed.err and "development key" in printed.err
    key_file = tmp_path / "signing-key.pem"
    key_file.write_bytes(signer.private_key_pem())
    monkeypatch.setenv("MODELGUARD_SIGNING_KEY_FILE", str(key_file))
    out = tmp_path / "published.pem"
    assert main(["public-key", "--out", str(out)]) == 0
    assert out.read_text() == signer.public_key_pem
    assert "development key" not in capsys.readouterr().err
