"""Test helpers for authentication: a tokens file with two tenants and an admin, and
certificates (a CA, a server certificate for 127.0.0.1, client certificates) made with the
``openssl`` command in the test's own directory."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from modelguard.auth import mint_token
from tests.requirements import require_binary


@dataclass(frozen=True)
class Tokens:
    file: Path
    acme: str  # tenant "acme"
    globex: str  # tenant "globex"
    admin: str  # tenant "ops", role admin


def write_tokens(directory: Path) -> Tokens:
    acme, acme_line = mint_token("acme")
    globex, globex_line = mint_token("globex")
    admin, admin_line = mint_token("ops", "admin")
    path = directory / "tokens"
    path.write_text(f"# tenant role hash\n{acme_line}\n{globex_line}\n\n{admin_line}\n")
    return Tokens(path, acme, globex, admin)


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip


def _signed(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


def make_certs(directory: Path) -> Certs:
    require_binary(
        "openssl",
        "the openssl command (it makes the test certificates)",
        "install the Debian package openssl",
    )
    _ca(directory, "ca")
    _ca(directory, "rogue-ca")
    _signed(
        directory,
        "server",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _signed(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _signed(directory, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    d = directory
    return Certs(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "rogue.pem",
        d / "rogue.key",
    )
