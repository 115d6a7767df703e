"""Natural images that stand for a user: the ``a`` of a carrier ``c = a + tanh(p)``.

The photographs are the ones scikit-image ships inside its wheel (no download), in a
fixed order. Image ``index`` is photograph ``index % P`` under crop variant
``index // P``: variant 0 is the whole photograph (centre-cropped to the target aspect),
variant ``v > 0`` a deterministic sub-window (60–95 % of the side, position and
horizontal flip drawn from a generator seeded by ``v``). Distinct indices therefore give
distinct images, and the same index always gives the same image.

A user's image is chosen from ``sha256(user_id, generation)`` so that a rotation (a new
generation) changes it; a carrier pool instead enumerates indices ``0 .. n-1`` so every
pooled carrier is distinct by construction.

Shapes: returned tensors are ``(C, H, W)`` float32 in [0, 1]; ``C`` is 1 (luminance,
ITU-R BT.601 weights as in ``skimage.color.rgb2gray``) or 3 (RGB; grey photographs are
replicated to three channels).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from modelguard.errors import InvalidInput, NotFound

#: scikit-image photographs (loaders in ``skimage.data``), in a fixed order.
PHOTOGRAPHS: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "moon",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
    "clock",
    "cell",
    "page",
    "text",
    "stereo_motorcycle",
)


@lru_cache(maxsize=len(PHOTOGRAPHS))
def _photograph(name: str) -> np.ndarray:
    """The photograph as float32 (H, W, 3) in [0, 1]."""
    try:
        from skimage import data
    except ImportError as err:
        raise NotFound(
            "natural images come from scikit-image (PyPI scikit-image==0.26.0): install it"
        ) from err
    image = getattr(data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity)
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def photograph_count() -> int:
    return len(PHOTOGRAPHS)


def _crop_box(
    height: int, width: int, aspect: float, variant: int
) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of variant ``variant`` for a target aspect (w / h)."""
    # The largest window of the target aspect that fits.
    if width / height > aspect:
        full_h, full_w = height, max(1, round(height * aspect))
    else:
        full_h, full_w = max(1, round(width / aspect)), width
    if variant == 0:
        return (height - full_h) // 2, (width - full_w) // 2, full_h, full_w, False
    rng = np.random.default_rng([0xC0FFEE, variant])
    scale = float(rng.uniform(0.6, 0.95))
    crop_h, crop_w = max(2, round(full_h * scale)), max(2, round(full_w * scale))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w, bool(variant % 2)


def natural_image(index: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Natural image number ``index`` resized to ``shape`` = (C, H, W), C ∈ {1, 3}.

    Shape ``(C, H, W)``, float32 in [0, 1]; deterministic.
    """
    channels, height, width = shape
    if index < 0:
        raise InvalidInput(f"natural image index must be >= 0; got {index}")
    if channels not in (1, 3) or height < 1 or width < 1:
        raise InvalidInput(f"natural images are (1|3, H, W); got shape {shape}")
    name = PHOTOGRAPHS[index % len(PHOTOGRAPHS)]
    variant = index // len(PHOTOGRAPHS)
    photo = _photograph(name)
    top, left, crop_h, crop_w, flip = _crop_box(
        photo.shape[0], photo.shape[1], width / height, variant
    )
    window = photo[top : top + crop_h, left : left + crop_w]
    if flip:
        window = window[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1).unsqueeze(0)
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True)[0]
    if channels == 1:
        weights = torch.tensor([0.2125, 0.7154, 0.0721]).view(3, 1, 1)
        resized = (resized * weights).sum(0, keepdim=True)
    return resized.clamp(0.0, 1.0).contiguous()


def user_image_index(user_id: str, generation: int, modulus: int = 1 << 20) -> int:
    """The natural-image index of ``user_id`` at ``generation`` (sha256-derived, stable
    across processes and Python versions); never equal to the previous generation's."""

    def index_at(gen: int) -> int:
        digest = hashlib.sha256(f"{user_id}\x00{gen}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % modulus

    index = index_at(generation)
    if generation > 0 and index == index_at(generation - 1):
        index = (index + 1) % modulus  # a rotation always changes the image
    return index


def natural_image_for_user(
    user_id: str, generation: int, shape: tuple[int, int, int]
) -> torch.Tensor:
    """The natural image standing for ``user_id`` at carrier ``generation``."""
    return natural_image(user_image_index(user_id, generation), shape)
