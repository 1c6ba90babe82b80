"""Fused trials: the K fold models of M trials in one batched model (M x K rows).

The stacked engine (`selector.stacked`) made one trial's K folds one batched model; on small data a
step is still mostly op dispatch. Here M trials (the *members* of a group) train together: every
weight is one (M*K, out, in) tensor and each layer is one `torch.baddbmm` for all members and
folds. Row ``m * K + k`` is member m's fold k.

What members share: depth and batch size (the group key: they fix the layer count and the
batches of every step). What may differ: width and shape (each layer is padded to the group's
widest and masked), activation, batch norm, residual links, dropout p, optimizer and all its
hyperparameters, learning-rate schedule, gradient clipping; each member stops early, is pruned or
diverges on its own and then leaves the group.

Exactness, point by point (with dropout 0 a member's weights equal its solo stacked run's to float32
rounding):

* Initial weights: each member's fold models are built under the fold seeds of its own trial and
  copied into the top-left corner of the padded tensors; padded entries are zero.
* Padded units stay exactly zero: their weights, bias and batch-norm scale are zero, so their
  pre-activation is 0, and so is their output behind an activation that is 0 at 0; behind one
  that is not (sigmoid) the group multiplies activations by a unit mask. So their gradients, and
  those of the weights into and out of them, are zero; with zero gradients and zero weights each
  optimizer's update is zero (`fused_optim`). (The mask, where it is not needed, cost two
  passes over each layer's activations a step: 2-3% of a penguins group's step.)
  Parameters a member does not have (batch norm's for a member without it, a projection for a
  member whose skip is the identity) are zero, unused, and stay zero the same way.
* Batches: each row has the generator its solo run's fold has, so it draws the same permutations.
* Where an operation differs between members (activation, batch norm) it runs once per run of
  equal values along the rows; members are ordered so that those runs, and the runs of equal
  optimizers (`fused_optim.FusedOptimizer`), are few. Batch norm is `F.batch_norm` on a
  (1, rows x units, batch) view. Group norm with one group per unit computes the same
  training statistics in about half the time at 80 x 34 x 64, and with the running estimates
  from `torch.native_group_norm`'s mean and 1 / std breast_cancer groups of 16 trained 11%
  faster at widths about 34, but 7% slower at about 136 (fixed workloads, side by side): not
  kept.
* Gradient clipping uses each row's own global norm; learning-rate schedules are each member's
  own torch scheduler, read once an epoch.
* Members that leave are dropped from every tensor (weights, optimizer state, masks), so the group
  gets cheaper as its members stop.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from selector import engine
from selector.data import FoldData
from selector.engine import CVResult, MemoryNeed, batch_bounds, derive_seed, make_schedule
from selector.errors import TrialDiverged
from selector.fused_optim import STATES, FusedOptimizer, kind
from selector.metrics import Metric, Task
from selector.model import ACTIVATION_FUNCTIONS, ZERO_AT_ZERO, build_mlp, initial_state
from selector.space import TrialConfig
from selector.spec import Param, SpaceSpec, TrainingSpec
from selector.stacked import DROP_BITS, EVAL_CHUNK_ELEMENTS, pad_rows

# The weights are strided views into one (rows, N) tensor and their gradients views into another,
# so that the optimizer step is a few operations on whole rows; autograd accumulates into such a
# gradient in place and only warns that its strides are not the ones it would pick.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

# (epoch, {member: mean CV score}) -> {member: why it stops} (pruned): called once an epoch
OnEpoch = Callable[[int, dict[int, float]], dict[int, Exception]]
# [(member, its result or why it left)]: the members that left at one epoch, together
OnDone = Callable[[list[tuple[int, "CVResult | Exception"]]], None]


# What the members of one group share: the layer count and the batches of every step.
GROUP_KEY = ("depth", "batch_size")


def group_key(config: TrialConfig) -> tuple[int, ...]:
    """The values of `GROUP_KEY`: members of one group have the same."""
    return tuple(getattr(config, name) for name in GROUP_KEY)


@dataclass(frozen=True)
class _Slot:
    """One parameter's place in a row of the flat weights."""

    key: str  # the reference model's state_dict key
    shape: tuple[int, ...]  # padded
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _skip_kind(config: TrialConfig, layer: int) -> str:
    if not config.residual or layer == 0:
        return "none"
    w = config.widths()
    return "identity" if w[layer - 1] == w[layer] else "projection"


