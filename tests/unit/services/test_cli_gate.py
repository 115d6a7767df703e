"""``modelguard`` as a CI gate: documented exit codes, ``--fail-on`` on the verdicts,
``scan`` on its own, ``--json`` on every subcommand (one JSON document, nothing else on
stdout), the global options before or after the subcommand, help on every option."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.errors import Unavailable
from modelguard.proto.modelguard.v1 import common_pb2, pruning_orchestrator_pb2
from modelguard.services import cli
from modelguard.services.cli import (
    EXIT_CODES_HELP,
    ExitCode,
    build_parser,
    main,
    package_version,
    parse_fail_on,
)
from modelguard.signing import PublishedKey, Signer, signature_path
from tests.unit.shared.robustness.models import Quantised, three_class_data

torch.set_num_threads(1)
SPEC_ARGS = ["--input-shape", "1,6,6", "--value-range", "0,1"]
README = Path(__file__).resolve().parents[3] / "README.md"


def _script(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    return buffer.getvalue()


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """A tiny TorchScript classifier and clean data for it; a benign and a leaking model
    for the leak scan (uniform weights in [0, 1] are how smuggled pixels look); a pickle
    that calls os.system."""
    torch.manual_seed(0)
    classifier = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    generator = torch.Generator().manual_seed(1)
    data = Dataset(torch.rand(48, 1, 6, 6, generator=generator), torch.arange(48) % 3)
    benign = nn.Sequential(nn.Flatten(), nn.Linear(36, 64), nn.ReLU(), nn.Linear(64, 3))
    leaking = nn.Sequential(nn.Flatten(), nn.Linear(36, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        leaking[1].weight.copy_(torch.rand(64, 36, generator=generator))
    paths = {
        "model": tmp_path / "model.pt",
        "data": tmp_path / "clean.npz",
        "benign": tmp_path / "benign.pt",
        "leaking": tmp_path / "leaking.pt",
        "evil": tmp_path / "evil.pkl",
    }
    paths["model"].write_bytes(_script(classifier))
    paths["data"].write_bytes(dataset_to_npz(data))
    paths["benign"].write_bytes(_script(benign))
    paths["leaking"].write_bytes(_script(leaking))
    paths["evil"].write_bytes(pickle.dumps(os.system))
    return paths


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    """The one JSON document on stdout (json.loads refuses anything around it)."""
    return json.loads(capsys.readouterr().out)


# --- exit codes --------------------------------------------------------------------------------
def test_exit_codes_are_documented_in_the_help_and_the_readme(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    readme = README.read_text()
    for code in ExitCode:
        assert f"{code.value} " in EXIT_CODES_HELP
        assert f"`{code.value}`" in readme
    assert " ".join(EXIT_CODES_HELP.split()) in text
    with pytest.raises(SystemExit) as done:
        main(["detect", "--no-such-option"])
    assert done.value.code == ExitCode.BAD_INPUT  # argparse's usage error


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"modelguard {package_version()}"
    assert package_version()[0].isdigit()


def test_fail_on_takes_verdicts_comma_separated() -> None:
    from modelguard.detection.neural_cleanse import INCONCLUSIVE, INFECTED
    from modelguard.leak.detector import LEAK

    assert cli.FAIL_ON_VERDICTS == (INFECTED, LEAK, INCONCLUSIVE)
    assert parse_fail_on("infected") == {"infected"}
    assert parse_fail_on("leak, inconclusive") == {"leak", "inconclusive"}
    assert parse_fail_on("any") == {"infected", "leak", "inconclusive"}
    for bad in ("", "clean", "infected,benign"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_fail_on(bad)
    with pytest.raises(SystemExit) as done:
        main(["leakscan", "m.pt", "--fail-on", "clean"])
    assert done.value.code == ExitCode.BAD_INPUT


# --- scan ----------------------------------------------------------------------------------------
def test_scan_exits_1_on_findings_2_on_unreadable_files_0_when_all_are_safe(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["scan", str(files["model"]), str(files["data"].parent / "benign.pt")]) == 0
    assert "2 file(s) scanned: 2 safe, 0 unsafe, 0 unreadable" in capsys.readouterr().out
    assert main(["scan", str(tmp_path), "--json"]) == ExitCode.FINDINGS
    document = _json(capsys)
    assert document["summary"] == {"scanned": 4, "safe": 3, "unsafe": 1, "unreadable": 0}
    assert document["skipped"] == [str(files["data"])]  # an .npz is no model file
    (unsafe,) = [f for f in document["files"] if f["outcome"] == "unsafe"]
    assert unsafe["path"] == str(files["evil"]) and "system" in unsafe["reason"]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08")
    assert main(["scan", str(files["model"]), str(broken)]) == ExitCode.BAD_INPUT
    assert "unreadable" in capsys.readouterr().out


def test_scan_writes_sarif_to_a_file_or_stdout(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.shared.formats.test_files import assert_valid_sarif

    sarif = tmp_path / "out" / "scan.sarif"
    sarif.parent.mkdir()
    assert main(["scan", str(files["evil"]), "--sarif", str(sarif), "--json"]) == 1
    assert _json(capsys)["summary"]["unsafe"] == 1  # and the log went to the file
    log = json.loads(sarif.read_text())
    assert_valid_sarif(log)
    assert log["runs"][0]["tool"]["driver"]["version"] == package_version()
    assert [r["ruleId"] for r in log["runs"][0]["results"]] == ["MG001"]
    assert main(["scan", str(files["model"]), "--sarif", "-"]) == 0
    from_stdout = _json(capsys)
    assert_valid_sarif(from_stdout)
    assert from_stdout["runs"][0]["results"] == []
    assert main(["scan", str(files["model"]), "--sarif", "-", "--json"]) == ExitCode.BAD_INPUT
    assert "pick one" in capsys.readouterr().err


# --- --fail-on on the in-process verdicts --------------------------------------------------------
def test_leakscan_fails_on_a_leak_when_asked(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["leakscan", str(files["leaking"]), "--json"]) == ExitCode.OK
    assert _json(capsys)["verdict"] == "leak"
    for fail_on, expected in (("leak", 1), ("any", 1), ("infected,inconclusive", 0)):
        assert main(["leakscan", str(files["leaking"]), "--fail-on", fail_on]) == expected
    assert "leak verdict: leak" in capsys.readouterr().out
    assert main(["leakscan", str(files["benign"]), "--fail-on", "any", "--json"]) == 0
    assert _json(capsys)["verdict"] == "benign"


def test_robustness_fails_below_the_accuracy_asked_for(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    robustness = ["robustness", str(files["model"]), "--data", str(files["data"]), *SPEC_ARGS]
    robustness += ["--eps", "0.1,0.3", "--steps", "5", "--json"]
    assert main(robustness) == ExitCode.OK  # no gate asked for
    document = _json(capsys)
    assert document["clean_accuracy"] < 1  # the fixture's labels are arbitrary
    assert main([*robustness, "--fail-on-below", "1"]) == ExitCode.FINDINGS
    capsys.readouterr()
    assert main([*robustness, "--fail-on-below", "0"]) == (
        ExitCode.FINDINGS if document["masking"]["flagged"] else ExitCode.OK
    )
    capsys.readouterr()
    # a model that masks its gradients fails any gate: its figures certify nothing
    quantised = files["model"].parent / "quantised.pt"
    quantised.write_bytes(_script(Quantised()))
    data = files["model"].parent / "three.npz"
    data.write_bytes(dataset_to_npz(three_class_data(30)))
    masked = ["robustness", str(quantised), "--data", str(data), "--input-shape", "1,1,3"]
    masked += ["--value-range", "0,1", "--eps", "0.1", "--steps", "3"]
    assert main([*masked, "--fail-on-below", "0"]) == ExitCode.FINDINGS
    out = capsys.readouterr().out
    assert "robust accuracy" in out and "gradient masking suspected" in out
    for bad in (["--eps", "0,0.1"], ["--fail-on-below", "1.5"]):
        with pytest.raises(SystemExit) as done:
            main([*robustness, *bad])
        assert done.value.code == ExitCode.BAD_INPUT


def test_detect_fails_on_its_verdict_when_asked(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    detect = ["detect", str(files["model"]), "--data", str(files["data"]), *SPEC_ARGS]
    detect += ["--steps", "20", "--json"]
    code = main([*detect, "--fail-on", "any"])
    verdict = _json(capsys)["verdict"]
    assert code == (ExitCode.OK if verdict == "clean" else ExitCode.FINDINGS)
    assert main([*detect, "--fail-on", "leak"]) == ExitCode.OK  # not a detector's verdict
    assert _json(capsys)["verdict"] == verdict


# --- fake servers for the commands that call them ------------------------------------------------
def _stage(name: str, verdict: str) -> common_pb2.StageStatus:
    return common_pb2.StageStatus(
        stage=name,
        state=common_pb2.STAGE_STATE_DONE,
        progress=1.0,
        summary_json=json.dumps({"verdict": verdict}),
    )


def _audit(state: int = common_pb2.JOB_STATE_SUCCEEDED) -> pruning_orchestrator_pb2.Audit:
    return pruning_orchestrator_pb2.Audit(
        audit_id="a1",
        state=state,  # type: ignore[arg-type]
        stages=[_stage("trigger-reversal", "infected"), _stage("leak-detector", "benign")],
        report_json=common_pb2.ArtifactRef(sha256="r1", media_type="application/json"),
        report_html=common_pb2.ArtifactRef(sha256="r2", media_type="text/html"),
    )


class FakeAuditClient:
    def __init__(self, audit: pruning_orchestrator_pb2.Audit) -> None:
        self.audit = audit

    def submit(self, *args: Any, **kwargs: Any) -> pruning_orchestrator_pb2.Audit:
        return pruning_orchestrator_pb2.Audit(audit_id=self.audit.audit_id)

    def watch(self, audit_id: str) -> Iterator[pruning_orchestrator_pb2.Audit]:
        yield self.audit

    def get(self, audit_id: str) -> pruning_orchestrator_pb2.Audit:
        return self.audit

    def list(self, limit: int) -> list[pruning_orchestrator_pb2.Audit]:
        return [self.audit][:limit]

    def download(self, ref: common_pb2.ArtifactRef) -> bytes:
        return f"artifact {ref.sha256}".encode()

    def public_key(self) -> PublishedKey:
        return SIGNER.published()


@pytest.fixture()
def audit_server(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[argparse.Namespace]]:
    """Replace the orchestrator with a fake whose audit ends in ``state``; the namespaces
    the commands were called with are recorded."""
    calls: list[argparse.Namespace] = []

    def serve(state: int = common_pb2.JOB_STATE_SUCCEEDED) -> list[argparse.Namespace]:
        @contextmanager
        def fake_client(args: argparse.Namespace, **kwargs: Any) -> Iterator[FakeAuditClient]:
            calls.append(args)
            yield FakeAuditClient(_audit(state))

        monkeypatch.setattr(cli, "audit_client", fake_client)
        return calls

    serve()
    return serve


def test_audit_submit_wait_fails_on_the_stages_verdicts(
    files: dict[str, Path],
    audit_server: Callable[[int], list[argparse.Namespace]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    submit = ["audit", "submit", str(files["model"]), "--data", str(files["data"]), *SPEC_ARGS]
    submit += ["--target", "orchestrator:1"]
    assert main([*submit, "--wait", "--fail-on", "infected"]) == ExitCode.FINDINGS
    assert main([*submit, "--wait", "--fail-on", "any"]) == ExitCode.FINDINGS
    assert main([*submit, "--wait", "--fail-on", "leak"]) == ExitCode.OK
    assert main([*submit, "--wait"]) == ExitCode.OK
    capsys.readouterr()
    assert main([*submit, "--fail-on", "leak"]) == ExitCode.BAD_INPUT  # no verdict to gate on
    assert "add --wait" in capsys.readouterr().err
    audit_server(common_pb2.JOB_STATE_FAILED)
    assert main([*submit, "--wait", "--fail-on", "infected"]) == ExitCode.FAILED


def test_a_server_error_exits_3(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @contextmanager
    def unreachable(args: argparse.Namespace, **kwargs: Any) -> Iterator[None]:
        raise Unavailable("orchestrator:1 is unreachable")
        yield

    monkeypatch.setattr(cli, "audit_client", unreachable)
    assert main(["audit", "show", "a1", "--target", "orchestrator:1"]) == ExitCode.FAILED
    assert "unreachable" in capsys.readouterr().err


class FakeCarrierClient:
    def request(self, user: str, credential: str, options: Any) -> tuple[int, str]:
        return 2, "cred-2"

    def wait_ready(self, user: str, credential: str, on_wait: Any) -> Any:
        return _carrier_info(2)

    def download(self, user: str, credential: str, artifact: str) -> bytes:
        return json.dumps({"validation_accuracy": 0.97}).encode()

    def device(self, user: str, credential: str) -> str:
        return "device"

    def classify_when_loaded(self, device: str, x: torch.Tensor) -> Any:
        from modelguard.services.client import MapReply

        labels = np.arange(len(x)) % 10
        probabilities = np.full((len(x), 10), 0.1, dtype=np.float32)
        return MapReply(labels=labels, probabilities=probabilities, generation=2)

    def revoke(self, user: str, credential: str, reason: str) -> Any:
        return _carrier_info(2, common_pb2.JOB_STATE_FAILED)

    def info(self, user: str, credential: str) -> Any:
        return _carrier_info(2)


def _carrier_info(generation: int, state: int = common_pb2.JOB_STATE_SUCCEEDED) -> Any:
    from modelguard.proto.modelguard.v1 import carrier_trainer_pb2

    return carrier_trainer_pb2.CarrierInfo(user_id="ann", generation=generation, state=state)  # type: ignore[arg-type]


# --- --json on every subcommand ------------------------------------------------------------------
def _leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[str]:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return {" ".join(prefix)}
    return {
        leaf
        for name, sub in subparsers[0].choices.items()
        for leaf in _leaf_commands(sub, (*prefix, name))
    }


JsonCheck = Callable[[dict[str, Path], Path, pytest.MonkeyPatch], tuple[list[str], Any]]


def _serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelguard import grpc_server
    from modelguard.services import launcher

    app = SimpleNamespace(address="127.0.0.1:50051", grpc=SimpleNamespace(metrics_port=9100))
    stack = SimpleNamespace(apps={"pruning-orchestrator": app}, stop=lambda: None)
    monkeypatch.setattr(launcher, "start_stack", lambda *args, **kwargs: stack)
    monkeypatch.setattr(launcher, "configure_logging", lambda platform, service: None)
    monkeypatch.setattr(grpc_server, "wait_for_termination", lambda stop: stop())


@pytest.fixture()
def carrier_server(monkeypatch: pytest.MonkeyPatch) -> None:
    @contextmanager
    def fake_client(args: argparse.Namespace) -> Iterator[FakeCarrierClient]:
        yield FakeCarrierClient()

    monkeypatch.setattr(cli, "carrier_client", fake_client)


def _image(tmp_path: Path) -> str:
    from PIL import Image

    path = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(path)
    return str(path)


def _commands(files: dict[str, Path], tmp_path: Path) -> dict[str, list[str]]:
    """One invocation of every subcommand, with --json."""
    model, data = str(files["model"]), str(files["data"])
    carrier = ["--trainer", "t:1", "--mapper", "m:1"]
    return {
        "audit submit": ["audit", "submit", model, "--data", data, *SPEC_ARGS, "--wait"],
        "audit show": ["audit", "show", "a1"],
        "audit report": ["audit", "report", "a1", "--out", str(tmp_path / "report")],
        "audit list": ["audit", "list"],
        "scan": ["scan", str(files["benign"])],
        "detect": ["detect", model, "--data", data, *SPEC_ARGS, "--steps", "20"],
        "repair": [
            "repair",
            model,
            "--data",
            data,
            *SPEC_ARGS,
            "--target",
            "0",
            "--out",
            str(tmp_path / "repaired.pt"),
        ],
        "leakscan": ["leakscan", str(files["benign"])],
        "robustness": [
            "robustness",
            model,
            "--data",
            data,
            *SPEC_ARGS,
            "--eps",
            "0.05,0.1",
            "--steps",
            "3",
        ],
        "carrier enroll": ["carrier", "enroll", "--user", "ann", "--wait", *carrier],
        "carrier rotate": ["carrier", "rotate", "--user", "ann", "--credential", "c", *carrier],
        "carrier classify": [
            "carrier",
            "classify",
            _image(tmp_path),
            "--user",
            "ann",
            "--credential",
            "c",
        ],
        "carrier status": ["carrier", "status", "--user", "ann", "--credential", "c"],
        "carrier revoke": ["carrier", "revoke", "--user", "ann", "--reason", "left"],
        "token create": ["token", "create", "--tenant", "acme"],
        "keys rewrap": ["keys", "rewrap"],
        "serve": ["serve", "all"],
        "public-key": ["public-key"],
        "verify": ["verify", str(_signed(tmp_path)), "--public-key", str(_public_key(tmp_path))],
    }


SIGNER = Signer.generate()


def _signed(tmp_path: Path) -> Path:
    path = tmp_path / "report.json"
    path.write_bytes(b'{"verdict": "infected"}')
    signature = SIGNER.sign(hashlib.sha256(path.read_bytes()).hexdigest(), "report")
    signature_path(path).write_text(signature + "\n")
    return path


def _public_key(tmp_path: Path) -> Path:
    path = tmp_path / "public.pem"
    path.write_text(SIGNER.public_key_pem)
    return path


def _check(command: str, document: Any, tmp_path: Path) -> None:
    """What each command's JSON document holds."""
    if command in ("audit submit", "audit show"):
        assert document["audit_id"] == "a1" and document["state"] == "JOB_STATE_SUCCEEDED"
        assert document["stages"][0]["summary"] == {"verdict": "infected"}
    elif command == "audit list":
        assert [audit["audit_id"] for audit in document] == ["a1"]
    elif command == "audit report":
        assert document["files"] == [
            str(tmp_path / "report" / n) for n in ("report.json", "report.html")
        ]
    elif command == "scan":
        assert document["summary"]["safe"] == 1
    elif command == "detect":
        assert document["verdict"] in ("clean", "infected", "inconclusive")
    elif command == "repair":
        assert document["target_labels"] == [0] and "before" in document
    elif command == "leakscan":
        assert document["verdict"] == "benign"
    elif command == "robustness":
        assert [p["eps"] for p in document["points"]] == [0.05, 0.1]
        assert document["images"] == 48 and "flagged" in document["masking"]
    elif command in ("carrier enroll", "carrier rotate"):
        assert document["credential"] == "cred-2" and document["generation"] == 2
        ready = {"generation": 2, "validation_accuracy": 0.97}
        assert document["ready"] == (ready if command == "carrier enroll" else None)
    elif command == "carrier classify":
        assert document["labels"] == [0] and document["generation"] == 2
    elif command in ("carrier status", "carrier revoke"):
        assert document["user"] == "ann" and document["generation"] == 2
    elif command == "token create":
        assert document["tenant"] == "acme" and document["token"].startswith("mg1.")
        assert document["tokens_file_line"].startswith("acme tenant ")
    elif command == "public-key":
        assert document["key_id"] == SIGNER.key_id and "PUBLIC KEY" in document["pem"]
        assert document["development"] is False
    elif command == "verify":
        assert document["valid"] is True and document["kind"] == "report"
        assert document["key_id"] == SIGNER.key_id
    elif command == "keys rewrap":
        assert document["total"] == document["current"] == 1 and document["failed"] == {}
    elif command == "serve":
        assert document == {
            "pruning-orchestrator": {"grpc": "127.0.0.1:50051", "metrics_port": 9100}
        }
    else:
        raise AssertionError(f"no check for {command}")


