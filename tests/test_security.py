"""Passwords never leave the URL they came in; the dashboard is private unless asked otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from selector.cli import app
from selector.dashboard import exposure_warning
from tests.conftest import small_raw, write_study

SECRET = "s3cretPW"


@pytest.mark.postgres
def test_storage_password_is_never_printed_or_written(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # artifacts of a server-backed study go to the working directory
    url = sa.make_url(pg_url).set(password=SECRET).render_as_string(hide_password=False)
    study_file = write_study(tmp_path / "s.toml", {**small_raw(n_trials=2), "storage": url})
    runner = CliRunner()
    outputs = []
    for args in (
        ["run", str(study_file)],
        ["status", str(study_file)],
        ["status", str(study_file), "--json"],
        ["studies", "--storage", url],
        ["export", str(study_file), "--format", "yaml"],
        ["export", str(study_file), "--format", "toml"],
        ["final", str(study_file)],
        ["report", str(study_file), "-o", str(tmp_path / "report.html")],
        ["run", str(study_file), "--storage", url.replace("127.0.0.1", "127.0.0.1:1")],
    ):
        result = runner.invoke(app, args)
        outputs.append(result.output + (result.stderr if result.stderr_bytes else ""))
    assert all(SECRET not in out for out in outputs), [o for o in outputs if SECRET in o]
    assert "***" in outputs[-1]  # the unreachable URL is named, masked
    for f in tmp_path.rglob("*"):
        written = f.suffix in (".json", ".html", ".toml", ".yaml", ".txt", ".csv")
        if f.is_file() and written and f.name != "s.toml":
            assert SECRET not in f.read_text(errors="ignore"), f
    with sa.create_engine(pg_url).connect() as conn:
        for table in (
            "selector_studies",
            "study_user_attributes",
            "trial_user_attributes",
            "study_system_attributes",
            "selector_final",
        ):
            dump = " ".join(str(r) for r in conn.execute(sa.text(f"SELECT * FROM {table}")))
            assert SECRET not in dump, table


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_dashboard_on_loopback_is_quiet(host: str) -> None:
    assert exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_dashboard_warns_when_reachable_from_other_machines(host: str) -> None:
    warning = exposure_warning(host)
    assert warning is not None and "no authentication" in warning
