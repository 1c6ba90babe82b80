"""The search space: the only place that calls `trial.suggest_*`.

`sample_config` maps a trial to a `TrialConfig`. Replaying a stored trial goes through the same code
with `optuna.trial.FixedTrial(params)`, so a replayed config is exactly the searched one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import optuna

from selector.spec import Param, SpaceSpec

# Parameters searched only where they apply: for other optimizers they keep their default.
CONDITIONAL: dict[str, tuple[str, ...]] = {
    "momentum": ("momentum",),
    "nesterov": ("momentum",),
    "beta1": ("adam", "adamw"),
    "beta2": ("adam", "adamw"),
    "rho": ("rmsprop", "adadelta"),
}


@dataclass(frozen=True)
class TrialConfig:
    """Everything that defines one network and how it is trained."""

    depth: int = 2
    width: int = 128
    shape: str = "constant"
    activation: str = "relu"
    dropout: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    rho: float = 0.9
    batch_norm: bool = False
    residual: bool = False
    grad_clip: float = 0.0
    lr_schedule: str = "constant"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def widths(self) -> list[int]:
        """Hidden layer widths: all equal, or halving layer by layer (never below 4) for a funnel."""
        if self.shape == "funnel":
            return [max(self.width >> i, 4) for i in range(self.depth)]
        return [self.width] * self.depth


def _suggest(trial: optuna.Trial, name: str, p: Param) -> Any:
    if p.kind == "fixed":
        return p.value
    if p.kind == "choice":
        return trial.suggest_categorical(name, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(name, float(p.low), float(p.high), log=p.log)


def sample_config(trial: optuna.Trial | optuna.trial.FixedTrial, space: SpaceSpec) -> TrialConfig:
    """Draw one config; optimizer-specific parameters are suggested only for their optimizers."""
    values: dict[str, Any] = {}
    optimizer = _suggest(trial, "optimizer", space.optimizer)  # type: ignore[arg-type]
    for name in TrialConfig.__dataclass_fields__:
        param: Param = getattr(space, name)
        if name == "optimizer":
            values[name] = optimizer
        elif name in CONDITIONAL and optimizer not in CONDITIONAL[name]:
            values[name] = TrialConfig.__dataclass_fields__[name].default
        else:
            values[name] = _suggest(trial, name, param)  # type: ignore[arg-type]
    return TrialConfig(**values)


def replay_config(params: dict[str, Any], space: SpaceSpec) -> TrialConfig:
    """The config of a finished trial, rebuilt from its params through `sample_config`."""
    return sample_config(optuna.trial.FixedTrial(params), space)
