"""Sustained load on the real result-mapper service (issue 8, "load test").

``python -m bench.bench_load [--seconds 60] [--users 1000] [--concurrency 16]`` (part of
``make bench``):

1. writes ``--users`` ready carriers into a fresh local artifact store exactly as
   carrier-trainer would (a signed 10→64→10 mapper each, the per-generation credential
   stored hashed), so the service warms every user from the store on first use;
2. starts ``python -m modelguard.services.result_mapper.main`` — the production wiring, with its
   interceptors, metrics and accounting — as a separate process on loopback (extraction
   auto-revocation and the per-user rate limits are raised out of the way: this measures
   capacity and stability, not the abuse controls, which have their own tests);
3. runs a closed-loop gRPC load generator in this process for ``--seconds``: each call
   maps one pseudo-output of a user chosen round-robin with that user's credential;
4. samples the server's resident memory every second and prints throughput, p50/p99,
   errors by status code, and memory at start (after warm-up), end and peak.

Pass criteria printed at the end: zero errors, and memory growth from start to end within
noise (``--max-growth-mb``, default 20 MB). Writes ``bench/out/load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench import results
from bench.bench_serving import percentile_ms
from modelguard.datasets import REPO_ROOT
from modelguard.localstack import free_port, wait_for_port

OUT_DIR = REPO_ROOT / "bench" / "out"
MAP_METHOD = "/modelguard.v1.ResultMapper/Map"


def seed_store(store_dir: Path, users: int) -> dict[str, str]:
    """Ready carriers for ``bench-0 … bench-{users-1}``; returns user → credential. Signed
    with the development key, which the loopback server uses without a key file."""
    import torch

    from modelguard.carrier.carrier import MappingNetwork, mapper_to_safetensors
    from modelguard.carrier.mapper_registry import hash_credential, new_credential
    from modelguard.carrier.records import READY, CarrierRecord, CarrierRepository
    from modelguard.services.carrier_trainer.service import ref_dict
    from modelguard.signing import Signer
    from modelguard.store import make_store

    store = make_store("local", root=store_dir)
    signer = Signer.development()
    repository = CarrierRepository(store)
    torch.manual_seed(0)
    credentials: dict[str, str] = {}
    for i in range(users):
        mapper = MappingNetwork(10, 10, hidden=64)
        ref = store.put_blob(mapper_to_safetensors(mapper), "application/safetensors")
        user = f"bench-{i}"
        credential = new_credential()
        repository.put(
            CarrierRecord(
                user_id=user,
                generation=1,
                credential_hash=hash_credential(credential),
                state=READY,
                artifacts={"mapper": ref_dict(ref)},
                signatures={"mapper": signer.sign(ref.sha256, "mapper")},
            )
        )
        credentials[user] = credential
    return credentials


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def run_load(
    target: str,
    requests: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
    server_pid: int,
) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(MAP_METHOD)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        memory: list[tuple[float, float]] = []
        state = {"measuring": False, "stop": False, "next": 0}

        async def worker() -> None:
            while not state["stop"]:
                request = requests[state["next"] % len(requests)]
                state["next"] += 1
                start = time.perf_counter()
                try:
                    await call(request, timeout=10)
                except grpc.aio.AioRpcError as err:
                    if state["measuring"]:
                        errors[err.code().name] = errors.get(err.code().name, 0) + 1
                    continue
                if state["measuring"]:
                    latencies.append(time.perf_counter() - start)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)  # every user warmed from the store at least once
        began = time.perf_counter()
        state["measuring"] = True
        while (elapsed := time.perf_counter() - began) < seconds:
            memory.append((elapsed, rss_mb(server_pid)))
            await asyncio.sleep(1.0)
        state["measuring"] = False
        elapsed = time.perf_counter() - began
        memory.append((elapsed, rss_mb(server_pid)))
        state["stop"] = True
        await asyncio.gather(*tasks)
    latencies.sort()
    count = len(latencies)
    pct = partial(percentile_ms, latencies)

    # start/end memory: medians of the first and last five samples (one sample is noisy)
    start_mb = statistics.median(m for _, m in memory[:5])
    end_mb = statistics.median(m for _, m in memory[-5:])
    return {
        "seconds": elapsed,
        "concurrency": concurrency,
        "requests": count,
        "rps": count / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1e3 if count else float("nan"),
        "errors": sum(errors.values()),
        "error_codes": errors,
        "rss_start_mb": start_mb,
        "rss_end_mb": end_mb,
        "rss_peak_mb": max(m for _, m in memory),
        "rss_samples": memory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-growth-mb", type=float, default=20.0)
    args = parser.parse_args(argv)

    from modelguard.proto.modelguard.v1 import result_mapper_pb2

    with tempfile.TemporaryDirectory(prefix="mg-load-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        credentials = seed_store(workdir / "store", args.users)
        print(f"seeded {args.users} users in {time.perf_counter() - started:.1f} s", flush=True)
        rng = np.random.default_rng(0)
        requests = [
            result_mapper_pb2.MapRequest(
                user_id=user,
                credential=credential,
                pseudo_output=rng.standard_normal(10).astype("<f4").tobytes(),
                rows=1,
            ).SerializeToString()
            for user, credential in credentials.items()
        ]
        port = free_port()
        env = {
            **os.environ,
            "MODELGUARD_BUS": "memory",
            "MODELGUARD_STORE": "local",
            "MODELGUARD_STORE_DIR": str(workdir / "store"),
            "MODELGUARD_SIGNING_KEY_FILE": "",  # the development key, as seed_store signs
            "MODELGUARD_LOG_LEVEL": "WARNING",
            "MODELGUARD_RESULT_MAPPER_GRPC_PORT": str(port),
            "MODELGUARD_RESULT_MAPPER_METRICS_PORT": "-1",
            "MODELGUARD_RESULT_MAPPER_AUTO_REVOKE": "false",
            "MODELGUARD_RESULT_MAPPER_MAX_ROWS_PER_GENERATION": "0",
            "MODELGUARD_RESULT_MAPPER_MAX_ROWS_PER_WINDOW": str(10**9),
            # the seeded carriers have no query profile: what is measured is the mapper
            "MODELGUARD_RESULT_MAPPER_PROFILE_SCORING": "false",
            **rate_limits_off(),
        }
        log_path = workdir / "result-mapper.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "modelguard.services.result_mapper.main"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                try:
                    wait_for_port("127.0.0.1", port, timeout=60)
                except TimeoutError:
                    print(log_path.read_text()[-3000:], file=sys.stderr)
                    raise
                result = asyncio.run(
                    run_load(
                        f"127.0.0.1:{port}",
                        requests,
                        args.concurrency,
                        args.seconds,
                        args.warmup,
                        server.pid,
                    )
                )
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
            if server.returncode not in (0, -signal.SIGTERM):
                print(log_path.read_text()[-3000:], file=sys.stderr)

    growth = result["rss_end_mb"] - result["rss_start_mb"]
    text = (
        f"result-mapper under load for {result['seconds']:.0f} s, concurrency "
        f"{args.concurrency}, {args.users} users (client and server in separate processes):\n"
        f"  {result['requests']:,} requests, {result['rps']:,.0f} req/s, p50 "
        f"{result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, max {result['max_ms']:.1f} ms\n"
        f"  errors: {result['errors']} {result['error_codes'] or ''}\n"
        f"  server RSS: start {result['rss_start_mb']:.1f} MB, end {result['rss_end_mb']:.1f} MB "
        f"(growth {growth:+.1f} MB), peak {result['rss_peak_mb']:.1f} MB\n"
        f"  machine load average at end: {os.getloadavg()[0]:.2f}"
    )
    ok = result["errors"] == 0 and growth <= args.max_growth_mb
    text += f"\nbars (0 errors, growth <= {args.max_growth_mb:g} MB): {'met' if ok else 'NOT met'}"
    print(text)
    results.record(
        "load", "Load: the result-mapper process under sustained load", results.code_block(text)
    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "load.json").write_text(
        json.dumps(result | {"users": args.users, "growth_mb": growth, "ok": ok}, indent=2)
    )
    return 0 if ok else 1


def rate_limits_off() -> dict[str, str]:
    """Environment lifting result-mapper's per-user request-rate and budget limits, for
    the settings this version has (the load test measures capacity, not the limits)."""
    from modelguard.config import ResultMapperSettings

    env: dict[str, str] = {}
    for name, field in ResultMapperSettings.model_fields.items():
        description = (field.description or "").lower()
        limit = "rate" in name or "budget" in name
        if limit and ("0: off" in description or "0: no " in description):
            env[f"MODELGUARD_RESULT_MAPPER_{name.upper()}"] = "0"
    return env


if __name__ == "__main__":
    sys.exit(main())
