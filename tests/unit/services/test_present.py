"""State names come from the proto enums: every value has a name, none is a number.
Progress shows as bars on a terminal and as lines elsewhere, and never runs backwards."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from rich.console import Console

from modelguard.proto.modelguard.v1 import common_pb2
from modelguard.proto.modelguard.v1.pruning_orchestrator_pb2 import Audit
from modelguard.services.present import (
    ProgressBoard,
    failed,
    job_state_name,
    print_summary,
    stage_state_name,
    watch,
)


def test_every_state_has_its_enum_name() -> None:
    assert [job_state_name(v) for v in common_pb2.JobState.values()] == [
        "unspecified",
        "queued",
        "running",
        "succeeded",
        "failed",
    ]
    assert stage_state_name(common_pb2.STAGE_STATE_NOT_RUN) == "not run"
    assert stage_state_name(common_pb2.STAGE_STATE_SKIPPED) == "skipped"
    for value in common_pb2.StageState.values():
        assert not stage_state_name(value).isdigit()
    assert job_state_name(99) == "99"  # a newer server's state is shown, not a crash
    assert failed(common_pb2.JOB_STATE_FAILED) and not failed(common_pb2.JOB_STATE_SUCCEEDED)


def test_summaries_render(capsys: pytest.CaptureFixture[str]) -> None:
    print_summary(
        "trigger-reversal",
        {
            "verdict": "infected",
            "flagged": [1],
            "labels": [
                {"label": 0, "l1_norm": None, "anomaly_index": None, "attack_success": 0.1},
                {"label": 1, "l1_norm": 3.0, "anomaly_index": 4.2, "attack_success": 1.0},
            ],
            "seconds": 2.0,
        },
    )
    print_summary("repair", {"mode": "rollback", "before": {"accuracy": 0.9}, "after": {}})
    out = capsys.readouterr().out
    assert "verdict: infected (flagged: [1]) in 2.0 s" in out
    assert "repair (rollback)" in out and "pruned 0 neurons" in out
    print_summary("repair", {"mode": "rollback", "before": {}, "after": {}, "edit": "fc (re-fit)"})
    assert "pruned 0 neurons; edited fc (re-fit)" in capsys.readouterr().out


# --- progress ------------------------------------------------------------------------------
def _plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_plain_progress_lines_never_run_backwards() -> None:
    console, buffer = _plain_console()
    with ProgressBoard(console) as board:
        report = board.reporter("reversal")
        for fraction in (0.0, 0.02, 0.46, 0.32, 0.40, 0.52, float("nan"), 1.0, 1.0):
            report(fraction, "restart" if fraction == 0.32 else "")
    assert buffer.getvalue().splitlines() == [
        "reversal:   0.0%",
        "reversal:  46.0%",
        "reversal:  52.0%",  # 0.32 and 0.40 held at 46 %, so no new line until 52 %
        "reversal: 100.0%",
    ]


def test_stage_lines_print_on_a_new_state_and_hold_their_highest_fraction() -> None:
    console, buffer = _plain_console()
    with ProgressBoard(console, step=0.01, on_message=True) as board:
        board.update("trigger-reversal", 0.46, "running")
        board.update("trigger-reversal", 0.32, "running attempt 2")
        board.update("leak-detector", 1.0, "succeeded")
    assert buffer.getvalue().splitlines() == [
        "trigger-reversal:  46.0% running",
        "trigger-reversal:  46.0% running attempt 2",
        "leak-detector: 100.0% succeeded",
    ]


def test_a_terminal_gets_a_bar_that_never_runs_backwards() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with ProgressBoard(console) as board:
        assert board._bars is not None
        board.update("reversal", 0.46, "label 3")
        board.update("reversal", 0.32, "restart")
        task = board._bars.tasks[0]
        assert (task.description, task.completed, task.fields["note"]) == (
            "reversal",
            0.46,
            "restart",
        )
    assert board._bars is None  # stopped on exit
    assert "46%" in buffer.getvalue() and "32%" not in buffer.getvalue()


def test_watch_shows_each_stage_of_the_audit() -> None:
    console, buffer = _plain_console()

    class Client:
        def watch(self, audit_id: str) -> Iterator[Audit]:
            for progress, state in (
                (0.5, common_pb2.STAGE_STATE_RUNNING),
                (0.2, common_pb2.STAGE_STATE_RUNNING),
                (1.0, common_pb2.STAGE_STATE_DONE),
            ):
                stage = common_pb2.StageStatus(
                    stage="trigger-reversal", state=state, progress=progress
                )
                yield Audit(audit_id=audit_id, stages=[stage])

    audit = watch(Client(), "a1", console)  # type: ignore[arg-type]
    assert audit.stages[0].progress == 1.0
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "trigger-reversal:  50.0% running"
    assert all("20.0%" not in line for line in lines)
    assert lines[-1].startswith("trigger-reversal: 100.0%")
