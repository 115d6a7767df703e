"""Short carrier trainings on a tiny frozen public model and a synthetic 4-class task."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from modelguard.carrier.carrier import (
    Carrier,
    CarrierConfig,
    CarrierTrainer,
    TrainingState,
    mapped_accuracy,
    mapper_to_safetensors,
    train_carrier,
)
from modelguard.carrier.mapper_registry import MapperRegistry, hash_credential
from modelguard.carrier.natural_images import natural_image
from modelguard.carrier.pool import CarrierPool, PoolConfig
from modelguard.carrier.public_models import PublicModel, from_module
from modelguard.datasets import Dataset
from modelguard.errors import InvalidInput, ResourceExhausted

CLASSES = 4


def synthetic_task(n: int, seed: int) -> Dataset:
    """6×6 images: class k is a bright bar (row 1, row 4, column 1, column 4) in noise."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    x = torch.rand(n, 1, 6, 6, generator=generator) * 0.3
    for k, (axis, index) in enumerate(((2, 1), (2, 4), (3, 1), (3, 4))):
        rows = y == k
        if axis == 2:
            x[rows, 0, index, :] = 1.0
        else:
            x[rows, 0, :, index] = 1.0
    return Dataset(x, y)


def tiny_public_model() -> PublicModel:
    torch.manual_seed(123)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 12),
    )
    return from_module("tiny-random", net, (1, 12, 12))


