"""Real servers for the integration tests: one SeaweedFS (S3) and one Tansu broker keeping
its log in that SeaweedFS, started once per session and stopped at its end. Every test
under this directory is marked ``integration``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelguard.localstack import (
    SeaweedServer,
    TansuBroker,
    start_seaweedfs,
    start_tansu,
    tansu_binary,
    venv_bin,
)
from tests.requirements import SEAWEEDFS, TANSU, require_file

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    require_file(venv_bin("weed"), SEAWEEDFS)
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tansu(
    tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedServer
) -> Iterator[TansuBroker]:
    require_file(tansu_binary(), TANSU)
    broker = start_tansu(tmp_path_factory.mktemp("tansu"), seaweed, bucket="tansu-tests")
    yield broker
    broker.stop()


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """``unique_name("audit")`` -> ``"audit-1a2b3c4d5e"``: valid as topic and bucket name."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bucket_name(unique_name: Callable[[str], str]) -> str:
    return unique_name("mg-test")


@pytest.fixture
def topic_name(unique_name: Callable[[str], str]) -> str:
    return unique_name("mg.test")


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3 loads its protocol schemas with deprecated importlib.resources calls
    for text in ("read_text is deprecated", "open_text is deprecated"):
        config.addinivalue_line("filterwarnings", f"ignore:{text}:DeprecationWarning")
