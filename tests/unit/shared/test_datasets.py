from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from modelguard.datasets import (
    Dataset,
    dataset_to_npz,
    load_fashion_mnist,
    load_mnist,
    load_npz,
    read_idx,
)
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

SPEC = InputSpec((1, 4, 4))


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def test_idx_parsing() -> None:
    payload = struct.pack(">BBBB", 0, 0, 0x08, 2) + struct.pack(">II", 2, 3) + bytes(range(6))
    assert read_idx(payload).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(InvalidInput, match="truncated"):
        read_idx(payload[:-1])
    with pytest.raises(InvalidInput, match="magic"):
        read_idx(b"\x01\x02\x03\x04")


def test_mnist_and_fashion_mnist_load() -> None:
    mnist = load_mnist("test")
    assert mnist.x.shape == (10000, 1, 28, 28) and mnist.y.shape == (10000,)
    assert float(mnist.x.min()) >= 0.0 and float(mnist.x.max()) <= 1.0
    assert mnist.y[:5].tolist() == [7, 2, 1, 0, 4]
    fashion = load_fashion_mnist("test")
    assert fashion.x.shape == (10000, 1, 28, 28)
    assert set(fashion.y.unique().tolist()) == set(range(10))


def test_npz_roundtrip_and_subset() -> None:
    data = Dataset(torch.rand(10, 1, 4, 4), torch.arange(10) % 3)
    loaded = load_npz(dataset_to_npz(data), SPEC, num_classes=3)
    assert torch.equal(loaded.x, data.x) and torch.equal(loaded.y, data.y)
    assert len(loaded.subset(4, seed=1)) == 4
    assert torch.equal(loaded.subset(4, seed=1).y, loaded.subset(4, seed=1).y)


def test_channel_axis_may_be_omitted_for_grey_images() -> None:
    x = np.random.rand(5, 4, 4).astype(np.float32)
    assert load_npz(_npz(x=x, y=np.zeros(5, np.int64)), SPEC).x.shape == (5, 1, 4, 4)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 1, 4, 4), np.float32)}, "'x' and 'y'"),
        ({"x": np.zeros((2, 1, 5, 4), np.float32), "y": np.zeros(2, np.int64)}, "expected"),
        ({"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.zeros(2, np.int64)}, "float"),
        ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(3, np.int64)}, "shape"),
        ({"x": np.full((2, 1, 4, 4), np.nan, np.float32), "y": np.zeros(2, np.int64)}, "NaN"),
        ({"x": np.full((2, 1, 4, 4), 255.0, np.float32), "y": np.zeros(2, np.int64)}, "range"),
        ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.array([0, 9])}, "outside"),
        ({"x": np.zeros((0, 1, 4, 4), np.float32), "y": np.zeros(0, np.int64)}, "empty"),
        ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(2, np.float32)}, "integer"),
    ],
)
def test_bad_datasets_get_actionable_errors(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_npz(_npz(**arrays), SPEC, num_classes=3)


def test_pickled_object_arrays_are_refused() -> None:
    objects = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(InvalidInput, match="pickled"):
        load_npz(_npz(x=objects, y=np.zeros(2, np.int64)), SPEC)


def test_garbage_bytes_are_refused() -> None:
    with pytest.raises(InvalidInput):
        load_npz(b"not a zip at all", SPEC)
