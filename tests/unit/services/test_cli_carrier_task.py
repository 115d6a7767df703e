"""``modelguard carrier enroll --task-data``: a team's own task sent to carrier-trainer.
An .npz goes as it is; a folder of images is read as the audit reads clean data (class
sub-folders or a CSV, fitted to --input-shape, in [0, 1]) and sent as an .npz; the
reference the upload returns goes in the request."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from modelguard.proto.modelguard.v1 import common_pb2, jobs_pb2
from modelguard.services import cli
from modelguard.services.cli import ExitCode, main

CARRIER = ["--trainer", "t:1", "--mapper", "m:1", "--json"]


class RecordingCarrierClient:
    """Remembers the uploaded task data and the options of the request."""

    def __init__(self) -> None:
        self.uploaded: list[bytes] = []
        self.options: list[jobs_pb2.CarrierOptions] = []

    def upload_task_data(self, data: bytes) -> common_pb2.ArtifactRef:
        self.uploaded.append(data)
        return common_pb2.ArtifactRef(sha256="ab" * 32, key="k", size=len(data))

    def request(
        self, user: str, credential: str, options: jobs_pb2.CarrierOptions
    ) -> tuple[int, str]:
        self.options.append(options)
        return 1, "cred-1"


@pytest.fixture(name="client")
def _client(monkeypatch: pytest.MonkeyPatch) -> RecordingCarrierClient:
    recording = RecordingCarrierClient()

    @contextmanager
    def fake_client(args: argparse.Namespace) -> Iterator[Any]:
        yield recording

    monkeypatch.setattr(cli, "carrier_client", fake_client)
    return recording


def _folder(root: Path) -> Path:
    """Two classes of grey 10×10 PNGs, three images each."""
    for label, shade in (("cat", 40), ("dog", 200)):
        (root / label).mkdir(parents=True)
        for index in range(3):
            pixels = np.full((10, 10), shade + index, dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


def test_a_folder_of_class_folders_is_sent_as_an_npz(
    tmp_path: Path, client: RecordingCarrierClient, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(tmp_path / "pets")
    argv = ["carrier", "enroll", "--user", "team", "--task-data", str(folder)]
    assert main([*argv, "--input-shape", "1,8,8", *CARRIER]) == ExitCode.OK
    (sent,) = client.uploaded
    with np.load(io.BytesIO(sent)) as archive:
        x, y = archive["x"], archive["y"]
    assert x.shape == (6, 1, 8, 8) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1
    assert y.tolist() == [0, 0, 0, 1, 1, 1]  # cat, dog: their sorted order
    (options,) = client.options
    assert options.task_data.sha256 == "ab" * 32 and options.task == ""
    assert "labels: the class folders in sorted order" in " ".join(capsys.readouterr().err.split())


def test_an_npz_is_sent_as_it_is(tmp_path: Path, client: RecordingCarrierClient) -> None:
    path = tmp_path / "task.npz"
    np.savez(path, x=np.zeros((4, 1, 5, 5), np.float32), y=np.arange(4) % 2)
    argv = ["carrier", "enroll", "--user", "team", "--task-data", str(path), *CARRIER]
    assert main(argv) == ExitCode.OK
    assert client.uploaded == [path.read_bytes()]  # carrier-trainer checks it


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--labels", "predicted", "--input-shape", "1,8,8"], "needs a model to label with"),
        ([], "needs --input-shape C,H,W"),
        (["--task", "mnist"], "--task or --task-data, not both"),
    ],
)
def test_a_task_folder_without_what_it_needs_is_refused_before_any_upload(
    tmp_path: Path,
    client: RecordingCarrierClient,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    problem: str,
) -> None:
    folder = _folder(tmp_path / "pets")
    argv = ["carrier", "enroll", "--user", "team", "--task-data", str(folder), *extra]
    assert main([*argv, *CARRIER]) == ExitCode.BAD_INPUT
    assert problem in " ".join(capsys.readouterr().err.split())  # the console wraps lines
    assert client.uploaded == [] and client.options == []


def test_labels_with_an_npz_are_refused(
    tmp_path: Path, client: RecordingCarrierClient, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "task.npz"
    np.savez(path, x=np.zeros((4, 1, 5, 5), np.float32), y=np.arange(4) % 2)
    argv = ["carrier", "enroll", "--user", "team", "--task-data", str(path)]
    assert main([*argv, "--labels", "folders", *CARRIER]) == ExitCode.BAD_INPUT
    assert "an .npz carries its labels in y" in " ".join(capsys.readouterr().err.split())
