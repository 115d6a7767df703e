"""Encryption-at-rest overhead: artifact upload and download throughput with and without
envelope encryption, measured in one run so that the ratio compares like with like.

``python -m bench.bench_encryption [--mb 16] [--repeats 5] [--s3]`` stores ``--repeats``
distinct random payloads of ``--mb`` MB through `LocalStore` in a temporary directory
(``--s3``: through `S3Store` on a SeaweedFS server started for the run) once plain and
once encrypted (AES-256-GCM, a fresh data key per object), alternating the two so that a
noisy spell of a shared host lands on both, and reads each back (digest checked, and
decrypted when encrypted). It prints the median MB/s per direction and the ratio
encrypted / plain. Payloads are random: compressible data would not change the work.
Takes a few seconds at the defaults. Not yet part of `make bench` or the results page.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=16.0, help="payload size, MB")
    parser.add_argument("--repeats", type=int, default=5, help="payloads per store")
    parser.add_argument("--s3", action="store_true", help="S3Store on a local SeaweedFS")
    args = parser.parse_args(argv)
    size = int(args.mb * (1 << 20))
    seconds: dict[tuple[str, str], list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-encryption-") as tmp,
        stores(Path(tmp), args.s3) as (plain, encrypted),
    ):
        for store in (plain, encrypted):  # warm-up: bucket creation, first-call costs
            store.get_blob(store.put_blob(os.urandom(1 << 16)))
        for _ in range(args.repeats):
            payload = os.urandom(size)
            for label, store in (("plain", plain), ("encrypted", encrypted)):
                started = time.perf_counter()
                ref = store.put_blob(payload)  # a fresh payload: never already stored
                uploaded = time.perf_counter()
                store.get_blob(ref)
                downloaded = time.perf_counter()
                seconds.setdefault((label, "upload"), []).append(uploaded - started)
                seconds.setdefault((label, "download"), []).append(downloaded - uploaded)
    backend = "S3Store on SeaweedFS" if args.s3 else "LocalStore"
    print(f"{backend}: {args.repeats} payloads of {args.mb:g} MB, median MB/s")
    megabytes = size / (1 << 20)
    for direction in ("upload", "download"):
        rates = {
            label: megabytes / statistics.median(seconds[(label, direction)])
            for label in ("plain", "encrypted")
        }
        print(
            f"  {direction:8}  plain {rates['plain']:8.1f}  encrypted {rates['encrypted']:8.1f}"
            f"  ratio {rates['encrypted'] / rates['plain']:.2f}"
        )


if __name__ == "__main__":
    main()
