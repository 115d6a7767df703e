"""Per-layer parameter statistics for leak forensics (after Song et al., CCS 2017).

For every weight tensor of a Linear/Conv layer (any parameter named ``*weight`` with two or
more dimensions, so TorchScript modules and custom layers are covered too) we compute the
the forensics' distribution summary — count, min, max, mean, variance, skewness ``S`` and kurtosis
``K`` — plus features that separate data-carrying weights from trained ones:

* ``tail_fraction``: share of weights with ``|w − mean| > 3σ`` (0.0027 for a normal law);
* ``positive_fraction``: share of the nonzero weights that are ``> 0``. Sign encoding (Song
  et al., CCS 2017) writes the bits of the secret into the signs, and image bits are far
  from balanced. ``positive_fraction_stderr`` is its cluster-robust standard error: the
  standard deviation of the per-unit positive fractions (a unit is an index of the first
  dimension: a Linear output, a Conv output channel) over √units, at least the binomial
  one — the signs of one unit's weights are not independent, so a layer with few units
  can be lopsided by chance far more often than its weight count suggests;
  ``zero_fraction`` is the share of exact zeros (pruned weights), ``units`` the number of
  units;
* ``sign_autocorrelation``: lag-1 correlation of the signs in the flattened order — bits of
  neighbouring pixels come in runs;
* ``autocorrelation`` / ``autocorrelation_lag``: the largest correlation between ``w_i`` and
  ``w_{i+L}`` over lags ``1 ≤ L ≤ max_lag`` — correlated value encoding copies image rows
  into consecutive weights, whose neighbours are as correlated as neighbouring pixels;
* ``quantile_skewness``: Kelly's skewness ``(Q90 + Q10 − 2·Q50) / (Q90 − Q10)``. Unlike
  the moment skewness it ignores the extreme tails (benign SGD training can grow long
  one-sided tails) and measures the bulk: a layer copying sparse images (MNIST: 80% dark
  background) has its median inside the background cluster, at one end of the range
  (value ≈ ±1). When the median is ill-defined — a hole at the centre, as in a
  magnitude-pruned layer whose median jumps between the two lobes, detected as
  ``Q55 − Q45 > 0.3·(Q90 − Q10)`` (0.1 for a normal law) — the midhinge
  ``(Q25 + Q75) / 2`` stands in for ``Q50``;
* ``neighbour_cokurtosis``: the joint fourth cumulant of neighbouring weights,
  ``E[a²b²] − E[a²]E[b²] − 2E[ab]²`` for ``a = z_i``, ``b = z_{i+1}``. It is 0 when
  neighbours are independent (whatever their distribution, e.g. a uniform
  initialisation) and when they are jointly Gaussian (a smooth learned template), positive
  when the weights' scale varies smoothly along the tensor (common in trained layers), and
  negative when neighbours share a two-level component — object and background of an
  encoded image (Fashion-MNIST-like data), which neither skewness nor sign statistics see.

The sign and neighbour features (``positive_fraction``, ``sign_autocorrelation``,
``autocorrelation``, ``quantile_skewness``, ``neighbour_cokurtosis``) ignore exact zeros,
so a pruned or zero-initialised layer is not mistaken for a lopsided one; the moments
(``mean`` … ``tail_fraction``) use every weight, as the reference method defines them.

Definitions (population moments, as ``scipy.stats`` with ``bias=True``): ``variance`` =
``m2``; ``skewness`` = ``m3 / m2^1.5``; ``kurtosis`` = ``m4 / m2² − 3`` (*excess*: 0 for a
normal law, −1.2 for a uniform one); autocorrelation at lag ``L`` = mean over
``i < n − L`` of ``z_i z_{i+L}`` with ``z`` the standardised weights; sign
autocorrelation is the same at lag 1 on ``sign(w)`` standardised by its own mean and
variance; quantiles use linear interpolation (``torch.quantile``), exactly up to
``exact_quantile_limit`` weights and from a fine histogram (resolution
``8σ / histogram_bins``) beyond. A constant tensor gets 0 for every shape statistic (and
a positive fraction of ½ when all zero). Non-finite entries are counted in ``nonfinite``
and left out of every statistic.

Tensor shapes: a Linear weight is ``(out, in)``, a Conv2d weight ``(out, in, kH, kW)``;
both are flattened in row-major order, which is how the published attacks lay out the
secret.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureConfig:
    """``max_lag``: largest lag of the autocorrelation scan; ``tail_sigma``: the
    ``tail_fraction`` threshold in standard deviations; ``min_count``: tensors with fewer
    weights are skipped (nothing can be said about a handful of numbers);
    ``exact_quantile_limit``/``histogram_bins``: how quantiles are computed;
    ``max_sample``/``sample_block``: tensors with more weights get their shape statistics
    (everything after the variance) from evenly spaced contiguous blocks of
    ``sample_block`` weights, ``max_sample`` in all (deterministic; keeps neighbours
    together), so a model costs tens of milliseconds whatever its size."""

    max_lag: int = 4
    tail_sigma: float = 3.0
    min_count: int = 16
    exact_quantile_limit: int = 1 << 13
    histogram_bins: int = 8192
    max_sample: int = 1 << 18
    sample_block: int = 4096

    def __post_init__(self) -> None:
        if self.max_lag < 1:
            raise ValueError("max_lag must be >= 1")
        if self.exact_quantile_limit < 1 or self.histogram_bins < 16:
            raise ValueError("exact_quantile_limit >= 1 and histogram_bins >= 16 are required")
        if self.sample_block < 2 or self.max_sample < self.sample_block:
            raise ValueError("sample_block >= 2 and max_sample >= sample_block are required")
        if not (math.isfinite(self.tail_sigma) and self.tail_sigma > 0):
            raise ValueError("tail_sigma must be finite and > 0")
        if self.min_count < 2:
            raise ValueError("min_count must be >= 2")


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one weight tensor. ``layer`` is the module name (``fc1``); ``shape``
    the tensor's shape."""

    layer: str
    shape: tuple[int, ...]
    count: int
    min: float
    max: float
    mean: float
    variance: float
    skewness: float
    kurtosis: float
    tail_fraction: float
    positive_fraction: float
    sign_autocorrelation: float
    autocorrelation: float
    autocorrelation_lag: int
    quantile_skewness: float
    neighbour_cokurtosis: float
    positive_fraction_stderr: float = 0.0
    zero_fraction: float = 0.0
    units: int = 1
    nonfinite: int = 0
    #: weights the shape statistics were computed from (``count`` unless sampled)
    sampled: int = 0

    @property
    def kind(self) -> str:
        """The layer's kind, from its weight shape (see `layer_kind`)."""
        return layer_kind(self.shape)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["kind"] = self.kind
        return out


