"""Clean data from a folder of images (class folders, a CSV, the model's own labels) or an
.npz, fitted to the declared input; every user error names what to fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from modelguard.clean_data import CleanData, centre_box, read_clean_data
from modelguard.datasets import Dataset, dataset_to_npz
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec

GREY = InputSpec((1, 4, 4))
RGB = InputSpec((3, 4, 4))


def _image(path: Path, value: int = 255, size: tuple[int, int] = (8, 8), mode: str = "L") -> Path:
    """A plain image (``size`` is width, height) saved in the format of its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _folder(root: Path, classes: dict[str, int]) -> Path:
    """``classes[name]`` images in each class folder, of brightness 0, 10, 20, …"""
    for name, count in classes.items():
        for index in range(count):
            _image(root / name / f"{index}.png", value=10 * index)
    return root


def _read(path: Path, spec: InputSpec = GREY, **options: object) -> CleanData:
    return read_clean_data(path, spec, **options)  # type: ignore[arg-type]


class Brightness(nn.Module):
    """Label 0 for bright images (mean above 0.5), label 1 for dark ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.flatten(1).mean(dim=1)
        return torch.stack([mean - 0.5, 0.5 - mean], dim=1)


# --- labels --------------------------------------------------------------------------------
def test_class_folders_named_by_integers_are_the_labels(tmp_path: Path) -> None:
    clean = _read(_folder(tmp_path / "data", {"3": 2, "7": 3}), num_classes=10)
    assert clean.dataset.y.tolist() == [3, 3, 7, 7, 7]
    assert clean.labels_from == "the class folders' names (3, 7)"
    assert clean.notes == ["labels: the class folders' names (3, 7)"]
    assert clean.dataset.x.shape == (5, 1, 4, 4) and clean.dataset.x.dtype == torch.float32


def test_class_folders_named_by_words_are_indexed_in_sorted_order(tmp_path: Path) -> None:
    clean = _read(_folder(tmp_path / "data", {"dog": 1, "cat": 2, "bird": 1}))
    assert clean.dataset.y.tolist() == [0, 1, 1, 2]  # bird, cat, cat, dog
    assert "sorted order" in clean.labels_from and "bird=0, cat=1, dog=2" in clean.labels_from


def test_class_folders_must_fit_the_models_classes(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"2": 1, "12": 1})
    with pytest.raises(
        InvalidInput, match=r"class folder '12' is label 12, but the model outputs 10"
    ):
        _read(root, num_classes=10)
    words = _folder(tmp_path / "words", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(InvalidInput, match=r"'c' is label 2 \(its index among the sorted"):
        _read(words, num_classes=2)


@pytest.mark.parametrize("header", ["", "file,label\n"])
def test_a_flat_folder_takes_its_labels_from_a_csv(tmp_path: Path, header: str) -> None:
    root = tmp_path / "data"
    for name in ("a.png", "b.jpg", "c.bmp"):
        _image(root / name)
    table = tmp_path / "labels.csv"
    table.write_text(header + "a.png,4\n./b.jpg, 1\n\nc.bmp,0\n")
    clean = _read(root, labels=str(table), num_classes=5)
    assert clean.dataset.y.tolist() == [4, 1, 0]
    assert clean.labels_from == f"the CSV file {table}"


def test_a_csv_may_label_class_folders_too(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"cat": 1, "dog": 1})
    table = tmp_path / "labels.csv"
    table.write_text("cat/0.png,5\ndog/0.png,6\n")
    assert _read(root, labels=str(table)).dataset.y.tolist() == [5, 6]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("a.png,1\n", r"1 image\(s\) have no row \(b.png\)"),
        ("a.png,1\nb.png,1\nz.png,2\n", r"1 row\(s\) name no image in the folder \(z.png\)"),
        ("a.png,1\nb.png,one\n", r"labels.csv line 2: the label of b.png is 'one', not an integer"),
        ("a.png,1.0\nb.png,1\n", r"line 1: the label of a.png is '1.0', not an integer"),
        ("a.png,1\na.png,2\nb.png,1\n", r"line 2: a.png is labelled twice"),
        ("a.png;1\nb.png;1\n", r"line 1: expected two columns \(file name, integer label\)"),
        ("a.png,-1\nb.png,1\n", r"line 1: the label of a.png is -1, not in 0..2"),
        ("a.png,3\nb.png,1\n", r"line 1: the label of a.png is 3, not in 0..2"),
    ],
)
def test_csv_errors_name_the_rows_and_files(tmp_path: Path, rows: str, message: str) -> None:
    root = tmp_path / "data"
    _image(root / "a.png")
    _image(root / "b.png")
    table = tmp_path / "labels.csv"
    table.write_text(rows)
    with pytest.raises(InvalidInput, match=message):
        _read(root, labels=str(table), num_classes=3)


def test_predicted_labels_are_the_models_own(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "bright.png", 255)
    _image(root / "dark.png", 0)
    _image(root / "grey.png", 250)
    clean = _read(root, labels="predicted", model=Brightness())
    assert clean.dataset.y.tolist() == [0, 1, 0]  # bright, dark, grey (sorted by name)
    assert clean.labels_from == "the model's own predictions (no ground truth given)"
    assert clean.notes == ["labels: the model's own predictions (no ground truth given)"]
    # class folders are then ignored, and said to be
    classes = _folder(tmp_path / "classes", {"0": 2})
    assert (
        "class folders are not used"
        in _read(classes, labels="predicted", model=Brightness()).labels_from
    )


def test_predicted_labels_see_the_declared_normalisation(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "a.png", 100)
    _image(root / "b.png", 150)
    # (x - 0.5) / 0.1: 100/255 becomes dark, 150/255 bright
    spec = InputSpec((1, 4, 4), mean=(0.5,), std=(0.1,))
    assert _read(root, spec, labels="predicted", model=Brightness()).dataset.y.tolist() == [1, 0]


def test_an_npz_keeps_its_labels_or_takes_the_models(tmp_path: Path) -> None:
    data = Dataset(
        torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).clone(), torch.tensor([2, 2])
    )
    path = tmp_path / "clean.npz"
    path.write_bytes(dataset_to_npz(data))
    clean = _read(path, num_classes=3)
    assert torch.equal(clean.dataset.x, data.x) and clean.dataset.y.tolist() == [2, 2]
    assert clean.labels_from == "the y array of clean.npz"
    predicted = _read(path, labels="predicted", model=Brightness())
    assert predicted.dataset.y.tolist() == [1, 0]
    assert predicted.labels_from.endswith("; the y array of clean.npz is not used")
    x_only = tmp_path / "x.npz"
    np.savez(x_only, x=data.x.numpy())
    assert _read(x_only, labels="predicted", model=Brightness()).dataset.y.tolist() == [1, 0]
    with pytest.raises(InvalidInput, match="must hold arrays 'x' and 'y'"):
        _read(x_only)
    with pytest.raises(InvalidInput, match=r"--labels folders needs a folder of images"):
        _read(path, labels="folders")
    with pytest.raises(InvalidInput, match="the limit is 10"):
        _read(path, max_bytes=10)


# --- fitting images to the declared input -----------------------------------------------------
def test_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path: Path) -> None:
    wide = np.zeros((8, 16), dtype=np.uint8)  # height 8, width 16
    wide[:, 4:12] = 255  # the centre square is white, the sides black
    root = tmp_path / "data" / "0"
    root.mkdir(parents=True)
    Image.fromarray(wide).save(root / "wide.png")
    tall = np.zeros((20, 5), dtype=np.uint8)  # smaller than the input on one side: upscaled
    tall[5:15] = 255
    Image.fromarray(tall).save(root / "tall.png")
    spec = InputSpec((1, 4, 4), value_range=(-1.0, 1.0))
    x = _read(tmp_path / "data", spec).dataset.x
    assert x.shape == (2, 1, 4, 4)
    assert torch.allclose(x, torch.ones_like(x)), "only the centre is kept, scaled to [-1, 1]"
    # (width, height) boxes of the target's aspect ratio
    assert centre_box((16, 8), (4, 4)) == (4, 0, 12, 8)
    assert centre_box((5, 20), (4, 4)) == (0, 7, 5, 12)
    assert centre_box((10, 10), (4, 2)) == (0, 2, 10, 7)
    assert _read(tmp_path / "data", InputSpec((1, 2, 4))).dataset.x.shape == (2, 1, 2, 4)


def test_channels_are_converted_to_the_declared_ones(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "0" / "red.png", (255, 0, 0), mode="RGB")
    _image(root / "0" / "redalpha.png", (255, 0, 0, 0), mode="RGBA")  # alpha dropped
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "0" / "redpalette.png")
    _image(root / "0" / "red.jpg", (255, 0, 0), mode="RGB")
    _image(root / "0" / "red.webp", (255, 0, 0), mode="RGB")
    rgb = _read(root, RGB).dataset.x
    assert rgb.shape == (5, 3, 4, 4)
    assert torch.allclose(rgb[:, 0], torch.ones(5, 4, 4), atol=0.02)  # JPEG, WebP: lossy
    assert torch.allclose(rgb[:, 1:], torch.zeros(5, 2, 4, 4), atol=0.02)
    grey = _read(root, GREY).dataset.x
    assert grey.shape == (5, 1, 4, 4)
    assert torch.allclose(grey, torch.full_like(grey, 76 / 255), atol=0.02)  # luminance of red


def test_greyscale_fills_three_channels_and_sixteen_bits_keep_their_range(tmp_path: Path) -> None:
    root = tmp_path / "data" / "0"
    _image(root / "grey.png", 51)
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16)).save(root / "deep.png")
    x = _read(tmp_path / "data", RGB).dataset.x
    assert x.shape == (2, 3, 4, 4)
    assert torch.allclose(x[0], torch.full((3, 4, 4), 32768 / 65535), atol=1e-3)  # deep.png
    assert torch.allclose(x[1], torch.full((3, 4, 4), 0.2), atol=1e-6)  # grey.png


def test_a_large_folder_is_read_as_a_seeded_subset(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"0": 4, "1": 3})
    clean = _read(root, max_images=3, seed=1)
    assert len(clean.dataset) == 3
    assert clean.subset == f"3 of the 7 in {root}, a random subset (seed 1; --max-images 3)"
    assert clean.notes[1] == f"images: {clean.subset}"
    again = _read(root, max_images=3, seed=1)
    assert torch.equal(clean.dataset.x, again.dataset.x)
    assert torch.equal(clean.dataset.y, again.dataset.y)
    # the decoded size is bounded too (here: 4 images of 1×4×4 float32)
    by_size = _read(root, max_bytes=4 * 16 * 4)
    assert len(by_size.dataset) == 4
    assert "the dataset size limit of 256 bytes" in by_size.subset
    assert _read(root).subset == ""


# --- user errors ---------------------------------------------------------------------------
def test_corrupt_images_are_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"cat": 2, "dog": 1})
    (root / "cat" / "broken.png").write_bytes(b"not an image at all")
    whole = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidInput) as caught:
        _read(root)
    message = str(caught.value)
    assert message.startswith(
        f"2 image(s) in {root} cannot be read: cat/broken.png (not an image in a known format, "
        "or corrupt), dog/truncated.png ("
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root.mkdir(), r"holds no images \(.png, .jpg, .jpeg, .bmp, .webp\)"),
        (lambda root: (root.mkdir(), (root / "notes.txt").write_text("")), "holds no images"),
        (lambda root: _image(root / "0" / "a.png"), "holds 1 image; at least 2 are needed"),
        (
            lambda root: (_image(root / "a.png"), _image(root / "cat" / "b.png")),
            r"mixes images \(a.png\) with sub-folders \(cat\)",
        ),
        (
            lambda root: (_image(root / "cat" / "a.png"), (root / "dog").mkdir()),
            "class folder 'dog' in .* holds no images",
        ),
        (
            lambda root: _image(root / "cat" / "more" / "a.png"),
            "cat/more in .* is a folder inside a class folder",
        ),
        (
            lambda root: (_image(root / "a.png"), _image(root / "b.png")),
            r"images directly in .* have no labels: put them in one sub-folder per class, or "
            r"give --labels FILE.csv",
        ),
    ],
)
def test_folder_errors_say_what_to_fix(tmp_path: Path, make: object, message: str) -> None:
    root = tmp_path / "data"
    make(root)  # type: ignore[operator]
    with pytest.raises(InvalidInput, match=message):
        _read(root)


def test_labels_option_errors(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "a.png")
    _image(root / "b.png")
    with pytest.raises(InvalidInput, match=r"--labels folders: the images of .* are not in class"):
        _read(root, labels="folders")
    with pytest.raises(
        InvalidInput, match=r"--labels takes folders, predicted or a .csv file; got 'folder'"
    ):
        _read(root, labels="folder")
    with pytest.raises(InvalidInput, match=r"cannot read the labels file .*missing.csv"):
        _read(root, labels=str(tmp_path / "missing.csv"))
    with pytest.raises(InvalidInput, match="images fill 1 \\(grey\\) or 3 \\(RGB\\) channels"):
        _read(root, InputSpec((2, 4, 4)), labels="predicted", model=Brightness())
    with pytest.raises(InvalidInput, match=r"is one image: --data takes an .npz or a folder"):
        _read(root / "a.png")
    with pytest.raises(InvalidInput, match=r"cannot read the dataset file .*nothing.npz"):
        _read(tmp_path / "nothing.npz")


def test_predicted_labels_without_a_model_is_a_callers_mistake(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "a.png")
    _image(root / "b.png")
    with pytest.raises(ValueError, match="needs the model"):
        _read(root, labels="predicted")
