"""Serving benchmark: the result-mapper against Seldon MLServer on the same per-user mappers.

``python -m bench.bench_serving`` (part of ``make bench``) benchmarks the state production
runs in: a pooled carrier goes to one user and carrier-trainer writes one mapper and one
query profile per carrier, so every user has a mapper and a profile of their own.

1. **Users.** ``--users`` users (default 1,000), ``bench-0 .. bench-{users-1}``, each
   with a ready carrier written into a local artifact store as carrier-trainer writes it
   (`seed_users`): the user's own mapper, the user's own query profile
   (``QueryProfile.fit`` on 1,000 of the user's legitimate pseudo-outputs, as many as
   carrier-trainer's validation set), both stored content-addressed and signed with the
   deployment's key, the per-generation credential stored hashed. The mappers are
   distinct and of the shape carrier-trainer deploys (``--mapper``, default its default
   public model, ``PUBLIC_MODEL`` setting; ``--hidden``, default its
   ``HIDDEN`` setting): the mapper `bench.bench_carrier` trained, when it has that shape
   (``.cache/carrier-bench/``), plus a seeded perturbation per user of 1% of each tensor's
   standard deviation (each user: other weights, another digest, an LRU entry of its
   own); otherwise seeded mappers of the deployed shape, said loudly (the work per call
   depends on the shape, not on the values). Each user's
   legitimate pseudo-outputs have a seeded mean and scale of their own; the profile is
   fitted on one draw of them and the requests are fresh draws of the same distribution
   (legitimate traffic for the extraction detector).
2. **Ours** is the production result-mapper process (``python -m
   modelguard.services.result_mapper.main``, what Kubernetes runs) with the settings the deployment
   sets (`deployed_settings`: ``deploy/k8s/base/config/result-mapper.env`` with the prod
   overlay's literals over it, the settings' defaults where neither sets one): bearer-token
   authentication, the per-user credential, the loaded-mapper LRU at its deployed byte
   bound, per-user rate limit and query budget, the extraction detector scoring every
   request against the user's own profile with auto-revocation on, query accounting,
   Prometheus metrics and /metrics. Only the per-user limits that the benchmark's own
   traffic would reach are raised (`benchmark_limits`: the demand per user at
   ``--rps-ceiling`` calls/s, far above what one core answers, spread over the users, in
   one server process's lifetime); each raised setting is printed and written to
   ``serving.json`` with its deployed value and why. When the users' mappers do not all
   fit the LRU bound, the round robin evicts and reloads from the store on every call,
   as production would: the bound, the mappers it holds and the bytes the server read
   from the store per request are reported.
3. **Theirs** is MLServer 1.7.1 in its multi-model serving: one model per user (a
   directory with the user's weights as ``.npz`` and a ``model-settings.json`` naming the
   numpy runtime `bench.mlserver_runtime`), all loaded at start-up; the time until every
   model is READY and the server's resident memory are reported. ``--mlserver-models N``
   serves N models instead (user i → model i mod N), for a machine that cannot load one
   per user; the output then says so.
4. **Load.** For every server configuration: the server pinned to core 0 (``taskset``),
   the load generator pinned to core 1; closed-loop gRPC unary calls on one channel at
   concurrency 1, 8 and 32 (``--seconds`` each after ``--warmup``), pre-serialised
   requests sent round robin over all users (``--requests-per-user`` distinct rows per
   user; ours: each with that user's id and credential; theirs: each to that user's
   model), every non-OK status counted as an error. Before the levels every request is
   sent once (every user's mapper and profile loaded, every model answering). The load
   generator is `bench/loadgen.cc` (C++, gRPC's generic stub; built on first use from
   Debian's libgrpc++-dev): the Python asyncio client costs several times a server's CPU
   per call and saturates its core below what the servers answer; ``--client python``
   uses it anyway.
5. **Rounds.** 4 is repeated for ``--rounds`` interleaved rounds (default 3: ours,
   theirs, ours, theirs, ...), so that a noisy spell of a shared host lands on every
   server rather than on one; each figure is the median per server and level over the
   rounds. The store and the model directories are built once and shared by all runs;
   every server process starts with fresh limits and detector state.
6. **Output.** A setup block (users, distinct mappers and profiles, LRU bound, settings
   raised), the table, the bars checked on the medians (≥ 2.5× MLServer's best
   configuration at concurrency 32; p99 ≤ 5 ms at concurrency 8; zero errors and zero
   extraction alarms in every round), each stated as met or NOT met, and
   ``bench/out/serving.json`` (setup, medians, and every round as measured).

MLServer runs from its own venv (``.cache/mlserver-venv``; it pins protobuf < 7): created
on first use with ``mlserver==1.7.1`` and ``uvloop==0.21.0`` unless ``--no-mlserver``.
``python -m bench.bench_serving loadgen ...`` is the load generator itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import results
from modelguard.config import CarrierTrainerSettings
from modelguard.datasets import REPO_ROOT

OUT_DIR = REPO_ROOT / "bench" / "out"
CARRIER_CACHE = REPO_ROOT / ".cache" / "carrier-bench"
MLSERVER_VENV = REPO_ROOT / ".cache" / "mlserver-venv"
#: uvloop 0.22.1 (newest < 0.23) breaks MLServer's parallel workers (asyncio.get_event_loop
#: raises in the worker process); 0.21.0 works.
MLSERVER_PACKAGES = ("mlserver==1.7.1", "uvloop==0.21.0")
CONCURRENCY = (1, 8, 32)
MAP_METHOD = "/modelguard.v1.ResultMapper/Map"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
BAR_RATIO, BAR_P99_MS = 2.5, 5.0


# ------------------------------------------------------------------------- load generator


def _group_cpu_seconds(pgid: int) -> float:
    """user + system CPU seconds of every live process in process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "comm": state ppid pgrp ...
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def percentile_ms(sorted_seconds: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted latencies in seconds, in ms."""
    count = len(sorted_seconds)
    return sorted_seconds[min(count - 1, int(q * count))] * 1e3 if count else float("nan")


async def _run_level(
    target: str,
    method: str,
    requests: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
    server_pgid: int = 0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        # raw bytes both ways: the load generator never (de)serialises
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        state = {"measuring": False, "stop": False}
        n_requests = len(requests)
        turn = [0]

        async def worker() -> None:
            while not state["stop"]:
                request = requests[turn[0] % n_requests]  # round robin over the users
                turn[0] += 1
                start = time.perf_counter()
                try:
                    await call(request, timeout=10, metadata=metadata or None)
                except grpc.aio.AioRpcError as err:
                    key = err.code().name
                    errors[key] = errors.get(key, 0) + 1
                    continue
                if state["measuring"]:
                    latencies.append(time.perf_counter() - start)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        errors.clear()
        server_cpu = _group_cpu_seconds(server_pgid) if server_pgid else 0.0
        client_cpu = time.process_time()
        state["measuring"] = True
        began = time.perf_counter()
        await asyncio.sleep(seconds)
        state["measuring"] = False
        elapsed = time.perf_counter() - began
        client_cpu = time.process_time() - client_cpu
        server_cpu = (_group_cpu_seconds(server_pgid) - server_cpu) if server_pgid else 0.0
        state["stop"] = True
        await asyncio.gather(*tasks)
    latencies.sort()
    count = len(latencies)

    def pct(q: float) -> float:
        return percentile_ms(latencies, q)

    return {
        "concurrency": concurrency,
        "requests": count,
        "rps": count / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1e3 if count else float("nan"),
        "errors": sum(errors.values()),
        "error_codes": errors,
        # CPU actually obtained on the shared machine: capacity per core despite neighbours
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "server_cpu_us_per_request": server_cpu / count * 1e6 if count and server_cpu else None,
        "rps_per_server_core": count / server_cpu if server_cpu else None,
    }


async def _wait_ready(
    target: str,
    method: str,
    requests: list[bytes],
    timeout: float,
    metadata: tuple[tuple[str, str], ...] = (),
    server_pgid: int = 0,
) -> tuple[bytes, float, float]:
    """Wait until the server answers the first request, then send every other one once
    (each must succeed: e.g. every user's mapper is loaded before the measurement).
    Returns the first answer and the server's resident memory (MB) right after it (one
    user loaded, every other user's state not yet) and after the last request (every
    user loaded, before any load level); 0 without ``server_pgid``."""
    import grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    async with grpc.aio.insecure_channel(target) as channel:
        ready: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        while time.monotonic() < deadline:
            try:  # any refusal while starting (MLServer: "model not ready yet")
                response: bytes = await ready(requests[0], timeout=2, metadata=metadata or None)
                rss_first_mb = group_rss_mb(server_pgid) if server_pgid else 0.0
                break
            except grpc.aio.AioRpcError as err:
                last = err
                await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"{target} not ready after {timeout:g} s: {last}")
        for request in requests[1:]:
            try:
                await ready(request, timeout=10, metadata=metadata or None)
            except grpc.aio.AioRpcError as err:
                raise RuntimeError(f"{target} refused a warm-up request: {err}") from err
    rss_every_mb = group_rss_mb(server_pgid) if server_pgid else 0.0
    return response, rss_first_mb, rss_every_mb


def write_requests(path: Path, requests: list[bytes]) -> None:
    """Requests for the load generator: each a 4-byte little-endian length, then bytes."""
    path.write_bytes(b"".join(len(r).to_bytes(4, "little") + r for r in requests))


def read_requests(path: Path) -> list[bytes]:
    data, requests, at = path.read_bytes(), [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "little")
        requests.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return requests


def loadgen_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.bench_serving loadgen")
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--request-file", type=Path, required=True, help="see write_requests")
    parser.add_argument("--metadata", nargs="*", default=[], help="KEY=VALUE sent with every call")
    parser.add_argument("--concurrency", type=int, nargs="*", default=list(CONCURRENCY))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--server-pgid", type=int, default=0)
    args = parser.parse_args(argv)
    requests = read_requests(args.request_file)
    metadata = tuple((key, value) for key, _, value in (m.partition("=") for m in args.metadata))

    async def run() -> None:
        began = time.perf_counter()
        first, rss_first_mb, rss_every_mb = await _wait_ready(
            args.target,
            args.method,
            requests,
            args.ready_timeout,
            metadata,
            args.server_pgid,
        )
        ready = {
            "ready": True,
            "rss_after_first_request_mb": rss_first_mb,
            "rss_after_every_user_mb": rss_every_mb,
            # until the first answer, then every request once (ours: every user warmed)
            "ready_seconds": time.perf_counter() - began,
            "response_bytes": len(first),
            "response_hex": first.hex(),
        }
        print(json.dumps(ready), flush=True)
        for concurrency in args.concurrency:
            result = await _run_level(
                args.target,
                args.method,
                requests,
                concurrency,
                args.seconds,
                args.warmup,
                args.server_pgid,
                metadata,
            )
            print(json.dumps(result), flush=True)

    asyncio.run(run())
    return 0


# ------------------------------------------------------------------------------ orchestration


# ------------------------------------------------------------------------------ orchestration


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(
        self, name: str, command: list[str], logdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["taskset", "-c", "0", *command],
            cwd=REPO_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


LOADGEN_SOURCE = Path(__file__).with_name("loadgen.cc")
LOADGEN_BINARY = REPO_ROOT / ".cache" / "loadgen" / "loadgen"
#: Debian's gRPC C++ development files (the C++ load generator's only dependency).
LOADGEN_PACKAGES = ("libgrpc++-dev", "pkgconf", "g++")


def ensure_cc_loadgen() -> Path | None:
    """The C++ load generator (`bench/loadgen.cc`), built on first use; None when it cannot
    be built (no root to install Debian's libgrpc++-dev, no compiler)."""
    stale = LOADGEN_BINARY.exists() and (
        LOADGEN_BINARY.stat().st_mtime < LOADGEN_SOURCE.stat().st_mtime
    )
    if LOADGEN_BINARY.exists() and not stale:
        return LOADGEN_BINARY

    def flags() -> list[str] | None:
        out = (
            subprocess.run(
                ["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True
            )
            if shutil.which("pkg-config")
            else None
        )
        return out.stdout.split() if out is not None and out.returncode == 0 else None

    if (flags() is None or shutil.which("g++") is None) and os.geteuid() == 0:
        print(f"installing {', '.join(LOADGEN_PACKAGES)} for the C++ load generator", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *LOADGEN_PACKAGES],
            check=False,
            capture_output=True,
            env=env,
        )
    cflags = flags()
    if cflags is None or shutil.which("g++") is None:
        return None
    LOADGEN_BINARY.parent.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(
        ["g++", "-O2", "-std=c++17", str(LOADGEN_SOURCE), *cflags, "-o", str(LOADGEN_BINARY)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        print(f"cannot build the C++ load generator:\n{built.stderr[-2000:]}", file=sys.stderr)
        return None
    return LOADGEN_BINARY


def _core_ticks() -> dict[str, list[int]]:
    """Per-core /proc/stat counters (user nice system idle iowait irq softirq steal)."""
    with open("/proc/stat") as handle:
        return {
            fields[0]: [int(v) for v in fields[1:9]]
            for fields in (line.split() for line in handle)
            if fields[0] in ("cpu0", "cpu1")
        }


def _steal_percent(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, float]:
    """Share of each core's time the hypervisor gave to other guests (a shared host's
    noise, which no pinning inside this machine avoids)."""
    shares = {}
    for core, old in before.items():
        delta = [b - a for a, b in zip(old, after[core], strict=True)]
        shares[core] = round(100 * delta[7] / max(1, sum(delta)), 1)
    return shares


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                if int(handle.read().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def _read_bytes(pgid: int) -> int:
    """Bytes the processes of group ``pgid`` read through read(2)-family calls (``rchar``;
    gRPC receives with recvmsg, which it does not count: in practice file reads)."""
    total = 0
    for pid in _group_pids(pgid):
        try:
            with open(f"/proc/{pid}/io") as handle:
                for line in handle:
                    if line.startswith("rchar:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process of group ``pgid`` (MLServer: its workers too), MB."""
    total = 0
    for pid in _group_pids(pgid):
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 1e6


def _run_loadgen(
    target: str,
    method: str,
    request_file: Path,
    seconds: float,
    warmup: float,
    server_pgid: int,
    metadata: tuple[str, ...] = (),
    cc_loadgen: Path | None = None,
    ready_timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """The ready line, then one result per concurrency level. The ready phase (every
    request once) always runs in the Python client; the levels run in ``cc_loadgen`` when
    given, else in the Python client. With the C++ client each level also records the
    bytes the server process read from files meanwhile (``server_read_bytes``: the
    artifact store, when the LRU reloads evicted mappers)."""
    command = [
        "taskset", "-c", "1", sys.executable, "-m", "bench.bench_serving", "loadgen",
        "--target", target, "--method", method, "--request-file", str(request_file),
        "--seconds", str(seconds), "--warmup", str(warmup), "--server-pgid", str(server_pgid),
        "--ready-timeout", str(ready_timeout),
    ]  # fmt: skip
    if metadata:
        command += ["--metadata", *metadata]
    if cc_loadgen is not None:
        command += ["--concurrency"]  # none: the ready phase only
    out = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise SystemExit(f"load generator failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if cc_loadgen is None:
        for line in lines[1:]:
            line["client"] = "python grpc.aio"
        return lines
    for concurrency in CONCURRENCY:
        command = [
            "taskset", "-c", "1", str(cc_loadgen), "--target", target, "--method", method,
            "--requests", str(request_file), "--concurrency", str(concurrency),
            "--seconds", str(seconds), "--warmup", str(warmup), "--server-pgid", str(server_pgid),
        ]  # fmt: skip
        for item in metadata:
            command += ["--metadata", item]
        ticks, read_before = _core_ticks(), _read_bytes(server_pgid)
        out = subprocess.run(command, check=False, capture_output=True, text=True)
        read_after = _read_bytes(server_pgid)
        if out.returncode != 0:
            raise SystemExit(f"C++ load generator failed ({out.returncode}):\n{out.stderr}")
        level = json.loads(out.stdout.strip().splitlines()[-1])
        count, server_cpu = level["requests"], level["server_cpu_s"]
        level["server_cpu_us_per_request"] = server_cpu / count * 1e6 if count else None
        level["rps_per_server_core"] = count / server_cpu if server_cpu else None
        level["steal_percent"] = _steal_percent(ticks, _core_ticks())
        # warm-up and measured calls alike (the counter cannot tell them apart)
        level["server_read_bytes"] = read_after - read_before
        lines.append(level)
    return lines


# ------------------------------------------------------------------------------ the users

#: Outputs of each public model (`modelguard.carrier.public_models`): the
#: input width of the seeded mappers served when bench_carrier's trained one is missing.
PUBLIC_MODEL_OUTPUTS = {
    "lenet5-fashion-conv": 410,
    "lenet5-fashion-features": 214,
    "lenet5-fashion": 10,
    "efficientnet-lite0": 1000,
}
#: Each user's mapper: the base mapper plus seeded noise of this fraction of each tensor's
#: standard deviation (distinct weights that still map like the trained mapper).
PERTURBATION = 0.01
#: Pseudo-outputs a user's query profile is fitted on: carrier-trainer fits it on the
#: carrier's validation inputs (``CarrierConfig.validation_samples``, 1,000).
PROFILE_SAMPLES = 1000


def _ensure_mlserver_venv() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if not mlserver.exists():
        print(f"creating {MLSERVER_VENV} ({', '.join(MLSERVER_PACKAGES)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *MLSERVER_PACKAGES], check=True)
    return MLSERVER_VENV


def base_mapper(public_model: str, hidden: int) -> tuple[dict[str, np.ndarray], str]:
    """The mapper every user's is derived from, as the serving format's tensors
    (``fc1.weight`` (hidden, in), ``fc1.bias``, ``fc2.weight`` (classes, hidden),
    ``fc2.bias``), and where it comes from."""
    trained = CARRIER_CACHE / f"mapper-{public_model}.safetensors"
    why = "is missing"
    if trained.exists():
        from safetensors.numpy import load

        tensors = load(trained.read_bytes())
        if set(tensors) != {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}:
            raise SystemExit(
                f"{trained}: the serving benchmark expects a mapper with a hidden layer"
            )
        if int(tensors["fc1.weight"].shape[0]) == hidden:
            source = f"{trained.relative_to(REPO_ROOT)} (trained by bench.bench_carrier)"
            arrays = {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}
            return arrays, source
        why = f"has hidden width {int(tensors['fc1.weight'].shape[0])}, not {hidden}"
    import torch

    from modelguard.carrier.carrier import MappingNetwork

    width = PUBLIC_MODEL_OUTPUTS.get(public_model)
    if width is None:
        raise SystemExit(
            f"unknown public model {public_model!r}: {', '.join(PUBLIC_MODEL_OUTPUTS)}"
        )
    # said loudly: the weights are not trained (the shape, and so the work per call, is)
    print(
        f"note: {trained.relative_to(REPO_ROOT)} {why}: serving seeded {width}→{hidden}→10 "
        "mappers, the deployed shape, instead",
        file=sys.stderr,
        flush=True,
    )
    torch.manual_seed(0)
    arrays = MappingNetwork(width, 10, hidden).arrays()
    return arrays, f"seeded {width}→{hidden}→10 (bench.bench_carrier's mapper {why})"


@dataclass
class BenchUsers:
    """What `seed_users` wrote, and what the load generators need."""

    names: list[str]
    credentials: list[str]
    #: (users, requests per user, inputs): each user's request rows
    rows: np.ndarray
    mapper_shape: str
    #: one mapper's safetensors bytes, and what the registry counts it as in its LRU
    mapper_file_bytes: int
    mapper_lru_bytes: int
    distinct_mappers: int
    distinct_profiles: int
    seconds: float


def seed_users(
    store_dir: Path,
    base: dict[str, np.ndarray],
    users: int,
    requests_per_user: int,
    mlserver_dir: Path | None,
    mlserver_models: int = 0,
) -> BenchUsers:
    """Ready carriers for ``bench-0 .. bench-{users-1}`` written as carrier-trainer writes
    them (`CarrierService.train`): the user's own mapper (``mapper_to_safetensors``) and
    own query profile (``QueryProfile.fit`` → ``to_dict`` → JSON) stored content-addressed,
    each signed with the deployment's key, the credential stored hashed, state READY.
    With ``mlserver_dir``, also an MLServer model directory (``model-settings.json``, the
    same weights as ``.npz``) for each of the first ``mlserver_models`` users.
    Deterministic but for the credentials (fresh per run, as they are per carrier)."""
    import torch

    from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
    from modelguard.carrier.mapper_registry import hash_credential, new_credential, parse_mapper
    from modelguard.carrier.query_profile import QueryProfile
    from modelguard.carrier.records import READY, CarrierRecord, CarrierRepository
    from modelguard.services.carrier_trainer.service import _jsonable, ref_dict
    from modelguard.signing import Signer
    from modelguard.store import make_store

    started = time.perf_counter()
    hidden, inputs = base["fc1.weight"].shape
    classes = base["fc2.weight"].shape[0]
    template = MappingNetwork(inputs, classes, hidden)  # identity input standardisation
    store = make_store("local", root=store_dir)
    # the benchmark's throw-away store is signed as carrier-trainer signs it, with the
    # development key the loopback server uses (it verifies every mapper and profile)
    signer = Signer.development()
    repository = CarrierRepository(store)
    if mlserver_dir is not None:
        mlserver_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(__file__).with_name("mlserver_runtime.py"), mlserver_dir)
    names, credentials = [], []
    rows = np.empty((users, requests_per_user, inputs), dtype=np.float32)
    mapper_digests, profile_digests = set(), set()
    file_bytes = lru_bytes = 0
    for i in range(users):
        user = f"bench-{i}"
        rng = np.random.default_rng((0, i))
        with torch.no_grad():
            for name, parameter in template.named_parameters():
                weights = base[name]
                noise = rng.standard_normal(weights.shape).astype(np.float32)
                scale = PERTURBATION * float(weights.std())
                parameter.copy_(torch.from_numpy(weights + scale * noise))
        mapper = mapper_to_safetensors(template)
        # the user's legitimate pseudo-outputs: a mean and a scale per unit of their own
        centre = rng.normal(0.0, 0.5, inputs)
        spread = rng.uniform(0.5, 1.5, inputs)
        draws = centre + spread * rng.standard_normal((PROFILE_SAMPLES + requests_per_user, inputs))
        draws = draws.astype(np.float32)
        profile = QueryProfile.fit(draws[:PROFILE_SAMPLES])
        rows[i] = draws[PROFILE_SAMPLES:]
        blobs = {
            "mapper": (mapper, "application/vnd.modelguard.mapper"),
            "profile": (
                json.dumps(profile.to_dict(), default=_jsonable).encode(),
                "application/json",
            ),
        }
        artifacts, signatures = {}, {}
        for name, (payload, media_type) in blobs.items():
            ref = store.put_blob(payload, media_type)
            artifacts[name] = ref_dict(ref)
            signatures[name] = signer.sign(ref.sha256, name)
        mapper_digests.add(artifacts["mapper"]["sha256"])
        profile_digests.add(artifacts["profile"]["sha256"])
        credential = new_credential()
        repository.put(
            CarrierRecord(
                user_id=user,
                generation=1,
                credential_hash=hash_credential(credential),
                state=READY,
                artifacts=artifacts,
                signatures=signatures,
            )
        )
        names.append(user)
        credentials.append(credential)
        parsed = parse_mapper(mapper)
        file_bytes, lru_bytes = len(mapper), parsed.nbytes
        if mlserver_dir is not None and i < mlserver_models:  # the same weights
            model_dir = mlserver_dir / user
            model_dir.mkdir(exist_ok=True)
            npz = model_dir / "mapper.npz"
            assert parsed.w1 is not None and parsed.b1 is not None  # a hidden layer
            np.savez(npz, w1=parsed.w1, b1=parsed.b1, w2=parsed.w2, b2=parsed.b2)
            settings = {
                "name": user,
                "implementation": "mlserver_runtime.NumpyMapper",
                "parameters": {"uri": str(npz)},
            }
            (model_dir / "model-settings.json").write_text(json.dumps(settings))
        if (i + 1) % 250 == 0:
            print(f"  {i + 1} users written ({time.perf_counter() - started:.0f} s)", flush=True)
    return BenchUsers(
        names=names,
        credentials=credentials,
        rows=rows,
        mapper_shape=f"{inputs}→{hidden}→{classes}",
        mapper_file_bytes=file_bytes,
        mapper_lru_bytes=lru_bytes,
        distinct_mappers=len(mapper_digests),
        distinct_profiles=len(profile_digests),
        seconds=time.perf_counter() - started,
    )


#: Thread counts of the BLAS libraries numpy may use.
_BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def seed_users_one_thread(
    store_dir: Path,
    base: dict[str, np.ndarray],
    users: int,
    requests_per_user: int,
    mlserver_dir: Path | None,
    mlserver_models: int = 0,
) -> BenchUsers:
    """`seed_users` in a child process whose BLAS runs one thread: on a busy 2-core host
    OpenBLAS's second thread made each profile's eigendecomposition many times slower. (Not set
    in this process: the servers it starts inherit its environment.)"""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = {name: os.environ.get(name) for name in _BLAS_THREADS}
    os.environ.update(dict.fromkeys(_BLAS_THREADS, "1"))
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            args = (store_dir, base, users, requests_per_user, mlserver_dir, mlserver_models)
            return pool.submit(seed_users, *args).result()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _round_robin(users: int, per_user: int) -> list[tuple[int, int]]:
    """(user, row) in sending order: every user once, then every user's next row, ..."""
    return [(user, row) for row in range(per_user) for user in range(users)]


def write_map_requests(path: Path, users: BenchUsers) -> int:
    """Ours: one pre-serialised MapRequest per (user, row), each with that user's id and
    credential, round robin over the users."""
    from modelguard.proto.modelguard.v1 import result_mapper_pb2

    order = _round_robin(len(users.names), users.rows.shape[1])
    write_requests(
        path,
        [
            result_mapper_pb2.MapRequest(
                user_id=users.names[user],
                credential=users.credentials[user],
                pseudo_output=users.rows[user, row].astype("<f4").tobytes(),
                rows=1,
            ).SerializeToString()
            for user, row in order
        ],
    )
    return len(order)


#: Run in MLServer's venv (its own generated code): (model name, row) pairs on stdin as
#: JSON → length-prefixed ModelInferRequests (`write_requests`' format) in argv[1].
_MLSERVER_REQUESTS = """
import json, sys
from mlserver.grpc import dataplane_pb2 as pb
with open(sys.argv[1], "wb") as out:
    for name, values in json.load(sys.stdin):
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="pseudo_output", datatype="FP32", shape=[1, len(values)],
            contents=pb.InferTensorContents(fp32_contents=values))
        data = pb.ModelInferRequest(model_name=name, inputs=[tensor]).SerializeToString()
        out.write(len(data).to_bytes(4, "little") + data)
"""


def write_infer_requests(path: Path, venv: Path, users: BenchUsers, models: int) -> int:
    """Theirs: the same rows in the same order, each to the user's model (user i → model
    ``bench-{i mod models}``; one per user unless ``models`` is smaller)."""
    order = _round_robin(len(users.names), users.rows.shape[1])
    pairs = [(users.names[user % models], users.rows[user, row].tolist()) for user, row in order]
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", _MLSERVER_REQUESTS, str(path)],
        input=json.dumps(pairs).encode(),
        check=True,
        cwd=path.parent,
    )
    return len(order)


# ----------------------------------------------------------------- deployed configuration

DEPLOY_K8S = REPO_ROOT / "deploy" / "k8s"
RESULT_MAPPER_ENV = DEPLOY_K8S / "base" / "config" / "result-mapper.env"
PROD_OVERLAY = DEPLOY_K8S / "overlays" / "prod" / "kustomization.yaml"
ENV_PREFIX = "MODELGUARD_RESULT_MAPPER_"
#: Per-process wiring the benchmark sets itself: loopback, free ports, a consumer group of
#: its own (the deployment's value of these says where a pod listens, not how it serves).
BENCH_WIRING = {"HOST", "GRPC_PORT", "METRICS_PORT", "GROUP"}


def deployed_settings() -> dict[str, dict[str, str]]:
    """``SETTING → {"value", "source"}`` for every ResultMapperSettings field: the prod
    overlay's literal if it sets one, else the base ConfigMap's
    (``deploy/k8s/base/config/result-mapper.env``), else the settings' default."""
    from modelguard.config import ResultMapperSettings

    settings: dict[str, dict[str, str]] = {}
    for name, field in ResultMapperSettings.model_fields.items():
        default = field.default
        text = str(default).lower() if isinstance(default, bool) else str(default)
        settings[name.upper()] = {"value": text, "source": "ResultMapperSettings default"}
    sources = (
        (RESULT_MAPPER_ENV, lambda line: line),
        (PROD_OVERLAY, lambda line: line.lstrip("- ").strip() if line.startswith("- ") else ""),
    )
    for path, literal in sources:
        for raw in path.read_text().splitlines():
            line = literal(raw.strip())
            if not line.startswith(ENV_PREFIX) or "=" not in line:
                continue
            key, _, value = line[len(ENV_PREFIX) :].partition("=")
            settings[key] = {"value": value.strip(), "source": str(path.relative_to(REPO_ROOT))}
    return settings


def benchmark_limits(
    deployed: dict[str, dict[str, str]],
    users: int,
    requests_per_user: int,
    server_seconds: float,
    rps_ceiling: float,
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The per-user limits a server process of the benchmark runs with: the deployed ones,
    except those the benchmark's own traffic would reach, raised (to twice the demand).

    Demand per user, at most: ``rps_ceiling / users`` calls a second (the round robin
    spreads the calls evenly) and, in one server process's lifetime (every process starts
    with fresh limits and detector state), the warm-up pass plus ``server_seconds`` at
    ``rps_ceiling``. A run lasts far less than the detector's window (an hour) and the
    budget's period (a day), so that is the demand within either. Returns
    (``SETTING → value`` to run with, one record per limit: deployed, demand, benchmark
    value, raised or not, and why)."""
    rate = rps_ceiling / users
    rows = math.ceil(rps_ceiling * server_seconds / users) + requests_per_user
    why_rate = (
        f"a closed-loop load generator at up to {rps_ceiling:,.0f} calls/s over {users} users "
        f"sends up to {rate:,.1f} calls/s per user"
    )
    why_rows = (
        f"one server process maps up to {rows:,} rows per user (warm-up pass + "
        f"{server_seconds:g} s at up to {rps_ceiling:,.0f} calls/s over {users} users)"
    )
    checks = (
        ("RATE_PER_SECOND", rate, why_rate, "rate limit (RESOURCE_EXHAUSTED)"),
        ("QUERY_BUDGET_ROWS", rows, why_rows, "query budget (RESOURCE_EXHAUSTED)"),
        ("MAX_ROWS_PER_WINDOW", rows, why_rows, "extraction detector, rate rule (revokes)"),
        ("MAX_ROWS_PER_GENERATION", rows, why_rows, "extraction detector, budget rule (revokes)"),
    )
    values: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for key, demand, why, what in checks:
        deployed_text = deployed[key]["value"]
        value = float(deployed_text)
        off = value <= 0  # 0: no such limit
        raise_it = not off and value < demand
        benchmark = math.ceil(2 * demand) if raise_it else value
        record = {
            "setting": ENV_PREFIX + key,
            "limit": what,
            "deployed": deployed_text,
            "demand_per_user": round(demand, 1),
            "benchmark": str(benchmark) if raise_it else deployed_text,
            "raised": raise_it,
            "why": (
                f"{why}: the deployed {deployed_text} would refuse or revoke the benchmark's "
                "own users; raised to twice that demand"
                if raise_it
                else f"{why}: no such limit deployed ({deployed_text})"
                if off
                else f"{why}: within the deployed {deployed_text}"
            ),
        }
        records.append(record)
        if raise_it:
            values[key] = str(benchmark)
    return values, records


def lru_behaviour(max_loaded_bytes: int, users: BenchUsers) -> dict[str, Any]:
    """What the deployed LRU bound does with these users' mappers under round robin."""
    holds = max_loaded_bytes // users.mapper_lru_bytes
    count = len(users.names)
    fits = count <= holds
    return {
        "max_loaded_bytes": max_loaded_bytes,
        "mapper_lru_bytes": users.mapper_lru_bytes,
        "mappers_held": holds,
        "users": count,
        "all_users_fit": fits,
        "expected": (
            f"all {count} users' mappers stay loaded after the warm-up pass: no misses"
            if fits
            else f"{count} users > {holds} mappers held: under round robin the LRU evicts "
            "each mapper before its user's next call, so every call misses and reloads "
            "the user's mapper from the store (read, signature check, parse), as production "
            "would"
        ),
    }


# -------------------------------------------------------------------------------- servers


def _metric_samples(port: int, name: str) -> dict[str, float]:
    """``labels → value`` of one metric family on a /metrics endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, value = line[len(name) :].rsplit(" ", 1)
            samples[labels.strip()] = float(value)
    return samples


@dataclass
class Bench:
    """Everything the runs share."""

    workdir: Path
    users: BenchUsers
    store_dir: Path
    map_requests: Path
    #: ResultMapperSettings environment of every run of ours (deployed + raised limits)
    ours_env: dict[str, str]
    mlserver_dir: Path | None
    infer_requests: Path | None
    mlserver_models: int
    seconds: float
    warmup: float
    cc_loadgen: Path | None
    ready_timeout: float
    mlserver_load_timeout: float


def _ours(bench: Bench, mode: str) -> dict[str, Any]:
    """The production result-mapper (``python -m modelguard.services.result_mapper.main``, the
    process Kubernetes runs) with the deployed settings and the benchmark's raised limits
    (`Bench.ours_env`) over the seeded store: bearer-token authentication, the per-user
    credential, the LRU at its deployed bound, per-user rate limits and query budget, the
    extraction detector scoring every request against the user's own profile and revoking
    on alarm, query accounting, Prometheus metrics and their /metrics endpoint. ``mode``
    is ``KEY=VALUE[,...]`` over those (e.g. ``grpc_workers=8``)."""
    from modelguard.auth import mint_token
    from modelguard.proto.modelguard.v1 import result_mapper_pb2

    label = mode or "as deployed"
    name = f"result-mapper-{(mode or 'deployed').replace('=', '').replace(',', '-')}"
    token, line = mint_token("bench")
    tokens_file = bench.workdir / "tokens"
    tokens_file.write_text(line + "\n")
    port, metrics_port = _free_port(), _free_port()
    env = {
        "MODELGUARD_BUS": "memory",
        "MODELGUARD_STORE": "local",
        "MODELGUARD_STORE_DIR": str(bench.store_dir),
        "MODELGUARD_SIGNING_KEY_FILE": "",  # the development key
        "MODELGUARD_AUTH_TOKENS_FILE": str(tokens_file),
        "MODELGUARD_TORCH_THREADS": "1",  # as deploy/k8s/base/config/platform.env
        "MODELGUARD_LOG_LEVEL": "WARNING",
        **bench.ours_env,
        ENV_PREFIX + "HOST": "127.0.0.1",
        ENV_PREFIX + "GRPC_PORT": str(port),
        ENV_PREFIX + "METRICS_PORT": str(metrics_port),
    }
    for setting in mode.split(","):
        key, _, value = setting.partition("=")
        if key:
            env[ENV_PREFIX + key.upper()] = value
    server = Server(
        name, [sys.executable, "-m", "modelguard.services.result_mapper.main"], bench.workdir, env
    )
    metrics: dict[str, dict[str, float]] = {}
    try:
        results = _run_loadgen(
            f"127.0.0.1:{port}",
            MAP_METHOD,
            bench.map_requests,
            bench.seconds,
            bench.warmup,
            server.process.pid,
            (f"authorization=Bearer {token}",),
            cc_loadgen=bench.cc_loadgen,
            ready_timeout=bench.ready_timeout,
        )
        rss_mb = group_rss_mb(server.process.pid)
        for family in ("grpc_requests_total", "extraction_alarms_total", "refusals_total"):
            metrics[family] = _metric_samples(metrics_port, f"modelguard_result_mapper_{family}")
    except SystemExit:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    ready, levels = results[0], results[1:]
    for level in levels:
        if "server_read_bytes" in level:
            # calls in the level, warm-up included (the read counter runs through both)
            calls = level["rps"] * (bench.seconds + bench.warmup)
            per_call = level["server_read_bytes"] / calls if calls else 0.0
            level["server_read_bytes_per_call"] = round(per_call)
            level["mapper_reloads_per_call_est"] = round(
                per_call / bench.users.mapper_file_bytes, 3
            )
    response = result_mapper_pb2.MapResponse.FromString(bytes.fromhex(ready["response_hex"]))
    return {
        "server": f"result-mapper ({label})",
        "first_label": list(response.labels),
        "ready_seconds": ready.get("ready_seconds"),
        "rss_mb": rss_mb,
        "rss_after_first_request_mb": ready.get("rss_after_first_request_mb"),
        "rss_after_every_user_mb": ready.get("rss_after_every_user_mb"),
        "extraction_alarms": sum(metrics["extraction_alarms_total"].values()),
        "server_counted": metrics["grpc_requests_total"],
        "refusals": metrics["refusals_total"],
        "levels": levels,
    }


def _mlserver_index_ready(http_port: int) -> int | None:
    """Models MLServer reports READY in its repository index (None: not answering)."""
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v2/repository/index",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            index = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return sum(1 for model in index if model.get("state") == "READY")


def _mlserver(bench: Bench, workers: int) -> dict[str, Any]:
    """MLServer 1.7.1's multi-model serving: every model directory under
    `Bench.mlserver_dir` loaded at start-up (one per user), the load generator sending
    each user's requests to that user's model."""
    assert bench.mlserver_dir is not None and bench.infer_requests is not None
    venv = _ensure_mlserver_venv()
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    # `mlserver start DIR` takes DIR as the model repository and DIR/settings.json
    (bench.mlserver_dir / "settings.json").write_text(
        json.dumps(
            {
                "debug": False,
                "parallel_workers": workers,
                "grpc_port": grpc_port,
                "http_port": http_port,
                "metrics_port": metrics_port,
                "host": "127.0.0.1",
            }
        )
    )
    started = time.perf_counter()
    server = Server(
        f"mlserver-w{workers}",
        [str(venv / "bin" / "mlserver"), "start", str(bench.mlserver_dir)],
        bench.workdir,
        env={
            "PYTHONPATH": str(bench.mlserver_dir),  # mlserver_runtime.py, for the workers too
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        },
    )
    try:
        ready = 0
        while True:
            if server.process.poll() is not None:
                raise SystemExit(f"MLServer exited ({server.process.returncode}) while loading")
            ready = _mlserver_index_ready(http_port) or 0
            if ready >= bench.mlserver_models:
                break
            if time.perf_counter() - started > bench.mlserver_load_timeout:
                rss = group_rss_mb(server.process.pid)
                raise SystemExit(
                    f"MLServer loaded {ready} of {bench.mlserver_models} models in "
                    f"{bench.mlserver_load_timeout:g} s (RSS {rss:.0f} MB): serve fewer with "
                    "--mlserver-models N (user i → model i mod N)"
                )
            time.sleep(0.5)
        load_seconds = time.perf_counter() - started
        loaded_rss_mb = group_rss_mb(server.process.pid)
        results = _run_loadgen(
            f"127.0.0.1:{grpc_port}",
            INFER_METHOD,
            bench.infer_requests,
            bench.seconds,
            bench.warmup,
            server.process.pid,
            cc_loadgen=bench.cc_loadgen,
            ready_timeout=bench.ready_timeout,
        )
        rss_mb = group_rss_mb(server.process.pid)
    except SystemExit:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    return {
        "server": f"mlserver 1.7.1 (parallel_workers={workers})",
        "models": bench.mlserver_models,
        # from the process start until every model is READY in the repository index
        "load_seconds": load_seconds,
        "loaded_rss_mb": loaded_rss_mb,
        "ready_seconds": results[0].get("ready_seconds"),
        "rss_mb": rss_mb,
        "levels": results[1:],
    }


def measure_mapper_bytes(
    in_features: int, hidden: int, classes: int = 10, users: int = 1000
) -> dict[str, Any]:
    """Traced heap growth per user when ``users`` distinct mappers are hot-loaded (arrays,
    ndarray headers, LRU node, user entry, credential hash), against the registry's own
    estimate (`LoadedMapper.nbytes`)."""
    import gc
    import tracemalloc

    import torch

    from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
    from modelguard.carrier.mapper_registry import MapperRegistry, hash_credential

    torch.manual_seed(0)
    template = MappingNetwork(in_features, classes, hidden)
    blobs = []
    for i in range(users):
        with torch.no_grad():
            template.fc2.bias[0] = float(i)
        blobs.append(mapper_to_safetensors(template))
    hashes = [hash_credential(f"credential-{i}") for i in range(users)]
    registry = MapperRegistry(max_loaded_bytes=1 << 40)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(users):
        registry.hot_load(f"user-{i:05d}", 0, blobs[i], hashes[i])
    gc.collect()
    traced = (tracemalloc.get_traced_memory()[0] - before) / users
    tracemalloc.stop()
    estimate = registry.status().loaded_bytes / users
    return {
        "mapper": f"{in_features}→{hidden}→{classes}",
        "traced_bytes_per_user": round(traced),
        "registry_estimate_bytes": round(estimate),
        "users_in_256_MiB": int((256 << 20) // max(traced, estimate)),
    }


# -------------------------------------------------------------------------------- results

#: Per-run figures outside the levels: the median over the rounds (and each round's).
#: The result-mapper Deployment, whose container memory limit bounds a replica.
RESULT_MAPPER_MANIFEST = REPO_ROOT / "deploy" / "k8s" / "base" / "result-mapper.yaml"
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def replica_memory_limit_bytes(manifest: Path = RESULT_MAPPER_MANIFEST) -> int | None:
    """The container's ``limits`` memory in the manifest (e.g. ``memory: 2Gi``), bytes."""
    import re

    match = re.search(r"limits:\s*\{[^}]*memory:\s*(\d+)(Ki|Mi|Gi|K|M|G)?\b", manifest.read_text())
    if match is None:
        return None
    return int(match.group(1)) * _UNITS.get(match.group(2) or "", 1)


def memory_per_user(
    run: dict[str, Any], users: int, mapper_bytes: int, max_loaded_bytes: int
) -> dict[str, Any]:
    """What one more user costs a result-mapper replica: its resident memory right after the
    warm-up pass (every user's mapper and profile loaded) minus right after the first
    user's request, over the other users; split into the mapper (``mapper_bytes``, held by
    the LRU up to ``max_loaded_bytes``, most recently used first) and the rest (profile,
    limits, accounting: kept for every user). How many users' state fits the replica's
    memory limit with the LRU full."""
    first, every = run.get("rss_after_first_request_mb"), run.get("rss_after_every_user_mb")
    if not first or not every or users < 2:
        return {}
    per_user = (every - first) * 1e6 / (users - 1)
    rest = max(per_user - mapper_bytes, 1.0)
    limit = replica_memory_limit_bytes()
    fit = int((limit - first * 1e6 - max_loaded_bytes) // rest) if limit else None
    return {
        "server": run["server"],
        "rss_after_first_user_mb": round(first, 1),
        "rss_after_every_user_mb": round(every, 1),
        "bytes_per_user": round(per_user),
        "bytes_per_user_besides_the_mapper": round(rest),
        "replica_memory_limit_bytes": limit,
        "users_per_replica_within_limit": fit if fit and fit > 0 else None,
        "mappers_kept_loaded": max_loaded_bytes // mapper_bytes if mapper_bytes else None,
    }


def _memory_text(memory: dict[str, Any], users: int) -> str:
    if not memory:
        return "memory per user: not measured"
    limit = memory["replica_memory_limit_bytes"]
    fit = memory["users_per_replica_within_limit"]
    within = (
        f"within the replica's memory limit ({limit / 2**30:g} GiB), with the mapper LRU "
        f"full, about {fit:,} users' state fits"
        if limit and fit
        else "the replica's memory limit could not be read"
    )
    return (
        f"memory per user ({memory['server']}): {memory['bytes_per_user'] / 1e3:,.0f} kB "
        f"resident with its mapper loaded, {memory['bytes_per_user_besides_the_mapper'] / 1e3:,.0f}"
        f" kB without (RSS {memory['rss_after_first_user_mb']:.0f} MB after the first user's "
        f"request, {memory['rss_after_every_user_mb']:.0f} MB after all {users:,} users', "
        f"before any load); the LRU keeps the {memory['mappers_kept_loaded']:,} most recently "
        f"used mappers loaded, others are reloaded from the store on a miss; {within}"
    )


_RUN_FIGURES = (
    "ready_seconds",
    "rss_mb",
    "rss_after_first_request_mb",
    "rss_after_every_user_mb",
    "load_seconds",
    "loaded_rss_mb",
)


def median_runs(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One run per server whose every level figure is the median of that figure over the
    rounds (errors and extraction alarms: the sum; the load generator's name: the first
    round's)."""
    merged: list[dict[str, Any]] = []
    for index, first in enumerate(rounds[0]):
        same = [r[index] for r in rounds]
        levels = []
        for position, level in enumerate(first["levels"]):
            samples = [run["levels"][position] for run in same]
            combined: dict[str, Any] = dict(level)
            for key, value in level.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values = [s[key] for s in samples if isinstance(s.get(key), int | float)]
                    combined[key] = statistics.median(values) if values else value
            combined["errors"] = sum(s["errors"] for s in samples)
            codes: dict[str, int] = {}
            for sample in samples:
                for code, count in sample.get("error_codes", {}).items():
                    codes[code] = codes.get(code, 0) + count
            combined["error_codes"] = codes
            combined["concurrency"] = level["concurrency"]
            combined["rounds"] = len(samples)
            combined["rps_by_round"] = [s["rps"] for s in samples]
            combined["p99_ms_by_round"] = [s["p99_ms"] for s in samples]
            cores = {k for s in samples for k in s.get("steal_percent", {})}
            combined["steal_percent"] = {
                core: statistics.median(s.get("steal_percent", {}).get(core, 0.0) for s in samples)
                for core in sorted(cores)
            }
            levels.append(combined)
        run: dict[str, Any] = {**first, "levels": levels}
        for key in _RUN_FIGURES:
            values = [r[key] for r in same if isinstance(r.get(key), int | float)]
            if values:
                run[key] = statistics.median(values)
                run[f"{key}_by_round"] = values
        if "extraction_alarms" in first:
            run["extraction_alarms"] = sum(r.get("extraction_alarms", 0) for r in same)
        merged.append(run)
    return merged


def rounds_flat(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [run for this_round in rounds for run in this_round]


def _table(runs: list[dict[str, Any]]) -> str:
    lines = [
        f"{'server':<36} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'srv CPU s':>9} {'req/srv-core-s':>14} {'steal % c0/c1':>13} {'reloads/call':>12}"
    ]
    for run in runs:
        for level in run["levels"]:
            capacity = level.get("rps_per_server_core") or float("nan")
            reloads = level.get("mapper_reloads_per_call_est")
            lines.append(
                f"{run['server']:<36} {level['concurrency']:>4} {level['rps']:>8.0f} "
                f"{level['p50_ms']:>7.2f} {level['p99_ms']:>7.2f} {level['errors']:>6} "
                f"{level['server_cpu_s']:>9.2f} {capacity:>14.0f} "
                f"{'/'.join(str(v) for v in level.get('steal_percent', {}).values()):>13} "
                f"{'-' if reloads is None else f'{reloads:.2f}':>12}"
            )
    return "\n".join(lines)


def _setup_text(setup: dict[str, Any]) -> str:
    lru = setup["lru"]
    raised = [r for r in setup["limits"] if r["raised"]]
    lines = [
        "setup:",
        f"  users {setup['users']}: {setup['distinct_mappers']} distinct mappers "
        f"({setup['mapper_shape']}, {setup['mapper_per_user']}), {setup['distinct_profiles']} "
        f"query profiles, {setup['requests_per_user']} requests per user sent round robin "
        f"({setup['requests_in_rotation']} in the rotation); store written in "
        f"{setup['seed_seconds']:.0f} s",
        f"  mapper: {setup['mapper']}",
        f"  result-mapper LRU bound (MAX_LOADED_BYTES) {lru['max_loaded_bytes']:,} B "
        f"({setup['deployed_settings']['MAX_LOADED_BYTES']['source']}): holds "
        f"{lru['mappers_held']:,} mappers of {lru['mapper_lru_bytes']:,} B; {lru['expected']}",
        "  result-mapper limits as deployed: "
        + ", ".join(
            f"{k}={setup['deployed_settings'][k]['value']}"
            for k in (
                "RATE_PER_SECOND",
                "RATE_BURST",
                "QUERY_BUDGET_ROWS",
                "MAX_ROWS_PER_WINDOW",
                "MAX_ROWS_PER_GENERATION",
                "AUTO_REVOKE",
                "PROFILE_SCORING",
                "GRPC_WORKERS",
            )
        ),
    ]
    if raised:
        lines.append(
            "  raised for the benchmark's users (the only departures from the deployment):"
        )
        lines += [
            f"    {r['setting']}: {r['deployed']} → {r['benchmark']} ({r['limit']}): {r['why']}"
            for r in raised
        ]
    else:
        lines.append(
            "  raised for the benchmark's users: none (the demand per user stays within every "
            f"deployed limit at up to {setup['rps_ceiling']:,.0f} calls/s: "
            + "; ".join(
                f"{r['setting'][len(ENV_PREFIX) :]} {r['demand_per_user']:g}"
                for r in setup["limits"]
            )
            + ")"
        )
    if setup.get("mlserver"):
        lines.append(f"  MLServer: {setup['mlserver']['serving']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    parser = argparse.ArgumentParser(description="result-mapper vs MLServer, per-user mappers")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of every server; the table and the bars use the median of "
        "each figure over the rounds",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["", "grpc_workers=8"],
        help="result-mapper settings per run, KEY=VALUE[,KEY=VALUE] (MODELGUARD_RESULT_MAPPER_*) "
        "over the deployed ones; '' is the deployed configuration, the one the bars are "
        "checked on",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=1000,
        help="users, each with its own mapper, query profile and credential (round robin)",
    )
    parser.add_argument(
        "--requests-per-user",
        type=int,
        default=4,
        help="distinct pre-serialised requests per user (fresh draws of its pseudo-outputs)",
    )
    parser.add_argument(
        "--rps-ceiling",
        type=float,
        default=50_000.0,
        help="calls/s no server here exceeds: sizes the per-user demand that decides which "
        "deployed per-user limits the benchmark must raise",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the bytes-per-user part")
    parser.add_argument(
        "--client",
        choices=("cc", "python"),
        default="cc",
        help="load generator: C++ (bench/loadgen.cc, built on first use) or Python grpc.aio",
    )
    parser.add_argument("--mlserver-workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--mlserver-models",
        type=int,
        default=0,
        help="models MLServer serves (0: one per user); fewer: user i → model i mod N",
    )
    parser.add_argument(
        "--mlserver-load-timeout",
        type=float,
        default=900.0,
        help="seconds MLServer may take to load every model",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        help="seconds a server may take to answer its first request",
    )
    parser.add_argument(
        "--mapper",
        default=CarrierTrainerSettings().public_model,
        choices=sorted(PUBLIC_MODEL_OUTPUTS),
        help="public model whose bench_carrier mapper is served (default: carrier-trainer's)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=CarrierTrainerSettings().hidden,
        help="mapper hidden width (default: what carrier-trainer deploys, its HIDDEN setting)",
    )
    args = parser.parse_args(argv)
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin server and client to cores")
    if args.users < 1 or args.requests_per_user < 1:
        raise SystemExit("--users and --requests-per-user must be >= 1")
    mlserver_models = min(args.mlserver_models or args.users, args.users)

    cc_loadgen = ensure_cc_loadgen() if args.client == "cc" else None
    if args.client == "cc" and cc_loadgen is None:
        print("the C++ load generator is unavailable: using the Python one", file=sys.stderr)
    memory = (
        []
        if args.no_memory
        else [
            *(measure_mapper_bytes(10, h) for h in (64, 256)),  # lenet5-fashion
            *(measure_mapper_bytes(214, h, users=500) for h in (64, 256)),  # 214 inputs
            measure_mapper_bytes(1000, 256, users=200),  # efficientnet-lite0
        ]
    )
    for row in memory:
        print(json.dumps(row), flush=True)
    deployed = deployed_settings()
    base, source = base_mapper(args.mapper, args.hidden)
    venv = None if args.no_mlserver else _ensure_mlserver_venv()
    # one server process's lifetime under load: the levels, each after its warm-up
    server_seconds = len(CONCURRENCY) * (args.seconds + args.warmup)
    raised, limits = benchmark_limits(
        deployed, args.users, args.requests_per_user, server_seconds, args.rps_ceiling
    )
    ours_env = {
        ENV_PREFIX + key: entry["value"]
        for key, entry in deployed.items()
        if key not in BENCH_WIRING and entry["source"] != "ResultMapperSettings default"
    }
    ours_env.update({ENV_PREFIX + key: value for key, value in raised.items()})
    rounds: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="mg-serving-") as tmp:
        workdir = Path(tmp)
        print(f"writing {args.users} users' carriers (mapper, profile, credential)", flush=True)
        mlserver_dir = None if args.no_mlserver else workdir / "mlserver-models"
        users = seed_users_one_thread(
            workdir / "store",
            base,
            args.users,
            args.requests_per_user,
            mlserver_dir,
            mlserver_models,
        )
        map_requests = workdir / "map.requests"
        write_map_requests(map_requests, users)
        infer_requests = None
        if venv is not None:
            infer_requests = workdir / "infer.requests"
            write_infer_requests(infer_requests, venv, users, mlserver_models)
        lru = lru_behaviour(int(deployed["MAX_LOADED_BYTES"]["value"]), users)
        setup: dict[str, Any] = {
            "users": args.users,
            "distinct_mappers": users.distinct_mappers,
            "distinct_profiles": users.distinct_profiles,
            "requests_per_user": args.requests_per_user,
            "requests_in_rotation": args.users * args.requests_per_user,
            "mapper": source,
            "mapper_shape": users.mapper_shape,
            "mapper_per_user": f"base + seeded noise of {PERTURBATION:.0%} of each tensor's std",
            "mapper_file_bytes": users.mapper_file_bytes,
            "profiles": f"QueryProfile.fit on {PROFILE_SAMPLES} of each user's pseudo-outputs "
            "(a mean and scale per unit of its own); requests: fresh draws of the same",
            "seed_seconds": users.seconds,
            "lru": lru,
            "deployed_settings": deployed,
            "rps_ceiling": args.rps_ceiling,
            "server_seconds": server_seconds,
            "limits": limits,
            "raised_settings": {
                r["setting"]: {k: r[k] for k in ("deployed", "benchmark", "limit", "why")}
                for r in limits
                if r["raised"]
            },
            "result_mapper_env": ours_env,
        }
        if venv is not None:
            per_user = mlserver_models == args.users
            setup["mlserver"] = {
                "models": mlserver_models,
                "one_model_per_user": per_user,
                "serving": (
                    f"multi-model serving, {mlserver_models} models: one model directory "
                    "(model-settings.json + the user's weights as .npz) per user, all loaded at "
                    "start-up; each request names its user's model"
                    if per_user
                    else f"multi-model serving, {mlserver_models} models for {args.users} "
                    f"users (NOT one per user: --mlserver-models {mlserver_models}; user i's "
                    f"requests go to model i mod {mlserver_models})"
                ),
            }
        print(_setup_text(setup), flush=True)
        bench = Bench(
            workdir=workdir,
            users=users,
            store_dir=workdir / "store",
            map_requests=map_requests,
            ours_env=ours_env,
            mlserver_dir=mlserver_dir,
            infer_requests=infer_requests,
            mlserver_models=mlserver_models,
            seconds=args.seconds,
            warmup=args.warmup,
            cc_loadgen=cc_loadgen,
            ready_timeout=args.ready_timeout,
            mlserver_load_timeout=args.mlserver_load_timeout,
        )
        # Rounds interleave the servers (ours, theirs, ours, theirs, ...) so that a noisy
        # spell of the host (steal time, another tenant) lands on both, not on one.
        for round_number in range(1, args.rounds + 1):
            print(f"--- round {round_number} of {args.rounds}", flush=True)
            this_round: list[dict[str, Any]] = []
            for mode in args.modes:
                this_round.append(_ours(bench, mode))
                run = this_round[-1]
                print(
                    f"{run['server']}: start, then every request once (every user's mapper "
                    f"and profile loaded from the store) {run['ready_seconds']:.1f} s, RSS "
                    f"{run['rss_mb']:.0f} MB, extraction alarms {run['extraction_alarms']:g}",
                    flush=True,
                )
                print(_table([run]), flush=True)
            if venv is not None:
                for workers in args.mlserver_workers:
                    this_round.append(_mlserver(bench, workers))
                    run = this_round[-1]
                    print(
                        f"{run['server']}: {run['models']} models READY after "
                        f"{run['load_seconds']:.1f} s (RSS {run['loaded_rss_mb']:.0f} MB), "
                        f"every request once {run['ready_seconds']:.1f} s, RSS {run['rss_mb']:.0f} "
                        "MB",
                        flush=True,
                    )
                    print(_table([run]), flush=True)
            rounds.append(this_round)
    runs = median_runs(rounds)

    def at(run: dict[str, Any], concurrency: int) -> dict[str, Any]:
        return next(level for level in run["levels"] if level["concurrency"] == concurrency)

    ours = [r for r in runs if r["server"].startswith("result-mapper")]
    theirs = [r for r in runs if r["server"].startswith("mlserver")]
    # the bars are checked on the first configuration of ours (by default the deployed
    # one), not the best of ours; MLServer is given its best
    checked = ours[0]
    errors = sum(level["errors"] for run in runs for level in run["levels"])
    alarms = sum(run.get("extraction_alarms", 0) for run in ours)
    summary: dict[str, Any] = {
        "setup": setup,
        "mapper": source,
        "mapper_shape": users.mapper_shape,
        "users": args.users,
        "client": runs[0]["levels"][0].get("client", ""),
        "result_mapper": checked["server"],
        "result_mapper_rps_c32": at(checked, 32)["rps"],
        "result_mapper_p99_ms_c8": at(checked, 8)["p99_ms"],
        "errors": errors,
        "extraction_alarms": alarms,
    }
    bars = []
    if theirs:
        best_theirs = max(theirs, key=lambda r: at(r, 32)["rps"])
        ratio = at(checked, 32)["rps"] / at(best_theirs, 32)["rps"]
        summary["ratio_c32_by_round"] = [
            ours_rps / theirs_rps
            for ours_rps, theirs_rps in zip(
                at(checked, 32)["rps_by_round"], at(best_theirs, 32)["rps_by_round"], strict=True
            )
        ]
        summary.update(
            best_mlserver=best_theirs["server"],
            mlserver_models=mlserver_models,
            mlserver_load_seconds=best_theirs.get("load_seconds"),
            mlserver_rps_c32=at(best_theirs, 32)["rps"],
            ratio_c32=ratio,
            bar_ratio_met=ratio >= BAR_RATIO,
        )
        rounds_text = ", ".join(f"{r:.2f}×" for r in summary["ratio_c32_by_round"])
        bars.append(
            f"throughput ≥ {BAR_RATIO:g}× MLServer's best ({best_theirs['server']}, "
            f"{mlserver_models} models) at concurrency 32: {ratio:.2f}× "
            f"(rounds {rounds_text}): {'met' if ratio >= BAR_RATIO else 'NOT MET'}"
        )
    summary["bar_p99_met"] = summary["result_mapper_p99_ms_c8"] <= BAR_P99_MS
    summary["bar_errors_met"] = errors == 0 and alarms == 0
    bars.append(
        f"p99 ≤ {BAR_P99_MS:g} ms at concurrency 8: {summary['result_mapper_p99_ms_c8']:.2f} ms: "
        f"{'met' if summary['bar_p99_met'] else 'NOT MET'}"
    )
    bars.append(
        f"zero errors and zero extraction alarms in every round: {errors} errors, {alarms:g} "
        f"alarms: {'met' if summary['bar_errors_met'] else 'NOT MET'}"
    )
    fastest = max(level["rps"] for run in rounds_flat(rounds) for level in run["levels"])
    if fastest > args.rps_ceiling:  # the limits were sized for less: say so
        bars.append(
            f"a level ran at {fastest:,.0f} calls/s, above --rps-ceiling {args.rps_ceiling:,.0f}: "
            "the per-user limits were sized for less; rerun with a higher ceiling"
        )
    summary["bars"] = bars
    summary["bytes_per_mapper"] = memory
    per_user = memory_per_user(
        checked,
        args.users,
        setup["lru"]["mapper_lru_bytes"],
        setup["lru"]["max_loaded_bytes"],
    )
    summary["memory_per_user"] = per_user
    memory_line = _memory_text(per_user, args.users)
    summary["cpu_note"] = f"os.cpu_count()={os.cpu_count()}; load average {os.getloadavg()}"
    print(f"\nmedian of {args.rounds} interleaved round(s) per server and level:")
    print(_setup_text(setup))
    print(_table(runs))
    print(f"bars, on the medians ({checked['server']}):")
    for line in bars:
        print(f"  {line}")
    print(memory_line)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "serving.json").write_text(
        json.dumps({"summary": summary, "runs": runs, "rounds": rounds}, indent=2)
    )
    print(f"written: {(OUT_DIR / 'serving.json').relative_to(REPO_ROOT)}")
    if args.users >= 1000 and args.rounds >= 3 and not args.no_mlserver:
        results.record(
            "serving",
            "Serving: result-mapper against MLServer 1.7.1",
            f"Median of {args.rounds} interleaved rounds per server and level; mappers: "
            f"{source}.\n\n"
            + results.code_block(
                "\n".join(
                    [_setup_text(setup), _table(runs), "bars, on the medians:", *bars, memory_line]
                )
            )
            + f"\n\n{summary['cpu_note']}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
