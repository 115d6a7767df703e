"""Safetensors: weights only, built into a registered architecture (``--arch``).

The header is validated before the payload is read: a JSON object without duplicate keys,
known dtypes, offsets that match the shapes, lie inside the file and do not overlap.
"""

from __future__ import annotations

import itertools
import json
import struct
from typing import TYPE_CHECKING, ClassVar

from modelguard.errors import InvalidInput
from modelguard.formats.base import ScanResult, first_line
from modelguard.formats.scan import is_zip

if TYPE_CHECKING:
    import torch
    from torch import nn

    from modelguard.spec import InputSpec

MAX_SAFETENSORS_HEADER = 100 << 20


class Safetensors:
    name: ClassVar[str] = "safetensors"
    label: ClassVar[str] = "safetensors"
    media_type: ClassVar[str] = "application/vnd.modelguard.safetensors"
    extension: ClassVar[str] = ".safetensors"
    needs_arch: ClassVar[bool] = True

    def sniff(self, data: bytes) -> bool:
        # A zip's local header can pass for a (huge) header length: torch archives first.
        return _looks_like_safetensors(data) and not is_zip(data)

    def scan(self, data: bytes) -> ScanResult:
        return ScanResult(self.name, check_safetensors(data))

    def load(self, data: bytes, spec: InputSpec, arch: str) -> nn.Module:
        from modelguard.formats.weights import build_from_state

        return build_from_state(arch, self._state(data), spec).eval()

    def load_weights(self, data: bytes) -> nn.Module:
        from modelguard.formats.weights import module_from_state_dict

        return module_from_state_dict(self._state(data))

    def save(self, module: nn.Module) -> bytes:
        from safetensors.torch import save

        from modelguard.formats.weights import state_of

        return save(state_of(module))

    def _state(self, data: bytes) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as err:
            raise InvalidInput(f"{self.name} weights could not be read: {first_line(err)}") from err


def weights_to_safetensors(module: nn.Module) -> bytes:
    """``module``'s weights as safetensors, uncopied (tests and the demo; the format's
    ``save`` is what the services use)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in module.state_dict().items()})


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
    "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
    "F64": 8, "C64": 8,
}  # fmt: skip


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInput(f"safetensors header names {key!r} twice")
        out[key] = value
    return out


def check_safetensors(data: bytes) -> list[str]:
    """Validate a safetensors header; returns one detail line per tensor."""
    if len(data) < 8:
        raise InvalidInput("safetensors file is truncated (no header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_SAFETENSORS_HEADER:
        raise InvalidInput(f"safetensors header claims {header_len} bytes; refused")
    if 8 + header_len > len(data):
        raise InvalidInput("safetensors header runs past the end of the file (truncated)")
    try:
        header = json.loads(data[8 : 8 + header_len], object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InvalidInput(f"safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise InvalidInput("safetensors header is not a JSON object")
    body = len(data) - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise InvalidInput("safetensors __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise InvalidInput(f"safetensors entry {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise InvalidInput(f"safetensors entry {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidInput(f"safetensors entry {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InvalidInput(f"safetensors entry {name!r} has invalid data_offsets")
        start, end = offsets
        if not (0 <= start <= end <= body):
            raise InvalidInput(
                f"safetensors entry {name!r} points past the end of the file (truncated or corrupt)"
            )
        elements = 1
        for d in shape:
            elements *= d
        if elements * _SAFETENSORS_DTYPES[dtype] != end - start:
            raise InvalidInput(
                f"safetensors entry {name!r}: shape {shape} of {dtype} does not match its "
                f"{end - start} bytes"
            )
        spans.append((start, end, name))
    spans.sort()
    for (_s1, e1, n1), (s2, _e2, n2) in itertools.pairwise(spans):
        if s2 < e1:
            raise InvalidInput(f"safetensors entries {n1!r} and {n2!r} overlap")
    return [f"{name}: [{start}, {end})" for start, end, name in spans]
