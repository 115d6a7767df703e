"""Serving benchmark: the result-mapper against Seldon MLServer on the same mapper weights.

``python -m bench.bench_serving`` (part of ``make bench``):

1. takes the mapper `bench.bench_carrier` trained for ``--mapper`` (default: carrier-trainer's
   default public model, lenet5-fashion-features, 214→256→10; ``.cache/carrier-bench/``)
   or, if that has not run, a seeded 10→256→10 mapper; writes it as safetensors (result-mapper)
   and ``.npz`` (MLServer runtime `bench.mlserver_runtime`);
2. for every server configuration, starts the server pinned to core 0 (``taskset``) and
   runs the same load generator pinned to core 1: closed-loop gRPC unary calls at
   concurrency 1, 8 and 32 (``--seconds`` each after a warm-up), one pre-serialised
   request with one 10-float pseudo-output, counting every non-OK status as an error;
3. prints a table, checks the bars (≥ 2.5× MLServer's best configuration at concurrency
   32; p99 ≤ 5 ms at concurrency 8; zero errors) and writes ``bench/out/serving.json``.

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
    request: bytes,
    concurrency: int,
    seconds: float,
    warmup: float,
    server_pgid: int = 0,
) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        # raw bytes both ways: the load generator never (de)serialises
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        state = {"measuring": False, "stop": False}

        async def worker() -> None:
            while not state["stop"]:
                start = time.perf_counter()
                try:
                    await call(request, timeout=10)
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


async def _wait_ready(target: str, method: str, request: bytes, timeout: float) -> bytes:
    import grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                ready: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
                response: bytes = await ready(request, timeout=2)
                return response
        except grpc.aio.AioRpcError as err:
            last = err
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{target} not ready after {timeout:g} s: {last}")


def loadgen_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.bench_serving loadgen")
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--request-file", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--server-pgid", type=int, default=0)
    args = parser.parse_args(argv)
    request = args.request_file.read_bytes()

    async def run() -> None:
        first = await _wait_ready(args.target, args.method, request, args.ready_timeout)
        print(
            json.dumps({"ready": True, "response_bytes": len(first), "response_hex": first.hex()}),
            flush=True,
        )
        for concurrency in args.concurrency:
            result = await _run_level(
                args.target,
                args.method,
                request,
                concurrency,
                args.seconds,
                args.warmup,
                args.server_pgid,
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


def _run_loadgen(
    target: str, method: str, request_file: Path, seconds: float, warmup: float, server_pgid: int
) -> list[dict[str, Any]]:
    command = [
        "taskset", "-c", "1", sys.executable, "-m", "bench.bench_serving", "loadgen",
        "--target", target, "--method", method, "--request-file", str(request_file),
        "--seconds", str(seconds), "--warmup", str(warmup), "--server-pgid", str(server_pgid),
    ]  # fmt: skip
    out = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise SystemExit(f"load generator failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return lines


def _ours(
    workdir: Path, weights: bytes, mode: str, request_row: np.ndarray, seconds: float, warmup: float
) -> dict[str, Any]:
    from services.result_mapper.core.registry import hash_credential
    from shared.proto.modelguard.v1 import result_mapper_pb2

    weights_file = workdir / "mapper.safetensors"
    weights_file.write_bytes(weights)
    credential = "bench-credential-" + "x" * 24
    port = _free_port()
    server = Server(
        f"result-mapper-{mode.replace(':', '-')}",
        [
            sys.executable, "-m", "bench.mapper_server", "--weights", str(weights_file),
            "--credential-hash", hash_credential(credential), "--mode", mode.split(":")[0],
            "--workers", [*mode.split(":"), "8"][1],
            "--port", str(port), "--users", "1000",
        ],
        workdir,
    )  # fmt: skip
    request = result_mapper_pb2.MapRequest(
        user_id="bench-7",
        credential=credential,
        pseudo_output=request_row.astype("<f4").tobytes(),
        rows=1,
    ).SerializeToString()
    request_file = workdir / f"map-{mode.replace(':', '-')}.bin"
    request_file.write_bytes(request)
    try:
        results = _run_loadgen(
            f"127.0.0.1:{port}", MAP_METHOD, request_file, seconds, warmup, server.process.pid
        )
    except SystemExit:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    ready, levels = results[0], results[1:]
    response = result_mapper_pb2.MapResponse.FromString(bytes.fromhex(ready["response_hex"]))
    return {
        "server": f"result-mapper ({mode})",
        "first_label": list(response.labels),
        "levels": levels,
    }


def _mlserver(
    workdir: Path,
    arrays: dict[str, np.ndarray],
    workers: int,
    request_row: np.ndarray,
    seconds: float,
    warmup: float,
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
    request_file = workdir / "infer.bin"
    request_file.write_bytes(_mlserver_request(venv, request_row, workdir))
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


def _table(runs: list[dict[str, Any]]) -> str:
    lines = [
        f"{'server':<36} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'srv CPU s':>9} {'req/srv-core-s':>14}"
    ]
    for run in runs:
        for level in run["levels"]:
            capacity = level.get("rps_per_server_core") or float("nan")
            lines.append(
                f"{run['server']:<36} {level['concurrency']:>4} {level['rps']:>8.0f} "
                f"{level['p50_ms']:>7.2f} {level['p99_ms']:>7.2f} {level['errors']:>6} "
                f"{level['server_cpu_s']:>9.2f} {capacity:>14.0f}"
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
        "--modes", nargs="+", default=["sync:4", "sync:16", "aio"], help="aio, sync or sync:N"
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

    memory = [
        *(measure_mapper_bytes(10, h) for h in (64, 256)),  # lenet5-fashion
        *(measure_mapper_bytes(214, h, users=500) for h in (64, 256)),  # lenet5-fashion-features
        measure_mapper_bytes(1000, 256, users=200),  # efficientnet-lite0
    ]
    for row in memory:
        print(json.dumps(row), flush=True)
    weights, arrays, source = _mapper_arrays(args.mapper)
    request_row = (
        np.random.default_rng(0).normal(size=(1, arrays["w1"].shape[0])).astype(np.float32)
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mg-serving-") as tmp:
        workdir = Path(tmp)
        for mode in args.modes:
            runs.append(_ours(workdir, weights, mode, request_row, args.seconds, args.warmup))
            print(_table(runs[-1:]), flush=True)
        if not args.no_mlserver:
            for workers in args.mlserver_workers:
                runs.append(
                    _mlserver(workdir, arrays, workers, request_row, args.seconds, args.warmup)
                )
                print(_table(runs[-1:]), flush=True)

    def at(run: dict[str, Any], concurrency: int) -> dict[str, Any]:
        return next(level for level in run["levels"] if level["concurrency"] == concurrency)

    ours = [r for r in runs if r["server"].startswith("result-mapper")]
    theirs = [r for r in runs if r["server"].startswith("mlserver")]
    best_ours = max(ours, key=lambda r: at(r, 32)["rps"])
    summary: dict[str, Any] = {
        "mapper": source,
        "mapper_shape": f"{arrays['w1'].shape[0]}→{arrays['w1'].shape[1]}→{arrays['w2'].shape[1]}",
        "best_result_mapper": best_ours["server"],
        "result_mapper_rps_c32": at(best_ours, 32)["rps"],
        "result_mapper_p99_ms_c8": at(best_ours, 8)["p99_ms"],
        "errors": sum(level["errors"] for run in runs for level in run["levels"]),
    }
    if theirs:
        best_theirs = max(theirs, key=lambda r: at(r, 32)["rps"])
        ratio = at(best_ours, 32)["rps"] / at(best_theirs, 32)["rps"]
        summary.update(
            best_mlserver=best_theirs["server"],
            mlserver_rps_c32=at(best_theirs, 32)["rps"],
            ratio_c32=ratio,
            bar_ratio_met=ratio >= BAR_RATIO,
        )
    summary["bar_p99_met"] = summary["result_mapper_p99_ms_c8"] <= BAR_P99_MS
    summary["bytes_per_mapper"] = memory
    summary["cpu_note"] = f"os.cpu_count()={os.cpu_count()}; load average {os.getloadavg()}"
    print("\n" + _table(runs))
    print(json.dumps(summary, indent=2))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "serving.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
