"""`LocalStore`: the artifact store in a directory (embedded mode, unit tests).

Layout: blobs at ``root/<blob_key(sha256)>``, documents at ``root/docs/<key>``. Every
write goes to a temporary file in the target directory and is renamed into place, so a
reader sees the old bytes or the new ones, never a torn file. With a cipher (see
`modelguard.store.encryption`) every file holds its encryption envelope followed by the
ciphertext; the digest stays the plaintext's and is checked after decryption.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from modelguard.errors import IntegrityError, InvalidInput, NotFound, Unavailable
from modelguard.store.base import ArtifactRef, blob_key, digest
from modelguard.store.encryption import (
    EnvelopeCipher,
    RewrapReport,
    check_plaintext,
    pack,
    unpack,
)

log = logging.getLogger(__name__)

DOCS_DIR = "docs"
_HEX = frozenset("0123456789abcdef")


def check_sha256(sha256_hex: str) -> str:
    """Digests become object keys: accept exactly 64 lowercase hex characters."""
    if len(sha256_hex) != 64 or not set(sha256_hex) <= _HEX:
        raise InvalidInput(f"invalid sha256 digest {sha256_hex!r}: expected 64 hex characters")
    return sha256_hex


def check_doc_key(key: str) -> str:
    """Document keys are relative slash-separated paths: no '..', no absolute paths, no
    empty or '.' segments, no backslashes or NUL (both stores apply this rule)."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidInput(f"invalid document key {key!r}: use a relative path like 'a/b.json'")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidInput(
            f"invalid document key {key!r}: '.', '..' and empty segments are not allowed"
        )
    return key


def check_doc_prefix(prefix: str) -> str:
    """A listing prefix may be empty or end with '/', otherwise it follows the key rule."""
    if prefix:
        check_doc_key(prefix.rstrip("/") if prefix.endswith("/") else prefix)
    return prefix


def ref_digest(ref: ArtifactRef | str) -> str:
    return check_sha256(ref.sha256 if isinstance(ref, ArtifactRef) else ref)


class LocalStore:
    def __init__(self, root: Path, cipher: EnvelopeCipher | None = None) -> None:
        self.root = Path(root)
        self.cipher = cipher
        self.docs_root = self.root / DOCS_DIR
        try:
            self.docs_root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Unavailable(f"cannot use {self.root} as the artifact store: {err}") from err

    # -- blobs ------------------------------------------------------------------------------

    def put_blob(self, data: bytes, media_type: str = "application/octet-stream") -> ArtifactRef:
        sha = digest(data)
        ref = ArtifactRef(sha256=sha, key=blob_key(sha), size=len(data), media_type=media_type)
        path = self.root / ref.key
        if self._holds(ref, path):
            return ref  # already there; a damaged copy is replaced below
        self._write(path, self._seal(ref.key, data))
        return ref

    def _holds(self, ref: ArtifactRef, path: Path) -> bool:
        try:
            if self.cipher is None and path.stat().st_size != ref.size:
                return False  # no need to read it
            return digest(self._open(ref.key, path.read_bytes())) == ref.sha256
        except (OSError, IntegrityError):
            return False

    def get_blob(self, ref: ArtifactRef | str) -> bytes:
        sha = ref_digest(ref)
        key = blob_key(sha)
        try:
            stored = (self.root / key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"artifact {key} not found in {self.root}") from None
        except OSError as err:
            raise Unavailable(f"cannot read artifact {key}: {err}") from err
        data = self._open(key, stored)
        if digest(data) != sha:
            raise IntegrityError(
                f"artifact {key} is corrupted: its bytes no longer match the digest; "
                "it will not be used (re-upload the original)"
            )
        return data

    def has_blob(self, sha256_hex: str) -> bool:
        return (self.root / blob_key(check_sha256(sha256_hex))).is_file()

    # -- documents --------------------------------------------------------------------------

    def put_doc(self, key: str, data: bytes) -> None:
        path = self._doc_path(key)
        self._write(path, self._seal(self._name(path), data))

    def get_doc(self, key: str) -> bytes:
        path = self._doc_path(key)
        try:
            stored = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"document {key!r} not found") from None
        except OSError as err:
            raise Unavailable(f"cannot read document {key!r}: {err}") from err
        return self._open(self._name(path), stored)

    def list_docs(self, prefix: str) -> list[str]:
        check_doc_prefix(prefix)
        keys = []
        for dirpath, _dirs, files in os.walk(self.docs_root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = (Path(dirpath) / name).relative_to(self.docs_root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete_doc(self, key: str) -> None:
        """Deleting an absent document is not an error (as in S3)."""
        with contextlib.suppress(FileNotFoundError):
            self._doc_path(key).unlink()

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise Unavailable(f"artifact store directory {self.root} is not writable")

    # -- encryption ---------------------------------------------------------------------------

    def rewrap_keys(self, encrypt_plaintext: bool = False) -> RewrapReport:
        """Re-wrap every object's data key under its tenant's active key: each file's
        envelope is replaced, its ciphertext bytes are written back unchanged.
        ``encrypt_plaintext``: objects written before encryption was on are encrypted
        (with the platform's key; run it while no service writes)."""
        if self.cipher is None:
            raise InvalidInput("rewrapping keys needs encryption on (a keyring)")
        report = RewrapReport()
        for path in sorted(self.root.rglob("*")):
            if not path.is_file() or path.name.startswith(".tmp-"):
                continue
            name = self._name(path)
            try:
                stored = path.read_bytes()
                envelope, ciphertext = unpack(name, stored)
                if envelope is None and encrypt_plaintext:
                    check_plaintext(name, stored)
                    self._write(path, self._seal(name, stored))
                    report.encrypted += 1
                    continue
                if envelope is None:
                    report.plaintext += 1
                    continue
                rewrapped = self.cipher.rewrap(name, envelope)
                if rewrapped is None:
                    report.current += 1
                    continue
                if path.read_bytes() != stored:  # rewritten meanwhile, with the active key
                    report.changed += 1
                    continue
                self._write(path, pack(rewrapped, ciphertext))
                report.rewrapped += 1
            except IntegrityError as err:
                report.failed[name] = str(err)
        return report

    def _name(self, path: Path) -> str:
        """An object's name: its path under the root (the same names as in S3)."""
        return path.relative_to(self.root).as_posix()

    def _seal(self, name: str, data: bytes) -> bytes:
        if self.cipher is None:
            return data
        ciphertext, envelope = self.cipher.seal(name, data)
        return pack(envelope, ciphertext)

    def _open(self, name: str, stored: bytes) -> bytes:
        if self.cipher is None:
            return stored
        envelope, ciphertext = unpack(name, stored)
        return self.cipher.open(name, ciphertext, envelope)

    # -- internals ----------------------------------------------------------------------------

    def _doc_path(self, key: str) -> Path:
        return self.docs_root / check_doc_key(key)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        """Atomic replace: temp file in the same directory, fsync, rename."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        except OSError as err:
            raise Unavailable(f"cannot write {path}: {err}") from err
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
