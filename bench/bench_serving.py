"""Serving benchmark: the result-mapper against Seldon MLServer on the same mapper weights.

``python -m bench.bench_serving`` (part of ``make bench``):

1. takes the mapper `bench.bench_carrier` trained for ``--mapper`` (default: carrier-trainer's
   default public model, lenet5-fashion-features, 214→256→10; ``.cache/carrier-bench/``)
   or, if that has not run, a seeded 10→256→10 mapper; writes it as safetensors (result-mapper)
   and ``.npz`` (MLServer runtime `bench.mlserver_runtime`);
2. ours is the production result-mapper process (``python -m services.result_mapper.main``,
   what Kubernetes runs) over a local store seeded with ``--users`` ready carriers exactly as
   carrier-trainer leaves them (signed mapper, query profile, hashed credential), with
   everything on at its defaults: bearer-token authentication, the per-user credential,
   per-user rate limits and query budget, the extraction detector scoring each request
   against the carrier's profile, query accounting, Prometheus metrics and /metrics;
   theirs is MLServer 1.7.1 with a numpy runtime on the same weights;
3. for every server configuration, starts the server pinned to core 0 (``taskset``) and
   runs the same load generator pinned to core 1: closed-loop gRPC unary calls on one
   channel at concurrency 1, 8 and 32 (``--seconds`` each after a warm-up), pre-serialised
   requests (ours: one per user, round robin, so no user nears its rate limit), every
   non-OK status counted as an error. The load generator is `bench/loadgen.cc` (C++, gRPC's
   generic stub; built on first use from Debian's libgrpc++-dev): the Python asyncio client
   costs ~250 µs of CPU a call and saturates its core below what the servers answer;
   ``--client python`` uses it anyway;
4. repeats 1-3 for ``--rounds`` interleaved rounds (default 3: ours, theirs, ours,
   theirs, ...), so that a noisy spell of a shared host lands on every server rather than
   on one, and takes the median of each figure per server and level over the rounds;
5. prints a table, checks the bars on the medians (≥ 2.5× MLServer's best configuration at
   concurrency 32; p99 ≤ 5 ms at concurrency 8; zero errors in every round) and writes
   ``bench/out/serving.json`` (the medians, and every round as measured).

MLServer runs from its own venv (``.cache/mlserver-venv``; it pins protobuf < 7): created
on first use with ``mlserver==1.7.1`` and ``uvloop==0.21.0`` unless ``--no-mlserver``.
``python -m bench.bench_serving loadgen ...`` is the load generator itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.datasets import REPO_ROOT

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
) -> bytes:
    """Wait until the server answers the first request, then send every other one once
    (each must succeed: e.g. every user's mapper is loaded before the measurement)."""
    import grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    async with grpc.aio.insecure_channel(target) as channel:
        ready: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        while time.monotonic() < deadline:
            try:  # any refusal while starting (MLServer: "model not ready yet")
                response: bytes = await ready(requests[0], timeout=2, metadata=metadata or None)
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
    return response


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
        first = await _wait_ready(
            args.target,
            args.method,
            requests,
            args.ready_timeout,
            metadata,
        )
        print(
            json.dumps({"ready": True, "response_bytes": len(first), "response_hex": first.hex()}),
            flush=True,
        )
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


def _mapper_arrays(
    public_model: str, hidden: int = 256
) -> tuple[bytes, dict[str, np.ndarray], str]:
    """(safetensors bytes, npz arrays, provenance)."""
    from services.carrier_trainer.core.carrier import MappingNetwork, mapper_to_safetensors
    from services.result_mapper.core.registry import parse_mapper

    trained = CARRIER_CACHE / f"mapper-{public_model}.safetensors"
    if trained.exists():
        data, source = trained.read_bytes(), str(trained.relative_to(REPO_ROOT))
    else:
        import torch

        # said loudly: the figures then describe a smaller mapper than the product serves
        print(
            f"note: {trained.relative_to(REPO_ROOT)} is missing (run `python -m "
            "bench.bench_carrier --skip-efficientnet` first): serving a seeded "
            f"10→{hidden}→10 mapper instead",
            file=sys.stderr,
            flush=True,
        )
        torch.manual_seed(0)
        data, source = (
            mapper_to_safetensors(MappingNetwork(10, 10, hidden)),
            f"seeded 10→{hidden}→10",
        )
    parsed = parse_mapper(data)
    if parsed.w1 is None or parsed.b1 is None:
        raise SystemExit("the serving benchmark expects a mapper with a hidden layer")
    arrays = {"w1": parsed.w1, "b1": parsed.b1, "w2": parsed.w2, "b2": parsed.b2}
    return data, arrays, source


def _ensure_mlserver_venv() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if not mlserver.exists():
        print(f"creating {MLSERVER_VENV} ({', '.join(MLSERVER_PACKAGES)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *MLSERVER_PACKAGES], check=True)
    return MLSERVER_VENV


def _mlserver_request(venv: Path, rows: np.ndarray, workdir: Path) -> bytes:
    """A serialised ModelInferRequest, built with MLServer's own generated code."""
    script = (
        "import sys, json\n"
        "from mlserver.grpc import dataplane_pb2 as pb\n"
        "values = json.loads(sys.argv[1])\n"
        "t = pb.ModelInferRequest.InferInputTensor(name='pseudo_output', datatype='FP32', "
        "shape=[1, len(values)], contents=pb.InferTensorContents(fp32_contents=values))\n"
        "request = pb.ModelInferRequest(model_name='mapper', inputs=[t])\n"
        "sys.stdout.buffer.write(request.SerializeToString())\n"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script, json.dumps(rows.ravel().tolist())],
        check=True,
        capture_output=True,
        cwd=workdir,
    )
    return out.stdout


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


def _run_loadgen(
    target: str,
    method: str,
    request_file: Path,
    seconds: float,
    warmup: float,
    server_pgid: int,
    metadata: tuple[str, ...] = (),
    cc_loadgen: Path | None = None,
) -> list[dict[str, Any]]:
    """The ready line, then one result per concurrency level. The ready phase (every
    request once) always runs in the Python client; the levels run in ``cc_loadgen`` when
    given, else in the Python client."""
    command = [
        "taskset", "-c", "1", sys.executable, "-m", "bench.bench_serving", "loadgen",
        "--target", target, "--method", method, "--request-file", str(request_file),
        "--seconds", str(seconds), "--warmup", str(warmup), "--server-pgid", str(server_pgid),
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
        ticks = _core_ticks()
        out = subprocess.run(command, check=False, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"C++ load generator failed ({out.returncode}):\n{out.stderr}")
        level = json.loads(out.stdout.strip().splitlines()[-1])
        count, server_cpu = level["requests"], level["server_cpu_s"]
        level["server_cpu_us_per_request"] = server_cpu / count * 1e6 if count else None
        level["rps_per_server_core"] = count / server_cpu if server_cpu else None
        level["steal_percent"] = _steal_percent(ticks, _core_ticks())
        lines.append(level)
    return lines


#: Signing key of the benchmark's throw-away store (carrier records are signed as
#: carrier-trainer signs them; the service verifies every mapper it loads).
BENCH_SIGNING_KEY = "bench-serving-signing-key"


def seed_carriers(
    store_dir: Path, weights: bytes, users: int, profile_samples: np.ndarray
) -> dict[str, str]:
    """Ready carriers for ``bench-0 .. bench-{users-1}`` exactly as carrier-trainer leaves
    them (the signed mapper, the query profile the extraction detector scores every
    request against, the credential stored hashed); returns user → credential. The users
    share one pooled carrier's mapper and profile (the same weights MLServer serves); each
    has its own credential, rate limit, budget, accounting and detector state."""
    from services.carrier_trainer.core.extraction import QueryProfile
    from services.carrier_trainer.service import ref_dict
    from services.carrier_trainer.state import READY, CarrierRecord, CarrierRepository
    from services.result_mapper.core.registry import hash_credential, new_credential
    from shared.signing import Signer
    from shared.store import make_store

    store = make_store("local", root=store_dir)
    signer = Signer(BENCH_SIGNING_KEY.encode())
    mapper = store.put_blob(weights, "application/vnd.modelguard.mapper")
    profile = json.dumps(QueryProfile.fit(profile_samples).to_dict()).encode()
    profile_ref = store.put_blob(profile, "application/json")
    repository = CarrierRepository(store)
    credentials: dict[str, str] = {}
    for i in range(users):
        user, credential = f"bench-{i}", new_credential()
        repository.put(
            CarrierRecord(
                user_id=user,
                generation=1,
                credential_hash=hash_credential(credential),
                state=READY,
                artifacts={"mapper": ref_dict(mapper), "profile": ref_dict(profile_ref)},
                signatures={"mapper": signer.sign(mapper.sha256)},
            )
        )
        credentials[user] = credential
    return credentials


def _metric_samples(port: int, name: str) -> dict[str, float]:
    """``labels → value`` of one metric family on a /metrics endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            samples[labels] = float(value)
    return samples


def _ours(
    workdir: Path,
    weights: bytes,
    mode: str,
    profile_rows: np.ndarray,
    rows: np.ndarray,
    seconds: float,
    warmup: float,
    cc_loadgen: Path | None,
) -> dict[str, Any]:
    """The production result-mapper (``python -m services.result_mapper.main``, the
    process Kubernetes runs) with everything on at its defaults: bearer-token
    authentication, the per-user credential, per-user rate limits and query budget, the
    extraction detector scoring every request against the carrier's profile, query
    accounting, Prometheus metrics and their /metrics endpoint. ``mode`` is
    ``workers=N`` (the gRPC thread pool, MODELGUARD_RESULT_MAPPER_GRPC_WORKERS)."""
    from shared.auth import mint_token
    from shared.proto.modelguard.v1 import result_mapper_pb2

    label = mode or "as deployed"
    name = f"result-mapper-{(mode or 'deployed').replace('=', '')}"
    store_dir = workdir / f"store-{name}"
    credentials = seed_carriers(store_dir, weights, len(rows), profile_rows)
    token, line = mint_token("bench")
    tokens_file = workdir / "tokens"
    tokens_file.write_text(line + "\n")
    port, metrics_port = _free_port(), _free_port()
    env = {
        "MODELGUARD_BUS": "memory",
        "MODELGUARD_STORE": "local",
        "MODELGUARD_STORE_DIR": str(store_dir),
        "MODELGUARD_SIGNING_KEY": BENCH_SIGNING_KEY,
        "MODELGUARD_AUTH_TOKENS_FILE": str(tokens_file),
        "MODELGUARD_TORCH_THREADS": "1",  # as deploy/k8s/base/config/platform.env
        "MODELGUARD_LOG_LEVEL": "WARNING",
        "MODELGUARD_RESULT_MAPPER_HOST": "127.0.0.1",
        "MODELGUARD_RESULT_MAPPER_GRPC_PORT": str(port),
        "MODELGUARD_RESULT_MAPPER_METRICS_PORT": str(metrics_port),
    }
    for setting in mode.split(","):
        key, _, value = setting.partition("=")
        if key:
            env[f"MODELGUARD_RESULT_MAPPER_{key.upper()}"] = value
    server = Server(name, [sys.executable, "-m", "services.result_mapper.main"], workdir, env=env)
    # one request per user, round robin: every user stays far below its rate limit
    requests = [
        result_mapper_pb2.MapRequest(
            user_id=user,
            credential=credential,
            pseudo_output=rows[i].astype("<f4").tobytes(),
            rows=1,
        ).SerializeToString()
        for i, (user, credential) in enumerate(credentials.items())
    ]
    request_file = workdir / f"{name}.requests"
    write_requests(request_file, requests)
    try:
        results = _run_loadgen(
            f"127.0.0.1:{port}",
            MAP_METHOD,
            request_file,
            seconds,
            warmup,
            server.process.pid,
            (f"authorization=Bearer {token}",),
            cc_loadgen=cc_loadgen,
        )
        counted = _metric_samples(metrics_port, "modelguard_result_mapper_grpc_requests_total")
    except SystemExit:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    ready, levels = results[0], results[1:]
    response = result_mapper_pb2.MapResponse.FromString(bytes.fromhex(ready["response_hex"]))
    return {
        "server": f"result-mapper ({label})",
        "first_label": list(response.labels),
        "server_counted": counted,
        "levels": levels,
    }


def _mlserver(
    workdir: Path,
    arrays: dict[str, np.ndarray],
    workers: int,
    request_row: np.ndarray,
    seconds: float,
    warmup: float,
    cc_loadgen: Path | None,
) -> dict[str, Any]:
    venv = _ensure_mlserver_venv()
    model_dir = workdir / f"mlserver-w{workers}"
    (model_dir / "mapper").mkdir(parents=True, exist_ok=True)
    np.savez(
        model_dir / "mapper" / "mapper.npz",
        w1=arrays["w1"],
        b1=arrays["b1"],
        w2=arrays["w2"],
        b2=arrays["b2"],
    )
    shutil.copy(
        Path(__file__).with_name("mlserver_runtime.py"),
        model_dir / "mapper" / "mlserver_runtime.py",
    )
    (model_dir / "mapper" / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "mapper",
                "implementation": "mlserver_runtime.NumpyMapper",
                "parameters": {"uri": str(model_dir / "mapper" / "mapper.npz")},
            }
        )
    )
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    (model_dir / "settings.json").write_text(
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
    request_file = workdir / "infer.requests"
    write_requests(request_file, [_mlserver_request(venv, request_row, workdir)])
    server = Server(
        f"mlserver-w{workers}",
        [str(venv / "bin" / "mlserver"), "start", str(model_dir)],
        workdir,
        env={
            "PYTHONPATH": "",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        },
    )
    try:
        results = _run_loadgen(
            f"127.0.0.1:{grpc_port}",
            INFER_METHOD,
            request_file,
            seconds,
            warmup,
            server.process.pid,
            cc_loadgen=cc_loadgen,
        )
    except SystemExit:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    return {"server": f"mlserver 1.7.1 (parallel_workers={workers})", "levels": results[1:]}


def measure_mapper_bytes(
    in_features: int, hidden: int, classes: int = 10, users: int = 1000
) -> dict[str, Any]:
    """Traced heap growth per user when ``users`` distinct mappers are hot-loaded (arrays,
    ndarray headers, LRU node, user entry, credential hash), against the registry's own
    estimate (`LoadedMapper.nbytes`)."""
    import gc
    import tracemalloc

    import torch

    from services.carrier_trainer.core.carrier import MappingNetwork, mapper_to_safetensors
    from services.result_mapper.core.registry import MapperRegistry, hash_credential

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


def median_runs(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One run per server whose every level figure is the median of that figure over the
    rounds (errors: the sum; the load generator's name: the first round's)."""
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
        merged.append({**first, "levels": levels})
    return merged


def _table(runs: list[dict[str, Any]]) -> str:
    lines = [
        f"{'server':<36} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'srv CPU s':>9} {'req/srv-core-s':>14} {'steal % c0/c1':>13}"
    ]
    for run in runs:
        for level in run["levels"]:
            capacity = level.get("rps_per_server_core") or float("nan")
            lines.append(
                f"{run['server']:<36} {level['concurrency']:>4} {level['rps']:>8.0f} "
                f"{level['p50_ms']:>7.2f} {level['p99_ms']:>7.2f} {level['errors']:>6} "
                f"{level['server_cpu_s']:>9.2f} {capacity:>14.0f} "
                f"{'/'.join(str(v) for v in level.get('steal_percent', {}).values()):>13}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    parser = argparse.ArgumentParser(description="result-mapper vs MLServer")
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
        help="result-mapper settings per run, KEY=VALUE[,KEY=VALUE] (MODELGUARD_RESULT_MAPPER_*); "
        "'' is the deployed configuration (the settings' defaults, as the ConfigMap sets them), "
        "the one the bars are checked on",
    )
    parser.add_argument(
        "--users", type=int, default=200, help="users the load is spread over (round robin)"
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
        "--mapper",
        default="lenet5-fashion-features",
        help="public model whose bench_carrier mapper is served (lenet5-fashion: 10 inputs)",
    )
    args = parser.parse_args(argv)
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin server and client to cores")

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
    weights, arrays, source = _mapper_arrays(args.mapper)
    # pseudo-outputs: the query profile is fitted on 2,000 draws, requests are fresh draws
    # of the same distribution (legitimate traffic for the extraction detector)
    draws = np.random.default_rng(0).normal(size=(2000 + args.users, arrays["w1"].shape[0]))
    profile_rows, rows = draws[:2000].astype(np.float32), draws[2000:].astype(np.float32)
    request_row = rows[:1]
    rounds: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="mg-serving-") as tmp:
        workdir = Path(tmp)
        # Rounds interleave the servers (ours, theirs, ours, theirs, ...) so that a noisy
        # spell of the host (steal time, another tenant) lands on both, not on one.
        for round_number in range(1, args.rounds + 1):
            print(f"--- round {round_number} of {args.rounds}", flush=True)
            this_round: list[dict[str, Any]] = []
            for mode in args.modes:
                this_round.append(
                    _ours(
                        workdir,
                        weights,
                        mode,
                        profile_rows,
                        rows,
                        args.seconds,
                        args.warmup,
                        cc_loadgen,
                    )
                )
                print(_table(this_round[-1:]), flush=True)
            if not args.no_mlserver:
                for workers in args.mlserver_workers:
                    this_round.append(
                        _mlserver(
                            workdir,
                            arrays,
                            workers,
                            request_row,
                            args.seconds,
                            args.warmup,
                            cc_loadgen,
                        )
                    )
                    print(_table(this_round[-1:]), flush=True)
            rounds.append(this_round)
    runs = median_runs(rounds)

    def at(run: dict[str, Any], concurrency: int) -> dict[str, Any]:
        return next(level for level in run["levels"] if level["concurrency"] == concurrency)

    ours = [r for r in runs if r["server"].startswith("result-mapper")]
    theirs = [r for r in runs if r["server"].startswith("mlserver")]
    # the bars are checked on the deployed configuration (the first run), not the best
    # of ours; MLServer is given its best
    best_ours = ours[0]
    summary: dict[str, Any] = {
        "mapper": source,
        "mapper_shape": f"{arrays['w1'].shape[0]}→{arrays['w1'].shape[1]}→{arrays['w2'].shape[1]}",
        "users": args.users,
        "client": runs[0]["levels"][0].get("client", ""),
        "result_mapper": best_ours["server"],
        "result_mapper_rps_c32": at(best_ours, 32)["rps"],
        "result_mapper_p99_ms_c8": at(best_ours, 8)["p99_ms"],
        "errors": sum(level["errors"] for run in runs for level in run["levels"]),
    }
    if theirs:
        best_theirs = max(theirs, key=lambda r: at(r, 32)["rps"])
        ratio = at(best_ours, 32)["rps"] / at(best_theirs, 32)["rps"]
        summary["ratio_c32_by_round"] = [
            ours_rps / theirs_rps
            for ours_rps, theirs_rps in zip(
                at(best_ours, 32)["rps_by_round"], at(best_theirs, 32)["rps_by_round"], strict=True
            )
        ]
        summary.update(
            best_mlserver=best_theirs["server"],
            mlserver_rps_c32=at(best_theirs, 32)["rps"],
            ratio_c32=ratio,
            bar_ratio_met=ratio >= BAR_RATIO,
        )
    summary["bar_p99_met"] = summary["result_mapper_p99_ms_c8"] <= BAR_P99_MS
    summary["bytes_per_mapper"] = memory
    summary["cpu_note"] = f"os.cpu_count()={os.cpu_count()}; load average {os.getloadavg()}"
    print(f"\nmedian of {args.rounds} interleaved round(s) per server and level:")
    print(_table(runs))
    print(json.dumps(summary, indent=2))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "serving.json").write_text(
        json.dumps({"summary": summary, "runs": runs, "rounds": rounds}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
