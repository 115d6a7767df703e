"""State names come from the proto enums: every value has a name, none is a number."""

from __future__ import annotations

import pytest

from modelguard.proto.modelguard.v1 import common_pb2
from modelguard.services.present import failed, job_state_name, print_summary, stage_state_name


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
