"""One optimizer step for many members at once, each with its own optimizer and hyperparameters.

The fused engine keeps all of a group's weights in one (rows, N) tensor: one row per member and
fold, each row the member's parameters flattened (padded units are zeros). torch.optim takes one
learning rate per parameter group, not per row, so the step is written out here: every
hyperparameter is a (rows, 1) tensor, and each optimizer's update runs once on the contiguous
block of rows whose members use it (`FusedOptimizer.segments`). The arithmetic per element is the
update of the torch.optim class that `selector.engine.make_optimizer` builds, with that class's
defaults (eps, dampening 0, no amsgrad, no centering), in the form torch uses with tensor
hyperparameters (Adam's `capturable` path):

* SGD: ``g = grad + wd * p; p -= lr * g``
* momentum: ``g = grad + wd * p; buf = m * buf + g; p -= lr * buf`` (Nesterov: ``p -= lr * (g + m * buf)``);
  torch starts ``buf`` as a copy of the first ``g``, which is ``m * 0 + g`` exactly
* Adagrad: ``g = grad + wd * p; sum += g * g; p -= lr * g / (sqrt(sum) + 1e-10)``
* RMSprop: ``g = grad + wd * p; sq = a * sq + (1 - a) * g * g; p -= lr * g / (sqrt(sq) + 1e-8)``
* Adadelta: ``g = grad + wd * p; sq = r * sq + (1 - r) g^2; d = sqrt(acc + 1e-6) / sqrt(sq + 1e-6) * g;
  acc = r * acc + (1 - r) d^2; p -= lr * d``
* Adam / AdamW: L2 into the gradient (Adam) or ``p *= 1 - lr * wd`` (AdamW); ``m = lerp(m, g, 1 - b1)``,
  ``v = b2 * v + (1 - b2) g^2``; ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + 1e-8)``

Two ways to run an update, chosen per run of rows (`FusedOptimizer.uses_kernel`): where a
member's rows hold few numbers (small networks), the formulas above on the whole run, a dozen
operations whatever the number of members; where they hold many, the arithmetic is bound by memory
traffic, and each member's block of rows goes through torch's own fused kernel (SGD, momentum,
Adagrad, Adam, AdamW; one pass over the numbers instead of a dozen, the kernel the stacked engine
runs for a single trial), called with that member's hyperparameters. RMSprop and Adadelta have no
such kernel and always take the formulas.

A row's step count is its own (`step(active=...)`): where folds take different numbers of batches
an epoch, a fold without a batch at some step keeps its weights, state and count. With a zero
gradient and zero weights every update above is exactly zero, so padded units stay zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selector.space import TrialConfig

# The state tensors each kind of update keeps, all (rows, N), zero at the start as in torch.
STATES: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "momentum": ("buf",),
    "nesterov": ("buf",),
    "adagrad": ("sum",),
    "rmsprop": ("square_avg",),
    "adadelta": ("square_avg", "acc_delta"),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}
# Updates torch has a fused kernel for, on which devices, and the numbers per member from which a
# member's own kernel call beats the formulas on whole runs of rows (measured, `bench.anytime`).
KERNELS: dict[str, tuple[str, ...]] = {
    "sgd": ("cpu", "cuda"),
    "momentum": ("cpu", "cuda"),
    "nesterov": ("cpu", "cuda"),
    "adagrad": ("cpu",),  # torch's fused Adagrad is CPU-only
    "adam": ("cpu", "cuda"),
    "adamw": ("cpu", "cuda"),
}
# 2^11: the formulas' `sqrt` runs through a path that takes about 20 times longer on zeros than on
# other numbers (one core: 285 us against 14 us for 65 x 1603 float32), and padded units keep
# zeros in the state. (It stays torch's: torch.optim's Adagrad and RMSprop take it, and numpy's,
# correctly rounded, differs from it by 1 ulp for about a fifth of float32 inputs.) Five
# penguins groups of 32 from a 4-minute study stepped 4% faster in all at 2^11 than at 2^13
# (45.3 against 47.2 ms); 0 (always the kernel) was in between (45.6).
KERNEL_ELEMENTS = 1 << 11
EPS = {"adagrad": 1e-10, "rmsprop": 1e-8, "adadelta": 1e-6, "adam": 1e-8, "adamw": 1e-8}


def kind(config: TrialConfig) -> str:
    """The update a config's optimizer makes: its name, with momentum split by Nesterov."""
    if config.optimizer == "momentum" and config.nesterov:
        return "nesterov"
    return config.optimizer


