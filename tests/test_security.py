"""Passwords never leave the URL they came in, in whatever form the URL carries them (userinfo,
`?password=`, `sslpassword`, `token`, `api_key`, ..., a URL that does not parse): not in messages,
`status`, `studies`, exports, reports, saved artifacts or database records. The dashboard is
private unless asked otherwise."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from selector import redact, storage
from selector.cli import app
from selector.dashboard import exposure_warning
from tests.conftest import small_raw, write_study

SECRET = "s3cretPW"


def _with_password(pg_url: str, form: str) -> str:
    """`pg_url` carrying SECRET as its userinfo password or as a query parameter `form`."""
    if form == "userinfo":
        return sa.make_url(pg_url).set(password=SECRET).render_as_string(hide_password=False)
    return f"{pg_url}?{form}={SECRET}"


@pytest.mark.postgres
@pytest.mark.parametrize("form", ["userinfo", "password", "sslpassword"])
def test_storage_password_is_never_printed_or_written(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    monkeypatch.chdir(tmp_path)  # artifacts of a server-backed study go to the working directory
    url = _with_password(pg_url, form)
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
        ["run", str(study_file), "--storage", url.replace("127.0.0.1:5432", "127.0.0.1:1")],
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
            "trial_system_attributes",
            "selector_final",
            "selector_workers",
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


# --- every form a URL carries a secret in ----------------------------------------------------

SECRET_FORMS = [
    f"postgresql://u:{SECRET}@db.example:5432/sel",
    f"postgresql://u@db.example:5432/sel?password={SECRET}",
    f"postgresql://u@db.example:5432/sel?sslmode=require&PASSWORD={SECRET}&connect_timeout=3",
    f"postgresql://u@db.example/sel?passwd={SECRET}",
    f"postgresql://u@db.example/sel?pwd={SECRET}",
    f"postgresql://u@db.example/sel?sslpassword={SECRET}",
    f"postgresql://u@db.example/sel?token={SECRET}",
    f"postgresql://u@db.example/sel?access_token={SECRET}",
    f"postgresql://u@db.example/sel?client_secret={SECRET}",
    f"postgresql://u@db.example/sel?api_key={SECRET}",
    f"postgresql://u@db.example/sel?ApiKey={SECRET}",
    f"postgresql://u@db.example/sel?pass%77ord={SECRET}",  # a percent-encoded key
    f"postgresql://u:{SECRET}@db.example/sel?password={SECRET}x",
    f"postgresql://u:{SECRET}/with?odd:chars@db.example/sel",  # '/', '?', ':' in the password
    f"postgresql://u:p@{SECRET}@db.example/sel",  # an unescaped '@' in the password
    f"sqlite:////tmp/s.db?password={SECRET}",
    # URLs that do not parse
    f"postgresql//u:{SECRET}@db.example/sel",
    f"postgresql://u@db.example:port/sel?password={SECRET}",
    f"postgresql://u:{SECRET}@db.example:port/sel",
    f"host=db.example user=u password={SECRET} dbname=sel",
    f"host=db.example password='{SECRET} x' dbname=sel",
]


@pytest.mark.parametrize("url", SECRET_FORMS)
def test_mask_hides_a_secret_in_every_form_a_url_carries_it(url: str) -> None:
    shown = storage.mask(url)
    assert SECRET not in shown and redact.MASK in shown, shown
    assert "db.example" in shown or "/tmp/s.db" in shown, (
        f"the URL is no longer recognizable: {shown}"
    )


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////home/me/runs/digits.db",
        "postgresql://selector@db:5432/selector?sslmode=require&application_name=w1",
        "grpc://proxy-host:13000",
    ],
)
def test_mask_leaves_a_url_without_secrets_as_given(url: str) -> None:
    assert storage.mask(url) == url


@pytest.mark.parametrize(
    "message",
    [
        f'invalid dsn: missing "=" after "{SECRET}" in connection info string',
        f"could not connect with host=db password={SECRET} dbname=sel",
        f"engine for postgresql://u:{SECRET}@db/sel failed",
    ],
)
def test_a_drivers_message_that_echoes_the_secret_is_scrubbed(message: str) -> None:
    url = f"postgresql://u@db/sel?password={SECRET}"
    scrubbed = storage.scrub(message, url)
    assert SECRET not in scrubbed and redact.MASK in scrubbed, scrubbed


UNREACHABLE = [
    f"postgresql://u@127.0.0.1:1/db?password={SECRET}",
    f"postgresql://u@127.0.0.1:1/db?sslpassword={SECRET}",
    f"postgresql://u@127.0.0.1:1/db?token={SECRET}",  # not a libpq option: the driver refuses it
    f"postgresql://u:{SECRET}@127.0.0.1:1/db?PassWord={SECRET}",
]


@pytest.mark.parametrize("url", UNREACHABLE)
@pytest.mark.parametrize("command", ["run", "status", "studies", "worker"])
def test_an_unreachable_server_is_named_with_its_secret_masked(
    url: str, command: str, tmp_path: Path
) -> None:
    study_file = write_study(tmp_path / "s.toml", small_raw(n_trials=1))
    args = {
        "run": ["run", str(study_file)],
        "status": ["status", "iris-small"],
        "studies": ["studies"],
        "worker": ["worker", "iris-small"],
    }[command]
    result = CliRunner().invoke(app, [*args, "--storage", url])
    out = result.output  # stdout and stderr
    assert result.exit_code == 2, out
    assert SECRET not in out and f"{storage.mask(url)}: cannot connect" in out, out
    assert len(out.splitlines()) == 1 and "Traceback" not in out, out


def _sqlite_dump(db: Path) -> str:
    """Every row of every table of a SQLite database, as text."""
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return "\n".join(
            f"{t}: {row!r}" for t in tables for row in conn.execute(f'SELECT * FROM "{t}"')
        )


@pytest.mark.filterwarnings("ignore:Query string argument")  # pysqlite ignores the parameters
def test_query_parameter_secrets_never_reach_outputs_files_or_records(tmp_path: Path) -> None:
    """A SQLite URL carrying secrets as query parameters (ignored by the driver), through every
    command that prints, exports, saves or records something."""
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}?password={SECRET}&Api_Key={SECRET}&sslmode=disable"
    study_file = write_study(tmp_path / "s.toml", small_raw(n_trials=2))
    runner = CliRunner()
    outputs = {}
    for args in (
        ["run", str(study_file), "--workers", "1"],
        ["status", str(study_file)],
        ["status", str(study_file), "--json"],
        ["studies"],
        ["studies", "--json"],
        ["export", str(study_file), "--format", "json", "-o", str(tmp_path / "best.json")],
        ["export", str(study_file), "--format", "yaml"],
        ["export", str(study_file), "--format", "toml"],
        ["final", str(study_file)],
        ["report", str(study_file), "-o", str(tmp_path / "report.html")],
    ):
        result = runner.invoke(app, [*args, "--storage", url])
        out = result.output + (result.stderr if result.stderr_bytes else "")
        assert result.exit_code == 0, out
        outputs[" ".join(args[:2])] = out
    assert all(SECRET not in out for out in outputs.values()), outputs
    status = runner.invoke(app, ["status", str(study_file), "--json", "--storage", url])
    info = json.loads(status.stdout)
    assert info["storage"].endswith("?Api_Key=***&password=***&sslmode=disable"), info["storage"]
    html = (tmp_path / "report.html").read_text()
    assert SECRET not in html and html.count("password=***") >= 1
    written = [f for f in tmp_path.rglob("*") if f.is_file()]  # the database files included
    assert any(f.name == "config.json" for f in written)  # the saved model's exported config
    for f in written:
        assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in _sqlite_dump(db)
