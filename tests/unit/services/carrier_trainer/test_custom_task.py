"""A team's own task for carrier enrolment: the dataset is uploaded to carrier-trainer,
named in the request, checked before anything is queued, and a carrier and mapper are
trained for it with as many classes as its labels have; result-mapper serves that
mapper. A bad dataset is refused by RequestCarrier itself, with its problem named. With
authentication on, a tenant may only name task data it uploaded itself."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from modelguard.auth import Identity
from modelguard.bus.memory import MemoryBus
from modelguard.carrier.public_models import from_module
from modelguard.carrier.records import READY
from modelguard.carrier.task_data import MIN_SAMPLES_PER_CLASS
from modelguard.config import CarrierTrainerSettings, PlatformSettings, ResultMapperSettings
from modelguard.convert import ref_to_proto
from modelguard.errors import InvalidInput
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.runtime import ServiceApp
from modelguard.services.carrier_client import CarrierClient
from modelguard.services.carrier_trainer.service import TASK_DATA_TENANTS_PREFIX, CarrierService
from modelguard.services.launcher import build_service
from modelguard.services.result_mapper.service import ResultMapperService
from modelguard.topics import CARRIER_READY, CARRIER_REQUESTED
from tests.unit.authkit import Tokens, write_tokens
from tests.unit.carrierkit import IN_FEATURES, pseudo

CLASSES = 3


@dataclass
class Servers:
    bus: MemoryBus
    trainer: ServiceApp
    mapper: ServiceApp

    @property
    def carriers(self) -> CarrierService:
        return self.trainer.components["service"]  # type: ignore[no-any-return]

    def client(self, token: str = "") -> CarrierClient:
        return CarrierClient(self.trainer.address, self.mapper.address, timeout=10, token=token)

    def train_queued(self) -> None:
        """What carrier-trainer's Kafka handler does with each queued request."""
        for message in self.bus.records(CARRIER_REQUESTED):
            self.carriers.train(jobs_pb2.CarrierRequested.FromString(message.value))


@pytest.fixture(name="servers")
def _servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Servers]:
    """Authentication off (embedded mode)."""
    yield from start_servers(tmp_path, monkeypatch)


@pytest.fixture(name="tokens")
def _tokens(tmp_path: Path) -> Tokens:
    return write_tokens(tmp_path)


@pytest.fixture(name="authed")
def _authed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokens: Tokens) -> Iterator[Servers]:
    """Authentication on: tenants acme and globex, and an admin."""
    yield from start_servers(tmp_path, monkeypatch, str(tokens.file))


def start_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth_tokens_file: str = ""
) -> Iterator[Servers]:
    """carrier-trainer and result-mapper in-process over gRPC, with a tiny public model;
    named tasks are not reachable (their loader fails the test)."""
    torch.manual_seed(0)
    public = from_module(
        "tiny", nn.Sequential(nn.Flatten(), nn.Linear(144, IN_FEATURES)), (1, 12, 12)
    )
    monkeypatch.setattr("modelguard.carrier.public_models.load_public_model", lambda name: public)

    def no_named_task(name: str, split: str = "train") -> None:
        raise AssertionError(f"a custom task must not load the named dataset {name!r}")

    monkeypatch.setattr("modelguard.services.carrier_trainer.service.load_named", no_named_task)
    bus = MemoryBus()
    platform = PlatformSettings(store_dir=tmp_path / "store", auth_tokens_file=auth_tokens_file)
    trainer = build_service(
        "carrier-trainer",
        platform,
        CarrierTrainerSettings(grpc_port=0, metrics_port=-1, worker=False),
        bus=bus,
    )
    mapper = build_service(
        "result-mapper",
        platform,
        # random pseudo-outputs would not pass the extraction detector's profile
        ResultMapperSettings(grpc_port=0, metrics_port=-1, worker=False, profile_scoring=False),
        bus=bus,
    )
    trainer.start()
    mapper.start()
    try:
        yield Servers(bus, trainer, mapper)
    finally:
        mapper.stop(0.5)
        trainer.stop(0.5)
        bus.close()


