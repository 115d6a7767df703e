"""Fuzz tests of every gRPC method and of the model and dataset parsers.

Shared here: the example budget (``MODELGUARD_FUZZ_EXAMPLES`` overrides every target's
default, ``MODELGUARD_FUZZ_SEED`` picks another reproducible run), the per-target case
accounting printed in pytest's terminal summary, and `IsolatedRunner`, which runs a parser
on hostile bytes in a spawned child process so that a crash (segfault) or a hang of a
native parser is observed and reported instead of taking the test session down.

Failures are collected, not raised at the first one: a fuzz test reports every distinct
failure it met (grouped by signature, with the smallest input that triggered it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

EXAMPLES_ENV = "MODELGUARD_FUZZ_EXAMPLES"
SEED_ENV = "MODELGUARD_FUZZ_SEED"
REPO_ROOT = Path(__file__).resolve().parents[3]


def examples(default: int) -> int:
    """The example budget of one target: ``MODELGUARD_FUZZ_EXAMPLES`` or ``default``."""
    value = os.environ.get(EXAMPLES_ENV, "").strip()
    return int(value) if value else default


def fuzz_seed() -> int:
    return int(os.environ.get(SEED_ENV, "0").strip() or 0)


def fuzz_settings(default_examples: int) -> settings:
    """Bounded, reproducible (seeded), no example database (failing inputs are reported), no
    shrinking (failures are collected with the smallest input seen instead)."""
    return settings(
        max_examples=examples(default_examples),
        deadline=None,  # per-call deadlines are enforced by the harness (hangs are findings)
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=True,
    )


# --------------------------------------------------------------------------------------
# Case accounting
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Finding:
    signature: str
    count: int
    example: str  # the smallest input that triggered it, described
    size: int
    detail: str = ""  # traceback or server log line


@dataclasses.dataclass
class Tally:
    """Cases run and distinct failures of one fuzz target."""

    target: str
    cases: int = 0
    slowest: float = 0.0
    findings: dict[str, Finding] = dataclasses.field(default_factory=dict)
    #: how the cases ended (status code or parser outcome): how deep the fuzzing got
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)

    def case(self, seconds: float = 0.0, outcome: str = "") -> None:
        self.cases += 1
        self.slowest = max(self.slowest, seconds)
        if outcome:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def fail(self, signature: str, example: str, size: int, detail: str = "") -> None:
        found = self.findings.get(signature)
        if found is None:
            self.findings[signature] = Finding(signature, 1, example, size, detail)
            return
        found.count += 1
        if size < found.size:
            found.example, found.size = example, size
            found.detail = detail or found.detail

    def report(self) -> str:
        lines = [f"{self.target}: {len(self.findings)} distinct failure(s) in {self.cases} cases"]
        for finding in self.findings.values():
            lines.append(f"- [{finding.count}x] {finding.signature}")
            lines.append(f"    smallest input: {finding.example}")
            if finding.detail:
                lines.extend("    " + line for line in finding.detail.strip().splitlines()[-12:])
        return "\n".join(lines)

    def check(self) -> None:
        if self.findings:
            pytest.fail(self.report(), pytrace=False)


TALLIES: dict[str, Tally] = {}


def tally(target: str) -> Tally:
    """A fresh tally for ``target`` (a re-run of the same test replaces the old one)."""
    TALLIES[target] = Tally(target)
    return TALLIES[target]


class _Summary:
    """Writes the cases run per target at the end of the session (shown without -s)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not TALLIES:
            return
        terminalreporter.write_sep("-", "fuzz cases per target")
        total = failures = 0
        for name in sorted(TALLIES):
            item = TALLIES[name]
            total += item.cases
            failures += len(item.findings)
            outcomes = ", ".join(
                f"{k} {v}" for k, v in sorted(item.outcomes.items(), key=lambda kv: -kv[1])
            )
            terminalreporter.write_line(
                f"{name:<46} {item.cases:>5} cases {len(item.findings):>2} failure(s) "
                f"slowest {item.slowest:5.2f}s  [{outcomes}]"
            )
        terminalreporter.write_line(
            f"{'TOTAL':<46} {total:>5} cases {failures:>2} distinct failure(s)"
        )


def register_summary(config: pytest.Config) -> None:
    name = "modelguard-fuzz-summary"
    if not config.pluginmanager.has_plugin(name):
        config.pluginmanager.register(_Summary(), name)


