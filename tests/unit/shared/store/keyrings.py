"""Keyring files for encryption tests: random 32-byte keys, written as the Secret would be."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def write_keyring(path: Path, tenants: dict[str, tuple[str, dict[str, str]]]) -> Path:
    """``tenants``: tenant -> (active key id, {key id: base64 key})."""
    document = {
        "tenants": {
            tenant: {"active": active, "keys": keys} for tenant, (active, keys) in tenants.items()
        }
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return path
