"""neuron-scoring core: which neurons of a layer carry the (reversed) trigger.

* `score_neurons`: activation under the stamped trigger and incoming-weight magnitude per
  neuron, with the two rankings (pruning with rollback).
* `estimate_shapley`: each neuron's Shapley value for the attack success rate, by
  truncated Monte Carlo permutation sampling with ε-greedy refinement (ShapPruning).
* `LayerProbe` / `resolve_layer` / `list_prunable_layers`: layer access for eager and
  TorchScript models.
"""

from services.neuron_scoring.core.layers import (
    LayerInfo,
    LayerProbe,
    get_module,
    is_scripted,
    list_prunable_layers,
    resolve_layer,
)
from services.neuron_scoring.core.scoring import (
    AttackSet,
    NeuronScores,
    ScoringConfig,
    as_reversed_triggers,
    build_attack_set,
    score_neurons,
)
from services.neuron_scoring.core.shapley import (
    ShapleyConfig,
    ShapleyResult,
    estimate_shapley,
    shapley_game,
)

__all__ = [
    "AttackSet",
    "LayerInfo",
    "LayerProbe",
    "NeuronScores",
    "ScoringConfig",
    "ShapleyConfig",
    "ShapleyResult",
    "as_reversed_triggers",
    "build_attack_set",
    "estimate_shapley",
    "get_module",
    "is_scripted",
    "list_prunable_layers",
    "resolve_layer",
    "score_neurons",
    "shapley_game",
]
