"""`selector.tpe`: Optuna's TPE with cheaper replacements for some of its functions, the
same proposals."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers._tpe.probability_distributions import _MixtureOfProductDistribution
from optuna.samplers._tpe.sampler import _split_trials

from selector import tpe
from selector.space import sample_config
from tests.test_space import FULL_SPACE, _space

# One parameter of every kind TPE models: categorical, continuous (linear and log), discrete
# (float step, int, int log).
EVERY_KIND = {
    "c": CategoricalDistribution(["a", "b", "c", "d"]),
    "f": FloatDistribution(0.0, 1.0),
    "fl": FloatDistribution(1e-5, 1e-1, log=True),
    "fs": FloatDistribution(0.0, 2.0, step=0.25),
    "i": IntDistribution(1, 6),
    "il": IntDistribution(8, 512, log=True),
}


def _value(params: dict[str, object]) -> float:
    return (
        float(params["f"])  # type: ignore[arg-type]
        + math.log10(float(params["fl"])) ** 2  # type: ignore[arg-type]
        + abs(float(params["fs"]) - 1.0)  # type: ignore[arg-type]
        + 0.1 * int(params["i"])  # type: ignore[call-overload]
        + 0.01 * math.log(int(params["il"]))  # type: ignore[call-overload]
        + (0.5 if params["c"] == "d" else 0.0)
    )


def _history(n: int, seed: int = 0) -> optuna.Study:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask(EVERY_KIND)
        study.tell(trial, _value(trial.params))
    return study


def _optunas() -> object:
    tpe.install()
    assert tpe.optunas_log_pdf is not None, "Optuna's mixture moved: tpe.install replaced nothing"
    return tpe.optunas_log_pdf


def _mixtures(n_trials: int) -> list[_MixtureOfProductDistribution]:
    """Both Parzen estimators (good, bad) of a study of `n_trials` with every kind of parameter."""
    study = _history(n_trials)
    sampler = optuna.samplers.TPESampler(seed=1)
    trials = study.get_trials(deepcopy=False)
    below, above = _split_trials(study, trials, 10)
    return [
        sampler._build_parzen_estimator(
            study, EVERY_KIND, part, handle_below=handle_below
        )._mixture_distribution
        for part, handle_below in ((below, True), (above, False))
    ]


def _candidates(mixture: _MixtureOfProductDistribution) -> np.ndarray:
    """TPE's own candidates, a count that is no multiple of the block size."""
    return mixture.sample(np.random.RandomState(0), 3 * tpe.CHUNK + 7)


@pytest.mark.parametrize("n_trials", [12, 300])
def test_elementwise_log_pdf_equals_optunas_bit_for_bit(n_trials: int) -> None:
    """Where a mixture's density is not taken as a matrix product (points at and beyond the
    bounds among the candidates), every value equals Optuna's, -inf and all; and so does
    `_elementwise_log_pdf` on TPE's own candidates."""
    optunas = _optunas()
    for mixture in _mixtures(n_trials):
        x = _candidates(mixture)
        terms = tpe._Terms.of(mixture, x)
        assert np.array_equal(tpe._elementwise_log_pdf(terms, x), optunas(mixture, x))  # type: ignore[operator]
        edges = x[:4].copy()
        edges[0, 1], edges[1, 1] = 0.0, 1.0  # on the bounds
        edges[2, 1], edges[3, 1] = -0.5, 1.5  # beyond them: zero density
        x = np.concatenate([x, edges])
        assert not tpe._Terms.of(mixture, x).quadratic_ok(x)
        theirs = optunas(mixture, x)  # type: ignore[operator]
        ours = tpe.mixture_log_pdf(mixture, x)
        assert np.array_equal(ours, theirs, equal_nan=True)
        assert np.isneginf(ours[-2:]).all()


@pytest.mark.parametrize("n_trials", [12, 300, 2000])
def test_quadratic_log_pdf_within_its_error_of_optunas(n_trials: int) -> None:
    """On TPE's own candidates `mixture_log_pdf` takes the matrix product, and each value is
    within `QUADRATIC_ERROR` of Optuna's (absolute), for the good and the bad estimator of a
    study with every kind of parameter."""
    optunas = _optunas()
    for mixture in _mixtures(n_trials):
        x = _candidates(mixture)
        assert tpe._Terms.of(mixture, x).quadratic_ok(x)
        theirs = optunas(mixture, x)  # type: ignore[operator]
        ours = tpe.mixture_log_pdf(mixture, x)
        assert np.isfinite(theirs).all()
        assert np.abs(ours - theirs).max() <= tpe.QUADRATIC_ERROR
        assert not np.array_equal(ours, theirs)  # the matrix product did score them


