"""The training service end to end: real ``celery worker`` subprocesses, the machine's Redis and
PostgreSQL (each test its own Redis DB or private redis-server, and its own database), a tiny model.

Every wait is bounded; a worker's log is printed when a test fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mavis_lc import MavisLLM
from mavis_lc.jobs import cancel, job_status, submit_training, wait
from mavis_lc.registry import Registry
from mavis_lc.settings import get_settings
from tests.integration.workers import (
    REDIS_HOST,
    SERVICES_REQUIRED,
    RedisServer,
    Worker,
    postgres_database,
    services_available,
    tiny_config,
    wait_for,
    worker_env,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not SERVICES_REQUIRED and not services_available(),
        reason="needs Redis at 127.0.0.1:6379 and PostgreSQL at :5432",
    ),
]

FAST = "tests.rewards_for_tests:length_score"
SLOW = "tests.rewards_for_tests:slow_length_score"


class Service:
    """One test's service: env for the workers, the registry, and the workers it started."""

    def __init__(self, tmp_path: Path, database_url: str, broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.broker_url = broker_url
        self.monkeypatch = monkeypatch
        self.workers: list[Worker] = []
        self.env: dict[str, str] = {}
        self.configure()
        self.registry = Registry(database_url)

    def configure(self, **overrides: str) -> None:
        """Point this process (and workers started later) at the services, plus ``overrides``."""
        values = {
            "MAVIS_DATABASE_URL": self.database_url,
            "MAVIS_BROKER_URL": self.broker_url,
            "MAVIS_RESULT_BACKEND": self.broker_url,
            "MAVIS_ARTIFACTS": str(self.tmp_path / "shared-artifacts"),
            "MAVIS_TEST_REWARD_SLEEP_S": "0.5",
            **overrides,
        }
        for key, value in values.items():
            self.monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        self.env = worker_env(values)

    def start_worker(self, name: str, queues: str = "training") -> Worker:
        worker = Worker(self.env, name, self.tmp_path / f"{name}.log", queues)
        self.workers.append(worker)
        return worker

    def versions(self) -> list[Any]:
        """Every registered version, of every objective."""
        return [v for o in self.registry.list_objectives() for v in self.registry.list_versions(o.name)]

    def logs(self) -> str:
        return "\n".join(f"----- {w.name}\n{w.output()[-4000:]}" for w in self.workers)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.registry.close()


@pytest.fixture
def service_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Callable[[str | None], Service]]:
    """Build a `Service` on a fresh database and a given broker URL (default: a free-ish DB 9-15
    of the shared Redis, flushed afterwards)."""
    made: list[Service] = []
    flushed: list[redis.Redis] = []
    with postgres_database() as database_url:

        def build(broker_url: str | None = None) -> Service:
            if broker_url is None:
                db = random.randint(9, 15)
                client = redis.Redis(host=REDIS_HOST, port=6379, db=db)
                client.flushdb()
                flushed.append(client)
                broker_url = f"redis://{REDIS_HOST}:6379/{db}"
            service = Service(tmp_path, database_url, broker_url, monkeypatch)
            made.append(service)
            return service

        try:
            yield build
        finally:
            failed = getattr(request.node, "rep_call", None)
            for service in made:
                if failed is None or failed.failed:
                    print(service.logs())
                service.close()
            for client in flushed:
                client.flushdb()


@pytest.fixture
def service(service_factory: Callable[[str | None], Service]) -> Service:
    return service_factory(None)


def test_queue_worker_progress_register_and_decode(service: Service, tiny_model_dir: Path) -> None:
    service.start_worker("w1")
    job_id = submit_training(SLOW, tiny_config(tiny_model_dir, n_iterations=2))
    running = wait_for(
        lambda: (job := job_status(job_id)).status == "running" and job.progress.get("stage") and job,
        120,
        "progress of a running job",
    )
    assert running.progress["stage"] in ("rollouts", "rewards", "fit") and running.worker.startswith("w1@")
    job = wait(job_id, timeout_s=120)
    assert job.status == "succeeded", (job.error, service.logs())
    [version] = service.versions()
    assert version.id == job.result_version_id and version.training_job_id == job_id and version.iteration == 1

    from celery.result import AsyncResult

    from worker.app import create_app

    assert AsyncResult(job_id, app=create_app()).state == "SUCCESS"
    llm = MavisLLM(
        base_model=str(tiny_model_dir),
        heads=[f"{version.objective}@latest"],
        database_url=service.database_url,
        max_tokens=6,
    )
    result = llm.generate(["Tell me about cats"])
    assert result.generations[0][0].generation_info["heads"][0]["version"] == version.version  # type: ignore[index]


