"""The Shapley estimator: exact games, and a toy model whose neurons' contributions to the
attack success rate are known in closed form."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.repair.shapley import ShapleyConfig, estimate_shapley, shapley_game
from modelguard.spec import InputSpec


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the CI machine has two cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exact_shapley(value: dict[frozenset[int], float], n: int) -> list[float]:
    """Shapley values of the game ``v(S) = a(∅) - a(S)`` by enumeration."""
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                total += weight * (value[s] - value[s | {i}])
        out.append(total)
    return out


def metric_from(table: dict[frozenset[int], float], n: int):  # type: ignore[no-untyped-def]
    calls = [0]

    def metric(pruned: torch.Tensor) -> torch.Tensor:
        calls[0] += len(pruned)
        return torch.tensor(
            [table[frozenset(int(i) for i in torch.nonzero(row).flatten())] for row in pruned]
        )

    return metric, calls


def all_subsets(n: int) -> list[frozenset[int]]:
    return [frozenset(c) for k in range(n + 1) for c in itertools.combinations(range(n), k)]


def test_additive_game_is_recovered_exactly() -> None:
    weights = [0.4, 0.3, 0.0, 0.2, 0.1]
    table = {s: 1.0 - sum(weights[i] for i in s) for s in all_subsets(5)}
    metric, _ = metric_from(table, 5)
    estimate = shapley_game(metric, list(range(5)), 5, ShapleyConfig(truncation=0.0, seed=1))
    assert torch.allclose(estimate.values, torch.tensor(weights, dtype=torch.float64), atol=1e-6)
    assert torch.all(estimate.ci < 1e-6)  # every marginal is the same number


def test_interacting_game_matches_enumeration() -> None:
    # a(S): the attack works unless neuron 0 is pruned, or both 1 and 2 are; neuron 3 adds
    # a little on its own; 4 and 5 are null players
    n = 6
    table = {}
    for s in all_subsets(n):
        broken = 0 in s or {1, 2} <= s
        table[s] = (0.0 if broken else 0.8) + (0.0 if 3 in s else 0.2)
    exact = exact_shapley(table, n)
    assert exact[:4] == pytest.approx([0.8 * 2 / 3, 0.8 / 6, 0.8 / 6, 0.2])
    metric, calls = metric_from(table, n)
    config = ShapleyConfig(permutations=200, truncation=0.0, max_evaluations=100_000, seed=3)
    estimate = shapley_game(metric, list(range(n)), n, config)
    assert torch.allclose(estimate.values.float(), torch.tensor(exact), atol=0.06)
    # the 95% intervals cover the truth (with a little slack for the 5%)
    covered = (estimate.values - torch.tensor(exact, dtype=torch.float64)).abs() <= (
        estimate.ci + 1e-9
    ) * 1.5
    assert int(covered.sum()) >= n - 1
    assert estimate.evaluations == calls[0]
    assert int(torch.argmax(estimate.values)) == 0


def test_values_sum_to_the_total_drop_without_truncation() -> None:
    n = 5
    table = {s: float(max(0.0, 1.0 - 0.3 * len(s))) ** 2 for s in all_subsets(n)}
    metric, _ = metric_from(table, n)
    config = ShapleyConfig(permutations=7, truncation=0.0, ci_target=10.0, seed=0)
    estimate = shapley_game(metric, list(range(n)), n, config)
    assert estimate.permutations == 7
    assert float(estimate.values.sum()) == pytest.approx(estimate.base - estimate.floor)


def test_truncation_saves_evaluations() -> None:
    # the attack dies once any 2 of the 24 neurons are pruned
    n = 24
    metric = lambda pruned: (pruned.sum(1) < 2).float()  # noqa: E731
    loose = ShapleyConfig(permutations=10, truncation=0.0, ci_target=10.0)
    tight = ShapleyConfig(permutations=10, truncation=0.01, ci_target=10.0)
    full = shapley_game(metric, list(range(n)), n, loose)
    cut = shapley_game(metric, list(range(n)), n, tight)
    assert cut.evaluations < full.evaluations / 2
    # nothing is lost here: after the second prune every marginal is truly 0
    assert torch.allclose(cut.values, full.values)


def test_epsilon_greedy_refinement_focuses_on_the_top_candidates() -> None:
    n = 20
    weights = torch.zeros(n)
    weights[[3, 11]] = torch.tensor([0.5, 0.3])
    generator = torch.Generator().manual_seed(0)

    def noisy(pruned: torch.Tensor) -> torch.Tensor:  # additive game with noise
        drop = (pruned.float() * weights).sum(1)
        return 1.0 - drop + 0.05 * torch.randn(len(pruned), generator=generator)

    config = ShapleyConfig(
        permutations=4, truncation=0.0, top_k=2, ci_target=0.01, max_evaluations=3000, epsilon=0.1
    )
    estimate = shapley_game(noisy, list(range(n)), n, config)
    assert estimate.evaluations <= 3000
    top = torch.argsort(estimate.values, descending=True)[:2].tolist()
    assert top == [3, 11]
    # the two leaders got more samples than the average player
    assert estimate.samples[[3, 11]].float().mean() > 2 * estimate.samples.float().mean()
    assert float(estimate.ci[3]) < float(
        estimate.ci[[i for i in range(n) if i not in (3, 11)]].max()
    )


def test_non_players_get_zero() -> None:
    table = {s: 1.0 - 0.5 * (1 in s) - 0.5 * (2 in s) for s in all_subsets(4)}
    metric, _ = metric_from(table, 4)
    estimate = shapley_game(metric, [1, 2, 3], 4, ShapleyConfig(truncation=0.0))
    assert estimate.values[0] == 0.0 and estimate.ci[0] == 0.0
    assert estimate.values[1:3].tolist() == pytest.approx([0.5, 0.5])


# ---------------------------------------------------------------- a toy model


class OrAndNet(nn.Module):
    """Inputs (1, 4, 4), 2 classes, ``fc1`` with six neurons. The trigger (pixel 15) feeds
    neurons 0, 1 and 2 (1.5 each); the target logit gets ``4·h0 + 3·h1 + 3·h2`` against
    about 5 for the other class, so the attack survives on neuron 0 alone or on 1 and 2
    together: ASR(S) = 0 iff 0 ∈ S and S meets {1, 2}. Shapley values: 2/3, 1/6, 1/6, and
    0 for neurons 3-5 (clean features the stamped inputs do not use)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 6)
        self.fc2 = nn.Linear(6, 2)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.zero_()
            self.fc1.weight[0:3, 15] = 1.0
            self.fc1.weight[3:6, 0:3] = torch.eye(3)
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.tensor([5.0, 0.0]))
            self.fc2.weight[1, 0:3] = torch.tensor([4.0, 3.0, 3.0])
            self.fc2.weight[0, 3:6] = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def toy_setup() -> tuple[Dataset, ReversedTrigger, InputSpec]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 4, 4, generator=generator) * 0.5
    x[:, 0, 3, 3] = 0.0
    y = torch.zeros(200, dtype=torch.long)
    mask = torch.zeros(4, 4)
    mask[3, 3] = 1.0
    return (
        Dataset(x, y),
        ReversedTrigger(1, mask, torch.full((1, 4, 4), 1.5)),
        InputSpec((1, 4, 4), value_range=(0.0, 1.5)),
    )


