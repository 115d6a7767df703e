"""The published development signing key (issues 15 and 19): refused by a service that
listens beyond loopback, a warning on loopback (the embedded demo, the CLI, the tests)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelguard import runtime
from modelguard.config import LeakDetectorSettings, PlatformSettings
from modelguard.errors import InvalidInput
from modelguard.runtime import check_signing_key, is_loopback, load_signer
from modelguard.services.launcher import build_service
from modelguard.signing import DEVELOPMENT_KEY_ID, Signer

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def own_key(tmp_path: Path) -> Path:
    """An Ed25519 key of this deployment only, as a mounted Secret file."""
    path = tmp_path / "signing-key.pem"
    path.write_bytes(Signer.generate().private_key_pem())
    return path


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "modelguard.example"])
def test_hosts_others_can_reach(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "modelguard.example"])
def test_the_development_key_is_refused_beyond_loopback(host: str, tmp_path: Path) -> None:
    with pytest.raises(
        InvalidInput, match=r"development signing key: set MODELGUARD_SIGNING_KEY_FILE\b"
    ):
        check_signing_key(PlatformSettings(store_dir=tmp_path), host, "leak-detector")


def test_a_key_file_holding_the_development_key_is_refused_too(tmp_path: Path) -> None:
    copied = tmp_path / "signing-key.pem"
    copied.write_bytes(Signer.development().private_key_pem())
    platform = PlatformSettings(store_dir=tmp_path, signing_key_file=str(copied))
    with pytest.raises(InvalidInput, match="development signing key"):
        check_signing_key(platform, "0.0.0.0", "result-mapper")


def test_the_development_key_is_a_warning_once_on_loopback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "_warned_default_key", False)
    platform = PlatformSettings(store_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="modelguard.runtime"):
        for service in ("leak-detector", "result-mapper"):  # embedded mode: one process
            check_signing_key(platform, "127.0.0.1", service)
    warnings = [r for r in caplog.records if "published development key" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING]


def test_a_key_of_its_own_is_accepted_anywhere_without_a_warning(
    tmp_path: Path,
    own_key: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "_warned_default_key", False)
    platform = PlatformSettings(store_dir=tmp_path, signing_key_file=str(own_key))
    with caplog.at_level(logging.WARNING, logger="modelguard.runtime"):
        for host in ("0.0.0.0", "127.0.0.1"):
            check_signing_key(platform, host, "leak-detector")
    assert "signing key" not in caplog.text.lower()


def test_a_service_built_beyond_loopback_needs_its_own_key(tmp_path: Path, own_key: Path) -> None:
    settings = LeakDetectorSettings(host="0.0.0.0", grpc_port=0, metrics_port=-1)
    with pytest.raises(InvalidInput, match=r"leak-detector would listen on 0\.0\.0\.0"):
        build_service("leak-detector", PlatformSettings(store_dir=tmp_path), settings)
    platform = PlatformSettings(store_dir=tmp_path, signing_key_file=str(own_key))
    app = build_service("leak-detector", platform, settings)  # built, never started
    assert app.runtime.signer.key_id == Signer.from_file(own_key).key_id
    app.runtime.bus.close()


def test_the_signer_is_the_key_file_s_or_the_development_key(tmp_path: Path, own_key: Path) -> None:
    assert load_signer(PlatformSettings(store_dir=tmp_path)).key_id == DEVELOPMENT_KEY_ID
    mounted = load_signer(PlatformSettings(store_dir=tmp_path, signing_key_file=str(own_key)))
    assert mounted.key_id == Signer.from_file(own_key).key_id != DEVELOPMENT_KEY_ID


def test_an_unusable_key_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    missing = PlatformSettings(store_dir=tmp_path, signing_key_file=str(tmp_path / "none.pem"))
    with pytest.raises(InvalidInput, match=r"cannot read the signing key file .*none\.pem"):
        load_signer(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(InvalidInput, match=r"not an unencrypted PEM private key.*openssl genpkey"):
        load_signer(PlatformSettings(store_dir=tmp_path, signing_key_file=str(garbage)))


def test_a_service_process_refuses_to_start_with_the_development_key(tmp_path: Path) -> None:
    """What Kubernetes would run, misconfigured: the process exits, naming the setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELGUARD_")}
    env.update(
        MODELGUARD_STORE_DIR=str(tmp_path / "store"),
        MODELGUARD_LEAK_DETECTOR_HOST="0.0.0.0",
        MODELGUARD_LEAK_DETECTOR_GRPC_PORT="0",
        MODELGUARD_LEAK_DETECTOR_METRICS_PORT="-1",
    )
    result = subprocess.run(
        [sys.executable, "-m", "modelguard.services.leak_detector.main"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a process that started serving instead would be killed here
    )
    assert result.returncode != 0
    assert "MODELGUARD_SIGNING_KEY_FILE" in result.stderr
