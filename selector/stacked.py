"""Training engine with the K fold models of a trial stacked into one batched model.

`cross_validate` here has the signature and the meaning of `selector.engine.cross_validate`: the same
initial weights (each fold's reference model is built under its own seed and copied in), the same
shuffled mini-batches (each fold keeps its own generator and `batch_bounds`), the same losses,
optimizer updates, early stopping, best-epoch snapshots, train scores, gradient statistics and
`TrialDiverged`. What changes is the arithmetic layout: every weight carries a leading fold axis
(K, out, in), activations are kept feature-major (K, features, rows) and each layer is one
`torch.baddbmm` for all K folds, so a step costs a handful of large kernels instead of K times as many
small ones.

Exactness, point by point:

* The loss of a step is the sum over folds of each fold's mean loss over its own rows, so each fold's
  gradient is exactly the gradient of its own mean loss. Folds whose batch at this step is shorter
  are padded with one of their own rows and the padding is masked out of the loss and of the batch
  norm statistics; a fold that has no batch at this step (it has fewer batches per epoch) is not
  stepped at all.
* torch.optim's optimizers are element-wise, so stepping the stacked tensors updates each fold's
  slice exactly as the fold's own optimizer would (weight decay is element-wise too). Where folds
  take different numbers of steps per epoch, Adam's bias correction needs a step count per fold: the
  optimizer then holds per-fold views of the stacked tensors, each with its own state.
* Gradient clipping uses each fold's own global norm (over all of that fold's parameters).
* Batch norm keeps running statistics per fold and per channel; evaluation uses them.
* Dropout draws an independent mask per fold and element. These masks cannot equal the reference
  engine's (which draws them fold after fold from one stream), so with dropout only the score
  distribution matches; with dropout 0 the weights match to float32 rounding.
* One place where float32 rounding is not small: with batch norm and an adaptive optimizer
  (Adagrad, RMSprop, Adam, AdamW), the bias of a linear layer in front of a batch norm has an
  exactly zero gradient in exact arithmetic, so its computed gradient is pure rounding noise that the
  optimizer normalises into steps of size lr. Those biases (and the running means that absorb them)
  drift differently here than in the reference engine, which itself drifts differently with 1 or 2
  torch threads. Training-mode outputs do not depend on them; evaluation-mode outputs shift by a
  few percent of a standard deviation, so such trials' scores can differ in the last digit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from selector import engine
from selector.data import FoldData
from selector.engine import (
    CVResult,
    batch_bounds,
    make_optimizer,
    make_schedule,
    resolve_device,
)
from selector.errors import SpecError
from selector.metrics import Task
from selector.model import ACTIVATION_FUNCTIONS, MLP, Block, build_mlp, initial_state
from selector.space import TrialConfig
from selector.spec import Param, SpaceSpec, StudySpec, TrainingSpec

CrossValidate = Callable[..., CVResult]

# Evaluation runs in chunks of rows so that K x rows x width activations stay small (in cache).
EVAL_CHUNK_ELEMENTS = 1 << 20
# Share of the free memory the stacked engine may plan to use before `fits` says no.
MEMORY_SHARE = 0.5


DROP_BITS = 16  # resolution of the CPU dropout draws: p is rounded to a multiple of 2^-16


def dropout_mask(
    shape: tuple[int, ...], p: float, device: torch.device, bits: np.random.PCG64 | None = None
) -> torch.Tensor:
    """A float mask of independent draws: 1 / (1 - p) with probability 1 - p, else 0.

    Given a bit generator `bits`, on the CPU: torch's CPU generator (mt19937, single-threaded) was
    a tenth of a trial's time, so the draws come from NumPy's PCG64 instead, each 64-bit word cut
    into four uniform 16-bit numbers, an element kept when its number is >= p * 2^16. The drop
    probability is then p rounded to a multiple of 2^-16 (off by at most 7.7e-6), and the scale is
    taken from the rounded p so that the mask's mean stays exactly 1. About 1.7 ns an element
    against 3.8 for `torch.rand`. Otherwise (a GPU, where Philox is cheap) one `torch.rand` float
    per element from torch's generator.
    """
    if device.type != "cpu" or bits is None:
        return torch.rand(shape, device=device).ge_(p).mul_(1.0 / (1.0 - p))
    levels = 1 << DROP_BITS
    cut = min(round(p * levels), levels - 1)
    n = math.prod(shape)
    draws = torch.from_numpy(bits.random_raw((n + 3) // 4).view(np.int16))  # uniform on int16
    out = torch.empty(shape)
    torch.ge(draws[:n].view(shape), cut - levels // 2, out=out)
    return out.mul_(levels / (levels - cut))


# Devices with a fused kernel, where torch's list differs from CPU and CUDA (checked at `step`).
FUSED_DEVICES: dict[type, tuple[str, ...]] = {torch.optim.Adagrad: ("cpu",)}


def stacked_optimizer(config: TrialConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """`engine.make_optimizer`'s optimizer with its exact hyperparameters, in torch's fused
    implementation where it has one (SGD, Adagrad, Adam, AdamW): one kernel per tensor instead of
    a dozen. The arithmetic per element is the same; RMSprop and Adadelta stay as they are."""
    opt = make_optimizer(config, params)
    accepted = inspect.signature(type(opt).__init__).parameters
    device = params[0].device.type
    if "fused" not in accepted or device not in FUSED_DEVICES.get(type(opt), ("cpu", "cuda")):
        return opt
    kwargs = {k: v for k, v in opt.defaults.items() if k in accepted}
    kwargs.update(fused=True, foreach=None)
    return type(opt)(params, **kwargs)


@dataclass
class _BlockRefs:
    """The stacked tensors of one block, looked up once (names follow `selector.model.Block`)."""

    weight: torch.Tensor  # (K, out, in)
    bias: torch.Tensor  # (K, out)
    norm_weight: torch.Tensor | None  # (K, out)
    norm_bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    batches_tracked: torch.Tensor | None  # (K,)
    skip: str  # "none", "identity" or "projection"
    skip_weight: torch.Tensor | None  # (K, out, in), no bias


class StackedMLP:
    """K copies of one `selector.model.MLP` architecture with their tensors stacked on axis 0.

    `params` and `buffers` are keyed like the reference model's `state_dict`, each tensor with a
    leading fold axis; `forward` takes feature-major input (K, in, rows) and returns
    (K, out, rows).
    """

    def __init__(
        self, config: TrialConfig, n_in: int, n_out: int, seeds: Sequence[int], device: torch.device
    ) -> None:
        states = []
        for s in seeds:  # the reference engine's draws for each fold (`model.initial_state`)
            torch.manual_seed(s)
            states.append(initial_state(config, n_in, n_out))
        with torch.device("meta"):  # the architecture only; no draws from the generator
            template = build_mlp(config, n_in, n_out)
        param_names = {name for name, _ in template.named_parameters()}
        self.config = config
        self.n_folds = len(seeds)
        self.bits: np.random.PCG64 | None = None  # dropout's draws on the CPU (`dropout_mask`)
        self.keys = list(states[0])
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for key in self.keys:
            stacked = torch.stack([st[key] for st in states]).to(device)
            if key in param_names:
                self.params[key] = stacked.requires_grad_(True)
            else:
                self.buffers[key] = stacked
        self.act = ACTIVATION_FUNCTIONS[config.activation]
        bn = next((m for m in template.modules() if isinstance(m, nn.BatchNorm1d)), None)
        self.bn_eps = float(bn.eps) if bn is not None else 1e-5
        self.bn_momentum = float(bn.momentum or 0.1) if bn is not None else 0.1
        self.blocks = [self._refs(i, template) for i in range(len(template.blocks))]
        self.head_weight = self.params["head.weight"]
        self.head_bias = self.params["head.bias"]
        self.layer_weights = [b.weight for b in self.blocks] + [self.head_weight]

    def _refs(self, i: int, template: MLP) -> _BlockRefs:
        pre = f"blocks.{i}."
        block = template.blocks[i]
        assert isinstance(block, Block)
        skip = "none"
        if block.skip is not None:
            skip = "identity" if isinstance(block.skip, nn.Identity) else "projection"
        bn = self.config.batch_norm
        return _BlockRefs(
            weight=self.params[pre + "linear.weight"],
            bias=self.params[pre + "linear.bias"],
            norm_weight=self.params[pre + "norm.weight"] if bn else None,
            norm_bias=self.params[pre + "norm.bias"] if bn else None,
            running_mean=self.buffers[pre + "norm.running_mean"] if bn else None,
            running_var=self.buffers[pre + "norm.running_var"] if bn else None,
            batches_tracked=self.buffers[pre + "norm.num_batches_tracked"] if bn else None,
            skip=skip,
            skip_weight=self.params[pre + "skip.weight"] if skip == "projection" else None,
        )

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def forward(
        self,
        x: torch.Tensor,
        *,
        train: bool,
        row_mask: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x` is (K, in, rows). In training, `row_mask` (K, 1, rows; 1 for a real row, 0 for
        padding), `counts` (K, 1, 1; real rows per fold) and `active` (K; bool) are given when the
        folds' batches differ in size; batch norm then uses only the real rows."""
        p = self.config.dropout
        for blk in self.blocks:
            h = torch.baddbmm(blk.bias.unsqueeze(-1), blk.weight, x)
            if blk.norm_weight is not None:
                h = self._batch_norm(h, blk, train, row_mask, counts, active)
            h = self.act(h)
            if train and p > 0:
                h = h * dropout_mask(tuple(h.shape), p, h.device, self.bits)
            if blk.skip == "identity":
                h = h + x
            elif blk.skip_weight is not None:
                h = h + torch.bmm(blk.skip_weight, x)
            x = h
        return torch.baddbmm(self.head_bias.unsqueeze(-1), self.head_weight, x)

    def _batch_norm(
        self,
        h: torch.Tensor,
        blk: _BlockRefs,
        train: bool,
        row_mask: torch.Tensor | None,
        counts: torch.Tensor | None,
        active: torch.Tensor | None,
    ) -> torch.Tensor:
        assert blk.norm_weight is not None and blk.norm_bias is not None
        assert blk.running_mean is not None and blk.running_var is not None
        K, C, B = h.shape
        if row_mask is None or not train:
            # (K, C, rows) viewed as (1, K*C, rows): per-fold, per-channel statistics over rows.
            if train and blk.batches_tracked is not None:
                blk.batches_tracked.add_(1)
            out = F.batch_norm(
                h.reshape(1, K * C, B),
                blk.running_mean.view(-1),
                blk.running_var.view(-1),
                blk.norm_weight.reshape(-1),
                blk.norm_bias.reshape(-1),
                training=train,
                momentum=self.bn_momentum,
                eps=self.bn_eps,
            )
            return out.view(K, C, B)
        assert counts is not None and active is not None
        n = counts.clamp(min=1.0)
        mean = (h * row_mask).sum(-1, keepdim=True) / n
        centered = h - mean
        var = (centered * row_mask).square().sum(-1, keepdim=True) / n
        out = centered * torch.rsqrt(var + self.bn_eps)
        out = out * blk.norm_weight.unsqueeze(-1) + blk.norm_bias.unsqueeze(-1)
        with torch.no_grad():
            m = self.bn_momentum
            unbiased = var * (n / (counts - 1).clamp(min=1.0))
            new_mean = (1 - m) * blk.running_mean + m * mean.squeeze(-1)
            new_var = (1 - m) * blk.running_var + m * unbiased.squeeze(-1)
            on = active.view(K, 1)
            blk.running_mean.copy_(torch.where(on, new_mean, blk.running_mean))
            blk.running_var.copy_(torch.where(on, new_var, blk.running_var))
            assert blk.batches_tracked is not None
            blk.batches_tracked.add_(active.to(blk.batches_tracked.dtype))
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().clone() for k, t in {**self.params, **self.buffers}.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, t in {**self.params, **self.buffers}.items():
                t.copy_(state[k])

    def fold_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Each fold's tensors in the reference model's `state_dict` layout (same keys, order)."""
        merged = {**self.params, **self.buffers}
        return [
            {key: merged[key][k].detach().clone() for key in self.keys} for k in range(self.n_folds)
        ]


def pad_rows(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Stack per-fold arrays of unequal row counts into (K, max rows, ...), zero-padded."""
    n_max = max(a.shape[0] for a in arrays)
    first = arrays[0]
    out = np.zeros((len(arrays), n_max, *first.shape[1:]), dtype=first.dtype)
    for k, a in enumerate(arrays):
        out[k, : a.shape[0]] = a
    return torch.as_tensor(out, device=device)


