"""carrier-trainer's default training configuration: the one bench_carrier measures."""

from __future__ import annotations

from modelguard.config import CarrierTrainerSettings
from modelguard.services.carrier_trainer.service import carrier_config


def test_default_recipe_runs_its_decaying_schedule_to_the_end_with_a_keyed_carrier() -> None:
    settings = CarrierTrainerSettings()
    config = carrier_config(settings, seed=7)
    assert settings.public_model == "lenet5-fashion-conv"
    assert (config.max_steps, config.lr_schedule, config.hidden) == (6000, "cosine", 64)
    # the convergence stop cannot fire before the last step
    assert config.patience * config.eval_every > config.max_steps
    assert config.output_key and config.seed == 7
    short = carrier_config(settings, seed=0, steps=50, hidden=8)
    assert (short.max_steps, short.hidden, short.lr_schedule) == (50, 8, "cosine")
    assert short.patience * short.eval_every > short.max_steps


def test_default_public_model_is_registered() -> None:
    from modelguard.carrier.public_models import PUBLIC_MODELS

    assert CarrierTrainerSettings().public_model in PUBLIC_MODELS
