"""What the weights-only formats (safetensors, torch.save state dicts) share: a state dict
becomes a registered architecture's module (``build_from_state``) or, for parameter-only
audits, a module holding its tensors under their own names (``module_from_state_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from modelguard.errors import InvalidInput
from modelguard.formats.base import first_line
from modelguard.nn.architectures import MAX_CLASSES, get_architecture
from modelguard.spec import InputSpec


def build_from_state(arch: str, state: dict[str, torch.Tensor], spec: InputSpec) -> nn.Module:
    """The ``arch`` module holding ``state``, sized from the weights themselves (input
    channels, classes), which must agree with ``spec``."""
    info = get_architecture(arch)
    for key in (info.input_key, info.classifier_key):
        if key not in state:
            raise InvalidInput(f"weights lack {key!r}: they are not a {arch} state dict")
        if state[key].dim() < 2:
            raise InvalidInput(
                f"weights {key!r} have shape {list(state[key].shape)}: not a {arch} state dict"
            )
    in_channels = int(state[info.input_key].shape[1])
    if in_channels != spec.channels:
        raise InvalidInput(
            f"the {arch} weights take {in_channels} input channel(s) but the declared input "
            f"shape {','.join(map(str, spec.shape))} has {spec.channels}"
        )
    num_classes = int(state[info.classifier_key].shape[0])
    if not 2 <= num_classes <= MAX_CLASSES:
        raise InvalidInput(
            f"the weights declare {num_classes} classes; 2 to {MAX_CLASSES} are supported"
        )
    try:
        module = info.factory(in_channels=in_channels, num_classes=num_classes, hw=spec.shape[1:])
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, MemoryError) as err:
        raise InvalidInput(f"weights do not fit {arch}: {first_line(err)}") from err
    return module


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies of ``module``'s state, ready to serialise (copies: tied
    or overlapping tensors must not share storage in the file)."""
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


class _StateDictModule(nn.Module):
    """Holds a state dict's tensors under their dotted names, as nested modules."""


def module_from_state_dict(state: Mapping[str, object]) -> nn.Module:
    """A module whose ``named_parameters()`` are the floating-point tensors of ``state``
    under their own dotted names (other entries are ignored; a name that cannot be a
    module path is kept at the top level with its dots replaced), for auditing weights
    without their architecture. The tensors are shared, not copied."""
    root = _StateDictModule()
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            continue
        if not value.is_floating_point():
            continue
        parameter = nn.Parameter(value.detach(), requires_grad=False)
        if not _place(root, key.split("."), parameter):
            fallback = key.replace(".", "_") or "_"
            while hasattr(root, fallback):
                fallback += "_"
            root.register_parameter(fallback, parameter)
    return root


def _place(root: nn.Module, parts: list[str], parameter: nn.Parameter) -> bool:
    if not all(parts):
        return False
    target = root
    for part in parts[:-1]:
        child = target._modules.get(part)
        if child is None:
            if hasattr(target, part):
                return False
            child = _StateDictModule()
            target.add_module(part, child)
        target = child
    if hasattr(target, parts[-1]):
        return False
    try:
        target.register_parameter(parts[-1], parameter)
    except (KeyError, TypeError):
        return False
    return True