#: Layer kinds whose weights are distributed differently and are compared only with
#: their own kind: fully connected, 1×1 (pointwise) convolutions, depthwise convolutions
#: (one input channel per filter: each unit is a small spatial kernel, whose centre-heavy,
#: mostly positive shape is normal there and alarming in a dense layer) and other
#: convolutions.
LAYER_KINDS = ("dense", "pointwise", "depthwise", "conv")


def layer_kind(shape: tuple[int, ...]) -> str:
    """``dense`` for a 2-D weight, ``pointwise`` for a convolution with a 1×1 kernel,
    ``depthwise`` for one with a single input channel per filter (a grouped depthwise
    convolution, or a first layer on one-channel images), ``conv`` otherwise."""
    if len(shape) <= 2:
        return "dense"
    kernel = 1
    for side in shape[2:]:
        kernel *= side
    if kernel == 1:
        return "pointwise"
    if shape[1] == 1:
        return "depthwise"
    return "conv"


def weight_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(layer name, weight)`` for every Linear/Conv-like weight of ``module``, in
    parameter order (works for eager and TorchScript modules)."""
    found: list[tuple[str, torch.Tensor]] = []
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if not leaf.endswith("weight") or param.dim() < 2:
            continue
        if not (param.is_floating_point() and param.numel() > 0):
            continue
        layer = name[: -len(".weight")] if name.endswith(".weight") else name
        found.append((layer or name, param.detach()))
    return found


def tensor_statistics(
    name: str, weight: torch.Tensor, config: FeatureConfig = FeatureConfig()
) -> LayerStats:
    """The statistics of one tensor (any shape), see the module docstring. Computed in
    float32 (torch's pairwise summation keeps reductions accurate to ~1e-6). ``count``,
    ``min``, ``max``, ``mean`` and ``variance`` always use every weight."""
    flat = weight.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    shape = tuple(int(d) for d in weight.shape)
    units = shape[0] if shape else 1
    nonfinite = 0
    mean, m2 = _mean_variance(flat)
    if not (math.isfinite(mean) and math.isfinite(m2)):
        # NaN/inf propagate into the moments: only then look for them
        finite = torch.isfinite(flat)
        nonfinite = int(flat.numel() - int(finite.sum()))
        flat = flat[finite]
        units = 1  # the unit structure is lost
        mean, m2 = _mean_variance(flat)
    n = int(flat.numel())
    if n == 0:
        return _flat_stats(name, shape, units=units, nonfinite=nonfinite)
    extremes = torch.aminmax(flat)
    low, high = float(extremes.min), float(extremes.max)
    sample = (
        flat
        if n <= config.max_sample
        else _block_sample(flat, config.max_sample, config.sample_block)
    )
    sampled = int(sample.numel())
    positive_count = int((sample > 0).sum())
    negative_count = int((sample < 0).sum())
    nonzero = positive_count + negative_count
    zero_fraction = 1.0 - nonzero / sampled
    positive = positive_count / nonzero if nonzero else 0.5
    stderr = _positive_fraction_stderr(flat, units, positive, nonzero, config.max_sample)
    if not (m2 > 0.0 and math.isfinite(m2)) or high == low:
        return _flat_stats(
            name,
            shape,
            count=n,
            low=low,
            high=high,
            mean=mean,
            positive=positive,
            stderr=stderr,
            zero_fraction=zero_fraction,
            units=units,
            nonfinite=nonfinite,
            sampled=sampled,
        )
    z = (sample - mean) / math.sqrt(m2)
    z2 = z * z
    skewness = float((z2 * z).mean())
    kurtosis = float((z2 * z2).mean()) - 3.0
    tail = int((z2 > config.tail_sigma**2).sum()) / sampled
    # sign and neighbour features: exact zeros (pruned weights) left out
    kept = sample
    if nonzero < sampled:
        kept = sample[sample != 0]
        if kept.numel() >= 3:
            kept_mean, kept_var = _mean_variance(kept)
            scale = math.sqrt(kept_var) if kept_var > 0 else 1.0
            z = (kept - kept_mean) / scale
            z2 = z * z
    lag_products = _lag_products(z, config.max_lag) if kept.numel() >= 3 else []
    autocorrelation, lag = (
        max((v, i + 1) for i, v in enumerate(lag_products)) if lag_products else (0.0, 0)
    )
    return LayerStats(
        layer=name,
        shape=shape,
        count=n,
        min=low,
        max=high,
        mean=mean,
        variance=m2,
        skewness=skewness,
        kurtosis=kurtosis,
        tail_fraction=tail,
        positive_fraction=positive,
        sign_autocorrelation=_sign_autocorrelation(kept, positive_count, negative_count),
        autocorrelation=autocorrelation,
        autocorrelation_lag=lag,
        quantile_skewness=_quantile_skewness(z, config) if kept.numel() >= 3 else 0.0,
        neighbour_cokurtosis=_neighbour_cokurtosis(z2, lag_products[0] if lag_products else 0.0),
        positive_fraction_stderr=stderr,
        zero_fraction=zero_fraction,
        units=units,
        nonfinite=nonfinite,
        sampled=sampled,
    )


def _positive_fraction_stderr(
    flat: torch.Tensor, units: int, positive: float, nonzero: int, limit: int
) -> float:
    """Cluster-robust standard error of the positive fraction: the spread of the per-unit
    positive fractions over √units, never below the binomial error. For a tensor larger
    than ``limit`` the spread is estimated on evenly spaced units."""
    binomial = math.sqrt(max(positive * (1.0 - positive), 1e-12) / max(nonzero, 1))
    if units < 2 or flat.numel() % units:
        return binomial
    rows = flat.reshape(units, -1)
    if flat.numel() > limit:
        keep = max(2, limit // rows.shape[1])
        if keep < units:
            rows = rows[torch.linspace(0, units - 1, keep).long()]
    per_unit = (rows > 0).sum(1).float() / (rows != 0).sum(1).clamp_min(1).float()
    spread = float(per_unit.std(correction=1))
    return max(binomial, spread / math.sqrt(units))


def _mean_variance(flat: torch.Tensor) -> tuple[float, float]:
    """Mean and population variance (two passes; much faster than ``torch.var_mean``'s
    Welford loop on large tensors, and as stable since the data are centred first)."""
    n = int(flat.numel())
    if n == 0:
        return 0.0, 0.0
    mean = flat.mean()
    centred = flat - mean
    return float(mean), float(torch.dot(centred, centred)) / n


def _flat_stats(
    name: str,
    shape: tuple[int, ...],
    *,
    count: int = 0,
    low: float = 0.0,
    high: float = 0.0,
    mean: float = 0.0,
    positive: float = 0.5,
    stderr: float = 0.0,
    zero_fraction: float = 0.0,
    units: int = 1,
    nonfinite: int = 0,
    sampled: int = 0,
) -> LayerStats:
    """Statistics of an empty or constant tensor: every shape statistic is 0."""
    return LayerStats(
        layer=name,
        shape=shape,
        count=count,
        min=low,
        max=high,
        mean=mean,
        variance=0.0,
        skewness=0.0,
        kurtosis=0.0,
        tail_fraction=0.0,
        positive_fraction=positive,
        sign_autocorrelation=0.0,
        autocorrelation=0.0,
        autocorrelation_lag=0,
        quantile_skewness=0.0,
        neighbour_cokurtosis=0.0,
        positive_fraction_stderr=stderr,
        zero_fraction=zero_fraction,
        units=units,
        nonfinite=nonfinite,
        sampled=sampled,
    )


def _block_sample(values: torch.Tensor, total: int, block: int) -> torch.Tensor:
    """``total`` entries as evenly spaced contiguous blocks of ``block`` entries."""
    blocks = total // block
    starts = torch.linspace(0, values.numel() - block, blocks).long()
    index = (starts[:, None] + torch.arange(block)[None, :]).reshape(-1)
    return values[index]


def layer_statistics(
    module: nn.Module, config: FeatureConfig = FeatureConfig()
) -> list[LayerStats]:
    """Statistics of every Linear/Conv weight tensor of ``module`` with at least
    ``config.min_count`` weights."""
    return [
        tensor_statistics(name, weight, config)
        for name, weight in weight_tensors(module)
        if weight.numel() >= config.min_count
    ]


def _lag_products(z: torch.Tensor, max_lag: int) -> list[float]:
    """``mean(z_i z_{i+L})`` for ``L = 1 … min(max_lag, n − 1)``."""
    n = int(z.numel())
    return [float((z[lag:] * z[:-lag]).mean()) for lag in range(1, min(max_lag, n - 1) + 1)]


def _sign_autocorrelation(
    flat: torch.Tensor, positive: int | None = None, negative: int | None = None
) -> float:
    """Lag-1 correlation of ``sign(w)`` (values in {−1, 0, 1}); the counts of positive
    and negative entries are passed in when already known."""
    n = int(flat.numel())
    if n < 2:
        return 0.0
    if positive is None or negative is None:
        positive, negative = int((flat > 0).sum()), int((flat < 0).sum())
    mean = (positive - negative) / n
    variance = (positive + negative) / n - mean * mean
    if variance <= 1e-12:
        return 0.0
    signs = torch.sign(flat)
    # mean over pairs of (s_i − m)(s_{i+1} − m), expanded to avoid a centred copy
    pairs = float((signs[1:] * signs[:-1]).sum()) / (n - 1)
    first = float(signs[:-1].sum()) / (n - 1)
    last = float(signs[1:].sum()) / (n - 1)
    return (pairs - mean * (first + last) + mean * mean) / variance


def _quantiles(
    z: torch.Tensor, probabilities: tuple[float, ...], config: FeatureConfig
) -> list[float]:
    """Quantiles of standardised values ``z`` with linear interpolation between order
    statistics (exact for small tensors; from a fine histogram beyond, each order
    statistic placed by the midpoint rule inside its bin)."""
    n = int(z.numel())
    if n <= config.exact_quantile_limit:
        q = torch.quantile(z, torch.tensor(probabilities, dtype=z.dtype))
        return [float(v) for v in q]
    bins = config.histogram_bins
    low, high = -4.0, 4.0
    below = float((z < low).sum())
    hist = torch.histc(z, bins=bins, min=low, max=high).double()
    cdf = below + torch.cumsum(hist, 0)
    width = (high - low) / bins

    def order_statistic(rank: int) -> float:  # value of the rank-th smallest (1-based)
        index = int(torch.searchsorted(cdf, torch.tensor([float(rank)], dtype=cdf.dtype)).item())
        if index >= bins:
            return high
        if rank <= below:
            return low
        before = below if index == 0 else float(cdf[index - 1])
        inside = max(float(hist[index]), 1.0)
        return low + (index + (rank - before - 0.5) / inside) * width

    out: list[float] = []
    for p in probabilities:
        position = p * (n - 1)  # 0-based fractional rank, as torch.quantile
        lower = math.floor(position)
        fraction = position - lower
        first = order_statistic(lower + 1)
        second = order_statistic(min(lower + 2, n)) if fraction > 0 else first
        out.append(first + fraction * (second - first))
    return out


#: (Q55 − Q45) / (Q90 − Q10) above which the median is taken as ill-defined.
HOLLOW_CENTRE = 0.3


def _quantile_skewness(z: torch.Tensor, config: FeatureConfig) -> float:
    q10, q25, q45, q50, q55, q75, q90 = _quantiles(
        z, (0.1, 0.25, 0.45, 0.5, 0.55, 0.75, 0.9), config
    )
    spread = q90 - q10
    if spread <= 0.0:
        return 0.0
    centre = 0.5 * (q25 + q75) if q55 - q45 > HOLLOW_CENTRE * spread else q50
    return (q90 + q10 - 2.0 * centre) / spread


def _neighbour_cokurtosis(z2: torch.Tensor, ab: float) -> float:
    """Joint fourth cumulant of ``(z_i, z_{i+1})`` over all neighbouring pairs, from
    ``z2 = z²`` and ``ab = mean(z_i z_{i+1})``."""
    if z2.numel() < 3:
        return 0.0
    a2, b2 = z2[:-1], z2[1:]
    return float((a2 * b2).mean()) - float(a2.mean()) * float(b2.mean()) - 2.0 * ab * ab