@dataclass
class _Hyper:
    """A row's hyperparameters as Python floats, for the fused kernels' scalar arguments."""

    lr: float
    wd: float
    momentum: float
    beta1: float
    beta2: float


@dataclass(frozen=True)
class Segment:
    kind: str
    start: int  # rows [start, stop)
    stop: int


def segments(kinds: Sequence[str]) -> list[Segment]:
    """Runs of equal kinds along the rows."""
    out: list[Segment] = []
    for i, k in enumerate(kinds):
        if out and out[-1].kind == k:
            out[-1] = Segment(k, out[-1].start, i + 1)
        else:
            out.append(Segment(k, i, i + 1))
    return out


class FusedOptimizer:
    """The optimizers of `configs` (one per row) stepping the rows of `params` (rows, N)."""

    def __init__(
        self, params: torch.Tensor, configs: Sequence[TrialConfig], rows_per_member: int = 1
    ) -> None:
        if params.shape[0] != len(configs):
            raise ValueError("one config per row")
        self.params = params
        self.rows_per_member = rows_per_member
        self.kinds = [kind(c) for c in configs]
        self.segments = segments(self.kinds)
        dev = params.device

        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=params.dtype, device=dev).view(-1, 1)

        self.hyper = [_Hyper(c.lr, c.weight_decay, c.momentum, c.beta1, c.beta2) for c in configs]
        self.lr = column([c.lr for c in configs])
        self.wd = column([c.weight_decay for c in configs])
        self.momentum = column([c.momentum for c in configs])
        self.beta1 = column([c.beta1 for c in configs])
        self.beta2 = column([c.beta2 for c in configs])
        self.rho = column([c.rho for c in configs])
        # step counts in float64: bias corrections 1 - beta^t are computed as torch computes them
        self.steps = torch.zeros(len(configs), 1, dtype=torch.float64, device=dev)
        names = sorted({name for k in self.kinds for name in STATES[k]})
        self.state = {name: torch.zeros_like(params) for name in names}

    def set_lr(self, lr: Sequence[float]) -> None:
        """Each row's learning rate for the coming steps (a schedule's value this epoch)."""
        self.lr.copy_(torch.tensor(lr, dtype=self.lr.dtype).view(-1, 1))
        for h, value in zip(self.hyper, lr, strict=True):
            h.lr = float(value)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (an index tensor), in that order: members that leave the group."""
        keep = rows.tolist()
        self.kinds = [self.kinds[i] for i in keep]
        self.segments = segments(self.kinds)
        self.hyper = [self.hyper[i] for i in keep]
        for name in ("lr", "wd", "momentum", "beta1", "beta2", "rho", "steps"):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.state = {name: t.index_select(0, rows) for name, t in self.state.items()}

    def rebind(self, params: torch.Tensor) -> None:
        """Step `params` from now on (the weights after `select` compacted them)."""
        self.params = params

    def uses_kernel(self, seg: Segment) -> bool:
        """Whether `seg` steps member by member through torch's fused kernel (see the module)."""
        return (
            self.params.device.type in KERNELS.get(seg.kind, ())
            and self.params.shape[1] * self.rows_per_member >= KERNEL_ELEMENTS
        )

    @torch.no_grad()
    def step(self, grad: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Update every row from its gradient row; rows where `active` is False stay as they are
        (weights, state and step count)."""
        if active is not None and bool(active.all()):
            active = None
        if active is None:
            self.steps += 1
        else:
            self.steps += active.view(-1, 1).to(self.steps.dtype)
        on = None if active is None else active.tolist()
        for seg in self.segments:
            if self.uses_kernel(seg):
                self._kernel_update(seg, grad, on)
                continue
            off = None if on is None else [i for i in range(seg.start, seg.stop) if not on[i]]
            saved = []
            if off:
                index = torch.tensor(off, device=self.params.device)
                saved = [t.index_select(0, index) for t in (self.params, *self.state.values())]
            self._update(seg, grad)
            if off:
                for t, old in zip((self.params, *self.state.values()), saved, strict=True):
                    t.index_copy_(0, index, old)

    def _kernel_update(self, seg: Segment, grad: torch.Tensor, on: list[bool] | None) -> None:
        """Each member's rows in `seg` through torch's functional optimizer with `fused=True`;
        rows with differing step counts (folds with fewer batches) one at a time."""
        K = self.rows_per_member
        counts = self.steps.view(-1).tolist()
        for r in range(seg.start, seg.stop, K):
            rows = [i for i in range(r, r + K) if on is None or on[i]]
            if not rows:
                continue
            if len(rows) == K and len({counts[i] for i in rows}) == 1:
                blocks = [(r, r + K)]
            else:
                blocks = [(i, i + 1) for i in rows]
            for a, b in blocks:
                self._kernel_call(seg.kind, a, b, grad, counts[a])

    def _kernel_call(self, k: str, a: int, b: int, grad: torch.Tensor, count: float) -> None:
        """Rows [a, b) of one member through torch's fused kernel for its optimizer (the one
        `torch.optim` runs with `fused=True`), with the member's hyperparameters and the rows'
        step count (already counted)."""
        p, g = [self.params[a:b]], [grad[a:b]]
        h = self.hyper[a]
        lr, wd = h.lr, h.wd
        if k in ("sgd", "momentum", "nesterov"):
            torch._fused_sgd_(
                p,
                g,
                [self.state["buf"][a:b]] if k != "sgd" else [],
                weight_decay=wd,
                momentum=h.momentum if k != "sgd" else 0.0,
                lr=lr,
                dampening=0.0,
                nesterov=k == "nesterov",
                maximize=False,
                is_first_step=False,  # the buffer starts at zero: m * 0 + g is torch's copy of g
            )
            return
        step = [torch.tensor(count, dtype=torch.float32, device=self.params.device)]
        if k == "adagrad":
            torch._fused_adagrad_(
                p,
                g,
                [self.state["sum"][a:b]],
                step,
                lr=lr,
                lr_decay=0.0,
                weight_decay=wd,
                eps=EPS[k],
                maximize=False,
            )
            return
        fn = torch._fused_adamw_ if k == "adamw" else torch._fused_adam_
        fn(
            p,
            g,
            [self.state["exp_avg"][a:b]],
            [self.state["exp_avg_sq"][a:b]],
            [],
            step,
            amsgrad=False,
            lr=lr,
            beta1=h.beta1,
            beta2=h.beta2,
            weight_decay=wd,
            eps=EPS[k],
            maximize=False,
        )

    def _update(self, seg: Segment, grad_all: torch.Tensor) -> None:
        a, b, k = seg.start, seg.stop, seg.kind
        p, grad = self.params[a:b], grad_all[a:b]
        lr, wd = self.lr[a:b], self.wd[a:b]
        st = {name: t[a:b] for name, t in self.state.items()}
        if k == "adamw":
            p.mul_(1 - lr * wd)
            g = grad
        else:
            g = grad + wd * p
        if k == "sgd":
            p.sub_(lr * g)
        elif k in ("momentum", "nesterov"):
            m, buf = self.momentum[a:b], st["buf"]
            buf.mul_(m).add_(g)
            p.sub_(lr * (g + m * buf if k == "nesterov" else buf))
        elif k == "adagrad":
            s = st["sum"]
            s.addcmul_(g, g)
            p.addcdiv_(g * -lr, s.sqrt().add_(EPS[k]))
        elif k == "rmsprop":
            rho, sq = self.rho[a:b], st["square_avg"]
            sq.mul_(rho).add_(g * g * (1 - rho))
            p.addcdiv_(g * -lr, sq.sqrt().add_(EPS[k]))
        elif k == "adadelta":
            rho, sq, acc = self.rho[a:b], st["square_avg"], st["acc_delta"]
            sq.mul_(rho).add_(g * g * (1 - rho))
            std = sq.add(EPS[k]).sqrt_()
            delta = acc.add(EPS[k]).sqrt_().div_(std).mul_(g)
            acc.mul_(rho).add_(delta * delta * (1 - rho))
            p.sub_(lr * delta)
        else:  # adam, adamw
            b1, b2 = self.beta1[a:b], self.beta2[a:b]
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).add_(g * g * (1 - b2))
            t = self.steps[a:b]
            bc1 = 1 - b1.double() ** t
            bc2 = 1 - b2.double() ** t
            step_size = lr.double() / bc1
            neg = -step_size
            scale = (bc2.sqrt() * neg).to(p.dtype)
            denom = (v.sqrt() / scale).add_((EPS[k] / neg).to(p.dtype))
            p.addcdiv_(m, denom)


__all__ = ["EPS", "STATES", "FusedOptimizer", "Segment", "kind", "segments"]
