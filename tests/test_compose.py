"""docker-compose.yml and the Dockerfile: Docker cannot run here, so check that they parse, name
real selector commands, and match what the README tells users to run."""

from __future__ import annotations

import re
from typing import Any

import yaml
from typer.testing import CliRunner

from selector.cli import app
from tests.conftest import ROOT

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
README = (ROOT / "README.md").read_text()


def test_compose_has_postgres_init_workers_and_a_local_dashboard() -> None:
    services = COMPOSE["services"]
    assert {"postgres", "init", "worker", "dashboard"} <= set(services)
    assert "healthcheck" in services["postgres"]
    assert services["init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]


def _expand(arg: str) -> str:
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", arg)


def test_compose_commands_are_real_selector_commands() -> None:
    runner = CliRunner()
    for name in ("init", "worker"):
        service = {**COMPOSE["x-selector"], **COMPOSE["services"][name]}
        command = [_expand(a) for a in service["command"]]
        result = runner.invoke(app, [command[0], "--help"])
        assert result.exit_code == 0, (name, result.output)
        for option in (a for a in command[1:] if a.startswith("--")):
            assert option in result.output, (name, option)
    assert (ROOT / _expand(COMPOSE["services"]["init"]["command"][1])).is_file()


def test_the_storage_url_names_the_compose_database() -> None:
    url = COMPOSE["x-selector"]["environment"]["SELECTOR_STORAGE"]
    pg = COMPOSE["services"]["postgres"]["environment"]
    assert url == (
        f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
        f"{pg['POSTGRES_DB']}"
    )


def test_dockerfile_installs_the_pinned_cpu_torch_before_selector() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    torch = next(i for i, ln in enumerate(lines) if "pip install" in ln and "TORCH_SPEC" in ln)
    assert 'ARG TORCH_SPEC="torch==2.13.0"' in lines
    package = next(i for i, ln in enumerate(lines) if "pip install" in ln and "postgres" in ln)
    assert torch < package
    assert "-c constraints.txt" in lines[package]  # the versions the tests ran with
    assert 'ENTRYPOINT ["selector"]' in lines


def test_readme_shows_the_compose_commands() -> None:
    assert "docker compose up --scale worker=" in README
    assert "selector worker" in README and "selector proxy" in README


def test_workers_get_the_signal_and_the_time_to_record_a_stop() -> None:
    # `docker compose down`: SIGTERM through an init process, and more time than the worker's
    # 5 s wait for a safe point (`interrupt.TERM_GRACE_S`) before Docker kills it
    from selector import interrupt

    worker = COMPOSE["services"]["worker"]
    assert worker["init"] is True
    assert int(str(worker["stop_grace_period"]).removesuffix("s")) > interrupt.TERM_GRACE_S
