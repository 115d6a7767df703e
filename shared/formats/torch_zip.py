"""``torch.save`` state-dict archives: weights only, built into a registered architecture
(``--arch``), read with ``weights_only=True`` after the archive's pickles passed the scan
(`modelguard.formats.scan.scan_zip`)."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, ClassVar

from modelguard.errors import InvalidInput
from modelguard.formats.base import ScanResult, first_line
from modelguard.formats.scan import is_zip, scan_zip, zip_holds_code, zip_holds_program

if TYPE_CHECKING:
    from torch import nn

    from modelguard.spec import InputSpec


class TorchZip:
    name: ClassVar[str] = "torch-zip"
    label: ClassVar[str] = "a torch.save archive"
    media_type: ClassVar[str] = "application/vnd.modelguard.torch-state-dict"
    extension: ClassVar[str] = ".pth"
    needs_arch: ClassVar[bool] = True

    def sniff(self, data: bytes) -> bool:
        # every zip TorchScript and torch.export do not claim, so that its scan explains
        # what is wrong
        return is_zip(data) and not zip_holds_code(data) and not zip_holds_program(data)

    def scan(self, data: bytes) -> ScanResult:
        result = scan_zip(data)
        if result.script:
            raise InvalidInput("the archive holds TorchScript code: not a torch.save state dict")
        return ScanResult(self.name, result.details)

    def load(self, data: bytes, spec: InputSpec, arch: str) -> nn.Module:
        import torch

        from modelguard.formats.weights import build_from_state

        state = self._read(data)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise InvalidInput("torch.save archive does not hold a state dict of tensors")
        return build_from_state(arch, state, spec).eval()

    def load_weights(self, data: bytes) -> nn.Module:
        from modelguard.formats.weights import module_from_state_dict

        state = self._read(data)
        if not isinstance(state, dict):
            raise InvalidInput("torch.save archive does not hold a state dict")
        return module_from_state_dict(state)  # entries that are not tensors are skipped

    def save(self, module: nn.Module) -> bytes:
        import torch

        from modelguard.formats.weights import state_of

        buffer = io.BytesIO()
        torch.save(state_of(module), buffer)
        return buffer.getvalue()

    def _read(self, data: bytes) -> object:
        """The archive's object, unwrapped from a ``{"state_dict": ...}`` checkpoint."""
        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state: object = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise InvalidInput(f"{self.name} weights could not be read: {first_line(err)}") from err
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        return state
