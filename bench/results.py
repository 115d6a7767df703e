"""The results page: every benchmark writes its figures into one section of
``docs/benchmarks.md``, with the command that made them, the commit, the machine and the
date, so a figure always sits beside the run anyone can repeat.

A section lies between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``; a
benchmark replaces only its own section and leaves the others as they were measured.
Sections are kept in :data:`ORDER`; an unknown one is appended.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from modelguard.datasets import REPO_ROOT

PAGE = REPO_ROOT / "docs" / "benchmarks.md"
ORDER = (
    "zoo",
    "detection",
    "reversal_speed",
    "repair",
    "leak",
    "robustness",
    "encryption",
    "real_scale",
    "reference",
    "pass_layout",
    "carrier",
    "load",
    "serving",
)
HEADER = """# Benchmark results

Written by the benchmarks themselves (`make bench`, or the command given in each
section); each section says which command, commit, machine and date produced it. Quality
figures come from the zoo's **held-out** split (models trained with other seeds, trigger
shapes, positions and targets than the **tuning** split the rules were chosen on), unless
a section says otherwise. Speed figures are ratios against a baseline run in the same
process or script, so they hold on a noisy machine better than the absolute times.
"""


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit_label() -> str:
    """The commit measured, with ``+changes`` when the work tree differs from it (the
    results page and its images excepted: the benchmarks write them)."""
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        f":!{PAGE.relative_to(REPO_ROOT)}",
        ":!docs/benchmarks-*.png",
    )
    return f"{commit}+changes" if dirty else commit


#: The commit the benchmark started on: a long run must not be credited to a commit made
#: while it ran.
STARTED_ON = commit_label()


def machine_label() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages * size / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}"


def command_label(argv: list[str] | None = None) -> str:
    """How this run was started, as a user would type it."""
    args = sys.argv[1:] if argv is None else argv
    module = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "?"
    name = f"bench.{module}" if not module.startswith("bench.") else module
    return " ".join(["python -m", name, *(shlex.quote(a) for a in args)])


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def render_section(name: str, title: str, body: str, command: str) -> str:
    begin, end = _markers(name)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"`{command}` · commit `{commit_label()}` · {when}  \nMachine: {machine_label()}"
    return f"{begin}\n## {title}\n\n{meta}\n\n{body.strip()}\n{end}"


def record(name: str, title: str, body: str, command: str | None = None, page: Path = PAGE) -> Path:
    """Replace section ``name`` of the results page with ``body`` (Markdown)."""
    section = render_section(name, title, body, command or command_label())
    text = page.read_text() if page.exists() else HEADER
    sections = _split(text)
    sections[name] = section
    known = [n for n in ORDER if n in sections] + [n for n in sections if n not in ORDER]
    out = HEADER.rstrip() + "\n\n" + "\n\n".join(sections[n] for n in known) + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_suffix(".tmp")
    tmp.write_text(out)
    tmp.replace(page)
    return page


_SECTION = re.compile(r"<!-- bench:([\w-]+):begin -->.*?<!-- bench:\1:end -->", re.S)


def _split(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in _SECTION.finditer(text)}


def code_block(text: str) -> str:
    return f"```\n{text.rstrip()}\n```"