TRUE_VALUES = torch.tensor([2 / 3, 1 / 6, 1 / 6, 0.0, 0.0, 0.0])


def test_toy_model_contributions_are_recovered() -> None:
    data, trigger, spec = toy_setup()
    config = ShapleyConfig(seed=0, max_evaluations=1500)
    result = estimate_shapley(OrAndNet().eval(), data, [trigger], spec, config)
    assert result.layer == "fc1" and result.mode == "hook"
    assert result.base_metric == 1.0 and result.floor_metric == 0.0
    assert torch.allclose(result.values, TRUE_VALUES, atol=0.1)
    assert result.ranking[0] == 0
    assert set(result.ranking[1:3].tolist()) == {1, 2}
    assert 0 < result.evaluations <= config.max_evaluations
    assert torch.all(result.ci >= 0) and torch.all(torch.isfinite(result.ci))
    assert result.to_dict()["evaluations"] == result.evaluations


def test_fixed_neurons_are_not_players() -> None:
    data, trigger, spec = toy_setup()
    result = estimate_shapley(
        OrAndNet().eval(),
        data,
        [trigger],
        spec,
        ShapleyConfig(seed=0, max_evaluations=800),
        fixed=[0],
    )
    # with 0 pruned, pruning either 1 or 2 ends the attack: each is worth half
    assert result.values[0] == 0.0
    assert result.values[[1, 2]].tolist() == pytest.approx([0.5, 0.5], abs=0.1)
    assert result.ranking[-1] == 0
    assert result.fixed == (0,)


@pytest.mark.parametrize("kind", ["script", "trace", "weights"])
def test_torchscript_gives_the_same_values(kind: str) -> None:
    data, trigger, spec = toy_setup()
    eager = OrAndNet().eval()
    scripted = torch.jit.script(eager) if kind != "trace" else torch.jit.trace(eager, data.x[:2])
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    config = ShapleyConfig(seed=0, max_evaluations=600, permutations=6)
    reference = estimate_shapley(eager, data, [trigger], spec, config)
    if kind == "weights":
        from modelguard.nn.probe import LayerProbe

        probe = LayerProbe(loaded, None, spec, allow_graph=False)
        result = estimate_shapley(loaded, data, [trigger], spec, config, probe=probe)
        assert result.mode == "weights"
    else:
        result = estimate_shapley(loaded, data, [trigger], spec, config)
        assert result.mode == "graph"
    assert torch.allclose(result.values, reference.values)
    assert result.evaluations == reference.evaluations
    # the probe leaves the weights as they were
    assert torch.equal(loaded.fc1.weight, eager.fc1.weight)
