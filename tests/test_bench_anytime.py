"""bench.anytime's table: what it counts from the contenders' trial logs."""

from __future__ import annotations

from bench.anytime import Outcome, seeds_table, table


def _log(*trials: tuple[float, str, float | None, float]) -> list[dict[str, object]]:
    return [{"t": t, "state": s, "value": v, "epochs": e} for t, s, v, e in trials]


def test_the_table_counts_pruned_trials_and_the_k_fold_epochs_each_trained() -> None:
    c = Outcome(
        "(c)",
        _log((10, "COMPLETE", 0.9, 12), (20, "PRUNED", None, 3), (30, "PRUNED", None, 3)),
        None,
        1.0,
    )
    d = Outcome(
        "(d)",
        _log(
            (5, "COMPLETE", 0.95, 10),
            (6, "COMPLETE", 0.9, 10),
            (7, "PRUNED", None, 3),
            (8, "COMPLETE", 0.97, 12),
            (70, "COMPLETE", 0.99, 12),  # after the minute: not counted
        ),
        None,
        1.0,
    )
    assert (c.count(), c.pruned_share(), c.epochs()) == (3, 2 / 3, 18.0)
    assert (d.count(), d.pruned_share(), d.epochs()) == (4, 0.25, 35.0)
    text = table("penguins", {"c": c, "d": d}, 1.0)
    rows = text.splitlines()
    assert rows[1].split()[-7:-3] == ["pruned", "epochs", "ep/min", "best@1m"]
    assert rows[2].split()[1:6] == ["3", "3.0", "67%", "6.0", "18"]
    assert rows[3].split()[1:6] == ["4", "4.0", "25%", "8.8", "35"]
    assert "(d) / (c) trials: 1.33x; K-fold epochs trained: 1.94x" in text


def test_the_seeds_table_leaves_out_the_marks_line_when_no_mark_fits() -> None:
    def run(epochs: float) -> dict[str, Outcome]:
        log = _log((5, "COMPLETE", 0.9, epochs), (9, "PRUNED", None, 3))
        return {"c": Outcome("(c)", log, None, 0.5), "d": Outcome("(d)", log, None, 0.5)}

    short = seeds_table("penguins", {0: run(10), 1: run(12)}, 0.5)
    assert "seeds where" not in short
    assert short.splitlines()[2].split()[-2:] == [
        "4.0",
        "28",
    ]  # trials and K-fold epochs a minute, mean of 13 and 15
    assert "seeds where (d)'s best is at least (c)'s: 1 min 2/2" in seeds_table(
        "penguins", {0: run(10), 1: run(12)}, 1.0
    )