FAST = CarrierConfig(
    hidden=32,
    max_steps=300,
    eval_every=50,
    validation_samples=200,
    input_fraction=0.5,
    lr_perturbation=0.1,
    lr_mapper=5e-3,
    seed=0,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The suite is sized for one core; extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def public() -> PublicModel:
    return tiny_public_model()


@pytest.fixture(scope="module")
def task() -> tuple[Dataset, Dataset]:
    return synthetic_task(1500, seed=1), synthetic_task(500, seed=2)


def test_short_training_beats_chance_by_a_wide_margin(
    public: PublicModel, task: tuple[Dataset, Dataset]
) -> None:
    train, test = task
    before = copy.deepcopy(public.module.state_dict())
    result = train_carrier(
        FAST, public, train, natural_image(0, public.input_shape), test_data=test
    )
    assert result.test_accuracy is not None and result.test_accuracy >= 0.9  # chance: 0.25
    assert result.validation_accuracy >= 0.9
    # the public model is frozen and untouched
    for name, tensor in public.module.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    # the carrier stays a valid image near its natural image
    assert result.carrier.shape == public.input_shape
    assert float(result.carrier.min()) >= 0 and float(result.carrier.max()) <= 1
    assert float((result.carrier - result.natural).abs().max()) < 1.0
    assert result.placement.height == 6 and result.placement.top == 3
    assert 0 < result.steps <= FAST.max_steps and result.history
    # the exported mapper serves the same answers through the numpy registry
    registry = MapperRegistry()
    registry.hot_load("u", 0, mapper_to_safetensors(result.mapper), hash_credential("k"))
    assert result.output_key is not None  # keyed by default: the device sends f(g(x, c)) Q + o
    scores = Carrier.from_result(result).outputs(public, test.x).numpy()
    served = registry.map("u", "k", scores.astype("<f4").tobytes(), rows=len(scores)).labels
    served_accuracy = float((torch.from_numpy(served.astype(np.int64)) == test.y).float().mean())
    assert served_accuracy == pytest.approx(result.test_accuracy, abs=1e-6)
    # the query profile accepts legitimate traffic and rejects noise
    assert result.query_profile.outliers(scores).mean() < 0.05
    noise = np.random.default_rng(0).normal(0, 10, size=(100, public.output_dim)).astype(np.float32)
    assert result.query_profile.outliers(noise).mean() > 0.9


def test_training_is_deterministic(public: PublicModel, task: tuple[Dataset, Dataset]) -> None:
    train, _ = task
    config = CarrierConfig(**{**FAST.__dict__, "max_steps": 60, "eval_every": 30})
    a = train_carrier(config, public, train, natural_image(1, public.input_shape))
    b = train_carrier(config, public, train, natural_image(1, public.input_shape))
    assert torch.equal(a.perturbation, b.perturbation)
    assert a.validation_accuracy == b.validation_accuracy


def test_early_stop_hook_and_budget(public: PublicModel, task: tuple[Dataset, Dataset]) -> None:
    train, _ = task

    class StopAtFirstEvaluation(CarrierTrainer):
        def should_stop(self, state: TrainingState) -> str | None:
            return "enough"

    config = CarrierConfig(**{**FAST.__dict__, "max_steps": 1000, "eval_every": 20})
    result = StopAtFirstEvaluation(config, public).train(
        train, natural_image(2, public.input_shape)
    )
    assert (result.steps, result.stop_reason) == (20, "enough")
    budget = CarrierConfig(**{**FAST.__dict__, "max_steps": 10_000, "time_budget_s": 0.2})
    timed = train_carrier(budget, public, train, natural_image(2, public.input_shape))
    assert timed.stop_reason.startswith("time budget") and timed.steps < 10_000


def test_mapper_warm_start_is_evaluated_and_kept_when_best(
    public: PublicModel, task: tuple[Dataset, Dataset]
) -> None:
    train, test = task
    config = CarrierConfig(
        **{**FAST.__dict__, "max_steps": 20, "eval_every": 10, "mapper_warmup_samples": 500}
    )
    result = train_carrier(
        config, public, train, natural_image(0, public.input_shape), test_data=test
    )
    assert result.history[0].step == 0  # the warm-started mapper, before any joint step
    assert result.history[0].validation_accuracy >= 0.8  # random features + MLP suffice here
    assert result.validation_accuracy >= result.history[0].validation_accuracy


def test_config_validation() -> None:
    with pytest.raises(InvalidInput, match="gamma"):
        CarrierConfig(gamma=-1)
    with pytest.raises(InvalidInput, match="input_fraction"):
        CarrierConfig(input_fraction=1.5)


def test_wrong_natural_image_shape_is_refused(
    public: PublicModel, task: tuple[Dataset, Dataset]
) -> None:
    with pytest.raises(InvalidInput, match="natural image has shape"):
        train_carrier(FAST, public, task[0], torch.zeros(3, 12, 12))


def test_pool_per_user_and_shared_mappers(
    public: PublicModel, task: tuple[Dataset, Dataset]
) -> None:
    train, test = task
    config = CarrierConfig(**{**FAST.__dict__, "max_steps": 100})
    with pytest.raises(InvalidInput, match="output_key=False"):
        PoolConfig(mapper_sharing="shared", carrier=config)
    unkeyed = CarrierConfig(**{**FAST.__dict__, "max_steps": 100, "output_key": False})
    shared = CarrierPool.build(
        PoolConfig(size=2, mapper_sharing="shared", carrier=unkeyed), public, train, test_data=test
    )
    alice, _ = shared.rotate("alice")
    bob = shared.assign("bob")
    assert alice.carrier.mapper_bytes == bob.carrier.mapper_bytes  # one mapper on the server
    assert not torch.equal(
        alice.carrier.result.carrier, bob.carrier.result.carrier
    )  # distinct carriers
    for assignment in (alice, bob):
        accuracy = assignment.carrier.result.test_accuracy
        assert accuracy is not None and accuracy >= 0.8
    with pytest.raises(ResourceExhausted, match="pool is empty"):
        shared.rotate("alice")

    per_user = CarrierPool.build(PoolConfig(size=2, carrier=config, first_index=5), public, train)
    first = per_user.assign("carol")
    assert per_user.assign("carol") is first
    second, old = per_user.rotate("carol")
    assert old is first and second.generation == 1
    assert first.carrier.mapper_bytes != second.carrier.mapper_bytes
    assert first.carrier.image_index == 5 and second.carrier.image_index == 6
    # the rotated carrier's mapper is useless for the old carrier's pseudo-outputs
    result_old, result_new = first.carrier.result, second.carrier.result
    cross = mapped_accuracy(
        public,
        result_new.mapper,
        result_old.carrier,
        result_old.placement,
        test,
        output_key=result_old.output_key,
    )
    own = mapped_accuracy(
        public,
        result_new.mapper,
        result_new.carrier,
        result_new.placement,
        test,
        output_key=result_new.output_key,
    )
    assert own > cross


@pytest.mark.parametrize("hidden", [0, 16])
def test_standardisation_is_folded_into_the_served_weights(hidden: int) -> None:
    from modelguard.carrier.carrier import MappingNetwork
    from modelguard.carrier.mapper_registry import parse_mapper

    torch.manual_seed(0)
    # units on very different scales, one dead (constant) unit
    scores = torch.randn(500, 6) * torch.tensor([0.01, 1.0, 100.0, 5.0, 1.0, 0.0]) + 3.0
    mapper = MappingNetwork(6, 3, hidden)
    mapper.standardise(scores)
    assert float(mapper.input_std.min()) > 0  # the dead unit gets the floor, not 0
    served = parse_mapper(mapper_to_safetensors(mapper.eval()))
    assert set(mapper.arrays()) == {"fc2.weight", "fc2.bias"} | (
        {"fc1.weight", "fc1.bias"} if hidden else set()
    )
    with torch.no_grad():
        expected = mapper(scores).numpy()
    np.testing.assert_allclose(served.logits(scores.numpy()), expected, rtol=1e-4, atol=1e-3)


def test_fresh_mapper_is_standardised_and_a_shared_one_kept(
    public: PublicModel, task: tuple[Dataset, Dataset]
) -> None:
    train, _ = task
    # unkeyed: a keyed mapper has its standardisation folded into its first layer
    config = CarrierConfig(
        **{**FAST.__dict__, "max_steps": 20, "eval_every": 10, "output_key": False}
    )
    first = train_carrier(config, public, train, natural_image(0, public.input_shape))
    assert not torch.equal(first.mapper.input_std, torch.ones(public.output_dim))
    shared = copy.deepcopy(first.mapper)
    second = train_carrier(
        config,
        public,
        train,
        natural_image(1, public.input_shape),
        mapper=shared,
        train_mapper=False,
    )
    assert torch.equal(second.mapper.input_mean, shared.input_mean)
    assert torch.equal(second.mapper.input_std, shared.input_std)
    off = CarrierConfig(**{**config.__dict__, "standardise_samples": 0})
    plain = train_carrier(off, public, train, natural_image(0, public.input_shape))
    assert torch.equal(plain.mapper.input_std, torch.ones(public.output_dim))


def test_cosine_schedule(public: PublicModel, task: tuple[Dataset, Dataset]) -> None:
    with pytest.raises(InvalidInput, match="lr_schedule"):
        CarrierConfig(lr_schedule="step")
    train, test = task
    config = CarrierConfig(**{**FAST.__dict__, "lr_schedule": "cosine"})
    result = train_carrier(
        config, public, train, natural_image(0, public.input_shape), test_data=test
    )
    assert result.test_accuracy is not None and result.test_accuracy >= 0.9


def test_lenet_scores_expose_the_fully_connected_activations() -> None:
    from modelguard.carrier.public_models import LeNetScores
    from modelguard.nn.architectures import LeNet5

    torch.manual_seed(0)
    lenet = LeNet5().eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        scores = LeNetScores(lenet)(x)
        logits = lenet(x)
    assert scores.shape == (4, 120 + 84 + 10)
    torch.testing.assert_close(scores[:, -10:], logits)
    assert float(scores[:, :-10].min()) >= 0  # ReLU activations


def test_lenet_conv_scores_expose_the_pooled_conv2_map_and_the_logits() -> None:
    from modelguard.carrier.public_models import LeNetConvScores
    from modelguard.nn.architectures import LeNet5

    torch.manual_seed(0)
    lenet = LeNet5().eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        scores = LeNetConvScores(lenet)(x)
        logits = lenet(x)
        conv2 = lenet.pool(lenet.relu(lenet.conv2(lenet.pool(lenet.relu(lenet.conv1(x))))))
    assert scores.shape == (4, 16 * 5 * 5 + 10)
    torch.testing.assert_close(scores[:, -10:], logits)
    torch.testing.assert_close(scores[:, :-10], torch.flatten(conv2, 1))