def task_npz(per_class: int = MIN_SAMPLES_PER_CLASS + 5, classes: int = CLASSES) -> bytes:
    """A tiny synthetic task of 6×6 grey images: each class a brighter block in its own
    row band, so the classes differ."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(classes), per_class)
    x = rng.random((len(y), 1, 6, 6), dtype=np.float32) * 0.3
    for index, label in enumerate(y):
        x[index, 0, 2 * label : 2 * label + 2] += 0.6
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=x, y=y)
    return buffer.getvalue()


def test_a_custom_task_is_trained_and_served_with_its_own_classes(servers: Servers) -> None:
    with servers.client() as client:
        ref = client.upload_task_data(task_npz())
        options = jobs_pb2.CarrierOptions(steps=5, hidden=8, task_data=ref)
        generation, credential = client.request("team-a", options=options)
        servers.train_queued()
        record = servers.carriers.repository.get("team-a")
        assert record.state == READY, record.error
        manifest = json.loads(client.download("team-a", credential, "manifest"))
        assert manifest["classes"] == CLASSES
        assert manifest["task"] == "custom"
        assert manifest["task_input_shape"] == [1, 6, 6]
        assert manifest["test_accuracy"] is None  # a custom task has no separate test split

        service: ResultMapperService = servers.mapper.components["service"]
        (ready,) = servers.bus.records(CARRIER_READY)
        service.on_event(CARRIER_READY, ready.value)
        reply = client.map("team-a", credential, pseudo(4), 4)
    assert reply.generation == generation
    assert reply.probabilities.shape == (4, CLASSES)
    assert set(reply.labels.tolist()) <= set(range(CLASSES))


def test_a_custom_task_validation_share_is_held_out(servers: Servers) -> None:
    """The default hold-out (1,000 samples) would exceed a small team's data: a fifth is
    held out instead, and training still runs."""
    with servers.client() as client:
        ref = client.upload_task_data(task_npz(per_class=MIN_SAMPLES_PER_CLASS))
        client.request("team-b", options=jobs_pb2.CarrierOptions(steps=2, hidden=0, task_data=ref))
    servers.train_queued()
    record = servers.carriers.repository.get("team-b")
    assert record.state == READY, record.error
    assert record.manifest["classes"] == CLASSES


@pytest.mark.parametrize(
    ("dataset", "problem"),
    [
        (task_npz(per_class=MIN_SAMPLES_PER_CLASS - 1), "too few samples per class"),
        (task_npz(classes=1, per_class=40), "single class"),
    ],
)
def test_a_bad_dataset_is_refused_before_anything_is_queued(
    servers: Servers, dataset: bytes, problem: str
) -> None:
    with servers.client() as client:
        ref = client.upload_task_data(dataset)
        with pytest.raises(InvalidInput, match=problem) as refused:
            client.request("team-c", options=jobs_pb2.CarrierOptions(task_data=ref))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert servers.carriers.repository.find("team-c") is None
    assert servers.bus.records(CARRIER_REQUESTED) == []


def test_a_rotation_to_a_bad_dataset_keeps_the_working_carrier(servers: Servers) -> None:
    with servers.client() as client:
        good = client.upload_task_data(task_npz())
        _, credential = client.request(
            "team-d", options=jobs_pb2.CarrierOptions(steps=2, task_data=good)
        )
        servers.train_queued()
        bad = client.upload_task_data(task_npz(classes=1, per_class=40))
        with pytest.raises(InvalidInput, match="single class"):
            client.request("team-d", credential, jobs_pb2.CarrierOptions(task_data=bad))
    record = servers.carriers.repository.get("team-d")
    assert (record.generation, record.state) == (1, READY)


def test_only_data_uploaded_as_task_data_may_be_named(servers: Servers) -> None:
    """Any other blob of the shared store (another tenant's audit data, say) is refused."""
    elsewhere = servers.trainer.runtime.store.put_blob(task_npz(), "application/x-npz")
    with (
        servers.client() as client,
        pytest.raises(InvalidInput, match="was not uploaded to carrier-trainer"),
    ):
        client.request("team-e", options=jobs_pb2.CarrierOptions(task_data=ref_to_proto(elsewhere)))


def test_a_named_task_and_task_data_together_are_refused(servers: Servers) -> None:
    with servers.client() as client:
        ref = client.upload_task_data(task_npz())
        with pytest.raises(InvalidInput, match=r"give a task .*'mnist'.* or task data, not both"):
            client.request("team-f", options=jobs_pb2.CarrierOptions(task="mnist", task_data=ref))


# --- tenants ------------------------------------------------------------------------------
def enrol_for_tenant(servers: Servers, tokens: Tokens, user_id: str) -> str:
    """An admin enrols ``user_id`` (on a named task, never trained here) and hands its
    credential to a tenant, who may then rotate the carrier with it."""
    with servers.client(tokens.admin) as admin:
        _, credential = admin.request(user_id, options=jobs_pb2.CarrierOptions(task="mnist"))
    return credential


def test_a_tenant_cannot_name_another_tenants_task_data(authed: Servers, tokens: Tokens) -> None:
    """Knowing the digest of acme's upload is not enough for globex: the refusal is the
    one for data never uploaded, so it does not tell globex that the data exists."""
    credential = enrol_for_tenant(authed, tokens, "globex-device")
    with authed.client(tokens.acme) as acme:
        acmes = acme.upload_task_data(task_npz())
    never = jobs_pb2.CarrierOptions(task_data=acmes)
    never.task_data.sha256 = "0" * 64
    with authed.client(tokens.globex) as globex:
        with pytest.raises(InvalidInput, match="was not uploaded to carrier-trainer") as refused:
            globex.request("globex-device", credential, jobs_pb2.CarrierOptions(task_data=acmes))
        with pytest.raises(InvalidInput) as missing:
            globex.request("globex-device", credential, never)
    assert str(refused.value).replace(acmes.sha256[:12], "<digest>") == str(missing.value).replace(
        "0" * 12, "<digest>"
    )
    record = authed.carriers.repository.get("globex-device")
    assert (record.generation, record.options["task"]) == (1, "mnist")
    assert len(authed.bus.records(CARRIER_REQUESTED)) == 1  # the enrolment only


def test_a_tenant_may_name_the_same_bytes_once_it_uploaded_them_itself(
    authed: Servers, tokens: Tokens
) -> None:
    """The same bytes uploaded by two tenants belong to both; the training job (no
    caller) trains what the request was allowed to name."""
    credential = enrol_for_tenant(authed, tokens, "globex-device")
    with authed.client(tokens.acme) as acme:
        acmes = acme.upload_task_data(task_npz())
    with authed.client(tokens.globex) as globex:
        globexs = globex.upload_task_data(task_npz())
        assert globexs.sha256 == acmes.sha256
        generation, _ = globex.request(
            "globex-device", credential, jobs_pb2.CarrierOptions(steps=2, hidden=8, task_data=acmes)
        )
    assert generation == 2
    authed.train_queued()  # the enrolment's job is superseded and skipped
    record = authed.carriers.repository.get("globex-device")
    assert record.state == READY, record.error
    assert record.manifest["classes"] == CLASSES
    # acme's own use is unaffected by globex's upload
    acme_credential = enrol_for_tenant(authed, tokens, "acme-device")
    with authed.client(tokens.acme) as acme:
        assert (
            acme.request(
                "acme-device", acme_credential, jobs_pb2.CarrierOptions(steps=2, task_data=acmes)
            )[0]
            == 2
        )


def test_an_admin_may_name_any_uploaded_task_data_but_no_other_blob(
    authed: Servers, tokens: Tokens
) -> None:
    """As for audit artifacts, an admin is not confined to its own uploads; a blob that was
    never uploaded as task data stays refused."""
    with authed.client(tokens.acme) as acme:
        acmes = acme.upload_task_data(task_npz())
    elsewhere = authed.trainer.runtime.store.put_blob(task_npz(per_class=30), "application/x-npz")
    with authed.client(tokens.admin) as admin:
        assert admin.request("device", options=jobs_pb2.CarrierOptions(task_data=acmes))[0] == 1
        with pytest.raises(InvalidInput, match="was not uploaded to carrier-trainer"):
            admin.request(
                "device-2", options=jobs_pb2.CarrierOptions(task_data=ref_to_proto(elsewhere))
            )


def test_embedded_mode_names_any_task_data_uploaded_here(servers: Servers) -> None:
    """Authentication off (no caller): uploads record no tenant and any upload may be
    named, whoever sent it, as the training job does."""
    store = servers.trainer.runtime.store
    anonymous = servers.carriers.upload_task_data([(task_npz(), "application/x-npz")])
    assert store.list_docs(TASK_DATA_TENANTS_PREFIX) == []
    acmes = servers.carriers.upload_task_data(
        [(task_npz(per_class=MIN_SAMPLES_PER_CLASS), "application/x-npz")], Identity("acme")
    )
    assert store.list_docs(TASK_DATA_TENANTS_PREFIX) == [
        f"{TASK_DATA_TENANTS_PREFIX}{acmes.sha256}/acme"
    ]
    for ref in (anonymous, acmes):
        options = jobs_pb2.CarrierOptions(task_data=ref_to_proto(ref))
        assert servers.carriers.task_data(options).classes == CLASSES
    # the tenant's marker is per tenant: globex did not upload the anonymous data
    with pytest.raises(InvalidInput, match="was not uploaded"):
        servers.carriers.task_data(
            jobs_pb2.CarrierOptions(task_data=ref_to_proto(anonymous)), Identity("globex")
        )
