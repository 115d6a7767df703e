"""`make bench`: every benchmark in turn, each in its own process (so one's threads and
caches do not colour another's timings). Benchmarks print figures; they are not tests.

``python -m bench.run_all [--only NAME ...]``; ``--list`` shows the names.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS: dict[str, list[str]] = {
    "zoo": ["bench.zoo"],
    "detection": ["bench.bench_detection", "--seeds", "0,1,2"],
    "reversal-speed": ["bench.bench_reversal_speed"],
    "pass-layout": ["bench.bench_pass_layout"],
    "repair": ["bench.bench_repair", "--ensure"],
    "leak": ["bench.bench_leak"],
    "robustness": ["bench.bench_robustness"],
    "encryption": ["bench.bench_encryption"],
    "real-scale": ["bench.bench_realscale"],
    "reference": ["bench.bench_reference"],
    "blend-probe": ["bench.bench_blend_probe", "--small"],
    "carrier": ["bench.bench_carrier"],
    "serving": ["bench.bench_serving"],
    "load": ["bench.bench_load"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], choices=list(BENCHMARKS))
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(BENCHMARKS))
        return
    failed = []
    for name, command in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"\n===== {name}: python -m {' '.join(command)}", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", *command])
        print(f"===== {name}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
