"""Attack toolkits used to build test models, benchmarks and the demo."""

from modelguard.attacks.backdoor import (
    NAMED_PATTERNS,
    BackdoorModel,
    BlendTrigger,
    MultiTrigger,
    PatchTrigger,
    Trigger,
    TriggerLike,
    as_triggers,
    attack_success_rate,
    attack_success_rates,
    make_pattern,
    poison,
    poison_indices,
    stamp,
    train_backdoored,
    trigger_from_dict,
)

__all__ = [
    "NAMED_PATTERNS",
    "BackdoorModel",
    "BlendTrigger",
    "MultiTrigger",
    "PatchTrigger",
    "Trigger",
    "TriggerLike",
    "as_triggers",
    "attack_success_rate",
    "attack_success_rates",
    "make_pattern",
    "poison",
    "poison_indices",
    "stamp",
    "train_backdoored",
    "trigger_from_dict",
]
