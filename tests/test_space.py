"""The search space: every key, conditional parameters, replay through FixedTrial."""

from __future__ import annotations

import optuna
import pytest

from selector import spec
from selector.space import CONDITIONAL, TrialConfig, replay_config, sample_config
from tests.conftest import small_raw

FULL_SPACE = {
    "depth": {"low": 1, "high": 4},
    "width": {"low": 32, "high": 512, "log": True},
    "shape": ["constant", "funnel"],
    "activation": ["relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid"],
    "dropout": {"low": 0.0, "high": 0.5},
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
    "batch_size": [32, 64, 128, 256, 512],
    "optimizer": ["sgd", "momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamw"],
    "lr": {"low": 1e-4, "high": 3e-1, "log": True},
    "batch_norm": [False, True],
    "residual": [False, True],
    "grad_clip": [0.0, 1.0, 5.0],
    "lr_schedule": ["constant", "cosine", "step"],
}


def _space(**space: object) -> spec.SpaceSpec:
    return spec.parse(small_raw(space=space), origin="t.toml").space


def test_every_key_is_searched_within_its_range() -> None:
    space = _space(**FULL_SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        c = sample_config(trial, space)
        assert 1 <= c.depth <= 4 and 32 <= c.width <= 512
        assert 0.0 <= c.dropout <= 0.5 and 1e-4 <= c.lr <= 0.3
        assert c.optimizer in FULL_SPACE["optimizer"]  # type: ignore[operator]
        assert set(FULL_SPACE) <= set(trial.params)
        study.tell(trial, 0.0)


def test_optimizer_parameters_are_searched_only_where_they_apply() -> None:
    space = _space(
        **FULL_SPACE,
        momentum={"low": 0.5, "high": 0.99},
        nesterov=[False, True],
        beta1={"low": 0.8, "high": 0.95},
        rho={"low": 0.8, "high": 0.99},
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        c = sample_config(trial, space)
        seen.add(c.optimizer)
        for name, optimizers in CONDITIONAL.items():
            searched = name in trial.params
            assert searched == (c.optimizer in optimizers and name != "beta2"), (name, c.optimizer)
            if not searched:
                assert getattr(c, name) == TrialConfig.__dataclass_fields__[name].default
        study.tell(trial, 0.0)
    assert len(seen) == 7


def test_scalar_fixes_a_value_and_is_not_a_param() -> None:
    space = _space(depth=3, width=[64], optimizer="sgd")
    trial = optuna.create_study().ask()
    c = sample_config(trial, space)
    assert (c.depth, c.width, c.optimizer) == (3, 64, "sgd")
    assert "depth" not in trial.params and "width" not in trial.params


def test_replay_rebuilds_the_searched_config() -> None:
    space = _space(**FULL_SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(10):
        trial = study.ask()
        c = sample_config(trial, space)
        assert replay_config(trial.params, space) == c
        study.tell(trial, 0.0)


@pytest.mark.parametrize("shape,expected", [("constant", [64, 64, 64]), ("funnel", [64, 32, 16])])
def test_widths(shape: str, expected: list[int]) -> None:
    assert TrialConfig(depth=3, width=64, shape=shape).widths() == expected
