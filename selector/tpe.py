"""Optuna's TPE, made cheaper where its cost grows with the study, with the same proposals.

TPE scores each candidate by the log density of two Parzen estimators, mixtures with one
component per trial (`_MixtureOfProductDistribution.log_pdf`). For a fused group of 32 on a
penguins study of 4,700 trials that is 744 candidates x 4,700 components x each parameter, some
380 ms a group, a third of the group's time, and growing with every trial. Optuna builds the
whole candidates x components x parameters block at once (150 MB at that size), then passes over
it a dozen times; `mixture_log_pdf` computes the same elementwise arithmetic, in the same order,
on blocks of candidates that stay in cache, one parameter at a time and in place (no block to
fill and sum), with the parts that do not depend on the candidates (truncation masses, log
weights, log scales) computed once instead of once a candidate: 2.9x faster (380 to 133 ms at
4,700 trials, 822 to 281 ms at 8,800). Three more things, each exact: a discrete parameter's
masses once for the distinct values of all the candidates (not of each block); no truncation
mask where a block's candidates lie within the bounds; and the exponentials of the final
log-sum-exp without numpy's slow path for results that underflow (`exp_nonpositive`): a group
of 32's acquisition at 7,800 penguins trials went from 156 to 95 ms. Every value equals Optuna's
bit for bit (a test checks mixtures of every kind of distribution against Optuna's own
function), so TPE proposes exactly the trials it would.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

# Candidates scored at a time: a block of components x this many float64 stays in cache.
CHUNK = 32


@dataclass(frozen=True)
class _Categorical:
    column: int
    log_weights: np.ndarray  # (choices, components)


@dataclass(frozen=True)
class _Discrete:
    column: int
    dist: Any
    mu: np.ndarray  # the components' distinct (mu, sigma) pairs, and each component's pair
    sigma: np.ndarray
    pair: np.ndarray
    log_mass: np.ndarray  # each component's truncation mass


@dataclass(frozen=True)
class _Continuous:
    column: int
    is_log: bool
    mu: np.ndarray
    sigma: np.ndarray
    a: np.ndarray  # the bounds, standardised per component
    b: np.ndarray
    log_mass: np.ndarray
    log_scale: np.ndarray
    degenerate: np.ndarray  # components whose bounds coincide: nan, as Optuna gives
    # The bounds themselves, where every sigma is positive (else None): a candidate within them
    # lies within every component's a and b, since the rounded subtraction and division by a
    # positive sigma keep the order, so a block of such candidates needs no truncation mask.
    bounds: tuple[float, float] | None


def mixture_log_pdf(self: Any, x: np.ndarray) -> np.ndarray:
    """`_MixtureOfProductDistribution.log_pdf(x)`, equal to Optuna's value for value: each
    candidate's (a row of `x`) log density under the mixture `self`."""
    from optuna.samplers._tpe import _truncnorm
    from optuna.samplers._tpe.probability_distributions import (
        _BatchedCategoricalDistributions,
        _unique_inverse_2d,
    )

    # What does not depend on the candidates, once. `terms` keeps Optuna's order of addition
    # (categorical and discrete parameters in turn; the continuous ones summed after them).
    terms: list[_Categorical | _Discrete] = []
    cont: list[_Continuous] = []
    for i, d in enumerate(self.distributions):
        if isinstance(d, _BatchedCategoricalDistributions):
            with np.errstate(divide="ignore"):  # log(0) is -inf, as in Optuna's log of the take
                terms.append(_Categorical(i, np.log(d.weights).T))
        elif d.step == 0.0:
            mu, sigma = np.asarray(d.mu), np.asarray(d.sigma)
            a = (np.asarray([d.adapted_low]) - mu) / sigma
            b = (np.asarray([d.adapted_high]) - mu) / sigma
            lgm = _truncnorm._log_gauss_mass(a, b)
            bounds = (d.adapted_low, d.adapted_high) if (sigma > 0).all() else None
            cont.append(
                _Continuous(i, d.is_log, mu, sigma, a, b, lgm, np.log(sigma), a == b, bounds)
            )
        else:
            mu_uniq, sigma_uniq, pair = _unique_inverse_2d(d.mu, d.sigma)
            mass = _truncnorm._log_gauss_mass(
                (d.adapted_low - mu_uniq) / sigma_uniq, (d.adapted_high - mu_uniq) / sigma_uniq
            )[pair]
            terms.append(_Discrete(i, d, mu_uniq, sigma_uniq, pair, mass))
    log_weights = np.log(self.weights[np.newaxis])
    log_c = _truncnorm._norm_pdf_logC
    # A discrete parameter's masses for each distinct value among all the candidates, once
    # (Optuna computes them for the distinct values of its one block): each is a function of
    # its value and component alone, so the same numbers.
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in terms:
        if isinstance(t, _Discrete):
            step, is_log = t.dist.step, t.dist.is_log
            xi_uniq, xi_inv = np.unique(x[:, t.column], return_inverse=True)
            left = np.log(xi_uniq - step / 2) if is_log else (xi_uniq - step / 2)
            right = np.log(xi_uniq + step / 2) if is_log else (xi_uniq + step / 2)
            mass = _truncnorm._log_gauss_mass(
                (left[:, np.newaxis] - t.mu) / t.sigma, (right[:, np.newaxis] - t.mu) / t.sigma
            )
            tables[t.column] = (mass[:, t.pair], xi_inv.reshape(-1))
    n = len(x)
    result = np.empty(n, dtype=np.float64)
    # blocks of candidates x components, allocated once (a fresh array of this size is pages
    # mapped and faulted in anew each time)
    shape = (min(n, CHUNK), len(self.weights))
    buffers = [np.empty(shape) for _ in range(4)]
    for start in range(0, n, CHUNK):
        rows = x[start : start + CHUNK]
        weighted, z, total, out = (buf[: len(rows)] for buf in buffers)
        weighted.fill(0.0)
        for t in terms:
            if isinstance(t, _Categorical):
                weighted += t.log_weights[rows[:, t.column].astype(np.int64)]
                continue
            table, inverse = tables[t.column]
            weighted += table[inverse[start : start + CHUNK]]
            weighted -= t.log_mass
        for j, c in enumerate(cont):
            xi = np.log(rows[:, c.column]) if c.is_log else rows[:, c.column]
            np.subtract(xi[:, np.newaxis], c.mu, out=z)
            z /= c.sigma
            # Optuna's norm_logpdf(z) - log_mass - log_scale, one operation at a time, in place
            # (-(z * z) / 2 is z * z * -0.5 exactly: both round the same real number)
            o = total if j == 0 else out
            np.square(z, out=o)
            o *= -0.5
            o -= log_c
            o -= c.log_mass
            o -= c.log_scale
            inside = c.bounds is not None and bool(
                ((xi >= c.bounds[0]) & (xi <= c.bounds[1])).all()
            )
            if not inside:
                o[(z < c.a) | (z > c.b)] = -np.inf
            if c.degenerate.any():
                o[:, c.degenerate] = np.nan
            # numpy sums a short last axis (Optuna's block of parameters) left to right
            if j > 0:
                total += o
        if cont:
            weighted += total
        weighted += log_weights
        max_ = weighted.max(axis=1)
        max_[np.isneginf(max_)] = 0
        weighted -= max_[:, None]
        with np.errstate(divide="ignore"):  # log(0) where no component has mass
            result[start : start + len(rows)] = (
                np.log(exp_nonpositive(weighted, out=z).sum(axis=1)) + max_
            )
    return result