def test_quadratic_log_pdf_is_not_taken_where_its_rounding_could_grow() -> None:
    """A component a millionth of its range wide would have its expanded square rounded at
    some 1e11: such a mixture is scored elementwise, Optuna's numbers."""
    from optuna.samplers._tpe.probability_distributions import _BatchedTruncNormDistributions

    optunas = _optunas()
    narrow = _BatchedTruncNormDistributions(
        mu=np.array([0.3, 0.5]), sigma=np.array([1e-6, 0.2]), low=0.0, high=1.0
    )
    mixture = _MixtureOfProductDistribution(weights=np.array([0.5, 0.5]), distributions=[narrow])
    x = np.array([[0.3], [0.3 + 1e-6], [0.7]])
    assert not tpe._Terms.of(mixture, x).quadratic_ok(x)
    assert np.array_equal(tpe.mixture_log_pdf(mixture, x), optunas(mixture, x))  # type: ignore[operator]


@pytest.mark.parametrize("rounds", [30, 200])
def test_tpe_proposes_the_same_trials_with_either_log_pdf(
    rounds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TPE search (with its constant liar, trials asked two at a time) asks exactly the same
    params with Optuna's mixture density and with `mixture_log_pdf` (which takes each density
    as a matrix product): 60 trials, and 400."""
    optunas = _optunas()
    products = []
    quadratic = tpe._quadratic_log_pdf
    monkeypatch.setattr(
        tpe, "_quadratic_log_pdf", lambda terms, x: products.append(len(x)) or quadratic(terms, x)
    )

    def search() -> list[dict[str, object]]:
        study = optuna.create_study(
            sampler=optuna.samplers.TPESampler(seed=7, constant_liar=True, n_startup_trials=8)
        )
        for _ in range(rounds):
            pair = [study.ask(EVERY_KIND), study.ask(EVERY_KIND)]
            for trial in pair:
                study.tell(trial, _value(trial.params))
        return [t.params for t in study.trials]

    try:
        _MixtureOfProductDistribution.log_pdf = optunas  # type: ignore[assignment]
        before = search()
    finally:
        _MixtureOfProductDistribution.log_pdf = tpe.mixture_log_pdf  # type: ignore[method-assign]
    assert not products
    assert search() == before
    assert len(products) >= 2 * (2 * rounds - 8)  # good and bad, each trial after the start-up


def test_vectorised_log_ndtr_agrees_with_optunas_and_tpe_proposes_the_same() -> None:
    """`tpe.vectorised_log_ndtr` puts scipy's log Phi in place of Optuna's element-by-element
    one: the same function (within 1e-7 relative; Optuna's is the one off, just above 6), and the
    same TPE proposal after 80 trials of the full space, to rounding."""
    import math

    import numpy as np
    from optuna.samplers._tpe import _truncnorm
    from scipy.special import log_ndtr

    def own(a: np.ndarray) -> np.ndarray:  # Optuna's, as it defines it
        return np.frompyfunc(_truncnorm._log_ndtr_single, 1, 1)(a).astype(float)

    installed = _truncnorm._log_ndtr
    x = np.concatenate(
        [np.linspace(-40.0, 40.0, 20001), np.random.default_rng(0).normal(0, 5, 5000)]
    )
    ours, theirs = log_ndtr(x), own(x)
    assert np.allclose(ours, theirs, rtol=1e-7, atol=1e-12)

    space = _space(**FULL_SPACE)
    history = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(80):
        trial = history.ask()
        c = sample_config(trial, space)
        history.tell(trial, math.log10(c.lr) ** 2 + c.dropout + 0.1 * c.depth)

    def proposal() -> dict[str, object]:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=5, constant_liar=True))
        study.add_trials(history.get_trials())
        trial = study.ask()
        sample_config(trial, space)
        return trial.params

    try:
        _truncnorm._log_ndtr = own
        before = proposal()
        tpe.vectorised_log_ndtr()
        assert _truncnorm._log_ndtr is not own
        after = proposal()
    finally:
        _truncnorm._log_ndtr = installed
    assert before.keys() == after.keys()
    for name, value in before.items():
        if isinstance(value, float):
            assert math.isclose(value, after[name], rel_tol=1e-9), name
        else:
            assert value == after[name], name


def test_exp_nonpositive_equals_numpys_exp() -> None:
    """`tpe.exp_nonpositive` gives `np.exp`'s numbers on the whole non-positive range: the fast
    range, subnormal results, exact zeros far below, -inf and nan; into `out` as well."""
    d = np.concatenate(
        [
            np.linspace(-800.0, 0.0, 400_001),
            np.linspace(-746.0, -700.0, 100_001),  # subnormal results and the bounds around them
            [tpe.NORMAL, tpe.ZERO, np.nextafter(tpe.NORMAL, 0), np.nextafter(tpe.ZERO, -1)],
            [-np.inf, np.nan, -0.0, -1e300],
        ]
    ).reshape(-1, 6)
    expected = np.exp(d)
    assert (expected[np.isfinite(d) & (d > -745) & (d < -708.5)] > 0).all()  # subnormals seen
    assert np.array_equal(tpe.exp_nonpositive(d), expected, equal_nan=True)
    out = np.empty_like(d)
    assert tpe.exp_nonpositive(d, out=out) is out
    assert np.array_equal(out, expected, equal_nan=True)


def test_internal_repr_equals_optunas_and_follows_the_trials() -> None:
    """`tpe.internal_repr` gives the arrays of Optuna's `_get_internal_repr` (values and dtypes)
    for finished and running trials and trials without every parameter, read again from its
    cache, and after more trials finish."""
    tpe.install()
    optunas = tpe.optunas_internal_repr
    assert optunas is not None, "Optuna's _get_internal_repr moved: tpe.install replaced nothing"
    study = _history(40)
    sampler = optuna.samplers.TPESampler(seed=3)
    partial = study.ask({"c": EVERY_KIND["c"], "f": EVERY_KIND["f"]})  # a running trial, two params
    study.tell(partial, 1.0)
    running = study.ask(EVERY_KIND)  # a running trial with every param
    for _ in range(3):
        trials = study.get_trials(deepcopy=False)
        for space in (EVERY_KIND, {"il": EVERY_KIND["il"], "c": EVERY_KIND["c"]}):
            ours = tpe.internal_repr(sampler, trials, space, study)
            theirs = optunas(sampler, trials, space, study)
            assert list(ours) == list(theirs)
            for name in space:
                assert ours[name].dtype == theirs[name].dtype
                assert np.array_equal(ours[name], theirs[name]), name
        trial = study.ask(EVERY_KIND)
        study.tell(trial, _value(trial.params))
    assert running.number in {t.number for t in trials}


SPLIT_STATES = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
)


def _mixed_study(direction: str) -> optuna.Study:
    """60 trials: complete ones with tied values, pruned ones (with and without scores, a nan
    among them), infeasible and running ones."""
    study = optuna.create_study(direction=direction)
    rng = np.random.default_rng(0)
    for i in range(60):
        trial = study.ask()
        kind = i % 6
        if kind == 4:  # infeasible
            study._storage.set_trial_system_attr(trial._trial_id, "constraints", [0.5 * i, -1.0])
        if kind in (1, 2):  # pruned, its last score a tie, fresh or nan (or none at all)
            for step in range(int(rng.integers(0, 4))):
                value = float(rng.choice([0.25, 0.5, np.nan])) if step else float(i)
                trial.report(value, step)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif kind == 3:
            continue  # running
        else:
            study.tell(trial, float(rng.choice([0.1, 0.2, 0.3])))  # ties
    return study


def _optunas_split() -> Any:
    """Optuna's own `_split_trials`, kept by `tpe.install` where it puts selector's in place."""
    tpe.install()
    assert tpe.optunas_split_trials is not None, (
        "Optuna's _split_trials moved: tpe.install replaced nothing"
    )
    return tpe.optunas_split_trials


def _numbers(parts: tuple[list[Any], list[Any]]) -> list[list[int]]:
    return [[t.number for t in part] for part in parts]


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_split_trials_equals_optunas(direction: str) -> None:
    """`tpe.split_trials` gives Optuna's good and bad trials in Optuna's order: complete trials
    with ties, pruned ones (with and without scores, a nan among them), infeasible and running
    ones, at every size of the good part, read again from its cache."""
    optunas = _optunas_split()
    study = _mixed_study(direction)
    trials = study.get_trials(deepcopy=False, states=SPLIT_STATES)
    for n_below in (0, 1, 5, 11, 25, 60, 100):
        for _ in range(2):
            ours = tpe.split_trials(study, trials, n_below)
            theirs = optunas(study, trials, n_below)
            assert _numbers(ours) == _numbers(theirs), n_below


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_split_trials_adds_a_new_running_trial_to_the_last_split(
    direction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fused group's followers split its leader's trials plus the leader, running: that
    split is the last one with the leader among the bad trials, Optuna's answer, without
    working it out again. Any other change (a trial finished, another size of the good part,
    two new trials) is worked out from the trials."""
    optunas = _optunas_split()
    study = _mixed_study(direction)
    worked_out = []
    split = tpe._split
    monkeypatch.setattr(
        tpe, "_split", lambda *args: worked_out.append(len(args[1])) or split(*args)
    )

    def check(n_below: int) -> tuple[list[Any], list[Any]]:
        trials = study.get_trials(deepcopy=False, states=SPLIT_STATES)
        ours = tpe.split_trials(study, trials, n_below)
        assert _numbers(ours) == _numbers(optunas(study, trials, n_below))
        return ours

    for n_below in (0, 4, 100):
        check(n_below)
        leader = study.ask()  # the leader's proposal split the trials before it existed
        worked_out.clear()
        _, above = check(n_below)
        assert worked_out == [], "the followers' split was worked out again"
        assert above[-1].number == leader.number
        study.tell(leader, 0.2)  # the next group's leader: a finished trial changes the split
        check(n_below)
        assert len(worked_out) == 1
    check(5)
    study.ask()
    study.ask()
    worked_out.clear()
    check(5)  # two new trials
    check(6)  # another good part
    assert len(worked_out) == 2