def test_sigkill_mid_job_then_another_worker_finishes_it_once(service: Service, tiny_model_dir: Path) -> None:
    service.configure(MAVIS_VISIBILITY_TIMEOUT_S="5", MAVIS_TEST_REWARD_SLEEP_S="1.5")
    first = service.start_worker("doomed")
    job_id = submit_training(SLOW, tiny_config(tiny_model_dir, n_iterations=3))
    wait_for(lambda: job_status(job_id).progress.get("iteration", 0) >= 1, 120, "iteration 1 to start")
    first.kill()
    assert job_status(job_id).status == "running"
    service.start_worker("rescuer")
    job = wait(job_id, timeout_s=180)
    assert job.status == "succeeded", (job.error, service.logs())
    assert job.attempt == 2 and job.worker.startswith("rescuer@")  # type: ignore[union-attr]
    assert [v.training_job_id for v in service.versions()] == [job_id]


def test_a_redelivered_message_registers_no_second_version(service: Service, tiny_model_dir: Path) -> None:
    service.configure(MAVIS_VISIBILITY_TIMEOUT_S="2", MAVIS_TEST_REWARD_SLEEP_S="1.5")
    service.start_worker("w1")
    service.start_worker("w2")
    job_id = submit_training(SLOW, tiny_config(tiny_model_dir, n_iterations=3))
    job = wait(job_id, timeout_s=180)
    assert job.status == "succeeded" and job.attempt == 1, (job.error, service.logs())
    wait_for(lambda: "duplicate delivery" in service.logs(), 60, "the re-delivered message to be handled")
    assert [v.training_job_id for v in service.versions()] == [job_id]


def test_cancel_mid_job_then_the_worker_takes_the_next(service: Service, tiny_model_dir: Path) -> None:
    service.start_worker("w1")
    doomed = submit_training(SLOW, tiny_config(tiny_model_dir, n_iterations=3))
    wait_for(lambda: job_status(doomed).progress.get("stage"), 120, "the first job to report progress")
    nxt = submit_training(FAST, tiny_config(tiny_model_dir, seed=1))
    assert cancel(doomed).cancel_requested
    job = wait(doomed, timeout_s=60)
    assert job.status == "cancelled" and job.result_version_id is None, (job.error, service.logs())
    after = wait(nxt, timeout_s=120)
    assert after.status == "succeeded", (after.error, service.logs())
    assert [v.training_job_id for v in service.versions()] == [nxt]