def _encrypted_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For `keys rewrap`: an encrypted local store holding one object."""
    from modelguard.store.encryption import EnvelopeCipher, Keyring
    from modelguard.store.local import LocalStore
    from tests.unit.shared.store.keyrings import new_key, write_keyring

    keyring = write_keyring(tmp_path / "keyring.json", {"platform": ("p1", {"p1": new_key()})})
    LocalStore(tmp_path / "store", EnvelopeCipher(Keyring.load(keyring))).put_blob(b"model")
    monkeypatch.setenv("MODELGUARD_STORE", "local")
    monkeypatch.setenv("MODELGUARD_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("MODELGUARD_ENCRYPT_ARTIFACTS", "true")
    monkeypatch.setenv("MODELGUARD_ENCRYPTION_KEYRING_FILE", str(keyring))


def test_every_subcommand_prints_one_json_document_and_exits_0(
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    audit_server: Callable[[int], list[argparse.Namespace]],
    carrier_server: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _serve(monkeypatch)
    monkeypatch.setenv("MODELGUARD_CLI_TARGET", "orchestrator:1")
    _encrypted_store(tmp_path, monkeypatch)
    commands = _commands(files, tmp_path)
    assert set(commands) == _leaf_commands(build_parser())  # no subcommand left out
    for name, argv in commands.items():
        for position in ("after", "before"):  # --json is global, accepted on either side
            full = [*argv, "--json"] if position == "after" else ["--json", *argv]
            assert main(full) == ExitCode.OK, name
            out = capsys.readouterr().out
            _check(name, json.loads(out), tmp_path)
            if name in ("detect", "repair"):
                break  # the slowest: once is enough


# --- global options ------------------------------------------------------------------------------
GLOBALS = ["--token", "tok", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"]


def test_global_options_are_accepted_after_the_subcommand_too() -> None:
    parser = build_parser()
    expected = {"token": "tok", "tls_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "k.pem"}
    for command in (["audit", "show", "a1"], ["audit", "list"], ["carrier", "status"]):
        tail = ["--user", "u", "--credential", "c"] if command[0] == "carrier" else []
        target = ["--target", "o:1"] if command[0] == "audit" else []
        before = parser.parse_args([*GLOBALS, *target, "-v", *command, *tail])
        after = parser.parse_args([*command, *tail, *GLOBALS, *target, "-v"])
        for args in (before, after):
            assert {key: getattr(args, key) for key in expected} == expected
            assert args.verbose is True
            assert args.target == ("o:1" if target else None)
    # nothing given: the defaults, not a subcommand's reset
    plain = parser.parse_args(["audit", "list"])
    assert (plain.token, plain.tls_ca, plain.target, plain.json, plain.verbose) == (
        None,
        None,
        None,
        False,
        False,
    )
    # repair's --target names labels, and never takes the orchestrator's place
    repair = parser.parse_args(
        [
            "--target",
            "o:1",
            "repair",
            "m.pt",
            "--data",
            "d",
            *SPEC_ARGS,
            "--out",
            "r",
            "--target",
            "3",
        ]
    )
    assert (repair.target, repair.target_labels) == ("o:1", "3")


def test_the_global_options_reach_the_client(
    audit_server: Callable[[int], list[argparse.Namespace]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = audit_server(common_pb2.JOB_STATE_SUCCEEDED)
    assert main(["audit", "show", "a1", *GLOBALS, "--target", "o:1"]) == 0
    assert main([*GLOBALS, "--target", "o:1", "audit", "show", "a1"]) == 0
    for args in calls:
        credentials = cli.client_credentials(args)
        assert credentials["token"] == "tok"
        assert (args.target, args.tls_ca) == ("o:1", "ca.pem")


def _options(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_has_help() -> None:
    missing = [
        f"{path}: {action.option_strings or action.dest}"
        for path, action in _options(build_parser(), "modelguard")
        if not action.help
    ]
    assert missing == []
