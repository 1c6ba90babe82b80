"""The MLP builder: every knob gives a working network of the expected size."""

from __future__ import annotations

import pytest
import torch

from selector.model import ACTIVATION_FUNCTIONS, ACTIVATIONS, build_mlp, count_params, initial_state
from selector.space import TrialConfig


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", ["constant", "funnel"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_knob_builds_and_runs(
    activation: str, shape: str, residual: bool, batch_norm: bool
) -> None:
    c = TrialConfig(
        depth=3,
        width=32,
        shape=shape,
        activation=activation,
        residual=residual,
        batch_norm=batch_norm,
        dropout=0.1,
    )
    model = build_mlp(c, 7, 3)
    out = model(torch.randn(5, 7))
    assert out.shape == (5, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert count_params(c, 7, 3) == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_a_plain_mlp() -> None:
    c = TrialConfig(depth=2, width=10)
    assert count_params(c, 4, 3) == (4 * 10 + 10) + (10 * 10 + 10) + (10 * 3 + 3)


def test_residual_link_adds_the_input() -> None:
    c = TrialConfig(depth=2, width=6, residual=True)
    model = build_mlp(c, 6, 2)
    block = model.blocks[1]
    for p in block.linear.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(4, 6)
    assert torch.allclose(block(x), x)  # relu(0) + x
    assert model.blocks[0].skip is None


@pytest.mark.parametrize("shape", ["constant", "funnel"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("depth", [1, 3])
def test_initial_state_is_the_built_models_state(
    shape: str, residual: bool, batch_norm: bool, depth: int
) -> None:
    """`initial_state` after a seed equals the state of the model `build_mlp` builds after the
    same seed, key for key and bit for bit: the same draws in the same order."""
    c = TrialConfig(
        depth=depth, width=24, shape=shape, residual=residual, batch_norm=batch_norm, dropout=0.2
    )
    torch.manual_seed(123)
    built = build_mlp(c, 7, 3).state_dict()
    torch.manual_seed(123)
    drawn = initial_state(c, 7, 3)
    assert list(drawn) == list(built)
    for key, t in built.items():
        assert drawn[key].dtype == t.dtype and torch.equal(drawn[key], t), key


def test_each_activation_function_is_its_modules_arithmetic_forward_and_backward() -> None:
    """The engines call `ACTIVATION_FUNCTIONS`; the reference model calls the modules."""
    assert set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS)
    torch.manual_seed(0)
    x = torch.randn(4, 33, 17) * 3
    x[0, 0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    for name, make in ACTIVATIONS.items():
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_a, out_b = make()(a), ACTIVATION_FUNCTIONS[name](b)
        assert torch.equal(out_a, out_b), name
        g = torch.randn_like(out_a)
        out_a.backward(g)
        out_b.backward(g)
        assert torch.equal(a.grad, b.grad), name