def normalise(text: str, limit: int = 160) -> str:
    """A message with numbers and hex ids blanked, so that one bug is one signature."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = re.sub(r"0x[0-9a-fA-F]+|\b[0-9a-f]{8,}\b", "#", first)
    first = re.sub(r"\d+", "#", first)
    return first[:limit]


def project_frame(tb: Any) -> str:
    """``path:line in function`` of the innermost traceback frame inside the project (not
    in the venv, not in the tests), falling back to the innermost frame."""
    frames = traceback.extract_tb(tb)
    for frame in reversed(frames):
        path = Path(frame.filename)
        try:
            rel = path.resolve().relative_to(REPO_ROOT)
        except ValueError:
            continue
        if rel.parts[0] in ("services", "shared"):
            return f"{rel}:{frame.lineno} in {frame.name}"
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}"
    return "?"


# --------------------------------------------------------------------------------------
# Parsers in a child process: crash and hang detection, bounded memory
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # ok | allowed | error | crash | hang
    seconds: float = 0.0
    exc_type: str = ""
    message: str = ""
    location: str = ""
    trace: str = ""


def _targets() -> dict[str, Callable[..., Any]]:
    """The parsers under test, by name (resolved in the child)."""
    from modelguard.carrier.carrier import carrier_from_safetensors
    from modelguard.carrier.mapper_registry import parse_mapper
    from modelguard.datasets import load_npz
    from modelguard.detection.triggers import load_triggers
    from modelguard.formats.loader import load_model
    from modelguard.formats.scan import scan_model_bytes
    from modelguard.spec import InputSpec

    def spec(raw: dict[str, Any]) -> InputSpec:
        return InputSpec(
            shape=tuple(raw.get("shape", (1, 28, 28))),  # type: ignore[arg-type]
            value_range=tuple(raw.get("value_range", (0.0, 1.0))),  # type: ignore[arg-type]
            mean=tuple(raw.get("mean", ())),
            std=tuple(raw.get("std", ())),
        )

    return {
        "load_model": lambda data, spec_=None, arch="": load_model(data, spec(spec_ or {}), arch),
        "scan_model_bytes": lambda data: scan_model_bytes(data),
        "load_npz": lambda data, spec_=None, num_classes=None: load_npz(
            data, spec(spec_ or {}), num_classes
        ),
        "carrier_from_safetensors": lambda data: carrier_from_safetensors(data),
        "parse_mapper": lambda data: parse_mapper(data),
        "load_triggers": lambda data, labels=None: load_triggers(data, labels),
    }


def _worker_main(conn: Connection, memory_headroom: int) -> None:
    """Child process: run parser calls until told to stop. Address space is capped at
    what the imports use plus ``memory_headroom`` so a memory bomb fails fast here
    (and shows as the parser's exception) instead of exhausting the machine."""
    import resource
    import warnings

    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    from modelguard.errors import InvalidInput

    targets = _targets()
    vm = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                vm = int(line.split()[1]) * 1024
    if vm and memory_headroom > 0:
        limit = vm + memory_headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        name, data, kwargs = request
        started = time.perf_counter()
        try:
            targets[name](data, **kwargs)
            outcome = Outcome("ok", time.perf_counter() - started)
        except InvalidInput as err:
            outcome = Outcome(
                "allowed", time.perf_counter() - started, type(err).__name__, str(err)[:300]
            )
        except BaseException as err:
            outcome = Outcome(
                "error",
                time.perf_counter() - started,
                f"{type(err).__module__}.{type(err).__qualname__}",
                str(err)[:300],
                project_frame(err.__traceback__),
                "".join(traceback.format_exception(err))[-3000:],
            )
        del data
        conn.send(outcome)


class IsolatedRunner:
    """Runs ``_targets()[name](data, **kwargs)`` in a spawned child; restarts the child
    after a crash or a hang (a call that outlives ``timeout`` is killed)."""

    def __init__(self, timeout: float = 20.0, memory_headroom: int = 2 << 30) -> None:
        self.timeout = timeout
        self.memory_headroom = memory_headroom
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main, args=(child, self.memory_headroom), daemon=True
        )
        process.start()
        child.close()
        if not parent.poll(120):
            process.kill()
            raise RuntimeError("fuzz worker did not start within 120 s")
        assert parent.recv() == "ready"
        self._process, self._conn = process, parent

    def run(self, name: str, data: bytes, **kwargs: Any) -> Outcome:
        if self._process is None or not self._process.is_alive():
            self._start()
        assert self._conn is not None
        started = time.perf_counter()
        try:
            self._conn.send((name, bytes(data), kwargs))
            if self._conn.poll(self.timeout):
                outcome: Outcome = self._conn.recv()
                return outcome
        except (EOFError, BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.perf_counter() - started
        self._process.join(0.5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
            self._process = None
            return Outcome("hang", elapsed, message=f"no answer within {self.timeout:.0f} s")
        code = self._process.exitcode
        self._process = None
        return Outcome("crash", elapsed, message=f"worker died with exit code {code}")

    def close(self) -> None:
        if self._process is not None and self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
        self._process = None


# --------------------------------------------------------------------------------------
# Valid seed artifacts (mutated by the parser fuzz, stored for the gRPC fuzz)
# --------------------------------------------------------------------------------------

#: Where a hostile seed pickle would create a directory if anything ever unpickled it.
MARKER_PATH = Path(tempfile.gettempdir()) / f"modelguard-fuzz-executed-{os.getpid()}"


class Blob(bytes):
    """Bytes with a short repr (hypothesis describes strategies built from them)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@dataclasses.dataclass(frozen=True)
class Seeds:
    safetensors: bytes  # lenet5 weights
    torchscript: bytes  # torch.jit.script(lenet5) saved to bytes
    torch_zip: bytes  # torch.save(lenet5.state_dict())
    torch_export: bytes  # torch.export.save(torch.export.export(lenet5)), dynamic batch
    onnx: bytes  # torch.onnx.export(lenet5) (the dynamo exporter), fixed batch
    npz: bytes  # 3 MNIST-shaped samples, np.savez
    npz_compressed: bytes  # same, np.savez_compressed
    carrier: bytes  # carrier_to_safetensors
    mapper: bytes  # mapper safetensors 10 -> 16 -> 10
    triggers: bytes  # save_triggers, 10 labels, (1, 28, 28)
    pickles: tuple[bytes, ...]  # raw pickle streams, harmless and hostile


class _MkdirPayload:
    """Pickles to ``os.mkdir(path)``: if any parser ever unpickles it, ``path`` appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


_SEEDS: Seeds | None = None


def seeds() -> Seeds:
    """Built once per process, deterministically (``torch.manual_seed(0)``)."""
    global _SEEDS
    if _SEEDS is not None:
        return _SEEDS
    import collections
    import io
    import pickle
    import types
    import warnings

    import numpy as np
    import torch
    from safetensors.numpy import save as numpy_save

    from modelguard.carrier.carrier import Placement, carrier_to_safetensors
    from modelguard.detection.triggers import save_triggers
    from modelguard.formats.loader import weights_to_safetensors
    from modelguard.nn.architectures import build

    torch.manual_seed(0)
    model = build("lenet5").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = io.BytesIO()
        torch.jit.save(torch.jit.script(model), scripted)
    state = io.BytesIO()
    torch.save(model.state_dict(), state)
    example = (torch.zeros(2, 1, 28, 28),)
    exported = io.BytesIO()
    batch = ({0: torch.export.Dim("batch", min=1, max=64)},)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=batch), exported)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(model, example, dynamo=True, verbose=False)
    assert onnx_program is not None
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 28, 28), dtype=np.float32)
    y = np.array([0, 1, 2], dtype=np.int64)
    plain, compressed = io.BytesIO(), io.BytesIO()
    np.savez(plain, x=x, y=y)
    np.savez_compressed(compressed, x=x, y=y)
    public = types.SimpleNamespace(name="lenet5-fashion", weights_sha256="ab" * 32)
    carrier = carrier_to_safetensors(
        torch.rand(1, 32, 32),
        Placement(2, 2, 28, 28),
        public,
        generation=1,  # type: ignore[arg-type]
    )
    mapper = numpy_save(
        {
            "fc1.weight": rng.standard_normal((16, 10), dtype=np.float32),
            "fc1.bias": np.zeros(16, dtype=np.float32),
            "fc2.weight": rng.standard_normal((10, 16), dtype=np.float32),
            "fc2.bias": np.zeros(10, dtype=np.float32),
        },
        metadata={"format": "modelguard-mapper-v1", "hidden": "16"},
    )
    triggers = save_triggers(torch.rand(10, 28, 28), torch.rand(10, 1, 28, 28))
    hostile = _MkdirPayload(str(MARKER_PATH))
    pickles = (
        pickle.dumps({"fc1.weight": [1.0, 2.0]}, protocol=0),
        pickle.dumps(collections.OrderedDict(a=1, b=(2, 3)), protocol=2),
        pickle.dumps([1, "x", b"y", 2.5, None, True], protocol=5),
        pickle.dumps(hostile, protocol=0),
        pickle.dumps(hostile, protocol=2),
        pickle.dumps({"state_dict": hostile}, protocol=4),
    )
    _SEEDS = Seeds(
        safetensors=Blob(weights_to_safetensors(model)),
        torchscript=Blob(scripted.getvalue()),
        torch_zip=Blob(state.getvalue()),
        torch_export=Blob(exported.getvalue()),
        onnx=Blob(onnx_program.model_proto.SerializeToString()),
        npz=Blob(plain.getvalue()),
        npz_compressed=Blob(compressed.getvalue()),
        carrier=Blob(carrier),
        mapper=Blob(mapper),
        triggers=Blob(triggers),
        pickles=tuple(Blob(p) for p in pickles),
    )
    return _SEEDS
