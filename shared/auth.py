"""Who is calling: per-tenant bearer tokens, checked once per call by `AuthInterceptor`.

Tokens file (``MODELGUARD_AUTH_TOKENS_FILE``, mounted from a Secret), one token a line::

    # tenant  role    hash
    acme      tenant  sha256$3f9c0a7d21be$<salt base64>$<sha256(salt + token) hex>
    ops       admin   sha256$81d2e6f00c4a$...

Only hashes are stored. A token is ``mg1.<key id>.<secret>``: the key id names its line,
so a call costs one dict look-up and one salted SHA-256, compared in constant time. A
fast hash is enough because the secret is 256 random bits, not a password: there is
nothing to brute-force, and scrypt would add milliseconds to every call.

Roles: ``tenant`` sees its own audits and artifacts; ``admin`` sees every tenant's and may
enrol carrier users and rotate or revoke any carrier. Health checks and reflection
(``/grpc.*``) stay open. The file is re-read when it changes (a rotated Secret), so
adding or removing a token needs no restart.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from modelguard.errors import InvalidInput, PermissionDenied, Unauthenticated
from modelguard.interceptors import Behaviour, MethodInterceptor, wrap_handler

log = logging.getLogger(__name__)

Role = Literal["tenant", "admin"]
ROLES: tuple[Role, ...] = ("tenant", "admin")
TOKEN_PREFIX = "mg1"
HASH_SCHEME = "sha256"
#: Methods anyone may call: gRPC health (Kubernetes probes) and server reflection...
OPEN_METHOD_PREFIX = "/grpc."
#: ... the public key that verifies the deployment's signatures (it is public), and the
#: Open Inference Protocol's liveness and readiness (like gRPC health, they tell nothing).
OPEN_METHODS = frozenset(
    {
        "/modelguard.v1.PruningOrchestrator/GetPublicKey",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
#: How often the tokens file's mtime is checked for a rotated Secret.
RELOAD_INTERVAL_S = 2.0
_warned = False  # the "auth is off" warning, once per process
#: Key of the verified-token cache, random per process (never stored or sent).
_VERIFIED_KEY = secrets.token_bytes(32)
#: Bound of that cache (the tokens file lists far fewer).
MAX_VERIFIED_TOKENS = 4096
_TENANT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")


@dataclass(frozen=True)
class Identity:
    """The authenticated caller."""

    tenant: str
    role: Role = "tenant"

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def sees(self, owner: str) -> bool:
        """Whether this caller may see something owned by tenant ``owner``."""
        return self.admin or owner == self.tenant


def check_tenant(tenant: str) -> str:
    # also a path segment of ownership records in the store: no leading dot
    if not tenant or len(tenant) > 128 or tenant[0] == "." or not set(tenant) <= _TENANT_CHARS:
        raise InvalidInput(
            f"tenant id {tenant!r} is not valid: 1-128 letters, digits, -_.@ (not starting "
            "with a dot)"
        )
    return tenant


# --- tokens and their hashes -----------------------------------------------------------------
def _digest(salt: bytes, token: str) -> bytes:
    return hashlib.sha256(salt + token.encode()).digest()


def _key_id(token: str) -> str | None:
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def mint_token(tenant: str, role: Role = "tenant") -> tuple[str, str]:
    """A new token and the line that goes into the tokens file for it."""
    check_tenant(tenant)
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    key_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}.{key_id}.{secrets.token_urlsafe(32)}"
    salt = secrets.token_bytes(16)
    salt_text = base64.b64encode(salt).decode()
    hashed = f"{HASH_SCHEME}${key_id}${salt_text}${_digest(salt, token).hex()}"
    return token, f"{tenant} {role} {hashed}"


@dataclass(frozen=True)
class _Entry:
    identity: Identity
    salt: bytes
    digest: bytes


def parse_tokens(text: str, origin: str = "tokens file") -> dict[str, _Entry]:
    """Key id → entry. A malformed line refuses the whole file (fail closed, with the
    line number), rather than silently dropping a tenant's access."""
    entries: dict[str, _Entry] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{origin} line {number}"
        fields = line.split()
        if len(fields) != 3:
            raise InvalidInput(f"{where}: expected 'TENANT ROLE HASH', got {len(fields)} fields")
        tenant, role, hashed = fields
        check_tenant(tenant)
        if role not in ROLES:
            raise InvalidInput(f"{where}: role {role!r} unknown; use tenant or admin")
        try:
            scheme, key_id, salt, digest = hashed.split("$")
            if scheme != HASH_SCHEME or not key_id:
                raise ValueError(scheme)
            entry = _Entry(
                Identity(tenant, role),
                base64.b64decode(salt, validate=True),
                bytes.fromhex(digest),
            )
        except ValueError:
            raise InvalidInput(
                f"{where}: hash must look like {HASH_SCHEME}$<key id>$<salt>$<hex> (use "
                "`modelguard token create`)"
            ) from None
        if len(entry.digest) != 32 or key_id in entries:
            raise InvalidInput(f"{where}: bad digest length or duplicate key id {key_id}")
        entries[key_id] = entry
    return entries