class FusedModel:
    """M members' K fold models in padded stacked tensors; `forward` takes (rows, in, batch)."""

    def __init__(
        self,
        configs: Sequence[TrialConfig],
        n_in: int,
        n_out: int,
        seeds: Sequence[Sequence[int]],
        device: torch.device,
    ) -> None:
        depths = {c.depth for c in configs}
        if len(depths) != 1:
            raise ValueError("the members of a group share their depth")
        self.K = len(seeds[0])
        self.depth = depths.pop()
        self.n_in, self.n_out, self.device = n_in, n_out, device
        widths = [c.widths() for c in configs]
        self.P = [max(w[i] for w in widths) for i in range(self.depth)]
        ins = [n_in, *self.P[:-1]]
        any_bn = any(c.batch_norm for c in configs)
        slots: list[_Slot] = []
        offset = 0

        def add(key: str, *shape: int) -> None:
            nonlocal offset
            slots.append(_Slot(key, tuple(shape), offset))
            offset += math.prod(shape)

        self.has_proj = [
            any(_skip_kind(c, i) == "projection" for c in configs) for i in range(self.depth)
        ]
        for i, (p, q) in enumerate(zip(self.P, ins, strict=True)):
            add(f"blocks.{i}.linear.weight", p, q)
            add(f"blocks.{i}.linear.bias", p)
            if any_bn:
                add(f"blocks.{i}.norm.weight", p)
                add(f"blocks.{i}.norm.bias", p)
            if self.has_proj[i]:
                add(f"blocks.{i}.skip.weight", p, q)
        add("head.weight", n_out, self.P[-1])
        add("head.bias", n_out)
        self.slots = {s.key: s for s in slots}
        self.N = offset
        self.any_bn = any_bn
        self.row_configs = [c for c in configs for _ in range(self.K)]
        G = len(self.row_configs)
        self.flat = torch.zeros(G, self.N, device=device)
        self.buffers: dict[str, torch.Tensor] = {}
        if any_bn:
            for i, p in enumerate(self.P):
                self.buffers[f"blocks.{i}.norm.running_mean"] = torch.zeros(G, p, device=device)
                self.buffers[f"blocks.{i}.norm.running_var"] = torch.ones(G, p, device=device)
                self.buffers[f"blocks.{i}.norm.num_batches_tracked"] = torch.zeros(
                    G, dtype=torch.int64, device=device
                )
        with torch.no_grad():
            for m, (config, member_seeds) in enumerate(zip(configs, seeds, strict=True)):
                folds: dict[str, list[torch.Tensor]] = {}
                for s in member_seeds:
                    # what the member's solo run does for this fold (`torch.manual_seed` seeds the
                    # default CPU generator, which builds the weights, and queues a CUDA seeding):
                    # its linear layers reset in module order (`model.initial_state`), and
                    # nothing else draws
                    torch.default_generator.manual_seed(s)
                    for key, t in initial_state(config, n_in, n_out).items():
                        folds.setdefault(key, []).append(t)
                self._load_rows(m * self.K, {key: torch.stack(ts) for key, ts in folds.items()})
        self._derive()

    # --- layout --------------------------------------------------------------------------------

    def _view(self, t: torch.Tensor, key: str) -> torch.Tensor:
        s = self.slots[key]
        return t[:, s.offset : s.offset + s.numel].view(t.shape[0], *s.shape)

    def _load_rows(self, row: int, state: dict[str, torch.Tensor]) -> None:
        """Rows from `row` on set from `state`: each key's tensors stacked along a first axis,
        in the reference layout (padding left as it is)."""
        for key, t in state.items():
            target = self._view(self.flat, key) if key in self.slots else self.buffers[key]
            corner: tuple[Any, ...] = (
                slice(row, row + t.shape[0]),
                *(slice(0, n) for n in t.shape[1:]),
            )
            target[corner] = t.to(self.device)

    def _derive(self) -> None:
        """Everything that follows from the rows' configs: weight and gradient views, masks,
        runs of equal operations. Called again after rows leave."""
        G, dev = len(self.row_configs), self.device
        self.grad = torch.zeros_like(self.flat)
        self.params: dict[str, torch.Tensor] = {}
        for key in self.slots:
            p = self._view(self.flat, key).requires_grad_(True)
            p.grad = self._view(self.grad, key)
            self.params[key] = p
        # each layer's (weight, bias, skip weight or None) and the head's, looked up once, not by
        # key each step
        self.layers = [
            (
                self.params[f"blocks.{i}.linear.weight"],
                self.params[f"blocks.{i}.linear.bias"],
                self.params.get(f"blocks.{i}.skip.weight"),
            )
            for i in range(self.depth)
        ]
        self.head = (self.params["head.weight"], self.params["head.bias"])
        self.layer_weights = [weight for weight, _, _ in self.layers] + [self.head[0]]

        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=self.flat.dtype, device=dev).view(G, 1, 1)

        cfgs = self.row_configs
        # Padded units need their mask only behind an activation that is not 0 at 0 (sigmoid):
        # everywhere else a padded unit's pre-activation is 0 (zero weights and bias; batch norm
        # scales it by a zero gamma), so its output is 0 and no gradient reaches its weights.
        masked = any(not ZERO_AT_ZERO[c.activation] for c in cfgs)
        self.unit: list[torch.Tensor | None] = []
        self.identity: list[torch.Tensor | None] = []
        self.projection: list[torch.Tensor | None] = []
        for i, width in enumerate(self.P):
            ws = [c.widths()[i] for c in cfgs]
            if masked and len(set(ws)) > 1:
                units = torch.arange(width, device=dev).view(1, width, 1) < torch.tensor(
                    ws, device=dev
                ).view(G, 1, 1)
                self.unit.append(units.to(self.flat.dtype))
            else:
                self.unit.append(None)
            kinds = [_skip_kind(c, i) for c in cfgs]
            self.identity.append(
                column([k == "identity" for k in kinds]) if "identity" in kinds else None
            )
            self.projection.append(
                column([k == "projection" for k in kinds]) if self.has_proj[i] else None
            )
        self.dropout = column([c.dropout for c in cfgs])
        self.any_dropout = any(c.dropout > 0 for c in cfgs)
        # The CPU draws' cut and scale per row, as `stacked.dropout_mask` rounds them.
        levels = 1 << DROP_BITS
        cuts = [min(round(c.dropout * levels), levels - 1) for c in cfgs]
        floors = [k - levels // 2 for k in cuts]
        self.drop_floor = torch.tensor(floors, dtype=torch.int16, device=dev).view(G, 1, 1)
        self.drop_scale = column([levels / (levels - k) for k in cuts])
        self.runs = _runs([(c.activation, c.batch_norm) for c in cfgs])
        self.acts = {a: ACTIVATION_FUNCTIONS[a] for a in {c.activation for c in cfgs}}

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows`, in that order."""
        keep = rows.tolist()
        self.row_configs = [self.row_configs[i] for i in keep]
        self.flat = self.flat.detach().index_select(0, rows)
        self.buffers = {k: t.index_select(0, rows) for k, t in self.buffers.items()}
        self._derive()

    # --- forward -------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        *,
        train: bool,
        rows: tuple[int, int] | None = None,
        row_mask: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
        bits: np.random.PCG64 | None = None,
    ) -> torch.Tensor:
        """`x` is (rows, in, batch); `rows` = (a, b) runs only those rows (x then has b - a).
        In training, `row_mask` (rows, 1, batch), `counts` (rows, 1, 1) and `active` (rows)
        are given when the folds' batches differ in size, as in `selector.stacked`."""
        G = len(self.row_configs)
        a, b = rows if rows is not None else (0, G)
        whole = (a, b) == (0, G)

        def cut(t: torch.Tensor) -> torch.Tensor:  # no slice op (and its backward) if whole
            return t if whole else t[a:b]

        runs = [(act, bn, max(s, a) - a, min(e, b) - a) for act, bn, s, e in self.runs]
        runs = [r for r in runs if r[2] < r[3]]
        sizes = [e - s for _, _, s, e in runs]
        for i, (weight, bias, skip) in enumerate(self.layers):
            h = torch.baddbmm(cut(bias).unsqueeze(-1), cut(weight), x)
            # one split, not a slice per run: a slice's backward fills a zero gradient of the
            # whole of h for each run
            pieces = h.split(sizes) if len(runs) > 1 else (h,)
            parts = []
            for (act, bn, s, e), hs in zip(runs, pieces, strict=True):
                if bn:
                    hs = self._batch_norm(
                        hs, i, a + s, a + e, train, row_mask, counts, active, (s, e)
                    )
                parts.append(self.acts[act](hs))
            h = torch.cat(parts) if len(parts) > 1 else parts[0]
            unit = self.unit[i]
            if unit is not None:
                h = h * cut(unit)
            if train and self.any_dropout:
                h = h * self._dropout_mask(tuple(h.shape), a, b, bits)
            ident, proj = self.identity[i], self.projection[i]
            if ident is not None:
                h = h + _fit_rows(x * cut(ident), h.shape[1])
            if proj is not None:
                assert skip is not None
                h = h + torch.bmm(cut(skip) * cut(proj), x)
            x = h
        head_weight, head_bias = self.head
        return torch.baddbmm(cut(head_bias).unsqueeze(-1), cut(head_weight), x)

    def _dropout_mask(
        self, shape: tuple[int, ...], a: int, b: int, bits: np.random.PCG64 | None
    ) -> torch.Tensor:
        """`stacked.dropout_mask` with each row's own p (0 keeps every unit, scale 1)."""
        p = self.dropout[a:b]
        if self.device.type != "cpu" or bits is None:
            return torch.rand(shape, device=self.device).ge_(p).div_(1 - p)
        n = math.prod(shape)
        draws = torch.from_numpy(bits.random_raw((n + 3) // 4).view(np.int16))[:n].view(shape)
        out = torch.empty(shape, dtype=self.flat.dtype)  # a float result: a tenth of `where`
        torch.ge(draws, self.drop_floor[a:b], out=out)
        return out.mul_(self.drop_scale[a:b])

    def _batch_norm(
        self,
        h: torch.Tensor,
        layer: int,
        a: int,
        b: int,
        train: bool,
        row_mask: torch.Tensor | None,
        counts: torch.Tensor | None,
        active: torch.Tensor | None,
        local: tuple[int, int],
    ) -> torch.Tensor:
        """Batch norm of rows [a, b) (`local`: the same rows within this forward's slice)."""
        pre = f"blocks.{layer}.norm."
        gamma, beta = self.params[pre + "weight"], self.params[pre + "bias"]
        if (a, b) != (0, gamma.shape[0]):
            gamma, beta = gamma[a:b], beta[a:b]
        rm, rv = self.buffers[pre + "running_mean"][a:b], self.buffers[pre + "running_var"][a:b]
        tracked = self.buffers[pre + "num_batches_tracked"][a:b]
        G, C, B = h.shape
        eps, momentum = 1e-5, 0.1
        if row_mask is None or not train:
            if train:
                tracked.add_(1)
            out = F.batch_norm(
                h.reshape(1, G * C, B),
                rm.view(-1),
                rv.view(-1),
                gamma.reshape(-1),
                beta.reshape(-1),
                training=train,
                momentum=momentum,
                eps=eps,
            )
            return out.view(G, C, B)
        assert counts is not None and active is not None
        s, e = local
        mask, cnt, on = row_mask[s:e], counts[s:e], active[s:e]
        n = cnt.clamp(min=1.0)
        mean = (h * mask).sum(-1, keepdim=True) / n
        centered = h - mean
        var = (centered * mask).square().sum(-1, keepdim=True) / n
        out = centered * torch.rsqrt(var + eps)
        out = out * gamma.unsqueeze(-1) + beta.unsqueeze(-1)
        with torch.no_grad():
            unbiased = var * (n / (cnt - 1).clamp(min=1.0))
            new_mean = (1 - momentum) * rm + momentum * mean.squeeze(-1)
            new_var = (1 - momentum) * rv + momentum * unbiased.squeeze(-1)
            rm.copy_(torch.where(on.view(G, 1), new_mean, rm))
            rv.copy_(torch.where(on.view(G, 1), new_var, rv))
            tracked.add_(on.to(tracked.dtype))
        return out

    # --- states --------------------------------------------------------------------------------

    def rows_state(self, a: int, b: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A copy of rows [a, b): their weights and buffers (a best-epoch snapshot)."""
        return self.flat[a:b].detach().clone(), {k: t[a:b].clone() for k, t in self.buffers.items()}

    def load_rows(self, a: int, state: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        flat, buffers = state
        with torch.no_grad():
            self.flat[a : a + flat.shape[0]] = flat
            for k, t in buffers.items():
                self.buffers[k][a : a + t.shape[0]] = t

    def state_dicts(self, a: int, b: int) -> list[dict[str, torch.Tensor]]:
        """Rows [a, b) in the reference model's state_dict layout, padding cut away."""
        out = []
        for r in range(a, b):
            config = self.row_configs[r]
            with torch.device("meta"):
                template = build_mlp(config, self.n_in, self.n_out).state_dict()
            state = {}
            for key, t in template.items():
                source = self._view(self.flat, key) if key in self.slots else self.buffers[key]
                corner: tuple[Any, ...] = (r, *(slice(0, n) for n in t.shape))
                state[key] = source[corner].detach().clone()
            out.append(state)
        return out


def _fit_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` (rows, units, batch) cut or zero-padded to `width` units."""
    n = x.shape[1]
    if n == width:
        return x
    if n > width:
        return x[:, :width]
    return F.pad(x, (0, 0, 0, width - n))


def _runs(values: Sequence[tuple[str, bool]]) -> list[tuple[str, bool, int, int]]:
    """Runs of equal (activation, batch norm) along the rows: (activation, bn, start, stop)."""
    out: list[tuple[str, bool, int, int]] = []
    for i, (act, bn) in enumerate(values):
        if out and out[-1][:2] == (act, bn):
            out[-1] = (act, bn, out[-1][2], i + 1)
        else:
            out.append((act, bn, i, i + 1))
    return out


def member_order(configs: Sequence[TrialConfig]) -> list[int]:
    """The members' order along the rows: equal activations, batch norm and optimizers next to
    each other, so each differing operation runs on few contiguous blocks."""
    return sorted(
        range(len(configs)),
        key=lambda m: (configs[m].activation, configs[m].batch_norm, kind(configs[m])),
    )


# --- a group's training run ------------------------------------------------------------------


@dataclass
class _Step:
    position: int
    sizes: list[int]  # rows per fold
    span: tuple[int, int]

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1


class _Schedules:
    """Each member's learning rate per epoch, from torch's own schedulers: one stand-in
    optimizer per kind of schedule, with a parameter group per member (a scheduler computes
    each group's rate by itself, as it would alone). A stand-in costs about 2 ms to build; one
    per member was a tenth of a breast_cancer group's start. Members all start at epoch 0."""

    def __init__(self, configs: Sequence[TrialConfig], max_epochs: int) -> None:
        self.lr = {m: c.lr for m, c in enumerate(configs)}
        self.kinds: list[tuple[torch.optim.Optimizer, Any, dict[int, int]]] = []
        by_kind: dict[str, list[int]] = {}
        for m, c in enumerate(configs):
            if c.lr_schedule != "constant":
                by_kind.setdefault(c.lr_schedule, []).append(m)
        for members in by_kind.values():
            groups = [
                {"params": [torch.zeros(1, requires_grad=True)], "lr": configs[m].lr}
                for m in members
            ]
            opt = torch.optim.SGD(groups, lr=configs[members[0]].lr)
            schedule = make_schedule(configs[members[0]], opt, max_epochs)
            if schedule is not None:
                self.kinds.append((opt, schedule, {m: i for i, m in enumerate(members)}))

    def step(self) -> None:
        """One epoch on: every member's next rate."""
        for opt, schedule, index in self.kinds:
            opt.step()  # no gradient: nothing moves; torch wants a step before the schedule's
            schedule.step()
            for m, i in index.items():
                self.lr[m] = float(opt.param_groups[i]["lr"])


class FusedRun:
    """A group of members, their optimizers and their data on one device. `members` lists the
    members still in the group (their indices in `configs`), in row order."""

    def __init__(
        self,
        configs: Sequence[TrialConfig],
        folds: Sequence[FoldData],
        *,
        task: Task,
        n_out: int,
        max_epochs: int,
        seeds: Sequence[Sequence[int]],
        device: torch.device,
        dropout_seed: int = 0,
    ) -> None:
        if len({c.batch_size for c in configs}) != 1:
            raise ValueError("the members of a group share their batch size")
        order = member_order(configs)
        self.configs = list(configs)
        self.members = order
        self.task, self.device, self.folds = task, device, list(folds)
        self.K = K = len(folds)
        n_in = folds[0].X_train.shape[1]
        self.model = FusedModel(
            [configs[m] for m in order], n_in, n_out, [seeds[m] for m in order], device
        )
        self.opt = FusedOptimizer(self.model.flat, self.model.row_configs, K)
        self.schedules = _Schedules(configs, max_epochs)
        self.gens = [
            torch.Generator().manual_seed(int(seeds[m][k])) for m in order for k in range(K)
        ]
        self.bits = np.random.PCG64(dropout_seed) if device.type == "cpu" else None
        if device.type != "cpu":
            torch.manual_seed(dropout_seed)
        self.n_train = [f.X_train.shape[0] for f in folds]
        self.n_val = [f.X_val.shape[0] for f in folds]
        self.X = pad_rows([f.X_train for f in folds], device)
        self.y = pad_rows([f.y_train for f in folds], device)
        self.X_val = pad_rows([f.X_val for f in folds], device)
        self.n_max = int(self.X.shape[1])
        self.X_flat = self.X.reshape(K * self.n_max, n_in)
        self.y_flat = self.y.reshape(K * self.n_max)
        batch = configs[0].batch_size
        self.bounds = [batch_bounds(n, batch) for n in self.n_train]
        self.steps = []
        for j in range(max(len(b) for b in self.bounds)):
            sizes = [b[j][1] - b[j][0] if j < len(b) else 0 for b in self.bounds]
            self.steps.append(_Step(j, sizes, self.bounds[0][j]))
        self.uniform_rows = max([s.span[1] for s in self.steps if s.uniform], default=0)
        self.clip = any(c.grad_clip > 0 for c in configs)
        self._rows_changed()

    def _rows_changed(self) -> None:
        G, dev = len(self.members) * self.K, self.device
        self.fold_of = torch.arange(G, device=dev) % self.K
        self.offsets = self.fold_of * self.n_max
        clips = [c.grad_clip for c in self.model.row_configs]
        self.max_norm = torch.tensor(clips, device=dev).view(G, 1)
        self.clipped = self.max_norm > 0
        fold_of = self.fold_of.tolist()
        self.step_rows = [
            torch.tensor([s.sizes[k] for k in fold_of], dtype=self.X.dtype, device=dev)
            for s in self.steps
        ]

    def rows(self, member: int) -> tuple[int, int]:
        pos = self.members.index(member)
        return pos * self.K, (pos + 1) * self.K

    # --- training ------------------------------------------------------------------------------

    def train_epoch(self) -> tuple[np.ndarray, np.ndarray]:
        """One pass over every fold's training rows for every member: each row's mean loss
        (members, K) and each row's first-batch per-layer gradient norms (members, K, layers)."""
        K, dev, G = self.K, self.device, len(self.members) * self.K
        perms = [
            torch.randperm(self.n_train[r % K], generator=g).to(dev)
            for r, g in enumerate(self.gens)
        ]
        head = torch.stack([p[: self.uniform_rows] for p in perms]) + self.offsets.unsqueeze(1)
        totals = torch.zeros(G, device=dev)
        norms: torch.Tensor | None = None
        fold_of = self.fold_of.tolist()
        for step in self.steps:
            per_row, first = self._train_step(step, perms, head, fold_of, norms is None)
            if first is not None:
                norms = first
            totals += per_row * self.step_rows[step.position]
        self.schedules.step()
        lrs = [self.schedules.lr[m] for m in self.members]
        self.opt.set_lr([lr for lr in lrs for _ in range(K)])
        n = np.asarray([self.n_train[k] for k in fold_of], dtype=float)
        mean = totals.double().cpu().numpy() / n
        assert norms is not None
        return mean.reshape(-1, K), norms.cpu().numpy().reshape(len(self.members), K, -1)

    def _train_step(
        self,
        step: _Step,
        perms: list[torch.Tensor],
        head: torch.Tensor,
        fold_of: list[int],
        want_norms: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step of every row: each row's mean loss, and (if `want_norms`) each
        row's per-layer gradient norms before clipping."""
        G = len(fold_of)
        idx, row_mask, counts, active = self._batch(step, perms, head, fold_of)
        x = self.X_flat.index_select(0, idx.reshape(-1)).view(G, -1, self.X.shape[2])
        y = self.y_flat.index_select(0, idx.reshape(-1)).view(G, -1)
        out = self.model.forward(
            x.transpose(1, 2),
            train=True,
            row_mask=row_mask,
            counts=counts,
            active=active,
            bits=self.bits,
        )
        losses = self._loss_rows(out, y)
        if row_mask is None:
            per_row = losses.mean(1)
        else:
            assert counts is not None
            per_row = (losses * row_mask.squeeze(1)).sum(1) / counts.view(G).clamp(min=1.0)
        self.model.grad.zero_()
        per_row.sum().backward()  # type: ignore[no-untyped-call]
        grad = self.model.grad
        norms = None
        with torch.no_grad():
            if want_norms:
                norms = torch.stack(
                    [torch.linalg.vector_norm(w.grad, dim=(1, 2)) for w in self.model.layer_weights]  # type: ignore[arg-type]
                ).T
            if self.clip:
                total = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
                coef = (self.max_norm / (total + 1e-6)).clamp(max=1.0)
                grad.mul_(torch.where(self.clipped, coef, 1.0))
        self.opt.step(grad, active)
        return per_row.detach(), norms

    def time_steps(self, n: int, repeats: int = 3) -> float:
        """Seconds per optimizer step (the epoch's first batches), the least over `repeats`
        runs of `n` steps after one unmeasured step: what `choose_size`'s cost model measures."""
        K = self.K
        perms = [
            torch.randperm(self.n_train[r % K], generator=g).to(self.device)
            for r, g in enumerate(self.gens)
        ]
        head = torch.stack([p[: self.uniform_rows] for p in perms]) + self.offsets.unsqueeze(1)
        fold_of = self.fold_of.tolist()
        steps = [self.steps[j % len(self.steps)] for j in range(n)]
        self._train_step(steps[0], perms, head, fold_of, False)
        best = math.inf
        for _ in range(repeats):
            _sync(self.device)
            began = time.perf_counter()
            for step in steps:
                self._train_step(step, perms, head, fold_of, False)
            _sync(self.device)
            best = min(best, (time.perf_counter() - began) / n)
        return best

    def _loss_rows(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "regression":
            return (out.squeeze(1) - y).square()
        return F.cross_entropy(out, y, reduction="none")

    def _batch(
        self, step: _Step, perms: list[torch.Tensor], head: torch.Tensor, fold_of: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if step.uniform:
            a, b = step.span
            return head[:, a:b], None, None, None
        j, G = step.position, len(fold_of)
        sizes = [step.sizes[k] for k in fold_of]
        width = max(sizes)
        idx = torch.zeros(G, width, dtype=torch.int64, device=self.device)
        for r, (perm, size) in enumerate(zip(perms, sizes, strict=True)):
            if size:
                a, b = self.bounds[fold_of[r]][j]
                idx[r, :size] = perm[a:b]
                idx[r, size:] = perm[a]
        sz = torch.tensor(sizes, device=self.device)
        row_mask = (torch.arange(width, device=self.device) < sz.unsqueeze(1)).to(self.X.dtype)
        counts = sz.to(self.X.dtype).view(G, 1, 1)
        return idx + self.offsets.unsqueeze(1), row_mask.unsqueeze(1), counts, sz > 0

    # --- evaluation ----------------------------------------------------------------------------

    def predictions(self, which: str = "val", member: int | None = None) -> list[list[np.ndarray]]:
        """`engine.predict`'s output for each member in the group (or just `member`) and each
        fold, on the validation or training rows."""
        X, n = (self.X_val, self.n_val) if which == "val" else (self.X, self.n_train)
        a, b = (0, len(self.members) * self.K) if member is None else self.rows(member)
        fold_of = self.fold_of[a:b]
        widest = max([*self.model.P, X.shape[2]])
        chunk = max(64, EVAL_CHUNK_ELEMENTS // ((b - a) * widest))
        parts = []
        with torch.no_grad():
            for s in range(0, int(X.shape[1]), chunk):
                xb = X[:, s : s + chunk].index_select(0, fold_of).transpose(1, 2)
                parts.append(self.model.forward(xb, train=False, rows=(a, b)))
        out = torch.cat(parts, dim=2)  # (rows, n_out, rows of data)
        if self.task == "classification":
            values = torch.softmax(out.double(), dim=1).cpu().numpy()
            values = values / values.sum(axis=1, keepdims=True)
        else:
            values = out.squeeze(1).double().cpu().numpy()
        members = self.members if member is None else [member]
        result = []
        for pos in range(len(members)):
            per_fold = []
            for k, f in enumerate(self.folds):
                v = values[pos * self.K + k]
                if self.task == "classification":
                    per_fold.append(np.ascontiguousarray(v[:, : n[k]].T))
                else:
                    per_fold.append(v[: n[k]] * f.y_std + f.y_mean)
            result.append(per_fold)
        return result

    # --- members leaving -----------------------------------------------------------------------

    def snapshot(self, member: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.rows_state(*self.rows(member))

    def leave(self, members: Sequence[int]) -> None:
        """Drop `members` from every tensor; the others go on unchanged."""
        gone = set(members)
        if not gone:
            return
        keep_members = [m for m in self.members if m not in gone]
        rows = [
            pos * self.K + k
            for pos, m in enumerate(self.members)
            if m not in gone
            for k in range(self.K)
        ]
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        self.gens = [self.gens[r] for r in rows]
        self.members = keep_members
        if not rows:
            return
        self.model.select(index)
        self.opt.select(index)
        self.opt.rebind(self.model.flat)
        self._rows_changed()

    def state_dicts(self, member: int) -> list[dict[str, torch.Tensor]]:
        """A member's K fold models in the reference layout (for tests and inspection)."""
        return self.model.state_dicts(*self.rows(member))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the epoch loop for a group ----------------------------------------------------------------


@dataclass
class _Member:
    """One member's curves and best epoch, as `engine.drive` keeps them for a trial."""

    seeds: list[int]
    best: float = -math.inf
    best_epoch: int = 0
    best_scores: list[float] = field(default_factory=list)
    best_preds: list[np.ndarray] = field(default_factory=list)
    best_state: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
    val: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    folds: list[list[float]] = field(default_factory=list)
    grads: list[list[float]] = field(default_factory=list)


def drive_group(
    run: FusedRun,
    *,
    task: Task,
    n_classes: int,
    metric: Metric,
    training: TrainingSpec,
    seeds: Sequence[Sequence[int]],
    on_epoch: OnEpoch | None = None,
    on_done: OnDone | None = None,
) -> dict[int, CVResult | Exception]:
    """`engine.drive` for every member of `run` at once. A member whose loss is not finite
    leaves with `TrialDiverged`. After each epoch `on_epoch(epoch, {member: mean score})` is
    told every other member's score at once (one write and one pruning read for the group) and
    returns the members that stop, each with its exception (pruned); one that stops early or
    reaches the last epoch leaves with its `CVResult`. `on_done([(member, outcome), ...])` is
    called once an epoch with the members that left at it (their results recorded together),
    before the others train on. An exception `on_epoch` raises (Ctrl-C) stops the whole group."""
    folds = run.folds
    state = {m: _Member(seeds=list(seeds[m])) for m in run.members}
    outcomes: dict[int, CVResult | Exception] = {}

    def done(m: int, outcome: CVResult | Exception) -> None:
        outcomes[m] = outcome
        left.append((m, outcome))

    for epoch in range(1, training.max_epochs + 1):
        losses, norms = run.train_epoch()
        left: list[tuple[int, CVResult | Exception]] = []
        leaving: list[int] = []
        finished: list[int] = []
        live = list(run.members)
        preds = run.predictions("val")
        means: dict[int, float] = {}
        finite = np.isfinite(losses).all(axis=1)
        scored = [pos for pos in range(len(live)) if finite[pos]]
        row_of = {pos: row for row, pos in enumerate(scored)}
        by_fold = [  # every member's fold k at once: (members scored, folds)
            engine.score_rows(metric, f.y_val, [preds[pos][k] for pos in scored], n_classes)
            for k, f in enumerate(folds)
        ]
        for pos, m in enumerate(live):
            st = state[m]
            if not finite[pos]:
                leaving.append(m)
                bad = [k for k, v in enumerate(losses[pos]) if not math.isfinite(v)]
                done(m, TrialDiverged(epoch, bad[0]))
                continue
            scores = [fold[row_of[pos]] for fold in by_fold]
            mean = float(np.mean(scores))
            st.val.append(mean)
            st.loss.append(float(np.mean(losses[pos])))
            st.folds.append(scores)
            st.grads.append(np.mean(norms[pos], axis=0).tolist())
            if mean > st.best:
                st.best, st.best_epoch, st.best_scores, st.best_preds = (
                    mean,
                    epoch,
                    scores,
                    preds[pos],
                )
                st.best_state = run.snapshot(m)
            means[m] = mean
        try:
            stopped = on_epoch(epoch, means) if on_epoch is not None and means else {}
        except BaseException:  # a stop: those that diverged first are told so
            if left and on_done is not None:
                on_done(left)
            raise
        for m in means:
            st = state[m]
            if m in stopped:  # pruned (or its record failed): this member leaves
                leaving.append(m)
                done(m, stopped[m])
            elif engine.stops(epoch, st.best_epoch, st.best, metric, training):
                finished.append(m)
        for m in finished:
            done(m, _finish(run, m, state[m], task, n_classes, metric, training))
            leaving.append(m)
        if left and on_done is not None:
            on_done(left)
        run.leave(leaving)
        if not run.members:
            break
    return outcomes


def _finish(
    run: FusedRun,
    m: int,
    st: _Member,
    task: Task,
    n_classes: int,
    metric: Metric,
    training: TrainingSpec,
) -> CVResult:
    """A member's result: its best epoch restored, the train scores there (`engine.drive`)."""
    if st.best_state is not None:
        run.model.load_rows(run.rows(m)[0], st.best_state)
    train_scores = []
    for f, pred in zip(run.folds, run.predictions("train", member=m)[0], strict=True):
        y = f.y_train * f.y_std + f.y_mean if task == "regression" else f.y_train
        train_scores.append(engine.score(metric, y, pred, n_classes))
    return CVResult(
        value=st.best,
        best_epoch=st.best_epoch,
        epochs_run=len(st.val),
        fold_scores=st.best_scores,
        train_scores=train_scores,
        val_curve=st.val,
        train_loss_curve=st.loss,
        fold_curves=[list(c) for c in zip(*st.folds, strict=True)],
        grad_norms=st.grads,
        seeds=st.seeds,
        stopped_early=len(st.val) < training.max_epochs,
        oof=st.best_preds,
    )


def cross_validate_group(
    configs: Sequence[TrialConfig],
    folds: Sequence[FoldData],
    *,
    task: Task,
    n_classes: int,
    metric: Metric,
    training: TrainingSpec,
    seeds: Sequence[int],
    on_epoch: OnEpoch | None = None,
    on_done: OnDone | None = None,
) -> dict[int, CVResult | Exception]:
    """`engine.cross_validate` for each of `configs` (trial seeds `seeds`), all in one fused
    model: member m's fold seeds are the ones its solo run would use. Returns each member's
    result, or the exception it left with (diverged, pruned)."""
    K = len(folds)
    fold_seeds = [[derive_seed(s, k) for k in range(K)] for s in seeds]
    run = FusedRun(
        configs,
        folds,
        task=task,
        n_out=n_classes if task == "classification" else 1,
        max_epochs=training.max_epochs,
        seeds=fold_seeds,
        device=engine.resolve_device(training.device),
        dropout_seed=derive_seed(*seeds, K),
    )
    return drive_group(
        run,
        task=task,
        n_classes=n_classes,
        metric=metric,
        training=training,
        seeds=fold_seeds,
        on_epoch=on_epoch,
        on_done=on_done,
    )


# --- how many members: memory and cost --------------------------------------------------------


def group_need(
    configs: Sequence[TrialConfig], *, folds: int, n_in: int, n_train: int, n_val: int, n_out: int
) -> MemoryNeed:
    """The fused engine's peak for these members: the data once, each row's padded weights with
    gradients, optimizer state and one best-epoch snapshot per member, one step's activations
    and one evaluation chunk (`stacked.stacked_need`, with the rows of every member)."""
    depth = configs[0].depth
    P = [max(c.widths()[i] for c in configs) for i in range(depth)]
    ins = [n_in, *P]
    outs = [*P, n_out]
    per_row = sum(i * o + 3 * o for i, o in zip(ins, outs, strict=True))
    per_row += sum(i * o for i, o in zip(ins[1:-1], P[1:], strict=True))  # a projection, at most
    states = max(len(STATES[kind(c)]) for c in configs)
    G = len(configs) * folds
    batch = configs[0].batch_size
    act = n_in + 6 * sum(P) + 2 * n_out
    chunk = max(64, EVAL_CHUNK_ELEMENTS // (G * max(n_in, *P)))
    rows = max(n_train, n_val)
    return MemoryNeed(
        data=folds * (n_train + n_val) * (n_in + 1) * 4,
        weights=G * per_row * 4 * (3 + states),
        batch=G * min(batch, n_train) * act * 4 * 2,
        evaluation=G * min(chunk, rows) * (n_in + 3 * max(P) + n_out) * 4
        + G * rows * n_out * 8 * 2,
    )


# --- how many members: the cost model -------------------------------------------------------------

# One optimizer step of a group costs about FIXED + M * (PER_MEMBER + flops / RATE) seconds: a
# fixed part (dispatching the step's few dozen operations, whatever M), a part per member (its
# optimizer kernel, its share of the gather) and its arithmetic. Measured with one thread on the
# CPU and on an H100 (`python -m bench.anytime --calibrate` prints these for a machine).
COST = {
    "cpu": {"fixed": 8e-4, "per_member": 3e-5, "rate": 2.5e10},
    "cuda": {"fixed": 2.5e-3, "per_member": 1e-4, "rate": 2e13},
}
# The group size is the smallest power of two at which the fixed part is at most this share of
# a member's own cost: past it fusing more buys little and costs the sampler rounds of feedback.
NEAR = 0.1
# At most this many members: a group's bookkeeping (one TPE fit, one pruning read an epoch, one
# transaction for the members that leave at an epoch) is shared by its members too. Trials
# finished in 60-90 s, one core each, side by side: penguins 1200 (16), 1376 (32), 1536 (64);
# breast_cancer 1360 (16), 1472 (32), and 64 finished 0.75x the trials of 16.
MAX_AUTO = {"cpu": 32, "cuda": 64}
# Trials are fused only where the fixed part is at least this share of a trial's step alone:
# below it fusing saves little time, and members that train side by side cannot learn from
# each other's results (on digits, groups of 4 were pruned less and finished 0.44x the trials).
# A claim's trial below it trains alone (`split_claim`). Recorded breast_cancer searches (seeds
# 0, 1, 2, 4; 60 s) trained their claims whole in 0.88x to 1.01x the time at 0.25 that they took
# at 0.5 (mean 0.95x), and 0.88x to 1.03x at 1/3 (`python -m bench.fusegain --worth 0.5 0.25`):
# at depth 3 and batch size 16, fused models of widths up to about 190 trained faster than their
# members alone, wider ones slower.
WORTH = 0.25
# Share of the device's available memory a group may plan to use (`stacked.MEMORY_SHARE`).
MEMORY_SHARE = 0.5


def step_flops(config: TrialConfig, *, folds: int, n_in: int, n_out: int) -> float:
    """Arithmetic of one member's optimizer step over its K folds: the linear layers' multiply-
    adds forward and backward for one batch (no input gradient for the first layer)."""
    return _flops(config.widths(), config.batch_size, folds=folds, n_in=n_in, n_out=n_out)


def _flops(widths: Sequence[int], batch: int, *, folds: int, n_in: int, n_out: int) -> float:
    ins, outs = [n_in, *widths], [*widths, n_out]
    macs = sum(i * o for i, o in zip(ins, outs, strict=True))
    return float(folds * batch * (6 * macs - 2 * ins[0] * outs[0]))


def step_cost(
    configs: Sequence[TrialConfig], *, folds: int, n_in: int, n_out: int, device: str
) -> float:
    """The cost model's seconds for one optimizer step of `configs` as one group: the fixed
    part, and each member's own part at the group's padded widths."""
    c = COST["cuda" if device == "cuda" else "cpu"]
    depth = configs[0].depth
    padded = [max(m.widths()[i] for m in configs) for i in range(depth)]
    flops = _flops(padded, configs[0].batch_size, folds=folds, n_in=n_in, n_out=n_out)
    return c["fixed"] + len(configs) * (c["per_member"] + flops / c["rate"])


def split_claim(
    configs: Sequence[TrialConfig], *, folds: int, n_in: int, n_out: int, device: str
) -> list[list[int]]:
    """The trials of one claim cut into the groups that train as one model each: by their
    depth and batch size (`group_key`), then each of those by width (`split_by_width`).
    A trial whose step alone is mostly its own arithmetic (`cost_size` 1: the fixed part under
    `WORTH` of it, the rule `fuse = "auto"` applies to a study's typical trial) trains alone:
    on breast_cancer at depth 3 and batch size 16, fused models wider than about 190 took longer
    than their members one by one (`bench.fusegain`). Indices into `configs`, each group's in
    order."""
    by_key: dict[tuple[int, ...], list[int]] = {}
    parts = []
    for m, config in enumerate(configs):
        if cost_size(config, folds=folds, n_in=n_in, n_out=n_out, device=device) == 1:
            parts.append([m])
        else:
            by_key.setdefault(group_key(config), []).append(m)
    for key in sorted(by_key):
        same = by_key[key]
        cut = split_by_width(
            [configs[m] for m in same], folds=folds, n_in=n_in, n_out=n_out, device=device
        )
        parts += [[same[i] for i in part] for part in cut]
    return parts


def split_by_width(
    configs: Sequence[TrialConfig], *, folds: int, n_in: int, n_out: int, device: str
) -> list[list[int]]:
    """Members sharing depth and batch size (one key of a claim) cut into the groups that
    train fastest by the cost model: padding a narrow member to a wide one's width costs its
    arithmetic, each group costs a step's fixed part. Members sorted by width are cut into runs
    by dynamic programming (`step_cost` summed over the runs, least). Indices into `configs`."""
    order = sorted(range(len(configs)), key=lambda m: (max(configs[m].widths()), m))
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            run = [configs[m] for m in order[start:end]]
            total = best[start] + step_cost(run, folds=folds, n_in=n_in, n_out=n_out, device=device)
            if total < best[end]:
                best[end], cut[end] = total, start
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(sorted(order[cut[end] : end]))
        end = cut[end]
    return groups[::-1]


def cost_size(config: TrialConfig, *, folds: int, n_in: int, n_out: int, device: str) -> int:
    """The group size the cost model (`COST`) gives for members like `config`."""
    c = COST["cuda" if device == "cuda" else "cpu"]
    own = c["per_member"] + step_flops(config, folds=folds, n_in=n_in, n_out=n_out) / c["rate"]
    if c["fixed"] < WORTH * (c["fixed"] + own):  # a trial's step is mostly its own arithmetic
        return 1
    wanted = c["fixed"] / (NEAR * own)
    size, most = 1, MAX_AUTO["cuda" if device == "cuda" else "cpu"]
    while size < wanted and size < most:
        size *= 2
    return size


@dataclass(frozen=True)
class Sizing:
    """The group size a worker uses and what it came from: the cost model's size for the
    space's typical config, the members that fit in memory, the cap from the study's budget."""

    size: int
    by_cost: int
    fits: int
    cap: int
    config: TrialConfig


def _param_values(p: Param) -> list[Any]:
    if p.kind == "fixed":
        return [p.value]
    if p.kind == "choice":
        return list(p.choices)
    return [p.low, p.high]


def typical_config(space: SpaceSpec) -> TrialConfig:
    """A config in the middle of the space, for the cost model: the middle depth, the geometric
    middle width, the middle batch size, Adam where the space has it, no batch norm."""

    def middle(p: Param, log: bool = False) -> float:
        v = sorted(float(x) for x in _param_values(p))
        if p.kind in ("int", "float"):
            lo, hi = v[0], v[-1]
            return math.sqrt(lo * hi) if log and lo > 0 else (lo + hi) / 2
        return v[len(v) // 2]

    optimizers = [str(o) for o in _param_values(space.optimizer)]
    activations = [str(a) for a in _param_values(space.activation)]
    return TrialConfig(
        depth=round(middle(space.depth)),
        width=max(1, round(middle(space.width, log=True))),
        batch_size=max(2, round(middle(space.batch_size))),
        optimizer="adam" if "adam" in optimizers else optimizers[0],
        activation="relu" if "relu" in activations else activations[0],
    )


def largest(config: TrialConfig, space: SpaceSpec) -> TrialConfig:
    """`config` at the space's largest depth, width and batch size, constant shape: what a
    member of a claim can need at most (the claim's members may all train as one model), for
    the memory check made before the other members are sampled."""

    def top(p: Param, own: int) -> int:
        return max(own, int(max(float(x) for x in _param_values(p))))

    return dataclasses.replace(
        config,
        depth=top(space.depth, config.depth),
        width=top(space.width, config.width),
        batch_size=top(space.batch_size, config.batch_size),
        shape="constant",
    )


def members_that_fit(
    config: TrialConfig, folds: Sequence[FoldData], n_out: int, device: torch.device, most: int
) -> int:
    """How many members like `config` (1 to `most`) fit in a share of the device's available
    memory, by `group_need`; at least 1 (a single trial goes to `stacked.choose_engine`)."""
    budget = engine.available_memory(device) * MEMORY_SHARE
    shape = engine.fold_shape(folds, n_out)
    n = 1
    while n < most and group_need([config] * (n + 1), **shape).total <= budget:
        n += 1
    return n


def choose_size(
    space: SpaceSpec,
    folds: Sequence[FoldData],
    *,
    n_out: int,
    device: torch.device,
    cap: int,
) -> Sizing:
    """The group size for `fuse = "auto"`: the cost model's size (`cost_size`) for the space's
    typical config, at most `cap` and what fits in memory at the space's widest width. The
    same study on the same kind of device gets the same size, so a run repeats."""
    config = typical_config(space)
    n_in = folds[0].X_train.shape[1]
    by_cost = cost_size(config, folds=len(folds), n_in=n_in, n_out=n_out, device=device.type)
    fits = members_that_fit(largest(config, space), folds, n_out, device, by_cost)
    return Sizing(max(1, min(by_cost, fits, cap)), by_cost, fits, cap, config)


__all__ = [
    "COST",
    "GROUP_KEY",
    "FusedModel",
    "FusedRun",
    "Sizing",
    "choose_size",
    "cost_size",
    "cross_validate_group",
    "drive_group",
    "group_key",
    "group_need",
    "largest",
    "member_order",
    "members_that_fit",
    "split_by_width",
    "split_claim",
    "step_cost",
    "step_flops",
    "typical_config",
]