def test_redis_restart_while_a_job_waits_in_the_queue(
    service_factory: Callable[[str | None], Service], tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        service = service_factory(server.url)
        service.start_worker("w1")
        running = submit_training(SLOW, tiny_config(tiny_model_dir, n_iterations=2))
        wait_for(lambda: job_status(running).status == "running", 120, "the first job to start")
        waiting = submit_training(FAST, tiny_config(tiny_model_dir, seed=1))
        assert job_status(waiting).status == "queued"
        server.stop()
        server.start()
        for job_id in (running, waiting):
            job = wait(job_id, timeout_s=180)
            assert job.status == "succeeded", (job.error, service.logs())
        assert sorted(v.training_job_id for v in service.versions()) == sorted([running, waiting])
    finally:
        server.stop()


def test_eight_jobs_across_two_workers_agree_with_the_registry(service: Service, tiny_model_dir: Path) -> None:
    service.start_worker("w1")
    service.start_worker("w2")
    job_ids = [submit_training(FAST, tiny_config(tiny_model_dir, seed=seed)) for seed in range(8)]
    jobs = [wait(job_id, timeout_s=300) for job_id in job_ids]
    assert [job.status for job in jobs] == ["succeeded"] * 8, service.logs()
    versions = service.versions()
    assert sorted(v.version for v in versions) == list(range(1, 9))
    assert {v.training_job_id: v.id for v in versions} == {job.id: job.result_version_id for job in jobs}
    assert {job.worker.split("@")[0] for job in jobs} == {"w1", "w2"}  # type: ignore[union-attr]


def test_sharded_rollouts_on_two_workers_match_one_worker(service: Service, tiny_model_dir: Path) -> None:
    service.start_worker("w1")
    service.start_worker("w2")
    config = tiny_config(tiny_model_dir, rollout_cache_dir=str(service.tmp_path / "queued-rollouts"))
    sharded = wait(submit_training(FAST, config, shards=2), timeout_s=180)
    assert sharded.status == "succeeded", (sharded.error, service.logs())
    # The same job unsharded, on a worker too: bit-equality needs the same thread settings
    # (a float sum split over other thread counts may round differently).
    whole_config = {**config, "rollout_cache_dir": str(service.tmp_path / "whole-rollouts")}
    whole = wait(submit_training(FAST, whole_config), timeout_s=180)
    assert whole.status == "succeeded", (whole.error, service.logs())
    by_id = {v.id: v for v in service.versions()}
    assert by_id[sharded.result_version_id].sha256 == by_id[whole.result_version_id].sha256  # type: ignore[index]


def test_a_job_routed_to_the_gpu_queue_goes_to_the_worker_on_that_queue(service: Service, tiny_model_dir: Path) -> None:
    job_id = submit_training(FAST, tiny_config(tiny_model_dir), queue="gpu")
    client = redis.Redis.from_url(service.broker_url)
    assert (client.llen("gpu"), client.llen("training")) == (1, 0)  # on the named queue only
    service.start_worker("gpu1", queues="gpu")
    job = wait(job_id, timeout_s=120)
    assert job.status == "succeeded", (job.error, service.logs())
    assert job.worker is not None and job.worker.startswith("gpu1@")


def test_failed_and_cancelled_jobs_end_as_failure_and_revoked_in_celery_and_flower(
    service: Service, tiny_model_dir: Path
) -> None:
    import threading

    from celery.events.state import State
    from celery.result import AsyncResult

    from worker.app import create_app

    app = create_app()
    seen = State()  # what Flower builds from the workers' events
    receivers: list[Any] = []

    def listen() -> None:
        # One capture for the whole test: its event queue is deleted when a capture ends, so
        # restarting it on a timeout would drop the events sent in between (task-failed is sent once).
        with app.connection() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": seen.event})
            receivers.append(receiver)
            receiver.capture(limit=None, timeout=None, wakeup=False)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        service.start_worker("w1")
        # Events sent before the receiver's queue exists are lost: start once it hears the worker.
        wait_for(lambda: any(w.hostname.startswith("w1@") for w in seen.workers.values()), 120, "a worker event")
        failed = submit_training("tests.rewards_for_tests:nan_score", tiny_config(tiny_model_dir))
        assert wait(failed, timeout_s=120).status == "failed", service.logs()
        doomed = submit_training(SLOW, tiny_config(tiny_model_dir, n_iterations=3, seed=2))
        wait_for(lambda: job_status(doomed).progress.get("stage"), 120, "the job to report progress")
        cancel(doomed)
        assert wait(doomed, timeout_s=60).status == "cancelled", service.logs()
        assert AsyncResult(failed, app=app).state == "FAILURE"
        assert "failed: RewardError: objective 'nan_score'" in str(AsyncResult(failed, app=app).result)
        assert AsyncResult(doomed, app=app).state == "REVOKED"

        def flower_state(task_id: str) -> str | None:
            task = seen.tasks.get(task_id)
            return task.state if task is not None else None

        wait_for(lambda: flower_state(failed) == "FAILURE", 30, "a task-failed event")
        wait_for(lambda: flower_state(doomed) == "REVOKED", 30, "a task-revoked event")
        # The job rows stay the source of truth.
        assert (job_status(failed).status, job_status(doomed).status) == ("failed", "cancelled")
    finally:
        for receiver in receivers:
            receiver.should_stop = True  # the capture looks at it at least once a second
        listener.join(timeout=5)
        app.close()
