"""Compiled single-row kernels of the Map path (numba): the mapper and the query-profile
score of one request, each in one call that keeps the GIL.

Why: a one-row Map through numpy is ~20 numpy calls, and the BLAS ones (``np.dot``)
release the GIL around a few microseconds of work. In the gRPC server, where the
completion-queue thread and the worker threads all want the GIL, every release is a
chance to lose it and wait to get it back, with the context switches and the cold caches
that come with it: measured in the live server, the numpy path cost ~3× its tight-loop
time. Compiled kernels do the arithmetic in one call without releasing the GIL; on the
benchmark's 214→256→10 mapper the server answered 14–15% more requests a second at
concurrency 8 and 32 (three alternating runs each). Batches (``rows > 1``) stay on numpy,
where the per-call overhead is spread over the rows.

Semantics are the numpy path's (`LoadedMapper.logits`, ``_softmax``, ``argmax``;
`QueryProfile.scores`): float32 arithmetic, NaN propagated by the ReLU, a non-finite
logit makes the row refused, the label is the first maximum of the probabilities. Sums
are taken in another order than BLAS's, so results agree to float32 rounding.

Compilation (~1 s a kernel) happens once per machine: ``cache=True`` keeps the machine
code beside this file (or in numba's per-user cache when that is read-only), and
`warm_up` compiles or loads it before a server takes traffic, so no request pays for it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit


@njit(cache=True)
def _map_hidden(
    x: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    out: np.ndarray,
) -> int:  # pragma: no cover - compiled
    in_features, hidden = w1.shape
    classes = w2.shape[1]
    h = b1.copy()
    for k in range(in_features):  # x @ w1, a row of w1 at a time (contiguous, vectorised)
        xk = x[k]
        for j in range(hidden):
            h[j] += xk * w1[k, j]
    for c in range(classes):
        out[c] = b2[c]
    for j in range(hidden):
        hj = h[j]
        if not hj <= 0.0:  # ReLU that keeps NaN, as np.maximum(h, 0) does
            for c in range(classes):
                out[c] += hj * w2[j, c]
    return _softmax_argmax(out)


@njit(cache=True)
def _map_linear(
    x: np.ndarray, w2: np.ndarray, b2: np.ndarray, out: np.ndarray
) -> int:  # pragma: no cover - compiled
    in_features, classes = w2.shape
    for c in range(classes):
        out[c] = b2[c]
    for k in range(in_features):
        xk = x[k]
        for c in range(classes):
            out[c] += xk * w2[k, c]
    return _softmax_argmax(out)


@njit(cache=True)
def _softmax_argmax(out: np.ndarray) -> int:  # pragma: no cover - compiled
    """Softmax of the logits in ``out`` in place; the first index of the largest
    probability, or -1 when a logit is not finite (``out`` is then meaningless)."""
    classes = out.shape[0]
    top = out[0]
    for c in range(1, classes):
        if out[c] > top:
            top = out[c]
    total = 0.0
    for c in range(classes):
        e = math.exp(out[c] - top)  # NaN or inf anywhere: total is not finite
        out[c] = e
        total += e
    if not math.isfinite(total):
        return -1
    best = 0
    for c in range(classes):
        out[c] = out[c] / total
        if out[c] > out[best]:
            best = c
    return best


@njit(cache=True)
def _profile_score(
    z: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    scales: np.ndarray,
    residual_scale: float,
) -> float:  # pragma: no cover - compiled
    """`QueryProfile.scores` of one row. The residual's squared norm is
    ``‖z − μ‖² − ‖Vᵀ(z − μ)‖²`` (V's columns are orthonormal eigenvectors), summed in
    float64 and floored at 0: one pass over V instead of two."""
    in_features, rank = components.shape
    projected = np.zeros(rank, dtype=np.float32)
    centred_norm = 0.0
    for k in range(in_features):
        ck = z[k] - mean[k]
        centred_norm += float(ck) * float(ck)
        for r in range(rank):
            projected[r] += ck * components[k, r]
    score = 0.0
    projected_norm = 0.0
    for r in range(rank):
        p = float(projected[r])
        scaled = p * float(scales[r])
        score += scaled * scaled
        projected_norm += p * p
    if residual_scale:
        score += max(centred_norm - projected_norm, 0.0) * residual_scale
    return score


def map_row(
    x: np.ndarray,
    w1: np.ndarray | None,
    b1: np.ndarray | None,
    w2: np.ndarray,
    b2: np.ndarray,
) -> tuple[np.ndarray, int]:
    """One row ``x`` (float32, ``(in,)``) through the mapper: ``(probabilities (1,
    classes) float32, label)``; label -1 when the logits are not finite."""
    # numba does not check bounds: the shapes are checked here, once per call
    first = w1 if w1 is not None else w2
    if x.ndim != 1 or x.shape[0] != first.shape[0]:
        raise ValueError(f"a row of {first.shape[0]} values is needed; got shape {x.shape}")
    out = np.empty((1, w2.shape[1]), dtype=np.float32)
    if w1 is not None and b1 is not None:
        label = _map_hidden(x, w1, b1, w2, b2, out[0])
    else:
        label = _map_linear(x, w2, b2, out[0])
    return out, int(label)


def profile_score(
    z: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    scales: np.ndarray,
    residual_scale: float,
) -> float:
    """`QueryProfile.scores` of one float32 row ``z`` ``(K,)``."""
    if z.ndim != 1 or not z.shape[0] == mean.shape[0] == components.shape[0]:
        raise ValueError(f"a row of {mean.shape[0]} values is needed; got shape {z.shape}")
    return float(_profile_score(z, mean, components, scales, float(residual_scale)))


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for the argument types the Map
    path passes: read-only rows (``np.frombuffer`` of the request) and writable ones."""
    rng = np.random.default_rng(0)
    weights: dict[str, Any] = {
        "w1": rng.normal(size=(3, 4)).astype(np.float32),
        "b1": np.zeros(4, np.float32),
        "w2": rng.normal(size=(4, 2)).astype(np.float32),
        "b2": np.zeros(2, np.float32),
    }
    linear = rng.normal(size=(3, 2)).astype(np.float32)
    writable = np.ones(3, np.float32)
    read_only = np.frombuffer(writable.tobytes(), dtype="<f4")
    for row in (writable, read_only):
        map_row(row, weights["w1"], weights["b1"], weights["w2"], weights["b2"])
        map_row(row, None, None, linear, weights["b2"])
        profile_score(row, np.zeros(3, np.float32), np.eye(3, 2, dtype=np.float32),
                      np.ones(2, np.float32), 1.0)  # fmt: skip
