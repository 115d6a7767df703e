"""Reversed triggers as an artifact: safetensors holding ``masks`` (K, H, W) in [0, 1],
``patterns`` (K, C, H, W) in the input's value range, and ``labels`` (K,),
the label of each row (a triage optimises only some labels)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from modelguard.errors import InvalidInput

MAX_LABELS = 100_000


@dataclass(frozen=True)
class ReversedTrigger:
    """``x' = (1 - mask) * x + mask * pattern`` flips inputs to ``label``."""

    label: int
    mask: torch.Tensor  # (H, W)
    pattern: torch.Tensor  # (C, H, W)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.mask) * x + self.mask * self.pattern


def save_triggers(
    masks: torch.Tensor, patterns: torch.Tensor, labels: Sequence[int] | None = None
) -> bytes:
    """``labels``: the label of each row (None: row ``k`` is label ``k``)."""
    if masks.dim() != 3 or patterns.dim() != 4 or masks.shape[0] != patterns.shape[0]:
        raise ValueError("masks must be (K, H, W) and patterns (K, C, H, W)")
    rows = list(range(int(masks.shape[0]))) if labels is None else list(labels)
    if len(rows) != int(masks.shape[0]) or len(set(rows)) != len(rows):
        raise ValueError("labels must name each row of masks once")
    return safetensors_save(
        {
            "masks": masks.detach().float().contiguous(),
            "patterns": patterns.detach().float().contiguous(),
            "labels": torch.tensor(rows, dtype=torch.int64),
        }
    )


def load_triggers(data: bytes, labels: list[int] | None = None) -> list[ReversedTrigger]:
    """The triggers of ``labels`` (all when None)."""
    try:
        tensors = safetensors_load(data)
        masks, patterns = tensors["masks"], tensors["patterns"]
        stored = tensors.get("labels")
    except Exception as err:
        raise InvalidInput(f"reversed-trigger artifact is unreadable: {err}") from err
    if masks.dim() != 3 or patterns.dim() != 4 or masks.shape[0] != patterns.shape[0]:
        raise InvalidInput(
            f"reversed triggers need masks (K, H, W) and patterns (K, C, H, W); got "
            f"{list(masks.shape)} and {list(patterns.shape)}"
        )
    if tuple(masks.shape[1:]) != tuple(patterns.shape[2:]):
        raise InvalidInput("reversed-trigger masks and patterns differ in height or width")
    count = int(masks.shape[0])
    if not 1 <= count <= MAX_LABELS:
        raise InvalidInput(f"reversed triggers for {count} labels; 1 to {MAX_LABELS} supported")
    rows = list(range(count)) if stored is None else [int(v) for v in stored.flatten()]
    if len(rows) != count:
        raise InvalidInput("reversed-trigger labels do not match the masks")
    wanted = rows if labels is None else labels
    for label in wanted:
        if label not in rows:
            raise InvalidInput(
                f"label {label} has no reversed trigger (the artifact holds {_span(rows)})"
            )
    return [
        ReversedTrigger(label, masks[rows.index(label)], patterns[rows.index(label)])
        for label in wanted
    ]


def _span(rows: list[int]) -> str:
    if rows == list(range(len(rows))):
        return f"labels 0..{len(rows) - 1}"
    return f"labels {rows[:20]}" + (" …" if len(rows) > 20 else "")
