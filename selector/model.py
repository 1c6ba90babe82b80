"""The MLP a trial trains, built from a `TrialConfig`."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from selector.space import TrialConfig

LEAKY_SLOPE = 0.01
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
# The same activations as functions, for the stacked and fused engines' own forward passes: each
# calls the kernel its module calls, without a module call's overhead (a few us, several a step).
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "leaky_relu": lambda x: nn.functional.leaky_relu(x, LEAKY_SLOPE),
    "elu": nn.functional.elu,
    "gelu": nn.functional.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
# Whether each activation maps 0 to 0 (the fused engine masks padded units behind those that don't).
ZERO_AT_ZERO: dict[str, bool] = {
    name: bool(make()(torch.zeros(1)).item() == 0.0) for name, make in ACTIVATIONS.items()
}


class Block(nn.Module):
    """Linear → (batch norm) → activation → dropout, plus a skip link when `residual`.

    The skip is the identity where widths match and a bias-free projection where they don't (funnel).
    """

    def __init__(self, n_in: int, n_out: int, config: TrialConfig, *, residual: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.norm: nn.Module = nn.BatchNorm1d(n_out) if config.batch_norm else nn.Identity()
        self.act = ACTIVATIONS[config.activation]()
        self.drop: nn.Module = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.skip: nn.Module | None = None
        if residual:
            self.skip = nn.Identity() if n_in == n_out else nn.Linear(n_in, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.drop(self.act(self.norm(self.linear(x))))
        return h + self.skip(x) if self.skip is not None else h


class MLP(nn.Module):
    def __init__(self, n_in: int, n_out: int, config: TrialConfig) -> None:
        super().__init__()
        widths = config.widths()
        ins = [n_in, *widths[:-1]]
        self.blocks = nn.ModuleList(
            Block(i, o, config, residual=config.residual and k > 0)
            for k, (i, o) in enumerate(zip(ins, widths, strict=True))
        )
        self.head = nn.Linear(widths[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # type: ignore[no-any-return]

    def layers(self) -> list[nn.Linear]:
        """The main linear layers, input to output (for gradient statistics)."""
        return [b.linear for b in self.blocks] + [self.head]  # type: ignore[misc, return-value]


def build_mlp(config: TrialConfig, n_in: int, n_out: int) -> MLP:
    return MLP(n_in, n_out, config)


def initial_state(config: TrialConfig, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
    """The state_dict of `build_mlp(config, n_in, n_out)` after `reset_parameters()` of its
    linear layers in module order (what a fold's model starts from once its seed is set), drawn
    from the default generator in the same order, without building the modules: a fused group
    starts each member's K fold models this way (building the modules took most of a penguins
    group's start). A test checks it against the built model's."""
    widths = config.widths()
    ins = [n_in, *widths[:-1]]
    state: dict[str, torch.Tensor] = {}

    def linear(key: str, o: int, i: int, bias: bool) -> None:
        layer = SimpleNamespace(weight=torch.empty(o, i), bias=torch.empty(o) if bias else None)
        nn.Linear.reset_parameters(layer)  # type: ignore[arg-type]  # torch's own, on bare tensors
        state[f"{key}.weight"] = layer.weight
        if bias:
            state[f"{key}.bias"] = layer.bias

    for k, (i, o) in enumerate(zip(ins, widths, strict=True)):
        linear(f"blocks.{k}.linear", o, i, True)
        if config.batch_norm:
            norm = f"blocks.{k}.norm"
            state[f"{norm}.weight"], state[f"{norm}.bias"] = torch.ones(o), torch.zeros(o)
            state[f"{norm}.running_mean"], state[f"{norm}.running_var"] = (
                torch.zeros(o),
                torch.ones(o),
            )
            state[f"{norm}.num_batches_tracked"] = torch.tensor(0)
        if config.residual and k > 0 and i != o:
            linear(f"blocks.{k}.skip", o, i, False)
    linear("head", n_out, widths[-1], True)
    return state


def count_params(config: TrialConfig, n_in: int, n_out: int) -> int:
    """Trainable parameters of the network (the model size used by `one-se` and the diagnosis),
    counted from the layer widths as `MLP` builds them (a test checks it against the built
    model's): building the model on the meta device cost a fused trial 1.2 ms at its start."""
    widths = config.widths()
    ins = [n_in, *widths[:-1]]
    total = widths[-1] * n_out + n_out  # the head
    for k, (i, o) in enumerate(zip(ins, widths, strict=True)):
        total += i * o + o + (2 * o if config.batch_norm else 0)
        if config.residual and k > 0 and i != o:
            total += i * o  # the bias-free projection of a funnel's skip
    return total
