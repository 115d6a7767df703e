"""Rich rendering shared by the ``modelguard`` command and the demo.

An audit as it travels through the stages (`watch`), an audit's outcome (`print_audit`),
and the stage summaries. A summary is the same document whether a service produced it
(an audit stage's ``summary_json``) or an in-process command (``modelguard detect``,
``repair``, ``leakscan``): one renderer per stage prints both. State names come from the
proto enums, never from numbers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, TaskID, TaskProgressColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from modelguard.progress import Progress
from modelguard.proto.modelguard.v1 import common_pb2
from modelguard.topics import (
    AUDIT_STAGES,
    STAGE_LEAK_DETECTOR,
    STAGE_REPAIR,
    STAGE_ROBUSTNESS,
    STAGE_TRIGGER_REVERSAL,
)

if TYPE_CHECKING:
    from modelguard.formats.files import ScanReport
    from modelguard.proto.modelguard.v1.pruning_orchestrator_pb2 import Audit
    from modelguard.services.audit_client import AuditClient

err_console = Console(stderr=True)
out_console = Console()


# --- state names ---------------------------------------------------------------------------
def _enum_name(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower().replace("_", " ")


def job_state_name(state: int) -> str:
    """``JOB_STATE_SUCCEEDED`` → ``succeeded``; an unknown number is shown as such."""
    try:
        value = common_pb2.JobState.ValueType(state)
        return _enum_name(common_pb2.JobState.Name(value), "JOB_STATE_")
    except ValueError:
        return str(state)


def stage_state_name(state: int) -> str:
    """``STAGE_STATE_NOT_RUN`` → ``not run``; an unknown number is shown as such."""
    try:
        value = common_pb2.StageState.ValueType(state)
        return _enum_name(common_pb2.StageState.Name(value), "STAGE_STATE_")
    except ValueError:
        return str(state)


def failed(state: int) -> bool:
    return state == common_pb2.JOB_STATE_FAILED


# --- progress ------------------------------------------------------------------------------
class ProgressBoard:
    """Progress of named tasks on stderr: a rich bar per task on a terminal, plain lines
    otherwise (CI logs, pipes). A task's fraction never runs backwards: a stage that begins
    again (a restart, a retried attempt) holds at its highest fraction and says so in its
    message. Use it as a context manager (the bars need stopping)."""

    def __init__(
        self, console: Console | None = None, *, step: float = 0.05, on_message: bool = False
    ) -> None:
        """``step``: the advance that prints a plain line; ``on_message``: a new message
        prints one too (an audit's stage states), else only the advance does."""
        self.console = console if console is not None else err_console
        self.step = step
        self.on_message = on_message
        self._highest: dict[str, float] = {}
        self._printed: dict[str, tuple[float, str]] = {}
        self._bars: RichProgress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressBoard:
        if self.console.is_terminal:
            self._bars = RichProgress(
                TextColumn("{task.description:>18}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("[dim]{task.fields[note]}[/dim]"),
                console=self.console,
            )
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def update(self, task: str, fraction: float, message: str = "") -> None:
        """Show ``task`` at ``fraction`` (clamped to [its highest so far, 1])."""
        highest = self._highest.get(task, 0.0)
        shown = min(max(fraction, highest), 1.0) if math.isfinite(fraction) else highest
        self._highest[task] = shown
        if self._bars is not None:
            if task not in self._tasks:
                self._tasks[task] = self._bars.add_task(task, total=1.0, note="")
            self._bars.update(self._tasks[task], completed=shown, note=message)
            return
        last = self._printed.get(task)
        if (
            last is None
            or shown - last[0] >= self.step
            or (shown >= 1.0 > last[0])
            or (self.on_message and message != last[1])
        ):
            self._printed[task] = (shown, message)
            self.console.print(
                f"{task}: {shown * 100:5.1f}% {message}".rstrip(),
                style="dim",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def reporter(self, task: str) -> Progress:
        """A `Progress` callback updating ``task``."""

        def report(fraction: float, message: str = "") -> None:
            self.update(task, fraction, message)

        return report


# --- audits --------------------------------------------------------------------------------
def watch(client: AuditClient, audit_id: str, console: Console | None = None) -> Audit:
    """Follow an audit to its end, showing each stage's progress and state on stderr."""
    audit = None
    with ProgressBoard(console, step=0.01, on_message=True) as board:
        for audit in client.watch(audit_id):
            for stage in audit.stages:
                message = stage.error.message or stage.message
                board.update(
                    stage.stage,
                    stage.progress,
                    f"{stage_state_name(stage.state)} {message}".rstrip(),
                )
    return audit if audit is not None else client.get(audit_id)


def print_audit(audit: Audit) -> None:
    out_console.print(f"audit [bold]{audit.audit_id}[/bold]: {job_state_name(audit.state)}")
    table = Table("stage", "state", "message")
    for stage in audit.stages:
        message = stage.error.message if stage.error.message else stage.message
        table.add_row(stage.stage, stage_state_name(stage.state), message)
    out_console.print(table)
    for stage in audit.stages:
        if stage.summary_json:
            print_summary(stage.stage, json.loads(stage.summary_json))
    if audit.report_html.sha256:
        out_console.print(f"report: modelguard audit report {audit.audit_id} --out DIR")


def print_audit_list(audits: Iterable[Audit]) -> None:
    table = Table("audit", "state", "created", *AUDIT_STAGES)
    for audit in audits:
        stages = {s.stage: stage_state_name(s.state) for s in audit.stages}
        table.add_row(
            audit.audit_id,
            job_state_name(audit.state),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(audit.created_at)),
            *(stages.get(s, "") for s in AUDIT_STAGES),
        )
    out_console.print(table)


# --- stage summaries -----------------------------------------------------------------------
def print_summary(stage: str, summary: dict[str, Any]) -> None:
    """The summary document of ``stage`` (stages without a renderer print nothing)."""
    if stage == STAGE_TRIGGER_REVERSAL and summary.get("labels"):
        print_reversal(summary)
    elif stage == STAGE_LEAK_DETECTOR:
        print_leak(summary)
    elif stage == STAGE_REPAIR and "before" in summary:
        print_repair(summary)
    elif stage == STAGE_ROBUSTNESS and summary.get("points"):
        print_robustness(summary)


def print_reversal(summary: dict[str, Any]) -> None:
    """A trigger-reversal summary (`ReversalResult.to_dict` and what the service adds)."""
    flagged = list(summary.get("flagged", []))
    labels = Table(
        "label",
        "L1 norm",
        "anomaly index",
        "attack success",
        "flagged",
        title="trigger reversal (Neural Cleanse, MAD)",
    )
    rows = summary.get("labels", [])
    optimised = [row for row in rows if row.get("optimised", True)]
    for row in optimised:
        labels.add_row(
            str(row["label"]),
            _fixed(row.get("l1_norm"), 2),
            _fixed(row.get("anomaly_index"), 2),
            _fixed(row.get("attack_success"), 3),
            "yes" if row["label"] in flagged else "",
        )
    out_console.print(labels)
    if len(optimised) < len(rows):
        out_console.print(
            f"{len(rows) - len(optimised)} of {len(rows)} labels were left out by the triage "
            "(only the likeliest targets and a random sample were optimised)"
        )
    evidence = summary.get("evidence") or {}
    if evidence.get("summary"):
        out_console.print(str(evidence["summary"]), markup=False, highlight=False)
    seconds = summary.get("seconds")
    out_console.print(
        f"verdict: [bold]{summary.get('verdict')}[/bold] (flagged: {flagged or 'none'})"
        + (f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else "")
    )


def print_leak(summary: dict[str, Any]) -> None:
    """A leak-detector summary (`LeakVerdict.to_dict`)."""
    out_console.print(
        f"leak verdict: [bold]{summary.get('verdict')}[/bold] (score {summary.get('score', 0):.3g})"
    )
    layers = Table(
        "layer",
        "count",
        "min",
        "max",
        "mean",
        "variance",
        "skewness",
        "kurtosis",
        ">3σ",
        title="parameter statistics",
    )
    for row in summary.get("layers", []):
        layers.add_row(
            row["layer"],
            str(row["count"]),
            *(
                f"{row[k]:.4g}"
                for k in ("min", "max", "mean", "variance", "skewness", "kurtosis", "tail_fraction")
            ),
        )
    out_console.print(layers)
    for item in summary.get("evidence", [])[:10]:
        out_console.print(f"  evidence: {item['layer']} {item['feature']} = {item['value']:.4g}")


def print_repair(summary: dict[str, Any]) -> None:
    """A repair summary (`RepairResult.to_dict` with the stage's ``mode`` and ``verdict``)."""
    table = Table("measure", "before", "after", title=f"repair ({summary.get('mode')})")
    for key in summary.get("before", {}):
        table.add_row(key, _num(summary["before"][key]), _num(summary["after"].get(key)))
    out_console.print(table)
    verdict = f"; {summary['verdict']}" if summary.get("verdict") else ""
    edit = f"; edited {summary['edit']}" if summary.get("edit") else ""
    out_console.print(f"pruned {len(summary.get('pruned', []))} neurons{edit}{verdict}")


def print_robustness(summary: dict[str, Any]) -> None:
    """A robustness summary (`RobustnessResult.to_dict`): robust accuracy against ε, each
    attack's accuracy, the gradient-masking check and the notes."""
    points = summary.get("points", [])
    attacks = [a["attack"] for a in points[0]["attacks"]] if points else []
    kind = "targeted" if summary.get("targeted") else "untargeted"
    table = Table(
        "ε",
        "robust accuracy",
        *attacks,
        title=f"robust accuracy ({summary.get('norm')}, {kind}, {summary.get('images')} images; "
        f"clean {summary.get('clean_accuracy', 0):.1%})",
    )
    for point in points:
        table.add_row(
            f"{point['eps']:g}",
            f"{point['robust_accuracy']:.1%}",
            *(f"{a['accuracy']:.1%}" for a in point["attacks"]),
        )
    out_console.print(table)
    masking = summary.get("masking", {})
    if masking.get("flagged"):
        out_console.print("[red]gradient masking suspected[/red]: these figures are an upper bound")
        for reason in masking.get("reasons", []):
            out_console.print(f"  - {escape(reason)}", soft_wrap=True)
    else:
        out_console.print("gradient-masking check: passed")
    for note in summary.get("notes", []):
        out_console.print(f"note: {escape(note)}", soft_wrap=True)


def print_scan(report: ScanReport) -> None:
    """A file-safety scan: one line per file, the findings' reasons, a count."""
    marks = {"safe": "[green]safe[/green]", "unsafe": "[red]UNSAFE[/red]"}
    for scan in report.files:
        mark = marks.get(scan.outcome, "[yellow]unreadable[/yellow]")
        what = scan.format if scan.outcome == "safe" else scan.reason
        out_console.print(f"{mark} {escape(str(scan.path))}: {escape(what or '')}", soft_wrap=True)
    out_console.print(
        f"{len(report.files)} file(s) scanned: {report.count('safe')} safe, "
        f"{report.count('unsafe')} unsafe, {report.count('unreadable')} unreadable"
        + (f"; {len(report.skipped)} other file(s) skipped" if report.skipped else "")
    )


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(_num(v) for v in value)
    return str(value)
