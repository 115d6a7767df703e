"""`make demo` end to end: the embedded stack audits an infected model, repairs it, and
serves a user through a carrier that is then rotated."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_main_job_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, "-m", "modelguard.services.demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "250"},  # no wrapped lines to search
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for name in ("report.json", "report.html", "repaired.safetensors", "alice-carrier.png"):
        assert (out / name).is_file(), name
    # the device classifies through its carrier and keyed scores, before and after rotation
    correct = [float(share) for share in re.findall(r"([0-9.]+)% correct", text)]
    assert len(correct) == 2 and min(correct) > 90, text[-3000:]
    assert "old carrier refused at once" in text
    assert "still worked" not in text
