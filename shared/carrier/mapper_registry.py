"""The result-mapper's state: per-user mapping networks, credentials and query accounting.

``Map(user, credential, pseudo_output) → labels, probabilities`` (adversarial reprogramming): a
user's pseudo-output (the public model's scores on the user's carrier) is mapped by **that user's**
mapping network only. Mappers are hot-loaded when a carrier becomes ready and revoked at
once when it is rotated; a revoked generation can never be loaded again (a replayed
``CarrierReady`` is ignored).

Serving path: no torch. A mapper is parsed once from its safetensors bytes (the format
written by ``modelguard.carrier.carrier.mapper_to_safetensors``) into
contiguous float32 numpy arrays; a request is ``frombuffer`` → two matmuls → softmax,
one compiled kernel for a single row (`kernels`), numpy for a batch.

Memory: loaded mappers live in an LRU bounded in bytes (`max_loaded_bytes`). A mapper's
cost is its array bytes plus a measured per-object overhead (`MAPPER_OVERHEAD_BYTES`).
Measured with tracemalloc per user (mapper + user entry + credential hash;
``bench.bench_serving.measure_mapper_bytes``): 10→64→10 7.6 kB, 10→256→10 23.7 kB (10,000
users: 76 MB / 237 MB, inside the default 256 MiB), 1000→256→10 (EfficientNet-Lite0)
1.04 MB — there 10,000 users need the loader (LRU of the active ones) or shared mappers.
Mappers shared by several users (the reference method's "shared mapper" option) are loaded once,
keyed by the sha256 of their bytes. An evicted mapper is reloaded on its next use through
the injected ``loader(user_id, generation) -> bytes`` (the artifact store in production).

Credentials: a credential is issued per (user, carrier generation) — it rotates with the
carrier, otherwise a thief holding the device's credential could simply fetch the new
carrier. Only ``hmac-sha256$<salt>$<digest>`` is stored. A fast keyed hash is enough
because credentials are 256-bit random tokens (`new_credential`), not passwords: there is
nothing to brute-force, and a per-request scrypt would cost milliseconds. Comparison is
constant-time (`hmac.compare_digest`).

Errors (``modelguard.errors``, mapped to gRPC codes once by the server interceptor):
``Unauthenticated`` (no credential), ``PermissionDenied`` (credential not this user's),
``NotFound`` (unknown user, or carrier revoked), ``InvalidInput`` (wrong length, rows out
of range, NaN/Inf), ``Unavailable`` (an evicted mapper could not be reloaded).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_numpy_load

from modelguard.carrier.kernels import map_row
from modelguard.errors import (
    InvalidInput,
    ModelGuardError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

CREDENTIAL_SCHEME = "hmac-sha256"
#: Python-object overhead of one loaded mapper beyond its array bytes (measured with
#: tracemalloc for a 10→64→10 mapper: ndarray headers, the LoadedMapper, LRU node).
MAPPER_OVERHEAD_BYTES = 1200
#: Rows accepted in one Map call.
DEFAULT_MAX_ROWS = 4096
#: Largest weights file accepted (a 1000→1024→1000 mapper is ~8 MB).
MAX_MAPPER_BYTES = 64 << 20

#: Fetches a mapper's safetensors bytes again after eviction.
Loader = Callable[[str, int], bytes]


# ---------------------------------------------------------------------------- credentials


def new_credential() -> str:
    """A fresh 256-bit credential (URL-safe text) to hand to the device with its carrier."""
    return secrets.token_urlsafe(32)


def hash_credential(credential: str, salt: bytes | None = None) -> str:
    """``hmac-sha256$<salt b64>$<digest hex>``: what the servers store."""
    if not credential:
        raise InvalidInput("cannot hash an empty credential")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hmac.digest(salt, credential.encode(), "sha256").hex()
    return f"{CREDENTIAL_SCHEME}${base64.b64encode(salt).decode()}${digest}"


@dataclass(frozen=True)
class _CredentialHash:
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> _CredentialHash:
        try:
            scheme, salt, digest = text.split("$")
            if scheme != CREDENTIAL_SCHEME:
                raise ValueError(scheme)
            return cls(base64.b64decode(salt, validate=True), bytes.fromhex(digest))
        except (ValueError, TypeError) as err:
            raise InvalidInput(
                f"credential hash must look like {CREDENTIAL_SCHEME}$<salt base64>$<hex digest> "
                "(see hash_credential)"
            ) from err

    def matches(self, credential: str) -> bool:
        computed = hmac.digest(self.salt, credential.encode(), "sha256")  # one-shot, in C
        return hmac.compare_digest(computed, self.digest)


def verify_credential(credential: str, stored: str) -> bool:
    return _CredentialHash.parse(stored).matches(credential)


# -------------------------------------------------------------------------------- mappers


@dataclass(frozen=True)
class LoadedMapper:
    """A mapping network ready for numpy inference. ``w1`` is ``(in, hidden)`` (transposed
    from torch's layout so a request is ``x @ w1``), ``w2`` is ``(hidden|in, classes)``."""

    digest: str
    in_features: int
    classes: int
    hidden: int
    w1: np.ndarray | None
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray
    #: Whether a NaN or infinite input could come out as finite probabilities, so inputs
    #: must be checked before mapping (see `inputs_need_check`); otherwise a non-finite
    #: output is the check.
    check_inputs: bool = True

    @property
    def nbytes(self) -> int:
        arrays = (self.w1, self.b1, self.w2, self.b2)
        return sum(a.nbytes for a in arrays if a is not None) + MAPPER_OVERHEAD_BYTES

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(rows, in_features)`` float32 → ``(rows, classes)``. ``np.dot`` (BLAS
        straight away) rather than ``@`` (a generalised ufunc: more set-up per call)."""
        if self.w1 is not None and self.b1 is not None:
            h = np.dot(x, self.w1)
            h += self.b1
            np.maximum(h, 0.0, out=h)
            x = h
        out: np.ndarray = np.dot(x, self.w2)
        out += self.b2
        return out


def parse_mapper(weights: bytes) -> LoadedMapper:
    """Parse and validate safetensors mapper bytes (``fc1.weight`` (hidden, in),
    ``fc1.bias``, ``fc2.weight`` (classes, hidden|in), ``fc2.bias``)."""
    if len(weights) > MAX_MAPPER_BYTES:
        raise InvalidInput(f"mapper is {len(weights)} bytes; the limit is {MAX_MAPPER_BYTES}")
    try:
        tensors = safetensors_numpy_load(weights)
    except (SafetensorError, ValueError, OSError) as err:
        raise InvalidInput(f"mapper weights are not a readable safetensors file: {err}") from err
    names = set(tensors)
    if names not in (
        {"fc2.weight", "fc2.bias"},
        {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"},
    ):
        raise InvalidInput(
            "mapper safetensors must hold fc1.weight, fc1.bias, fc2.weight, fc2.bias "
            f"(or fc2.* only for a linear mapper); got {sorted(names)}"
        )

    def f32(name: str) -> np.ndarray:
        array = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if not np.isfinite(array).all():
            raise InvalidInput(f"mapper tensor {name} contains NaN or infinite values")
        return array

    w2, b2 = f32("fc2.weight"), f32("fc2.bias")
    if w2.ndim != 2 or b2.shape != (w2.shape[0],) or w2.shape[0] < 2:
        raise InvalidInput(f"fc2 has inconsistent shapes {w2.shape}, {b2.shape}")
    classes = int(w2.shape[0])
    w1 = b1 = None
    hidden = 0
    if "fc1.weight" in names:
        w1, b1 = f32("fc1.weight"), f32("fc1.bias")
        if w1.ndim != 2 or b1.shape != (w1.shape[0],) or w1.shape[0] != w2.shape[1]:
            raise InvalidInput(f"fc1 {w1.shape}/{b1.shape} does not feed fc2 {w2.shape}")
        hidden, in_features = int(w1.shape[0]), int(w1.shape[1])
        w1 = np.ascontiguousarray(w1.T)
    else:
        in_features = int(w2.shape[1])
    return LoadedMapper(
        digest=hashlib.sha256(weights).hexdigest(),
        in_features=in_features,
        classes=classes,
        hidden=hidden,
        w1=w1,
        b1=b1,
        w2=np.ascontiguousarray(w2.T),
        b2=b2,
        check_inputs=inputs_need_check(w1),
    )


def inputs_need_check(w1: np.ndarray | None) -> bool:
    """Whether a non-finite input can reach finite probabilities through this mapper.

    NaN always propagates (NaN × 0 is NaN; ``maximum`` keeps NaN), and so does ±inf
    wherever it lands in a logit or a hidden unit that ReLU keeps: ``softmax`` then meets
    ``inf - inf``. The one escape is the hidden layer's ReLU: an infinite input ``j``
    vanishes when every weight of row ``j`` of ``w1`` (``(in, hidden)``) has one strict
    sign (all > 0 for −inf, all < 0 for +inf: every hidden unit gets −inf, ReLU makes it
    0). A zero weight gives NaN, a weight of the other sign gives +inf: caught. So only a
    mapper with such a row has its inputs checked first; a linear mapper never needs it.
    """
    if w1 is None:
        return False
    return bool(((w1 > 0).all(axis=1) | (w1 < 0).all(axis=1)).any())


# ------------------------------------------------------------------------------- registry


class MapResult(NamedTuple):
    """A NamedTuple (immutable like the frozen dataclass it was, built in a third of its
    time: it is made on every call)."""

    labels: np.ndarray  # (rows,) int32
    probabilities: np.ndarray  # (rows, classes) float32, rows sum to 1
    classes: int
    generation: int

    def probabilities_bytes(self) -> bytes:
        """Little-endian float32, rows × classes (the MapResponse wire format)."""
        return self.probabilities.astype("<f4", copy=False).tobytes()


@dataclass
class Usage:
    """Per-user query accounting (all generations)."""

    calls: int = 0
    rows: int = 0
    refused: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    #: Rows mapped per carrier generation.
    rows_by_generation: dict[int, int] = field(default_factory=dict)


class QueryObserver(Protocol):
    """Sees every successfully mapped batch (e.g. the extraction detector). Must be fast;
    called outside the registry lock."""

    def observe(
        self, user_id: str, generation: int, pseudo: np.ndarray, labels: np.ndarray, now: float
    ) -> None: ...


#: Key of the verified-credential cache, random per process (never stored or sent).
_VERIFIED_KEY = secrets.token_bytes(32)


@dataclass
class _UserEntry:
    generation: int
    credential: _CredentialHash
    digest: str
    in_features: int
    classes: int
    #: Keyed blake2b of the last credential that passed the HMAC check. A returning
    #: caller then costs one blake2b (~1 µs) instead of HMAC-SHA256 (~5-10 µs, the
    #: largest fixed cost of a Map after gRPC itself). It dies with the entry, so
    #: rotation and revocation need nothing more.
    verified: bytes = b""

    def accepts(self, credential: str) -> bool:
        given = credential.encode()
        fast = hashlib.blake2b(given, key=_VERIFIED_KEY, digest_size=32).digest()
        if self.verified and hmac.compare_digest(fast, self.verified):
            return True
        if self.credential.matches(credential):
            self.verified = fast
            return True
        return False


@dataclass(frozen=True)
class RegistryStatus:
    users: int
    loaded_mappers: int
    loaded_bytes: int
    max_loaded_bytes: int
    evictions: int
    reloads: int
    revoked_users: int


def _quiet_fp_state() -> tuple[ContextVar[Any] | None, Any]:
    """numpy's floating-point error state with overflow and invalid ignored, and the
    context variable numpy keeps it in, so that `MapperRegistry.map` sets and resets it
    directly: ``with np.errstate(...)`` builds that state anew on every call (1.4 µs, the
    largest fixed overhead of a Map after the matrix products; this costs 0.2 µs). The
    state is checked to do what it says through ``np.geterr``; (None, None) where numpy
    keeps it elsewhere, and `map` then uses ``np.errstate``."""
    try:
        from numpy._core import _ufunc_config
    except ImportError:  # pragma: no cover - numpy < 2
        return None, None
    variable = getattr(_ufunc_config, "_extobj_contextvar", None)
    if not isinstance(variable, ContextVar):  # pragma: no cover - another numpy layout
        return None, None
    with np.errstate(over="ignore", invalid="ignore"):
        quiet = variable.get()
    token = variable.set(quiet)
    try:
        state = np.geterr()
    finally:
        variable.reset(token)
    if state["over"] != "ignore" or state["invalid"] != "ignore":  # pragma: no cover
        return None, None
    return variable, quiet


_FP_STATE, _QUIET_FP = _quiet_fp_state()
_maximum_of = np.maximum.reduce
_sum_of = np.add.reduce


def _softmax(logits: np.ndarray) -> bool:
    """Row-wise softmax of ``(rows, classes)`` logits in place; False when a row is not
    finite (the matrix products overflowed). One row, the common case, is done on the
    1-D view: the reductions without ``axis`` and ``keepdims`` cost half as much, and the
    ufuncs' own ``reduce`` skips the ``ndarray.max``/``sum`` Python wrappers."""
    if len(logits) == 1:
        row = logits[0]
        row -= _maximum_of(row)
        np.exp(row, out=row)
        total = float(_sum_of(row))
        if not math.isfinite(total):
            return False
        row /= total
        return True
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return bool(np.isfinite(logits).all())


class MapperRegistry:
    """Thread-safe registry of per-user mappers. See the module docstring."""

    def __init__(
        self,
        *,
        max_loaded_bytes: int = 256 << 20,
        max_rows: int = DEFAULT_MAX_ROWS,
        loader: Loader | None = None,
        observer: QueryObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_loaded_bytes < 1 or max_rows < 1:
            raise InvalidInput("max_loaded_bytes and max_rows must be >= 1")
        self.max_loaded_bytes = max_loaded_bytes
        self.max_rows = max_rows
        self.loader = loader
        self.observer = observer
        self.clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, _UserEntry] = {}
        #: user → highest revoked generation (kept after the entry is gone).
        self._revoked: dict[str, int] = {}
        #: credential of each revoked generation, so a revoked caller gets a useful answer.
        self._revoked_credentials: dict[str, _CredentialHash] = {}
        self._loaded: OrderedDict[str, LoadedMapper] = OrderedDict()
        #: digest → number of users whose current mapper it is (shared mappers).
        self._refs: dict[str, int] = {}
        self._loaded_bytes = 0
        self._usage: dict[str, Usage] = {}
        self._evictions = 0
        self._reloads = 0

    # ------------------------------------------------------------------ carrier events

    def hot_load(self, user_id: str, generation: int, weights: bytes, credential_hash: str) -> bool:
        """Install ``user_id``'s mapper for carrier ``generation`` (on CarrierReady).

        Returns False, changing nothing, for a stale event: a generation at or below the
        user's revoked one, or older than the one loaded. Loading the same generation
        again replaces it (idempotent for a replayed event).
        """
        if not user_id:
            raise InvalidInput("user_id is empty")
        if generation < 0:
            raise InvalidInput(f"generation must be >= 0; got {generation}")
        credential = _CredentialHash.parse(credential_hash)
        mapper = parse_mapper(weights)
        with self._lock:
            if generation <= self._revoked.get(user_id, -1):
                log.info("ignoring mapper %s/%d: generation revoked", user_id, generation)
                return False
            current = self._users.get(user_id)
            if current is not None and current.generation > generation:
                log.info(
                    "ignoring mapper %s/%d: generation %d is loaded",
                    user_id,
                    generation,
                    current.generation,
                )
                return False
            self._users[user_id] = _UserEntry(
                generation, credential, mapper.digest, mapper.in_features, mapper.classes
            )
            self._refs[mapper.digest] = self._refs.get(mapper.digest, 0) + 1
            self._insert(mapper)
            if current is not None:
                self._release(current.digest)
        return True

    def revoke(self, user_id: str, generation: int) -> bool:
        """Revoke every generation ``<= generation`` of ``user_id`` at once (on rotation or
        CarrierRevoked). Returns whether a loaded mapper was removed."""
        with self._lock:
            self._revoked[user_id] = max(generation, self._revoked.get(user_id, -1))
            entry = self._users.get(user_id)
            if entry is None or entry.generation > generation:
                return False
            del self._users[user_id]
            self._revoked_credentials[user_id] = entry.credential
            self._release(entry.digest)
        return True

    def generation(self, user_id: str) -> int | None:
        # One dict read is atomic (the GIL; the free-threaded build locks dicts itself):
        # the lock adds nothing here but its cost on every Map.
        entry = self._users.get(user_id)
        return entry.generation if entry else None

    # --------------------------------------------------------------------------- map

    def map(
        self,
        user_id: str,
        credential: str,
        pseudo_output: bytes,
        rows: int = 1,
        admit: Callable[[str, int], None] | None = None,
    ) -> MapResult:
        """Map ``rows`` pseudo-outputs (little-endian float32, row-major) with the user's
        own mapper. Raises the errors listed in the module docstring. ``admit(user_id,
        rows)`` (resource limits) runs once the credential and the request are checked, so
        neither a stranger nor a malformed call spends the user's rate or budget."""
        rows = rows or 1
        try:
            entry, mapper = self._authorise(user_id, credential)
            x = self._decode(entry, pseudo_output, rows)
            # Computing before the finiteness check saves a pass over the input on every
            # call: NaN or infinite inputs make the output non-finite (`inputs_need_check`
            # says for which mappers that holds), and only then is the input looked at, to
            # say which — still before ``admit`` charges anything.
            if mapper.check_inputs and not np.isfinite(x).all():
                self._refuse_non_finite(x)
            if rows == 1:  # the common call: one compiled kernel (see `kernels`)
                probabilities, label = map_row(x[0], mapper.w1, mapper.b1, mapper.w2, mapper.b2)
                if label < 0:
                    self._refuse_non_finite(x)
                labels = np.array((label,), dtype=np.int32)
            else:
                probabilities = self._map_batch(mapper, x)
                labels = probabilities.argmax(axis=1).astype(np.int32)
            if admit is not None:
                admit(user_id, rows)
        except ModelGuardError:
            self._account_refusal(user_id)
            raise
        now = self.clock()
        generation = entry.generation
        with self._lock:
            usage = self._usage.get(user_id)
            if usage is None:
                usage = self._usage[user_id] = Usage(first_seen=now)
            usage.calls += 1
            usage.rows += rows
            usage.last_seen = now
            by_generation = usage.rows_by_generation
            by_generation[generation] = by_generation.get(generation, 0) + rows
        if self.observer is not None:
            self.observer.observe(user_id, generation, x, labels, now)
        return MapResult(labels, probabilities, mapper.classes, generation)

    def _map_batch(self, mapper: LoadedMapper, x: np.ndarray) -> np.ndarray:
        """Probabilities of ``rows > 1`` rows through numpy (BLAS): raises InvalidInput
        when a row's logits are not finite."""
        if _FP_STATE is not None:  # np.errstate(over="ignore", invalid="ignore")
            quiet = _FP_STATE.set(_QUIET_FP)
            try:
                probabilities = mapper.logits(x)
                finite = _softmax(probabilities)
            finally:
                _FP_STATE.reset(quiet)
        else:  # pragma: no cover - see _quiet_fp_state
            with np.errstate(over="ignore", invalid="ignore"):
                probabilities = mapper.logits(x)
                finite = _softmax(probabilities)
        if not finite:
            self._refuse_non_finite(x)
        return probabilities

    @staticmethod
    def _refuse_non_finite(x: np.ndarray) -> None:
        bad = int((~np.isfinite(x)).sum())
        if bad:
            raise InvalidInput(
                f"pseudo_output contains {bad} NaN or infinite value(s): check the device's "
                "public-model run"
            )
        # finite inputs so large that the matrix products overflow
        raise InvalidInput(
            "pseudo_output values are too large to map (the mapper overflows): send the "
            "public model's scores under the carrier's output key, nothing else"
        )

    def _authorise(self, user_id: str, credential: str) -> tuple[_UserEntry, LoadedMapper]:
        if not credential:
            raise Unauthenticated(
                "no credential: send the credential issued with your carrier in the request"
            )
        # The common case reads the user's entry without the lock (a dict read is atomic;
        # hot_load and revoke replace or delete entries under it, so a revoked entry is
        # gone for every call that starts after `revoke` returns, as before). Refusals take
        # the lock to read the entry and the revocation records together.
        entry = self._users.get(user_id)
        if entry is not None and entry.accepts(credential):
            return entry, self._mapper_for(user_id, entry)
        with self._lock:
            entry = self._users.get(user_id)
            revoked_credential = self._revoked_credentials.get(user_id)
            revoked_through = self._revoked.get(user_id)
        if entry is None:
            if revoked_credential is not None and revoked_through is not None:
                if not revoked_credential.matches(credential):
                    raise PermissionDenied(
                        f"this credential does not grant access to user {user_id!r}"
                    )
                raise NotFound(
                    f"user {user_id!r}'s carrier (generation {revoked_through}) was revoked: "
                    "fetch the new carrier and credential (CarrierTrainer.GetCarrier) and retry"
                )
            raise NotFound(
                f"no carrier is registered for user {user_id!r}: request one with "
                "CarrierTrainer.RequestCarrier, then retry once it is ready"
            )
        if not entry.accepts(credential):
            if revoked_credential is not None and revoked_credential.matches(credential):
                raise NotFound(
                    f"the carrier this credential belongs to was revoked (user {user_id!r} is "
                    f"now on generation {entry.generation}): fetch the new carrier and "
                    "credential (CarrierTrainer.GetCarrier) and retry"
                )
            raise PermissionDenied(
                f"this credential does not grant access to user {user_id!r}'s mapper "
                "(credentials are per user and per carrier generation)"
            )
        return entry, self._mapper_for(user_id, entry)

    def _decode(self, entry: _UserEntry, pseudo_output: bytes, rows: int) -> np.ndarray:
        if not 1 <= rows <= self.max_rows:
            raise InvalidInput(f"rows must be between 1 and {self.max_rows}; got {rows}")
        expected = rows * entry.in_features * 4
        if len(pseudo_output) != expected:
            raise InvalidInput(
                f"pseudo_output holds {len(pseudo_output)} bytes; {rows} row(s) of this "
                f"user's public-model output need {expected} bytes ({rows} × "
                f"{entry.in_features} little-endian float32): send the public model's whole "
                "score vector, unmodified"
            )
        # finiteness is checked on the output (see `map`)
        return np.frombuffer(pseudo_output, dtype="<f4").reshape(rows, entry.in_features)

    def _account_refusal(self, user_id: str) -> None:
        with self._lock:
            usage = self._usage.get(user_id)
            if usage is None and user_id in self._users:
                usage = self._usage[user_id] = Usage(first_seen=self.clock())
            if usage is not None:  # unknown users are not given an accounting entry
                usage.refused += 1

    # ----------------------------------------------------------------------------- LRU

    def _mapper_for(self, user_id: str, entry: _UserEntry) -> LoadedMapper:
        with self._lock:
            mapper = self._loaded.get(entry.digest)
            if mapper is not None:
                self._loaded.move_to_end(entry.digest)
                return mapper
        if self.loader is None:
            raise Unavailable(
                f"user {user_id!r}'s mapper was evicted and no loader is configured: raise "
                "max_loaded_bytes or configure the artifact store"
            )
        try:
            weights = self.loader(user_id, entry.generation)
        except ModelGuardError:
            raise
        except Exception as err:  # the store's own errors: retryable
            raise Unavailable(f"reloading user {user_id!r}'s mapper failed: {err}") from err
        mapper = parse_mapper(weights)
        if mapper.digest != entry.digest:
            raise Unavailable(
                f"the stored mapper of {user_id!r} generation {entry.generation} does not "
                "match the one announced at hot-load (digest mismatch)"
            )
        with self._lock:
            if self._users.get(user_id) is not entry:  # revoked/rotated meanwhile
                raise NotFound(f"user {user_id!r}'s carrier changed during the call: retry")
            self._reloads += 1
            self._insert(mapper)
        return mapper

    def _insert(self, mapper: LoadedMapper) -> None:
        """Under the lock."""
        if mapper.digest in self._loaded:
            self._loaded.move_to_end(mapper.digest)
            return
        self._loaded[mapper.digest] = mapper
        self._loaded_bytes += mapper.nbytes
        while self._loaded_bytes > self.max_loaded_bytes and len(self._loaded) > 1:
            _, evicted = self._loaded.popitem(last=False)
            self._loaded_bytes -= evicted.nbytes
            self._evictions += 1

    def _release(self, digest: str) -> None:
        """Under the lock: one user fewer uses ``digest``; unload it when none does."""
        count = self._refs.get(digest, 0) - 1
        if count > 0:
            self._refs[digest] = count
            return
        self._refs.pop(digest, None)
        mapper = self._loaded.pop(digest, None)
        if mapper is not None:
            self._loaded_bytes -= mapper.nbytes

    # --------------------------------------------------------------------- introspection

    def usage(self, user_id: str) -> Usage:
        with self._lock:
            usage = self._usage.get(user_id)
            if usage is None:
                return Usage()
            return Usage(
                usage.calls,
                usage.rows,
                usage.refused,
                usage.first_seen,
                usage.last_seen,
                dict(usage.rows_by_generation),
            )

    def status(self) -> RegistryStatus:
        with self._lock:
            return RegistryStatus(
                users=len(self._users),
                loaded_mappers=len(self._loaded),
                loaded_bytes=self._loaded_bytes,
                max_loaded_bytes=self.max_loaded_bytes,
                evictions=self._evictions,
                reloads=self._reloads,
                revoked_users=len(self._revoked),
            )
