"""The real-scale benchmark's peak RSS is the command's own, not its parent's."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.bench_realscale import run


def test_a_commands_peak_rss_does_not_count_the_benchmarks_own_memory(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.safetensors"
    save_file({"w": torch.zeros(4)}, str(weights))
    ballast = torch.ones(768 << 18)  # 768 MB held (and touched) by the benchmark itself
    output, seconds, peak_gb = run(["scan", str(weights), "--json"])
    assert "safe" in str(output) and seconds > 0
    # a Python process that imports the CLI: far below the parent's ballast
    assert 0.02 < peak_gb < 0.7, peak_gb
    assert float(ballast[-1]) == 1.0
