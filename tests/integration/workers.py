"""Helpers of the worker integration tests: a private PostgreSQL database, a Redis DB or a
private redis-server, and real ``celery worker`` subprocesses running ``mavis_lc.service.app``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
POSTGRES = "postgresql://postgres@127.0.0.1:5432/{database}"
REDIS_HOST = "127.0.0.1"
PROMPTS = ["I love cats", "awful rain", "Tell me a story", "Numbers 1 2"]


SERVICES_REQUIRED = os.environ.get("MAVIS_REQUIRE_SERVICES") == "1"
"""Set by scripts/test.sh: a missing Redis or PostgreSQL then fails the tests instead of skipping them."""


def services_available() -> bool:
    try:
        redis.Redis(host=REDIS_HOST, port=6379, socket_connect_timeout=1).ping()
        with psycopg.connect(POSTGRES.format(database="test"), connect_timeout=2):
            return True
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head; dropped afterwards."""
    from mavis_lc.registry import upgrade

    name = f"mavis_worker_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES.format(database="test"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES.format(database=name)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(POSTGRES.format(database="test"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RedisServer:
    """A private redis-server on a free loopback port with an append-only file, so it can be
    restarted (or killed) without touching the shared one, and keep its queue across restarts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", REDIS_HOST, "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(host=REDIS_HOST, port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), 10, "the private redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the append-only file and exits
            self.process.wait(timeout=10)
        self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class Worker:
    """A ``celery -A mavis_lc.service.app worker`` subprocess in its own process group (SIGKILL takes its child)."""

    def __init__(self, env: dict[str, str], name: str, log: Path, queues: str = "training") -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "mavis_lc.service.app", "worker", "-Q", queues, "-c", "1",
             "--prefetch-multiplier", "1", "--max-tasks-per-child", "1", "-O", "fair", "--without-gossip",
             "--without-mingle", "--loglevel", "info", "--hostname", f"{name}@%h"],
            cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the worker and its pool process: a machine that vanishes mid-job."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def worker_env(overrides: dict[str, str]) -> dict[str, str]:
    """The test's environment (MAVIS_HOME, ...) plus ``overrides``, with the repository importable."""
    env = {key: value for key, value in os.environ.items()}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "MAVIS_DEVICE": "cpu",
            "MAVIS_HEARTBEAT_S": "0.5",
            "MAVIS_STALE_AFTER_S": "3",
            **overrides,
        }
    )
    return env


def tiny_config(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A training config that runs in a second or two on the tiny model."""
    return {
        "base_model": str(model_dir), "prompts": PROMPTS, "device": "cpu", "k_root": 2, "k_children": 2,
        "n_layers": 2, "segment_min_tokens": 2, "segment_max_tokens": 4, "top_k": 10,
        "rollout_prompts_per_batch": 2, "epochs": 2, "fit_batch_size": 32, "val_fraction": 0.25,
        "n_iterations": 1, **overrides,
    }  # fmt: skip