@dataclass
class _Step:
    """One optimizer step of the stacked model: which rows each fold trains on."""

    position: int  # batch number within the epoch
    sizes: list[int]  # rows per fold (0: this fold has no batch at this position)
    rows: torch.Tensor  # the same, as floats on the device
    span: tuple[int, int]  # where every fold's batch lies in its permutation, if `uniform`

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1


class StackedRun:
    """The K fold models of a trial, their optimizer and their data, stacked on one device."""

    def __init__(
        self,
        config: TrialConfig,
        folds: Sequence[FoldData],
        *,
        task: Task,
        n_out: int,
        max_epochs: int,
        seeds: Sequence[int],
        device: torch.device,
    ) -> None:
        if len(folds) != len(seeds):
            raise ValueError("one seed per fold")
        self.config, self.folds, self.task, self.device = config, list(folds), task, device
        self.K = len(folds)
        n_in = folds[0].X_train.shape[1]
        self.model = StackedMLP(config, n_in, n_out, seeds, device)
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.n_train = [f.X_train.shape[0] for f in folds]
        self.n_val = [f.X_val.shape[0] for f in folds]
        self.X = pad_rows([f.X_train for f in folds], device)  # (K, n_max, in)
        self.y = pad_rows([f.y_train for f in folds], device)  # (K, n_max)
        self.X_val = pad_rows([f.X_val for f in folds], device)
        self.n_max = int(self.X.shape[1])
        self.X_flat = self.X.reshape(self.K * self.n_max, n_in)
        self.y_flat = self.y.reshape(self.K * self.n_max)
        self.offsets = torch.arange(self.K, device=device) * self.n_max
        self.bounds = [batch_bounds(n, config.batch_size) for n in self.n_train]
        self.steps = []
        for j in range(max(len(b) for b in self.bounds)):
            sizes = [b[j][1] - b[j][0] if j < len(b) else 0 for b in self.bounds]
            rows = torch.tensor(sizes, dtype=self.X.dtype, device=device)
            self.steps.append(_Step(j, sizes, rows, self.bounds[0][j]))
        # Batches of equal size come first and lie at the same place in every fold's permutation.
        self.uniform_rows = max([s.span[1] for s in self.steps if s.uniform], default=0)
        # Equal step counts: every fold steps every time, one optimizer over the stacked tensors.
        # Otherwise per-fold views, so a fold with fewer batches keeps its own step count.
        self.lockstep = len({len(b) for b in self.bounds}) == 1
        params = self.model.parameters()
        self.views: list[list[torch.Tensor]] = []
        if self.lockstep:
            self.opt = stacked_optimizer(config, params)
        else:
            self.views = [[p.detach()[k] for p in params] for k in range(self.K)]
            self.opt = stacked_optimizer(config, [v for fold in self.views for v in fold])
        self.schedule = make_schedule(config, self.opt, max_epochs)
        self.best_state: dict[str, torch.Tensor] | None = None

    # --- training ------------------------------------------------------------------------------

    def _loss_rows(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-row losses (K, rows) from outputs (K, n_out, rows)."""
        if self.task == "regression":
            return (out.squeeze(1) - y).square()
        return F.cross_entropy(out, y, reduction="none")

    def train_epoch(self) -> tuple[list[float], list[list[float]]]:
        """One pass over every fold's training rows; returns each fold's mean loss and each fold's
        first-batch per-layer gradient norms (before clipping)."""
        K, dev = self.K, self.device
        perms = [
            torch.randperm(n, generator=g).to(dev)
            for n, g in zip(self.n_train, self.gens, strict=True)
        ]
        head = torch.stack([p[: self.uniform_rows] for p in perms]) + self.offsets.unsqueeze(1)
        totals = torch.zeros(K, device=dev)
        norms: list[list[float]] = []
        for step in self.steps:
            idx, row_mask, counts, active = self._batch(step, perms, head)
            flat = idx.reshape(-1)
            x = self.X_flat.index_select(0, flat).view(K, -1, self.X.shape[2])
            y = self.y_flat.index_select(0, flat).view(K, -1)
            out = self.model.forward(
                x.transpose(1, 2), train=True, row_mask=row_mask, counts=counts, active=active
            )
            rows = self._loss_rows(out, y)
            if row_mask is None:
                per_fold = rows.mean(1)
            else:
                assert counts is not None
                per_fold = (rows * row_mask.squeeze(1)).sum(1) / counts.view(K).clamp(min=1.0)
            for p in self.model.params.values():
                p.grad = None
            per_fold.sum().backward()  # type: ignore[no-untyped-call]
            if not norms:
                with torch.no_grad():
                    stacked = torch.stack(
                        [
                            torch.linalg.vector_norm(w.grad, dim=(1, 2))
                            for w in self.model.layer_weights
                        ]  # type: ignore[arg-type]
                    )
                norms = stacked.T.tolist()
            if self.config.grad_clip > 0:
                self._clip(self.config.grad_clip)
            self._step(active)
            totals += per_fold.detach() * step.rows
        if self.schedule is not None:
            self.schedule.step()
        # float32 sums, then divided in double, as the reference engine does
        return [t / n for t, n in zip(totals.tolist(), self.n_train, strict=True)], norms

    def _batch(
        self, step: _Step, perms: list[torch.Tensor], head: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Row indices into the flattened training rows (K, rows), plus the padding mask, row
        counts and active folds when the folds' batches differ in size. `head` holds the
        permutations' common prefix, already offset into the flattened rows."""
        j = step.position
        if step.uniform:
            a, b = step.span
            return head[:, a:b], None, None, None
        width = max(step.sizes)
        idx = torch.zeros(self.K, width, dtype=torch.int64, device=self.device)
        for k, (perm, size) in enumerate(zip(perms, step.sizes, strict=True)):
            if size:
                a, b = self.bounds[k][j]
                idx[k, :size] = perm[a:b]
                idx[k, size:] = perm[a]  # padding: a real row of this fold, masked out
        sizes = torch.tensor(step.sizes, device=self.device)
        row_mask = (torch.arange(width, device=self.device) < sizes.unsqueeze(1)).to(self.X.dtype)
        counts = sizes.to(self.X.dtype).view(self.K, 1, 1)
        return idx + self.offsets.unsqueeze(1), row_mask.unsqueeze(1), counts, sizes > 0

    def _clip(self, max_norm: float) -> None:
        """Scale each fold's gradients by its own global norm, as `clip_grad_norm_` would."""
        grads = [p.grad for p in self.model.params.values() if p.grad is not None]
        with torch.no_grad():
            sq = torch.stack([g.reshape(self.K, -1).square().sum(1) for g in grads]).sum(0)
            total = sq.sqrt()
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(self.K, *([1] * (g.dim() - 1))))

    def _step(self, active: torch.Tensor | None) -> None:
        if self.lockstep:
            self.opt.step()
            return
        on = [True] * self.K if active is None else active.tolist()
        params = list(self.model.params.values())
        for k, fold in enumerate(self.views):
            for view, p in zip(fold, params, strict=True):
                view.grad = p.grad[k] if on[k] and p.grad is not None else None
        self.opt.step()
        for fold in self.views:
            for view in fold:
                view.grad = None

    # --- evaluation ----------------------------------------------------------------------------

    def outputs(self, which: str = "val") -> list[torch.Tensor]:
        """Each fold's raw outputs (rows, n_out) in eval mode, on its validation or training rows."""
        X, n = (self.X_val, self.n_val) if which == "val" else (self.X, self.n_train)
        widest = max([*self.config.widths(), X.shape[2]])
        chunk = max(64, EVAL_CHUNK_ELEMENTS // (self.K * widest))
        parts = []
        with torch.no_grad():
            for a in range(0, int(X.shape[1]), chunk):
                xb = X[:, a : a + chunk].transpose(1, 2)
                parts.append(self.model.forward(xb, train=False))
        out = torch.cat(parts, dim=2)
        return [out[k, :, : n[k]].T for k in range(self.K)]

    def predictions(self, which: str = "val") -> list[np.ndarray]:
        """`engine.predict`'s output for each fold: probabilities or values on the original scale."""
        preds = []
        for out, f in zip(self.outputs(which), self.folds, strict=True):
            if self.task == "regression":
                preds.append(out.squeeze(-1).double().cpu().numpy() * f.y_std + f.y_mean)
            else:
                proba = torch.softmax(out.double(), dim=-1).cpu().numpy()
                preds.append(proba / proba.sum(axis=1, keepdims=True))
        return preds

    def snapshot(self) -> None:
        self.best_state = self.model.state()

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load(self.best_state)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Each fold's current weights, keyed and shaped like the reference model's state dict."""
        return self.model.fold_state_dicts()


def stacked_models(
    config: TrialConfig, folds: Sequence[FoldData], setup: engine.Setup
) -> StackedRun:
    """The K fold models stacked into one (an `engine.BuildModels`); CPU dropout from PCG64."""
    run = StackedRun(
        config,
        folds,
        task=setup.task,
        n_out=setup.n_out,
        max_epochs=setup.max_epochs,
        seeds=setup.seeds,
        device=setup.device,
    )
    run.model.bits = np.random.PCG64(setup.dropout_seed)
    return run


def cross_validate(config: TrialConfig, folds: Sequence[FoldData], **kwargs: Any) -> CVResult:
    """`engine.cross_validate` with the K folds stacked; `on_epoch(epoch, mean_val_score)` may
    raise to prune."""
    return engine.cross_validate(config, folds, build=stacked_models, **kwargs)


# --- choosing the engine -------------------------------------------------------------------------


def memory_need(
    folds: Sequence[FoldData], config: TrialConfig, n_out: int = 1
) -> engine.MemoryNeed:
    """`memory_estimate` by part (`engine.MemoryNeed`)."""
    return stacked_need(config, **engine.fold_shape(folds, n_out))


def stacked_need(
    config: TrialConfig, *, folds: int, n_in: int, n_train: int, n_val: int, n_out: int
) -> engine.MemoryNeed:
    """The stacked engine's peak for `folds` folds of `n_train` and `n_val` rows: the K stacked
    copies of the data, the weights with their gradients, optimizer state and best-epoch
    snapshot, and the activations of one training step and of one evaluation chunk."""
    K = folds
    widths = config.widths()
    ins = [n_in, *widths]
    outs = [*widths, n_out]
    weights = sum(i * o + o for i, o in zip(ins, outs, strict=True))
    if config.residual:
        weights += sum(i * o for i, o in zip(ins[1:-1], widths[1:], strict=True) if i != o)
    per_row = n_in + 6 * sum(widths) + 2 * n_out  # pre-norm, normed, activated, mask, dropped, skip
    chunk = max(64, EVAL_CHUNK_ELEMENTS // (K * max(n_in, *widths)))
    rows = max(n_train, n_val)
    return engine.MemoryNeed(
        data=K * (n_train + n_val) * (n_in + 1) * 4,
        weights=K * weights * 4 * 6,  # weights, grads, up to 3 optimizer states, snapshot
        batch=K * config.batch_size * per_row * 4 * 2,  # forward activations and their gradients
        # one chunk through the layers, then the outputs of all rows and float64 probabilities
        evaluation=K * min(chunk, rows) * (n_in + 3 * max(widths) + n_out) * 4
        + K * rows * n_out * 4 * 2,
    )


def memory_estimate(folds: Sequence[FoldData], config: TrialConfig, n_out: int = 1) -> int:
    """Bytes the stacked engine needs at its peak, roughly (`stacked_need`)."""
    return memory_need(folds, config, n_out).total


def _n_out(folds: Sequence[FoldData]) -> int:
    y = folds[0].y_train
    return int(y.max()) + 1 if np.issubdtype(y.dtype, np.integer) and len(y) else 1


def fits(
    folds: Sequence[FoldData],
    config: TrialConfig,
    *,
    device: str = "auto",
    n_out: int | None = None,
    budget: int | None = None,
) -> bool:
    """Whether the stacked engine's memory estimate fits in `budget` bytes (default: a share of the
    device's available memory)."""
    need = memory_estimate(folds, config, _n_out(folds) if n_out is None else n_out)
    if budget is None:
        budget = int(engine.available_memory(resolve_device(device)) * MEMORY_SHARE)
    return need <= budget


def choose_engine(
    config: TrialConfig,
    folds: Sequence[FoldData],
    training: TrainingSpec | None = None,
    *,
    budget: int | None = None,
) -> CrossValidate:
    """The stacked `cross_validate` where its memory estimate fits (in `budget`, by default a
    share of the available memory), else the reference engine's where its estimate fits in
    `engine.REFERENCE_SHARE` of the available memory, else (without a `budget`) the stacked one
    where it fits in that share. A trial that fits in neither is refused before anything is
    allocated (`TrialOutOfMemory`: the trial fails as `oom`)."""
    device = resolve_device(training.device if training is not None else "auto")
    stacks = len(folds) > 1
    if stacks and fits(folds, config, device=device.type, budget=budget):
        return cross_validate
    n_out = _n_out(folds)
    available = engine.available_memory(device)
    limit = available * engine.REFERENCE_SHARE
    reference = engine.reference_memory(folds, config, n_out, device)
    if reference.total <= limit:
        return engine.cross_validate
    stacked = memory_need(folds, config, n_out)
    if stacks and budget is None and stacked.total <= limit:
        return cross_validate
    need = min(reference, stacked, key=lambda n: n.total) if stacks else reference
    raise engine.out_of_memory(config, need, available, device, len(folds))


def auto_cross_validate(
    config: TrialConfig, folds: Sequence[FoldData], *, training: TrainingSpec, **kwargs: Any
) -> CVResult:
    """`engine.cross_validate`'s signature; runs whichever engine `choose_engine` picks."""
    return choose_engine(config, folds, training)(config, folds, training=training, **kwargs)


# --- a search space that cannot fit at all ---------------------------------------------------------


def smallest_config(space: SpaceSpec) -> TrialConfig:
    """The config of the search space that needs the least memory: the smallest width, depth
    and batch size, a funnel, no batch norm or residual links, the optimizer with the least
    state, wherever the space allows them."""
    fewest_states = min(_values(space.optimizer), key=lambda o: engine.OPTIMIZER_STATES.get(o, 2))
    return TrialConfig(
        width=int(min(_values(space.width))),
        depth=int(min(_values(space.depth))),
        batch_size=int(min(_values(space.batch_size))),
        shape="funnel" if "funnel" in _values(space.shape) else str(_values(space.shape)[0]),
        batch_norm=False not in _values(space.batch_norm),
        residual=False not in _values(space.residual),
        optimizer=str(fewest_states),
    )


def _values(p: Param) -> list[Any]:
    """The values a parameter can take, as far as its smallest one goes: a range's low end."""
    if p.kind == "fixed":
        return [p.value]
    if p.kind == "choice":
        return list(p.choices)
    return [p.low]


def check_space_fits(spec: StudySpec, n_features: int, n_rows: int, n_out: int) -> None:
    """Refuse a study whose search space cannot fit in memory even at its smallest config
    (`SpecError`, naming the knobs): every trial would fail as `oom`. `n_features` are the
    features after preprocessing, `n_rows` the dev rows that the folds split, `n_out` the
    classes (1 for regression). Memory is this machine's, on the study's device."""
    config = smallest_config(spec.space)
    device = resolve_device(spec.training.device)
    shape: dict[str, Any] = {
        "folds": spec.cv.folds * spec.cv.repeats,
        "n_in": n_features,
        "n_train": n_rows - n_rows // spec.cv.folds,
        "n_val": -(-n_rows // spec.cv.folds),
        "n_out": n_out,
    }
    reference = engine.reference_need(config, copies_data=device.type != "cpu", **shape)
    need = min(reference.total, stacked_need(config, **shape).total)
    available = engine.available_memory(device)
    if need > available * engine.REFERENCE_SHARE:
        refusal = engine.out_of_memory(config, reference, available, device, shape["folds"])
        raise SpecError(f"space: even the smallest config {refusal}")


__all__ = [
    "StackedMLP",
    "StackedRun",
    "auto_cross_validate",
    "check_space_fits",
    "choose_engine",
    "cross_validate",
    "dropout_mask",
    "fits",
    "memory_estimate",
    "memory_need",
    "smallest_config",
    "stacked_optimizer",
]
