"""TorchScript archives: the architecture travels with the weights, as code limited to
the standard operator namespaces (`modelguard.formats.scan.scan_zip`)."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, ClassVar

from modelguard.errors import InvalidInput
from modelguard.formats.base import ScanResult, first_line
from modelguard.formats.scan import is_zip, scan_zip, zip_holds_code

if TYPE_CHECKING:
    from torch import nn

    from modelguard.spec import InputSpec


class TorchScript:
    name: ClassVar[str] = "torchscript"
    label: ClassVar[str] = "TorchScript"
    media_type: ClassVar[str] = "application/vnd.modelguard.torchscript"
    extension: ClassVar[str] = ".pt"
    needs_arch: ClassVar[bool] = False

    def sniff(self, data: bytes) -> bool:
        return is_zip(data) and zip_holds_code(data)

    def scan(self, data: bytes) -> ScanResult:
        result = scan_zip(data)
        if not result.script:
            raise InvalidInput("the archive holds no TorchScript code: not a TorchScript file")
        return ScanResult(self.name, result.details)

    def load(self, data: bytes, spec: InputSpec, arch: str) -> nn.Module:
        # the archive is the whole model: spec and arch are not needed
        return self.load_weights(data).eval()

    def load_weights(self, data: bytes) -> nn.Module:
        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # still our format
                module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as err:  # TorchScript raises RuntimeError subclasses for every defect
            raise InvalidInput(
                f"TorchScript archive could not be loaded: {first_line(err)}"
            ) from err
        return module  # type: ignore[no-any-return]

    def save(self, module: nn.Module) -> bytes:
        import torch

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(module, buffer)
        return buffer.getvalue()