class TokenStore:
    """The tokens file in memory, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] = (-1, -1)
        self._checked = 0.0
        self._entries: dict[str, _Entry] = {}
        #: Tokens that passed the check, by keyed blake2b, for the current entries only
        #: (a new dict on every reload, so a revoked token is never served from it).
        self._verified: dict[bytes, Identity] = {}
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp and not force:
                return
            entries = parse_tokens(self.path.read_text(), str(self.path))
        except (OSError, InvalidInput) as err:
            if force:  # at start: refuse to run without the tokens the settings name
                raise InvalidInput(f"cannot load the tokens file {self.path}: {err}") from err
            # a half-written or broken update: keep serving the last good tokens
            log.error("tokens file %s not reloaded (keeping the last good one): %s", self.path, err)
            return
        # entries first, then a new cache: a call that finds the new cache reads the new
        # entries, so nothing checked against the old tokens ever lands in it
        self._entries, self._stamp, self._verified = entries, stamp, {}
        if not force:
            log.info("tokens file %s reloaded: %d token(s)", self.path, len(entries))

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Identity:
        now = time.monotonic()
        if now - self._checked >= RELOAD_INTERVAL_S:
            with self._lock:
                if now - self._checked >= RELOAD_INTERVAL_S:
                    self._checked = now
                    self._reload()
        # A returning caller costs one keyed blake2b and a dict read instead of parsing
        # the token and hashing it with its salt (every Map call carries a token). The key
        # is random per process, so the cache's timing says nothing about valid tokens;
        # only tokens that passed are stored, so it holds at most one entry per token.
        verified = self._verified  # read before the entries: a reload replaces both
        fast = hashlib.blake2b(token.encode(), key=_VERIFIED_KEY, digest_size=32).digest()
        identity = verified.get(fast)
        if identity is not None:
            return identity
        key_id = _key_id(token)
        entry = self._entries.get(key_id) if key_id else None
        # compare even when the key id is unknown, so timing does not tell ids apart
        salt, expected = (entry.salt, entry.digest) if entry else (b"", b"\0" * 32)
        if not hmac.compare_digest(_digest(salt, token), expected) or entry is None:
            raise Unauthenticated("unknown or revoked token")
        if len(verified) < MAX_VERIFIED_TOKENS:
            verified[fast] = entry.identity
        return entry.identity


def bearer_token(metadata: Any) -> str:
    """The token of ``authorization: Bearer <token>`` in gRPC invocation metadata."""
    value = None
    for key, item in metadata or ():
        if key == "authorization":  # the first one, as before
            value = item
            break
    if value is None:
        raise Unauthenticated(
            "no token: send 'authorization: Bearer <token>' metadata (the CLI sends "
            "MODELGUARD_TOKEN or --token)"
        )
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
    return token.strip()


# --- the caller of the current call ------------------------------------------------------------
_caller: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "modelguard_caller", default=None
)


def current_identity() -> Identity | None:
    """The authenticated caller of the RPC this thread serves; None when auth is off."""
    return _caller.get()


def require_admin(caller: Identity | None, action: str) -> None:
    """Refuse ``action`` to a non-admin caller (auth off: everyone may)."""
    if caller is not None and not caller.admin:
        raise PermissionDenied(f"{action} needs an admin token (tenant {caller.tenant!r})")


class AuthInterceptor(MethodInterceptor):
    """Authenticates every call but health and reflection: UNAUTHENTICATED for a missing or
    unknown token; the caller's `Identity` is available to servicers through
    `current_identity` while the call runs. What the caller may do (roles, tenants) is
    decided by the services, which know who owns what. The token is checked on every call,
    before the request is decoded (a stranger's bytes never reach a parser)."""

    def __init__(self, tokens: TokenStore) -> None:
        super().__init__()
        self.tokens = tokens

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if method.startswith(OPEN_METHOD_PREFIX) or method in OPEN_METHODS:
            return handler
        authenticate = self.tokens.authenticate

        def caller(context: grpc.ServicerContext) -> Identity:
            try:
                return authenticate(bearer_token(context.invocation_metadata()))
            except Unauthenticated as err:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
                raise  # not reached: abort raises

        def wrap_unary(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                token = _caller.set(caller(context))
                try:
                    return behaviour(request, context)
                finally:
                    _reset(token)

            return call

        def wrap_stream(behaviour: Behaviour) -> Behaviour:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                # the generator runs in the worker thread that iterates it
                token = _caller.set(caller(context))
                try:
                    yield from behaviour(request, context)
                finally:
                    _reset(token)

            return call

        return wrap_handler(handler, wrap_unary, wrap_stream)


def _reset(token: contextvars.Token[Identity | None]) -> None:
    try:
        _caller.reset(token)
    except ValueError:  # a generator closed from another context: clear instead
        _caller.set(None)


def load_token_store(tokens_file: str, service: str, host: str = "0.0.0.0") -> TokenStore | None:
    """The token store the settings name, or None (auth off), saying so once per process:
    a WARNING when the server is reachable from other machines, INFO on loopback only
    (embedded mode: the demo, the CLI, tests)."""
    if tokens_file:
        store = TokenStore(Path(tokens_file))
        log.info("%s: bearer-token authentication on (%d token(s))", service, len(store))
        return store
    global _warned
    if not _warned:
        _warned = True
        loopback = host in ("127.0.0.1", "localhost", "::1")
        log.log(
            logging.INFO if loopback else logging.WARNING,
            "authentication is OFF: MODELGUARD_AUTH_TOKENS_FILE is not set, so every gRPC API "
            "on %s is open to anyone who can reach it (set it in any deployment)",
            host,
        )
    return None
