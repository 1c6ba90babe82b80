"""What a user sees in a browser: optuna-dashboard on a real study, and report.html.

Drives Debian's chromium (/usr/bin/chromium) with Playwright; never downloads a browser. Without
chromium these tests skip, unless SELECTOR_REQUIRE_BROWSER=1 (as in CI), where they fail. A failing
test saves a screenshot of the page in its tmp_path and names it in the error.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from selector import dashboard, report, spec, storage, study, summary
from tests.conftest import small_raw

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 20_000
NAME = "iris-small"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install -y chromium); browser tests not run"
        if os.environ.get("SELECTOR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}, but SELECTOR_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A real study: 4 trials on iris, each with its note and learning-curve figure."""
    tmp = tmp_path_factory.mktemp("browser")
    url = f"sqlite:///{tmp / 'selector.db'}"
    study.run(spec.parse(small_raw(n_trials=4), origin="iris.toml"), url)
    return url, tmp


@pytest.fixture(scope="module")
def served(ran: tuple[str, Path]) -> Iterator[str]:
    """`selector dashboard`'s server (selector's figures published first), in this process."""
    url, _ = ran
    st, names = dashboard.studies(url)
    dashboard.Refresher(url, st, names, every=0).publish_changed()
    server = dashboard.make_server(url, st, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, shot: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.shot = shot

    @contextmanager
    def screenshot_on_failure(self) -> Iterator[Any]:
        try:
            yield self.page
        except BaseException as e:
            self.page.screenshot(path=str(self.shot))
            e.add_note(f"screenshot of the page: {self.shot}")
            raise
        finally:
            self.page.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Page:
    return Page(browser, tmp_path / f"{request.node.name}.png")


def _db_trials(url: str) -> int:
    path = storage.sqlite_path(url)
    with sqlite3.connect(str(path)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0])


def test_dashboard_lists_the_study(served: str, page: Page) -> None:
    with page.screenshot_on_failure() as p:
        p.goto(f"{served}/dashboard")
        p.get_by_text(NAME).first.wait_for(timeout=TIMEOUT_MS)
        assert page.errors == []


def test_dashboard_trial_count_equals_the_database(
    served: str, ran: tuple[str, Path], page: Page
) -> None:
    with page.screenshot_on_failure() as p:
        expected = _db_trials(ran[0])
        p.goto(f"{served}/dashboard/studies/1/trials")
        # once the list holds the last trial, the count above it is final
        p.get_by_text(f"Trial {expected - 1}", exact=True).first.wait_for(timeout=TIMEOUT_MS)
        shown = p.get_by_text(re.compile(r"^\d+ Trials$")).first
        assert shown.inner_text() == f"{expected} Trials"
        assert page.errors == []


def test_a_trials_note_and_its_learning_curves_are_visible(
    served: str, ran: tuple[str, Path], page: Page
) -> None:
    # the note shows the diagnosis against the study now (publishing rewrote any stale one)
    view = next(v for v in summary.status(ran[0], NAME).trials if v.record.number == 0)
    assert view.diagnosis is not None
    with page.screenshot_on_failure() as p:
        p.goto(f"{served}/dashboard/studies/1/trials")
        p.get_by_text(re.compile(rf"^Trial 0: {re.escape(view.diagnosis.label)}$")).wait_for(
            timeout=TIMEOUT_MS
        )
        assert p.get_by_text("Generalization gap").first.is_visible()
        assert p.get_by_text(f"Gradients {view.diagnosis.gradients}").first.is_visible()
        figure = p.locator('img[alt="learning curves of every fold"]').first
        figure.wait_for(timeout=TIMEOUT_MS)
        p.wait_for_function(
            "img => img.complete && img.naturalWidth > 0", arg=figure.element_handle()
        )
        assert page.errors == []


def test_dashboard_shows_selectors_study_figures(served: str, page: Page) -> None:
    with page.screenshot_on_failure() as p:
        p.goto(f"{served}/dashboard/studies/1")
        for title in ("CV score per trial", "Generalization gap", "Learning curves of the top"):
            p.get_by_text(re.compile(title)).first.wait_for(timeout=TIMEOUT_MS)
        assert page.errors == []


def test_report_opens_without_console_errors_and_draws_every_figure(
    ran: tuple[str, Path], page: Page
) -> None:
    url, tmp = ran
    path = tmp / "report.html"
    report.write(url, NAME, path)
    with page.screenshot_on_failure() as p:
        p.goto(path.as_uri())
        p.wait_for_selector("body[data-figures]", timeout=TIMEOUT_MS)
        assert p.evaluate("document.body.dataset.figures") == "drawn"
        drawn = p.evaluate(
            "[...document.querySelectorAll('div.figure')]"
            ".map(d => [d.dataset.name, d.querySelectorAll('svg.main-svg').length])"
        )
        assert len(drawn) == 6 and all(n > 0 for _, n in drawn), drawn
        points = p.evaluate(
            "document.querySelector('div.figure[data-name=\"cv-scores\"]').data"
            ".reduce((n, trace) => n + trace.x.length, 0)"
        )
        assert points == 4  # one point per complete trial of the real study
        assert page.errors == []
