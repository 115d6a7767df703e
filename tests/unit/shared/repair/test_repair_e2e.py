"""End to end: an infected LeNet-5 (the session fixture, poisoned independently of the
project's attack toolkit), its trigger reversed by Neural Cleanse on the defender's 500
clean samples, then repaired. The real trigger is used only to grade the result."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from modelguard.detection.neural_cleanse import ReversalConfig, reverse_triggers
from modelguard.nn.training import accuracy
from modelguard.repair.registry import repair
from modelguard.repair.rollback import RollbackConfig
from modelguard.repair.shapley import ShapleyConfig
from modelguard.repair.shapley_prune import ShapleyPruneConfig
from modelguard.spec import InputSpec

SPEC = InputSpec((1, 28, 28), (0.0, 1.0))
ASR_BAR = 0.10
ACCURACY_DROP_BAR = 0.03
CONFIGS = {
    "rollback": RollbackConfig(),
    # a smaller Shapley budget than the default keeps the test fast
    "shapley": ShapleyPruneConfig(
        shapley=ShapleyConfig(max_evaluations=2000), per_round=3, max_rounds=6
    ),
}


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread, set before the session's infected model is trained: on the
    shared two-core machine two threads run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reversed_trigger(infected_lenet: Any) -> Any:
    result = reverse_triggers(
        infected_lenet.module, infected_lenet.clean, SPEC, ReversalConfig(steps=150, seed=0)
    )
    assert result.flagged == (infected_lenet.target,)
    return result


@pytest.mark.parametrize("mode", ["rollback", "shapley"])
def test_repair_removes_the_real_backdoor(
    infected_lenet: Any, reversed_trigger: Any, mode: str
) -> None:
    model = infected_lenet.module
    before_accuracy = accuracy(model, infected_lenet.holdout)
    assert infected_lenet.real_asr(model) > 0.9

    progress: list[float] = []
    result = repair(
        model,
        infected_lenet.clean,
        SPEC,
        reversed_trigger,
        mode=mode,
        config=CONFIGS[mode],
        progress=lambda fraction, text="": progress.append(fraction),
    )

    repaired = result.model
    assert repaired is not None and repaired is not model
    assert result.target_labels == [infected_lenet.target]
    assert result.layer == "fc1" and result.pruned
    assert result.before.reversed_asr > 0.9
    assert result.after.reversed_asr < ASR_BAR
    # graded with the real trigger, which the repair never saw
    assert infected_lenet.real_asr(repaired) < ASR_BAR
    assert accuracy(repaired, infected_lenet.holdout) >= before_accuracy - ACCURACY_DROP_BAR
    # the original is untouched and the pruned neurons are zero in the copy
    assert infected_lenet.real_asr(model) > 0.9
    for _, index in result.pruned:
        assert torch.all(repaired.fc1.weight[index] == 0)
    assert result.evaluations > 0 and result.seconds > 0
    assert progress and all(0.0 <= f <= 1.0 for f in progress)
    document = result.to_dict()
    assert set(document) >= {"target_labels", "pruned", "before", "after", "curve", "seconds"}
    assert all(step["action"] in ("kept", "rolled_back") for step in document["curve"])
