"""Clean data as people have it: an ``.npz`` (``x``, ``y``) or a folder of images (PNG,
JPEG, BMP, WebP), flat or in one sub-folder per class, fitted to the declared input.

Labels come from the class folders, a CSV or the model's own predictions. Every reader
says which in one line (`CleanData.labels_from`): a verdict reached on the model's own
labels, or on folders mapped by their sorted order, is read differently from one reached
on ground truth, so the user is told rather than left to guess.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from modelguard.datasets import Dataset, load_npz, read_npz, validate_arrays
from modelguard.errors import InvalidInput
from modelguard.spec import InputSpec, wrap

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: ``--labels`` keywords; any other value names a CSV file.
FOLDERS, PREDICTED = "folders", "predicted"
MIN_IMAGES = 2
#: A larger folder is read as a seeded random subset of this many images: the detectors
#: use at most 1,000 (`TriggerReversalSettings.clean_samples`), and decoding 100k photos
#: would take minutes and gigabytes for nothing.
DEFAULT_MAX_IMAGES = 10_000
#: Decoded size (float32) a folder may fill, as `PlatformSettings.max_dataset_bytes`.
DEFAULT_MAX_BYTES = 1 << 30
PREDICT_BATCH = 32
#: File names an error lists at most.
NAMED = 5
_INTEGER = re.compile(r"[0-9]+")
_LABEL = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class CleanData:
    """A dataset and where its labels came from, said for the user."""

    dataset: Dataset
    #: e.g. "the model's own predictions (no ground truth given)"
    labels_from: str
    #: one line when a folder was read as a subset of its images, else ""
    subset: str = ""

    @property
    def notes(self) -> list[str]:
        """The lines to show the user."""
        return [f"labels: {self.labels_from}", *([f"images: {self.subset}"] if self.subset else [])]


def read_clean_data(
    path: Path,
    spec: InputSpec,
    *,
    labels: str | None = None,
    model: nn.Module | None = None,
    num_classes: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    seed: int = 0,
) -> CleanData:
    """The clean data at ``path``: an ``.npz`` file or a folder of images.

    ``labels``: None (the ``.npz``'s ``y``; a folder's class sub-folders), ``"folders"``,
    ``"predicted"`` (the top-1 of ``model``, which must then be given) or the path of a
    CSV file (file name relative to the folder, integer label). ``num_classes`` (the
    model's) bounds the labels. A folder with more than ``max_images`` images, or more
    than ``max_bytes`` of decoded pixels, is read as a random subset drawn with ``seed``.
    """
    if path.is_dir():
        return read_image_folder(
            path,
            spec,
            labels=labels,
            model=model,
            num_classes=num_classes,
            max_images=max_images,
            max_bytes=max_bytes,
            seed=seed,
        )
    return read_npz_file(
        path, spec, labels=labels, model=model, num_classes=num_classes, max_bytes=max_bytes
    )


# --- .npz ----------------------------------------------------------------------------------
def read_npz_file(
    path: Path,
    spec: InputSpec,
    *,
    labels: str | None = None,
    model: nn.Module | None = None,
    num_classes: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> CleanData:
    """An ``.npz`` with ``x`` and ``y``; with ``labels="predicted"``, ``x`` alone is
    enough (a ``y`` is then not used)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise InvalidInput(f"{path} is one image: --data takes an .npz or a folder of images")
    if labels not in (None, PREDICTED):
        raise InvalidInput(
            f"--labels {labels} needs a folder of images: an .npz carries its labels in y "
            "(or use --labels predicted)"
        )
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidInput(f"dataset is {size} bytes; the limit is {max_bytes}")
        data = path.read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read the dataset file {path}: {err.strerror}") from None
    if labels is None:
        return CleanData(load_npz(data, spec, num_classes), f"the y array of {path.name}")
    model = _needed(model)
    arrays = read_npz(data, required=("x",), optional=("y",))
    x = arrays["x"]
    images = validate_arrays(x, np.zeros(x.shape[:1], dtype=np.int64), spec).x
    ignored = f"; the y array of {path.name} is not used" if "y" in arrays else ""
    dataset = Dataset(images, predict_labels(model, images, spec))
    return CleanData(dataset, f"the model's own predictions (no ground truth given){ignored}")


# --- folders -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderLayout:
    """The images of a folder, as paths relative to it (``cat/1.png``), sorted; and its
    class sub-folders, sorted (empty when the images lie directly in it)."""

    files: list[str]
    classes: list[str]


def read_image_folder(
    root: Path,
    spec: InputSpec,
    *,
    labels: str | None = None,
    model: nn.Module | None = None,
    num_classes: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    seed: int = 0,
) -> CleanData:
    """A folder of images, each fitted to the declared input (`fit_image`) and scaled from
    [0, 1] into the declared value range; see `read_clean_data` for the arguments."""
    channels = spec.channels
    if channels not in (1, 3):
        raise InvalidInput(
            f"images fill 1 (grey) or 3 (RGB) channels; the declared input has {channels}"
        )
    layout = scan_folder(root)
    mode = labels or (FOLDERS if layout.classes else None)
    y: list[int] | None = None
    if mode == FOLDERS:
        y, labels_from = folder_labels(root, layout, num_classes)
    elif mode == PREDICTED:
        _needed(model)  # before any image is decoded
        labels_from = "the model's own predictions (no ground truth given)"
        if layout.classes:
            labels_from += "; the class folders are not used"
    elif mode is None:
        raise InvalidInput(
            f"the images directly in {root} have no labels: put them in one sub-folder per "
            "class, or give --labels FILE.csv (file name, label) or --labels predicted "
            "(the model's own)"
        )
    else:
        csv_path = Path(mode)
        if csv_path.suffix.lower() != ".csv" and not csv_path.is_file():
            raise InvalidInput(
                f"--labels takes {FOLDERS}, {PREDICTED} or a .csv file; got {mode!r}"
            )
        y = csv_labels(csv_path, root, layout.files, num_classes)
        labels_from = f"the CSV file {csv_path}"

    total = len(layout.files)
    if total < MIN_IMAGES:
        raise InvalidInput(
            f"{root} holds {total} image; at least {MIN_IMAGES} are needed for clean data"
        )
    chosen, bound = choose_images(total, spec, max_images, max_bytes, seed)
    subset = ""
    if bound:
        subset = (
            f"{len(chosen):,} of the {total:,} in {root}, a random subset (seed {seed}; {bound})"
        )
    x = decode_images(root, [layout.files[i] for i in chosen], spec)
    low, high = spec.value_range
    x *= high - low  # in place: the array may be up to max_bytes
    x += low
    if y is None:
        targets = predict_labels(_needed(model), torch.from_numpy(x), spec).numpy()
    else:
        targets = np.asarray([y[i] for i in chosen], dtype=np.int64)
    return CleanData(validate_arrays(x, targets, spec, num_classes), labels_from, subset)


def scan_folder(root: Path) -> FolderLayout:
    """The folder's images: all directly in it, or all in one sub-folder per class.
    Hidden entries and files that are not images are left out."""
    images, folders = _entries(root)
    if images and folders:
        raise InvalidInput(
            f"{root} mixes images ({_names(images)}) with sub-folders ({_names(folders)}): "
            "put every image in one sub-folder per class, or all of them directly in the folder"
        )
    if folders:
        files = []
        for name in folders:
            inner, nested = _entries(root / name)
            if nested:
                raise InvalidInput(
                    f"{name}/{nested[0]} in {root} is a folder inside a class folder: class "
                    "folders hold their images directly (one level of class folders)"
                )
            if not inner:
                raise InvalidInput(
                    f"class folder {name!r} in {root} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
            files += [f"{name}/{image}" for image in inner]
        return FolderLayout(files, folders)
    if not images:
        raise InvalidInput(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return FolderLayout(images, [])


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """The image files and the sub-folders of ``folder``, each sorted by name."""
    try:
        with os.scandir(folder) as scan:
            entries = [entry for entry in scan if not entry.name.startswith(".")]
        images = sorted(
            entry.name
            for entry in entries
            if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
        )
        folders = sorted(entry.name for entry in entries if entry.is_dir())
    except OSError as err:
        raise InvalidInput(f"cannot read the folder {folder}: {err.strerror}") from None
    return images, folders


def _names(names: Sequence[str]) -> str:
    """Up to `NAMED` names, and how many more."""
    shown = ", ".join(names[:NAMED])
    return shown if len(names) <= NAMED else f"{shown} and {len(names) - NAMED} more"


def folder_labels(
    root: Path, layout: FolderLayout, num_classes: int | None
) -> tuple[list[int], str]:
    """Each image's label from its class folder: the folder's name when every name is an
    integer (``0``..``9``), else the folder's index among the sorted names (as torchvision's
    ImageFolder does); and a note saying which."""
    if not layout.classes:
        raise InvalidInput(
            f"--labels {FOLDERS}: the images of {root} are not in class sub-folders; give "
            f"--labels FILE.csv or --labels {PREDICTED}"
        )
    if all(_INTEGER.fullmatch(name) for name in layout.classes):
        mapping = {name: int(name) for name in layout.classes}
        how = ""
        labels_from = f"the class folders' names ({_names(layout.classes)})"
    else:
        mapping = {name: index for index, name in enumerate(layout.classes)}
        how = " (its index among the sorted folder names)"
        pairs = [f"{name}={index}" for name, index in mapping.items()]
        labels_from = (
            f"the class folders in sorted order, not all named by integers ({_names(pairs)})"
        )
    for name, label in mapping.items():
        if num_classes is not None and label >= num_classes:
            raise InvalidInput(
                f"class folder {name!r} is label {label}{how}, but the model outputs "
                f"{num_classes} classes (0..{num_classes - 1})"
            )
    return [mapping[file.split("/", 1)[0]] for file in layout.files], labels_from


def csv_labels(
    csv_path: Path, root: Path, files: Sequence[str], num_classes: int | None
) -> list[int]:
    """The label of each of ``files`` from a CSV of (file name relative to the folder,
    integer label) rows; a first row whose label is not an integer is a header. An image
    without a row, or a row without an image, is an error that names them."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise InvalidInput(f"cannot read the labels file {csv_path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"labels file {csv_path} is not UTF-8 text") from None
    known = set(files)
    table: dict[str, int] = {}
    rows = 0
    try:
        for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not any(cell.strip() for cell in row):
                continue
            rows += 1
            where = f"{csv_path.name} line {line}"
            if len(row) != 2:
                raise InvalidInput(
                    f"{where}: expected two columns (file name, integer label); got {len(row)}"
                )
            name = PurePosixPath(row[0].strip().replace("\\", "/")).as_posix()
            label = row[1].strip()
            if not _LABEL.fullmatch(label):
                if rows == 1 and name not in known:
                    continue  # a header
                raise InvalidInput(f"{where}: the label of {name} is {label!r}, not an integer")
            value = int(label)
            if name in table:
                raise InvalidInput(f"{where}: {name} is labelled twice")
            if value < 0 or (num_classes is not None and value >= num_classes):
                bound = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
                raise InvalidInput(f"{where}: the label of {name} is {value}, not in {bound}")
            table[name] = value
    except csv.Error as err:
        raise InvalidInput(f"labels file {csv_path} is not a readable CSV: {err}") from None
    missing = [file for file in files if file not in table]
    extra = sorted(set(table) - known)
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} image(s) have no row ({_names(missing)})")
        if extra:
            problems.append(f"{len(extra)} row(s) name no image in the folder ({_names(extra)})")
        raise InvalidInput(
            f"{csv_path.name} does not match the images of {root}: {'; '.join(problems)}"
        )
    return [table[file] for file in files]


def choose_images(
    total: int, spec: InputSpec, max_images: int, max_bytes: int, seed: int
) -> tuple[list[int], str]:
    """Which of ``total`` images to read: all, or a seeded random subset (in file order)
    when they are more than ``max_images`` or their decoded pixels exceed ``max_bytes``;
    and, for a subset, the bound that made it one."""
    if max_images < MIN_IMAGES:
        raise InvalidInput(f"--max-images must be at least {MIN_IMAGES}; got {max_images}")
    per_image = 4 * spec.channels * spec.shape[1] * spec.shape[2]
    fit = max_bytes // per_image
    if fit < MIN_IMAGES:
        raise InvalidInput(
            f"the dataset size limit ({max_bytes:,} bytes) holds fewer than {MIN_IMAGES} "
            f"images of shape {list(spec.shape)}"
        )
    cap = min(max_images, fit)
    if total <= cap:
        return list(range(total)), ""
    if cap == max_images:
        bound = f"--max-images {max_images:,}"
    else:
        bound = f"the dataset size limit of {max_bytes:,} bytes"
    return sorted(random.Random(seed).sample(range(total), cap)), bound


def decode_images(root: Path, files: Sequence[str], spec: InputSpec) -> np.ndarray:
    """The images as one (N, C, H, W) float32 array in [0, 1]. Every unreadable file is
    found before the error, which names them."""
    x = np.empty((len(files), *spec.shape), dtype=np.float32)
    bad: list[str] = []
    for index, file in enumerate(files):
        try:
            x[index] = fit_image(root / file, spec)
        except InvalidInput as err:
            bad.append(f"{file} ({err})")
    if bad:
        raise InvalidInput(f"{len(bad)} image(s) in {root} cannot be read: {_names(bad)}")
    return x


def fit_image(path: Path, spec: InputSpec) -> np.ndarray:
    """One image as (C, H, W) float32 in [0, 1]: turned upright (EXIF), converted to the
    declared channels (1: luminance; 3: RGB; alpha dropped and palettes expanded, as
    torchvision's loader does), resized so its shorter side fits and centre-cropped to
    the declared (H, W) (cropped first, so no cropped-off pixel blends into the border).
    16-bit greyscale keeps its full range."""
    channels, height, width = spec.shape
    try:
        with Image.open(path) as opened:
            # JPEG: decode at a reduced scale that still covers the crop (much faster)
            opened.draft("L" if channels == 1 else "RGB", (max(height, width),) * 2)
            image = ImageOps.exif_transpose(opened)
            if image.mode == "I" or image.mode.startswith("I;16"):
                grey = np.asarray(image, dtype=np.float32).clip(0, 65535) * (255 / 65535)
                image = Image.fromarray(grey)  # mode F, resized without rounding
            else:
                image = image.convert("L" if channels == 1 else "RGB")
            fitted = image.crop(centre_box(image.size, (width, height)))
            fitted = fitted.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(fitted, dtype=np.float32)
    except UnidentifiedImageError:
        raise InvalidInput("not an image in a known format, or corrupt") from None
    except Exception as err:  # Pillow's decoders raise many kinds on a corrupt file
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidInput(message) from None
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], channels, axis=2)
    return array.transpose(2, 0, 1) / 255.0


def centre_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred box of ``size`` (width, height) with ``target``'s aspect ratio."""
    width, height = size
    crop_width = min(width, max(1, round(height * target[0] / target[1])))
    crop_height = min(height, max(1, round(width * target[1] / target[0])))
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


# --- labels from the model -----------------------------------------------------------------
def _needed(model: nn.Module | None) -> nn.Module:
    if model is None:
        raise ValueError(f"--labels {PREDICTED} needs the model: pass it to the reader")
    return model


@torch.no_grad()
def predict_labels(
    model: nn.Module, x: torch.Tensor, spec: InputSpec, batch: int = PREDICT_BATCH
) -> torch.Tensor:
    """The model's top-1 label of each image (``x`` in the declared value range: the
    declared normalisation is applied first), in batches."""
    wrapped = wrap(model, spec)
    outputs = [wrapped(x[start : start + batch]).argmax(dim=1) for start in range(0, len(x), batch)]
    return torch.cat(outputs).to(torch.int64)
