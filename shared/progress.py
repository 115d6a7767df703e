"""The one progress-callback type: ``progress(fraction, message)``.

Algorithms, stage workers, the CLI and the demo all report through it: ``fraction`` in
[0, 1], ``message`` a short human-readable note (may be empty). It lives in a module of
its own, importing nothing of the project, so that the algorithm packages can use it
without pulling in the job bus or the protos (as `modelguard.stage` would).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

Progress = Callable[[float, str], None]


@overload
def scaled(progress: Progress, start: float, span: float) -> Progress: ...
@overload
def scaled(progress: None, start: float, span: float) -> None: ...
def scaled(progress: Progress | None, start: float, span: float) -> Progress | None:
    """``progress`` for one part of a longer job: the part's fraction ``f`` is reported as
    ``start + span * f``. ``None`` stays ``None`` (no one is listening)."""
    if progress is None:
        return None
    outer = progress

    def report(fraction: float, message: str = "") -> None:
        outer(start + span * fraction, message)

    return report
