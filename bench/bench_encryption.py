"""Encryption-at-rest overhead: artifact upload and download throughput with and without
envelope encryption, measured in one run so that the ratio compares like with like.

``python -m bench.bench_encryption [--mb 16] [--repeats 5] [--backend local|s3|both]``
stores ``--repeats`` distinct random payloads of ``--mb`` MB through `LocalStore` in a
temporary directory and through `S3Store` on a SeaweedFS server started for the run (the
store the platform runs on), each once plain and once encrypted (AES-256-GCM, a fresh data
key per object), alternating the two so that a noisy spell of a shared host lands on both,
and reads each back (digest checked, and decrypted when encrypted). It prints, per backend
and direction, the median MB/s plain and encrypted, their ratio, and the added cost in
milliseconds per MB, and writes the table to the results page. Payloads are random:
compressible data would not change the work. ``--no-record`` prints only.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import results
from modelguard.store.base import ArtifactStore
from modelguard.store.encryption import EnvelopeCipher, Keyring
from modelguard.store.local import LocalStore


def random_keyring() -> Keyring:
    key = base64.b64encode(os.urandom(32)).decode()
    document = {"tenants": {"platform": {"active": "bench", "keys": {"bench": key}}}}
    return Keyring.parse(document, "benchmark keyring")


@contextmanager
def stores(workdir: Path, s3: bool) -> Iterator[tuple[ArtifactStore, ArtifactStore]]:
    """A plain and an encrypted store (separate directories or buckets)."""
    cipher = EnvelopeCipher(random_keyring())
    if not s3:
        yield LocalStore(workdir / "plain"), LocalStore(workdir / "encrypted", cipher)
        return
    from modelguard.localstack import start_seaweedfs
    from modelguard.store.s3 import S3Store

    server = start_seaweedfs(workdir / "seaweedfs")
    try:

        def s3_store(bucket: str, cipher: EnvelopeCipher | None) -> S3Store:
            return S3Store(
                server.endpoint, server.access_key, server.secret_key, bucket, cipher=cipher
            )

        yield s3_store("bench-plain", None), s3_store("bench-encrypted", cipher)
    finally:
        server.stop()


def measure(backend: str, size: int, repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds per transfer, keyed by (plain|encrypted, upload|download)."""
    seconds: dict[tuple[str, str], list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-encryption-") as tmp,
        stores(Path(tmp), backend == "s3") as (plain, encrypted),
    ):
        for store in (plain, encrypted):  # warm-up: bucket creation, first-call costs
            store.get_blob(store.put_blob(os.urandom(1 << 16)))
        for _ in range(repeats):
            payload = os.urandom(size)
            for label, store in (("plain", plain), ("encrypted", encrypted)):
                started = time.perf_counter()
                ref = store.put_blob(payload)  # a fresh payload: never already stored
                uploaded = time.perf_counter()
                store.get_blob(ref)
                downloaded = time.perf_counter()
                seconds.setdefault((label, "upload"), []).append(uploaded - started)
                seconds.setdefault((label, "download"), []).append(downloaded - uploaded)
    return seconds


BACKENDS = {"local": "LocalStore (disk)", "s3": "S3Store on SeaweedFS"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=16.0, help="payload size, MB")
    parser.add_argument("--repeats", type=int, default=5, help="payloads per store")
    parser.add_argument("--backend", choices=("local", "s3", "both"), default="both")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    size = int(args.mb * (1 << 20))
    megabytes = size / (1 << 20)
    lines = [
        f"{args.repeats} random payloads of {args.mb:g} MB per store, stored and read back "
        "(digest checked) plain and encrypted (AES-256-GCM envelope, a fresh data key per "
        "object), alternately; medians.",
        "",
        "| store | direction | plain MB/s | encrypted MB/s | ratio | added ms per MB |",
        "|---|---|---|---|---|---|",
    ]
    backends = ("local", "s3") if args.backend == "both" else (args.backend,)
    for backend in backends:
        seconds = measure(backend, size, args.repeats)
        for direction in ("upload", "download"):
            plain = statistics.median(seconds[("plain", direction)])
            encrypted = statistics.median(seconds[("encrypted", direction)])
            lines.append(
                f"| {BACKENDS[backend]} | {direction} | {megabytes / plain:.1f} | "
                f"{megabytes / encrypted:.1f} | {plain / encrypted:.2f} | "
                f"{1000 * (encrypted - plain) / megabytes:.1f} |"
            )
    print("\n".join(lines))
    if not args.no_record:
        results.record("encryption", "Encryption at rest: overhead per MB", "\n".join(lines))


if __name__ == "__main__":
    main()
