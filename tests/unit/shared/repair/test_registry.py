"""The repair-mode registry: every entry imports and is a `RepairMode` named by its key,
unknown names are refused with the list, the entry point dispatches through it (a mode
registered in a test is reached without touching any other code) and the registry
imports without torch (CLI choices, request validation)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
import torch

from modelguard.datasets import Dataset
from modelguard.detection.triggers import ReversedTrigger
from modelguard.errors import InvalidInput
from modelguard.repair.base import RepairMode
from modelguard.repair.fine_pruning import FinePruningConfig
from modelguard.repair.registry import (
    DEFAULT_REPAIR_MODE,
    NO_REPAIR,
    REPAIR_CHOICES,
    REPAIR_MODES,
    get_repair_mode,
    repair,
)
from modelguard.repair.result import Measure, RepairResult
from modelguard.repair.rollback import RollbackConfig
from modelguard.repair.scoring import NeuronRanking
from modelguard.spec import InputSpec
from tests.unit import repairkit


@pytest.mark.parametrize("name", list(REPAIR_MODES))
def test_every_entry_imports_and_satisfies_the_protocol(name: str) -> None:
    mode = get_repair_mode(name)
    assert isinstance(mode, RepairMode)
    assert mode.name == name
    assert dataclasses.is_dataclass(mode.config_type)
    assert mode.config_type.__dataclass_params__.frozen  # type: ignore[attr-defined]
    mode.config_type()  # the defaults are a valid config
    assert isinstance(mode.uses_ranking, bool)


def test_only_rollback_consumes_the_ranking() -> None:
    assert {n for n in REPAIR_MODES if get_repair_mode(n).uses_ranking} == {"rollback"}


def test_choices_and_default() -> None:
    assert DEFAULT_REPAIR_MODE in REPAIR_MODES
    assert (*REPAIR_MODES, NO_REPAIR) == REPAIR_CHOICES
    assert NO_REPAIR not in REPAIR_MODES


def test_unknown_mode_is_refused_with_the_list() -> None:
    for name in ("magic", "", NO_REPAIR, "Rollback"):
        with pytest.raises(InvalidInput, match="unknown repair mode") as caught:
            get_repair_mode(name)
        assert all(known in str(caught.value) for known in REPAIR_MODES)
    model = repairkit.SmallNet()
    with pytest.raises(InvalidInput, match="unknown repair mode"):
        repair(model, repairkit.clean_data(), repairkit.SPEC, [repairkit.trigger()], mode="x")


def test_a_config_of_another_mode_is_refused() -> None:
    with pytest.raises(InvalidInput, match="takes a RollbackConfig, not FinePruningConfig"):
        repair(
            repairkit.SmallNet(),
            repairkit.clean_data(),
            repairkit.SPEC,
            [repairkit.trigger()],
            mode="rollback",
            config=FinePruningConfig(),
        )


@dataclasses.dataclass(frozen=True)
class EchoConfig:
    note: str = "echo"


class Echo:
    """A mode that prunes nothing and records what it was given."""

    name: ClassVar[str] = "echo"
    config_type: ClassVar[type[Any]] = EchoConfig
    uses_ranking: ClassVar[bool] = True
    calls: ClassVar[list[dict[str, Any]]] = []

    def repair(
        self,
        model: torch.nn.Module,
        data: Dataset,
        spec: InputSpec,
        triggers: Sequence[ReversedTrigger],
        *,
        layer: str | None = None,
        config: EchoConfig | None = None,
        ranking: NeuronRanking | None = None,
        progress: Any = None,
    ) -> RepairResult:
        Echo.calls.append(
            {"model": model, "triggers": triggers, "layer": layer, "ranking": ranking}
        )
        figures = Measure(1.0, 1.0, 1.0)
        return RepairResult(
            self.name, layer or "", [t.label for t in triggers], [], figures, figures, [], 0,
            0.0, 0, model=model,
        )  # fmt: skip


def test_adding_a_mode_is_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REPAIR_MODES, "echo", f"{__name__}:Echo")
    Echo.calls.clear()
    model = repairkit.SmallNet()
    ranking = NeuronRanking("fc1", 2, (1, 0), (0, 1))
    mask, pattern = repairkit.trigger().mask, repairkit.trigger().pattern
    result = repair(
        model,
        repairkit.clean_data(),
        repairkit.SPEC,
        [(repairkit.TARGET, mask, pattern)],  # a raw tuple: normalised by the entry point
        mode="echo",
        layer="fc1",
        ranking=ranking,
    )
    assert result.mode == "echo" and len(Echo.calls) == 1
    call = Echo.calls[0]
    assert call["model"] is not model  # a copy
    assert call["layer"] == "fc1" and call["ranking"] is ranking
    assert [type(t) for t in call["triggers"]] == [ReversedTrigger]


def test_modes_that_do_not_use_the_ranking_do_not_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REPAIR_MODES, "echo", f"{__name__}:Echo")
    monkeypatch.setattr(Echo, "uses_ranking", False)
    Echo.calls.clear()
    repair(
        repairkit.SmallNet(),
        repairkit.clean_data(),
        repairkit.SPEC,
        [repairkit.trigger()],
        mode="echo",
        ranking=NeuronRanking("fc1", 2, (1, 0), (0, 1)),
    )
    assert Echo.calls[0]["ranking"] is None


def test_default_configs_are_the_mode_defaults() -> None:
    assert get_repair_mode("rollback").config_type() == RollbackConfig()


def test_registry_imports_without_torch() -> None:
    code = (
        "import sys; import modelguard.repair.registry as r; import modelguard.repair.base; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(r.REPAIR_CHOICES))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ",".join(REPAIR_CHOICES)
