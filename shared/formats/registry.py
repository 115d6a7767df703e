"""The model formats, by name. Adding a format = one module implementing
`modelguard.formats.base.ModelFormat` + one line in ``FORMATS`` (+ its ModelFormat proto enum
value, which a test checks).

Entries are "module:Class" strings imported on first use, so importing the registry
imports no torch and no format.
"""

from __future__ import annotations

import functools
import importlib

from modelguard.errors import InvalidInput
from modelguard.formats.base import ModelFormat
from modelguard.formats.pickles import raw_pickle_refusal

#: Registry order: the sniffing order (sniffs are exclusive, so it only orders messages).
FORMATS: dict[str, str] = {
    "safetensors": "modelguard.formats.safetensors:Safetensors",
    "torchscript": "modelguard.formats.torchscript:TorchScript",
    "torch-zip": "modelguard.formats.torch_zip:TorchZip",
    "torch-export": "modelguard.formats.torch_export:TorchExport",
    "onnx": "modelguard.formats.onnx:Onnx",
}


@functools.cache
def get_format(name: str) -> ModelFormat:
    """The format registered as ``name``; ``InvalidInput`` for an unknown name."""
    target = FORMATS.get(name)
    if target is None:
        raise InvalidInput(f"unknown model format {name!r}; known: {', '.join(FORMATS)}")
    module, _, attr = target.partition(":")
    fmt = getattr(importlib.import_module(module), attr)()
    if not isinstance(fmt, ModelFormat) or fmt.name != name:
        raise TypeError(f"{target} is not the ModelFormat {name!r}")
    return fmt


def all_formats() -> list[ModelFormat]:
    return [get_format(name) for name in FORMATS]


def sniff(data: bytes) -> ModelFormat:
    """The format of ``data`` (by magic and structure; nothing is scanned yet).

    A raw pickle is refused here (``UnsafeArtifact``): no format reads one, and saying
    why beats calling it unknown. Anything else unrecognised is ``InvalidInput``."""
    formats = all_formats()
    for fmt in formats:
        if fmt.sniff(data):
            return fmt
    refusal = raw_pickle_refusal(data)
    if refusal is not None:
        raise refusal
    if data[:2] == b"PK":
        raise InvalidInput("model file is a damaged zip archive (no local header at the start)")
    labels = [fmt.label for fmt in formats]
    raise InvalidInput(
        f"model file is neither {', '.join(labels[:-1])} nor {labels[-1]} "
        "(corrupt, truncated or another format)"
    )


def by_media_type(media_type: str) -> ModelFormat | None:
    """The format stored under ``media_type`` (an artifact's), if any."""
    return next((fmt for fmt in all_formats() if fmt.media_type == media_type), None)