# numpy's exp is a normal number above NORMAL (and fast; from about -708 on it takes a slow
# path); at or below ZERO it is exactly 0.
NORMAL, ZERO = -700.0, -750.0


def exp_nonpositive(d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`np.exp(d)`, the same numbers, faster where much of `d` is far below 0: numpy's exp
    takes about 1 ns a number above -708, but 6 ns on one whose result underflows to 0 and
    some 35-70 ns on one with a subnormal result (one core), and most of a mixture's
    components lie that far from most candidates. The range above NORMAL in one pass, 0 at or
    below ZERO, and those in between through exp one by one."""
    out = np.maximum(d, NORMAL, out=out)  # nan stays nan
    np.exp(out, out=out)
    low = d < NORMAL
    if low.any():
        np.multiply(out, ~low, out=out)  # exp(NORMAL) * 0 is 0
        between = np.flatnonzero(low & (d > ZERO))
        if between.size:
            out.flat[between] = np.exp(d.flat[between])
    return out


def internal_repr(
    self: Any, trials: list[Any], search_space: dict[str, Any], study: Any
) -> dict[str, np.ndarray]:
    """`TPESampler._get_internal_repr`, the same arrays, with each finished trial's row worked
    out once per sampler and search space (a finished trial's params never change): every fit
    of the Parzen estimators reads every trial, two fits a fused group (its leader's and its
    followers'), and turning each trial's params into numbers was 3% of a penguins search."""
    space = tuple(search_space.items())
    cache: dict[int, tuple[Any, tuple[Any, ...] | None]] = self.__dict__.setdefault(
        "_selector_rows", {}
    ).setdefault(space, {})
    rows = []
    for trial in trials:
        hit = cache.get(id(trial))
        if hit is not None and hit[0] is trial:
            row = hit[1]
        else:
            params = self._get_params(trial, study)
            row = (
                tuple(d.to_internal_repr(params[name]) for name, d in space)
                if search_space.keys() <= params.keys()
                else None
            )
            if trial.state.is_finished():
                cache[id(trial)] = (trial, row)
        if row is not None:
            rows.append(row)
    return {name: np.asarray([row[j] for row in rows]) for j, (name, _) in enumerate(space)}


def split_trials(study: Any, trials: list[Any], n_below: int) -> tuple[list[Any], list[Any]]:
    """Optuna's `_split_trials` (TPE's good and bad trials), the same lists in the same order,
    for a single objective, with each finished trial's infeasibility and pruned score worked
    out once (they read its constraints and intermediate values; 26 ms a split at 7,800
    penguins trials, two splits a fused group). Several objectives go to Optuna's own."""
    from optuna.samplers._tpe import sampler as tpe_sampler
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    if len(study.directions) > 1:
        below, above = optunas_split_trials(study, trials, n_below)
        return below, above
    minimize = study.direction == StudyDirection.MINIMIZE
    # each finished trial's (infeasibility, pruned score), kept with the study: (trial, scores)
    cache: dict[int, tuple[Any, tuple[float, tuple[float, float]]]] = study.__dict__.setdefault(
        "_selector_split_scores", {}
    )
    complete, pruned, running, infeasible = [], [], [], []
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            running.append(trial)
            continue
        hit = cache.get(id(trial))
        if hit is None or hit[0] is not trial:
            pruned_score = tpe_sampler._get_pruned_trial_score(trial, study)
            hit = (trial, (tpe_sampler._get_infeasible_trial_score(trial), pruned_score))
            cache[id(trial)] = hit
        if hit[1][0] > 0:
            infeasible.append(trial)
        elif trial.state == TrialState.COMPLETE:
            complete.append(trial)
        elif trial.state == TrialState.PRUNED:
            pruned.append(trial)
        else:
            raise AssertionError(f"trial {trial.number} is {trial.state.name}")
    n = min(n_below, len(complete))
    by_value = sorted(complete, key=lambda t: t.value, reverse=not minimize)
    below, above = by_value[:n], by_value[n:]
    n_below = max(0, n_below - len(below))
    n = min(n_below, len(pruned))
    by_score = sorted(pruned, key=lambda t: cache[id(t)][1][1])
    below, above = below + by_score[:n], above + by_score[n:]
    n_below = max(0, n_below - n)
    n = min(n_below, len(infeasible))
    by_bad = sorted(infeasible, key=lambda t: cache[id(t)][1][0])
    below, above = below + by_bad[:n], above + by_bad[n:] + running
    below.sort(key=lambda t: t.number)
    above.sort(key=lambda t: t.number)
    return below, above


# Optuna's own functions, kept where `install` replaces them (for the tests that compare them).
optunas_log_pdf: Any = None
optunas_internal_repr: Any = None
optunas_split_trials: Any = None


@functools.cache
def install() -> None:
    """Put the cheaper, exact functions in place of Optuna's for this process: scipy's
    vectorised log Phi (`vectorised_log_ndtr`), `mixture_log_pdf`, `internal_repr` and
    `split_trials`. Where this version of Optuna keeps them elsewhere, Optuna's own stay."""
    global optunas_log_pdf, optunas_internal_repr, optunas_split_trials
    vectorised_log_ndtr()
    from optuna.samplers import TPESampler
    from optuna.samplers._tpe import sampler as tpe_sampler

    own_split = getattr(tpe_sampler, "_split_trials", None)
    if callable(own_split) and own_split is not split_trials:
        optunas_split_trials = own_split
        tpe_sampler._split_trials = split_trials

    own_repr = getattr(TPESampler, "_get_internal_repr", None)
    if callable(own_repr) and own_repr is not internal_repr:
        optunas_internal_repr = own_repr
        TPESampler._get_internal_repr = internal_repr  # type: ignore[method-assign]
    try:
        from optuna.samplers._tpe.probability_distributions import (
            _MixtureOfProductDistribution,
        )
    except ImportError:
        return
    own = getattr(_MixtureOfProductDistribution, "log_pdf", None)
    if callable(own) and own is not mixture_log_pdf:
        optunas_log_pdf = own
        _MixtureOfProductDistribution.log_pdf = mixture_log_pdf  # type: ignore[method-assign]


def vectorised_log_ndtr() -> None:
    """Optuna's TPE evaluates log Phi (the normal's log CDF, in every truncated-normal mass of its
    acquisition function and its sampling) element by element in Python, through `np.frompyfunc`
    over a scalar function: half the time of each proposal at a few hundred trials (13 ms of 25).
    scipy's `special.log_ndtr` is the same function vectorised, and exact where Optuna's is off by
    up to 6e-8 (relative) just above 6; it takes its place in Optuna's module for this process.
    A test checks that the two agree and that TPE proposes the same trials with either."""
    from optuna.samplers._tpe import _truncnorm
    from scipy.special import log_ndtr

    if callable(getattr(_truncnorm, "_log_ndtr", None)):
        _truncnorm._log_ndtr = lambda a: log_ndtr(np.asarray(a, dtype=float))
