"""The ``ModelFormat`` protocol: one implementation per model file format, listed in
`modelguard.formats.registry`.

Imports no torch at run time (the registry, the CLI's argument parser and the scanner
stay light); implementations import it only where they load or save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from modelguard.spec import InputSpec


@dataclass(frozen=True)
class ScanResult:
    kind: str  # the format's registry name
    #: what was inspected (pickles and globals), for reports.
    details: list[str] = field(default_factory=list)


@runtime_checkable
class ModelFormat(Protocol):
    """A model file format. ``load``, ``load_weights`` and ``save`` assume bytes that
    ``scan`` accepted: only the scan stands between a hostile file and a parser."""

    name: ClassVar[str]  # registry key, and ModelFormat enum value MODEL_FORMAT_<NAME>
    label: ClassVar[str]  # for people: "TorchScript", "a torch.save archive"
    media_type: ClassVar[str]  # of the artifact in the store
    extension: ClassVar[str]  # file name suffix, with the dot
    needs_arch: ClassVar[bool]  # weights only: a registered architecture builds the module

    def sniff(self, data: bytes) -> bool:
        """Whether ``data`` is in this format, by magic bytes and structure alone (no
        payload is parsed). Never raises. At most one format claims any file."""
        ...

    def scan(self, data: bytes) -> ScanResult:
        """The full safety scan: ``UnsafeArtifact`` for a file that could run code,
        ``InvalidInput`` for a malformed one."""
        ...

    def load(self, data: bytes, spec: InputSpec, arch: str) -> nn.Module:
        """The model in eval mode, for inputs of ``spec`` (``arch``: a registered
        architecture, used when ``needs_arch``). ``InvalidInput`` when it does not load."""
        ...

    def load_weights(self, data: bytes) -> nn.Module:
        """A module whose parameters are the file's weights, for parameter-only audits
        (no architecture needed, the forward pass may not work)."""
        ...

    def save(self, module: nn.Module) -> bytes:
        """``module`` in this format (TorchScript stays TorchScript)."""
        ...


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
