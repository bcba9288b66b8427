"""Running training jobs: claim, train, register, finish. The library code behind both the
Celery tasks (`mavis_lc.service.tasks`, thin shells) and the broker-less in-process runner
(`mavis_lc.jobs`); it imports no Celery, so a job runs in-process without the ``[worker]`` extra.

A job is a ``training_jobs`` row (objective, `TrainingConfig` as JSON, status, progress); a
task gets only its id. `run_job` is the whole life of one delivery:

1. **Claim** the row by compare-and-set (queued -> running). A delivery that finds the job
   finished exits without work (a duplicate). One that finds it running with a fresh heartbeat
   waits until it finishes or its heartbeat goes stale (its worker died), then takes it over
   by another compare-and-set on the heartbeat.
2. **Train** in a per-job work folder (``$MAVIS_HOME/jobs/<job id>``): a rerun after a crash
   resumes from the last finished stage. Progress (stage, iteration, step, total, metrics) goes
   to the row and to the Celery state; a heartbeat thread refreshes the row; cancellation is
   read from ``cancel_requested``.
3. **Register** the final iteration's head once, with ``training_job_id`` = the job id (the
   registry returns the existing version for a second registration of the same job). Earlier
   iterations are not registered: they are warm starts, not products; their metrics are kept
   in the version's ``metrics["iterations"]``.
4. **Finish** the row as succeeded, failed (with the error) or cancelled.

Transient infrastructure errors (database or Redis connection loss) are retried with
exponential backoff; `TrainingError` and other `MavisError` are not: they fail the job.

Sharded rollouts: `sample_rollout_shard` tasks each sample the iteration-0 trees of one prompt
range and put them in the artifact store; `train_from_shards` (a chord callback) merges them
into the file `train_objective` looks for and runs the job, which then starts at the rewards.
Tree sampling is seeded per prompt and node, so the merged rollouts, and so the result, are
identical to a one-worker run. While shards run, the row stays ``queued``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import update

from mavis_lc.errors import ConfigurationError, JobError, MavisError, TrainingCancelled
from mavis_lc.registry import Registry
from mavis_lc.registry.db import session_factory
from mavis_lc.registry.models import TERMINAL_JOB_STATUSES, TrainingJob, utcnow
from mavis_lc.settings import get_settings

if TYPE_CHECKING:
    from mavis_lc.training import TrainingConfig, TrainingResult

logger = logging.getLogger(__name__)


class _NoSoftTimeLimit(Exception):
    """Stands for Celery's ``SoftTimeLimitExceeded`` where Celery is not installed (it is never raised then)."""


try:  # a worker's soft time limit, seen through the training code's exception chain
    from celery.exceptions import SoftTimeLimitExceeded
except ImportError:  # the in-process runner without the [worker] extra
    SoftTimeLimitExceeded = _NoSoftTimeLimit  # type: ignore[assignment,misc]

TRAINING_QUEUE = "training"
"""The queue every training task is routed to."""


class WorkerSettings(BaseSettings):
    """Time limits and liveness of training jobs, from ``MAVIS_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MAVIS_", extra="ignore")

    soft_time_limit_s: int = 6 * 3600
    """A job past this many seconds is asked to stop (``SoftTimeLimitExceeded``) and is marked failed."""
    time_limit_s: int = 6 * 3600 + 900
    """A job past this many seconds has its process killed."""
    visibility_timeout_s: int = 8 * 3600
    """Redis re-delivers an unacknowledged message after this many seconds."""
    heartbeat_s: float = 30.0
    """How often a running job refreshes its row's heartbeat."""
    stale_after_s: float = 300.0
    """A running job whose heartbeat is older than this is taken over by a re-delivered message."""
    max_attempts: int = 3
    """A job claimed this many times (worker deaths, take-overs) and delivered again is failed."""

    def check(self) -> None:
        """Raise `ConfigurationError` unless visibility timeout > hard limit > soft limit > 0,
        and the heartbeat comes well within ``stale_after_s``."""
        if not self.visibility_timeout_s > self.time_limit_s > self.soft_time_limit_s > 0:
            raise ConfigurationError(
                "need MAVIS_VISIBILITY_TIMEOUT_S > MAVIS_TIME_LIMIT_S > MAVIS_SOFT_TIME_LIMIT_S > 0, got "
                f"{self.visibility_timeout_s} > {self.time_limit_s} > {self.soft_time_limit_s}"
            )
        if not 0 < 2 * self.heartbeat_s <= self.stale_after_s:
            raise ConfigurationError(
                "need 0 < 2 * MAVIS_HEARTBEAT_S <= MAVIS_STALE_AFTER_S, "
                f"got {self.heartbeat_s} and {self.stale_after_s}"
            )


StateReporter = Callable[[dict[str, Any]], None]
"""Receives each progress snapshot (what `run_job` also writes to the row)."""

PROGRESS_INTERVAL_S = 0.5
"""Least time between two progress writes of the same stage (the last step is always written)."""
CANCEL_POLL_S = 1.0
"""Least time between two reads of ``cancel_requested``."""
MAX_RETRIES = 8
RETRY_BASE_S = 2.0
RETRY_MAX_S = 300.0


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is an infrastructure fault worth
    retrying: a lost database connection (SQLAlchemy ``OperationalError``/``InterfaceError``),
    or a Redis or broker connection error or timeout."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    try:  # the broker's errors exist only with the [worker] extra (in-process runs need neither)
        from kombu.exceptions import OperationalError as KombuOperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:
        KombuOperationalError = RedisConnectionError = RedisTimeoutError = OperationalError  # type: ignore[misc,assignment]

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (OperationalError, InterfaceError, RedisConnectionError, RedisTimeoutError)):
            return True
        if isinstance(current, KombuOperationalError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def retry_delay_s(retries: int) -> float:
    """Backoff before retry number ``retries + 1``: 2 s, 4 s, 8 s ... capped at 300 s, with up to 25% jitter."""
    delay = min(RETRY_MAX_S, RETRY_BASE_S * 2**retries)
    return delay * (1 + random.random() / 4)


def worker_name(node: str | None = None) -> str:
    """A name unique to this delivery: ``node:pid:random`` (node: the Celery node name, default
    the host name). The row's ``worker`` is the claim token."""
    return f"{node or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def job_workdir(job_id: str) -> Path:
    """The job's checkpoint folder, ``$MAVIS_HOME/jobs/<job id>``: a rerun on this machine resumes there."""
    return get_settings().home / "jobs" / job_id


def training_config(config: Mapping[str, Any]) -> TrainingConfig:
    """The `TrainingConfig` a job row stores.

    Raises:
        ConfigurationError: a key is not a `TrainingConfig` field (the message lists them), or a value is out of range.
    """
    from mavis_lc.training import TrainingConfig

    allowed = {f.name for f in fields(TrainingConfig)}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConfigurationError(
            f"unknown training option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    result = TrainingConfig(**dict(config))
    result.validate()
    return result


def shard_ranges(n_prompts: int, prompts_per_batch: int, shards: int) -> list[tuple[int, int]]:
    """Split prompts ``[0, n_prompts)`` into at most ``shards`` consecutive ranges whose starts
    are multiples of ``prompts_per_batch`` (as `sample_trees` requires), as even as that allows."""
    if shards < 1:
        raise ConfigurationError(f"shards must be >= 1, got {shards}")
    batches = math.ceil(n_prompts / prompts_per_batch)
    count = max(1, min(shards, batches))
    ranges = []
    for index in range(count):
        first, last = (batches * index) // count, (batches * (index + 1)) // count
        ranges.append((first * prompts_per_batch, min(n_prompts, last * prompts_per_batch)))
    return ranges


# Claiming ------------------------------------------------------------------------------------


@dataclass
class _Claim:
    """Who runs the job in this delivery, and what happened to its claim since."""

    job_id: str
    worker: str
    lost: threading.Event = field(default_factory=threading.Event)


def _take_over_stale(registry: Registry, job_id: str, worker: str, stale_after_s: float) -> bool:
    """Compare-and-set: take a running job whose heartbeat is older than ``stale_after_s``."""
    now = utcnow()
    with session_factory(registry.engine).begin() as session:
        taken = session.execute(
            update(TrainingJob)
            .where(
                TrainingJob.id == job_id,
                TrainingJob.status == "running",
                TrainingJob.heartbeat_at < now - timedelta(seconds=stale_after_s),
            )
            .values(worker=worker, attempt=TrainingJob.attempt + 1, heartbeat_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
    return bool(taken)


def _heartbeat(registry: Registry, claim: _Claim) -> bool:
    """Refresh the heartbeat if this delivery still owns the job; ``False`` (and ``claim.lost``) if not."""
    with session_factory(registry.engine).begin() as session:
        owned = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == claim.job_id, TrainingJob.status == "running", TrainingJob.worker == claim.worker)
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
    if not owned:
        claim.lost.set()
    return bool(owned)


def _release(registry: Registry, claim: _Claim) -> None:
    """Put a job this delivery owns back to queued (before a retry), so the retry can claim it.
    Best effort: if the database is down, the retry takes the job over once its heartbeat is stale."""
    try:
        with session_factory(registry.engine).begin() as session:
            session.execute(
                update(TrainingJob)
                .where(
                    TrainingJob.id == claim.job_id, TrainingJob.status == "running", TrainingJob.worker == claim.worker
                )
                .values(status="queued", worker=None)
                .execution_options(synchronize_session=False)
            )
    except Exception as exc:
        logger.warning("job %s: could not release the claim before retrying: %s", claim.job_id, exc)


def claim(registry: Registry, job_id: str, settings: WorkerSettings, worker: str | None = None) -> _Claim | None:
    """Claim ``job_id`` for this delivery, or ``None`` when there is nothing to do (see module docstring).

    Waits at most ``stale_after_s + heartbeat_s`` for a running job to finish or go stale.

    Raises:
        NotFoundError: no such job.
    """
    name = worker or worker_name()
    deadline = time.monotonic() + settings.stale_after_s + 2 * settings.heartbeat_s
    while True:
        if registry.claim_job(job_id, name):
            return _Claim(job_id, name)
        job = registry.get_job(job_id)
        if job.status in TERMINAL_JOB_STATUSES:
            logger.info("job %s is already %s: duplicate delivery, nothing to do", job_id, job.status)
            return None
        if job.status == "running" and _take_over_stale(registry, job_id, name, settings.stale_after_s):
            logger.warning("job %s: took over from %s, whose heartbeat stopped", job_id, job.worker)
            return _Claim(job_id, name)
        if time.monotonic() > deadline:
            logger.info("job %s is still running on %s: duplicate delivery, nothing to do", job_id, job.worker)
            return None
        time.sleep(min(settings.heartbeat_s, 1.0))


# Running -------------------------------------------------------------------------------------


class _JobProgress:
    """The ``progress`` and ``should_cancel`` callbacks of one job: row writes (throttled),
    Celery state, cancellation reads. Database hiccups here are logged, not raised: training
    goes on, and the heartbeat thread or the final registration notices a lasting outage."""

    def __init__(self, registry: Registry, claim: _Claim, report_state: StateReporter | None) -> None:
        self.registry = registry
        self.claim = claim
        self.report_state = report_state
        self.cancel_requested = False
        self._last_write = 0.0
        self._last_stage: tuple[str, int] | None = None
        self._last_poll = 0.0

    def __call__(self, stage: str, iteration: int, step: int, total: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if (stage, iteration) == self._last_stage and step < total and now - self._last_write < PROGRESS_INTERVAL_S:
            return
        self._last_stage, self._last_write = (stage, iteration), now
        snapshot = {
            "stage": stage,
            "iteration": iteration,
            "step": step,
            "total": total,
            "metrics": _json_safe(metrics),
            "heartbeat": utcnow().isoformat(),
        }
        try:
            self.cancel_requested = self.registry.update_progress(self.claim.job_id, snapshot) or self.cancel_requested
            self._last_poll = now
        except JobError:  # the row left `running` under us: someone else owns or ended it
            self.claim.lost.set()
        except Exception as exc:
            logger.warning("job %s: progress not recorded: %s", self.claim.job_id, exc)
        if self.report_state is not None:
            try:
                self.report_state({"job_id": self.claim.job_id, **snapshot})
            except Exception as exc:
                logger.warning("job %s: Celery state not updated: %s", self.claim.job_id, exc)

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self.cancel_requested and now - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = now
            try:
                self.cancel_requested = self.registry.get_job(self.claim.job_id).cancel_requested
            except Exception as exc:
                logger.warning("job %s: cancellation flag not read: %s", self.claim.job_id, exc)
        return self.cancel_requested or self.claim.lost.is_set()


class _HeartbeatThread(threading.Thread):
    """Refreshes the row's heartbeat every ``interval_s`` while the job trains, also through
    stages that report no progress for a while (loading a model, a long fit epoch)."""

    def __init__(self, registry: Registry, claim: _Claim, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{claim.job_id[:8]}", daemon=True)
        self.registry, self.claim, self.interval_s = registry, claim, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                if not _heartbeat(self.registry, self.claim):
                    return
            except Exception as exc:
                logger.warning("job %s: heartbeat failed: %s", self.claim.job_id, exc)


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (the registry stores strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _register(registry: Registry, job_id: str, objective: str, result: TrainingResult) -> int:
    """Register the final iteration's head for ``job_id`` (idempotent); returns the version id."""
    final = result.final
    info = registry.register_version(
        objective,
        final.artifact_path,
        base_model_id=result.base_model_id,
        tokenizer_fingerprint=result.tokenizer_fingerprint,
        architecture={"architecture": result.architecture},
        iteration=final.iteration,
        training_params=_json_safe(result.params),
        metrics=_json_safe(
            {**final.metrics, "iterations": [{"iteration": it.iteration, **it.metrics} for it in result.iterations]}
        ),
        normalization={"mean": final.reward_mean, "std": final.reward_std},
        training_job_id=job_id,
    )
    return info.id


def _finish(
    registry: Registry, job_id: str, status: str, error: str | None = None, version_id: int | None = None
) -> str:
    """Record the job's end; a job that some other delivery already finished is left as it is."""
    try:
        return registry.finish_job(job_id, status, error=error, result_version_id=version_id).status
    except JobError:
        return registry.get_job(job_id).status


def run_job(
    job_id: str,
    *,
    report_state: StateReporter | None = None,
    settings: WorkerSettings | None = None,
    registry: Registry | None = None,
    worker: str | None = None,
) -> dict[str, Any]:
    """Run one delivery of the job ``job_id`` (see the module docstring); the same code runs in
    Celery workers and in-process.

    Returns:
        ``{"job_id", "status", "version_id"}``; status ``duplicate`` when this delivery did no work.

    Raises:
        NotFoundError: no such job.
        Exception: a transient infrastructure error (`is_transient`); the claim was released,
            and the caller retries. Training failures are not raised: they fail the job.
    """
    from mavis_lc.training import train_objective

    worker_settings = settings if settings is not None else WorkerSettings()
    owned_registry = registry is None
    registry = registry if registry is not None else Registry()
    try:
        claimed = claim(registry, job_id, worker_settings, worker)
        if claimed is None:
            return {"job_id": job_id, "status": "duplicate", "version_id": None}
        job = registry.get_job(job_id)
        if job.attempt > worker_settings.max_attempts:
            status = _finish(registry, job_id, "failed", f"gave up after {job.attempt - 1} attempts (worker lost)")
            return {"job_id": job_id, "status": status, "version_id": None}
        progress = _JobProgress(registry, claimed, report_state)
        heartbeat = _HeartbeatThread(registry, claimed, worker_settings.heartbeat_s)
        heartbeat.start()
        workdir = job_workdir(job_id)
        try:
            config = training_config(job.config)
            result = train_objective(config, progress=progress, should_cancel=progress.should_cancel, workdir=workdir)
            if claimed.lost.is_set():
                return {"job_id": job_id, "status": "duplicate", "version_id": None}
            if progress.cancel_requested or registry.get_job(job_id).cancel_requested:
                raise TrainingCancelled(f"job {job_id} was cancelled after its last stage")
            version_id = _register(registry, job_id, job.objective, result)
            status = _finish(registry, job_id, "succeeded", version_id=version_id)
            shutil.rmtree(workdir, ignore_errors=True)
            return {"job_id": job_id, "status": status, "version_id": version_id}
        except KeyboardInterrupt:  # Ctrl-C in an in-process run: the job ends cancelled, not running forever
            _finish(registry, job_id, "cancelled", "interrupted (KeyboardInterrupt)")
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        except TrainingCancelled as exc:
            if claimed.lost.is_set() and not progress.cancel_requested:
                return {"job_id": job_id, "status": "duplicate", "version_id": None}
            status = _finish(registry, job_id, "cancelled", str(exc))
            shutil.rmtree(workdir, ignore_errors=True)
            return {"job_id": job_id, "status": status, "version_id": None}
        except Exception as exc:
            if is_transient(exc):
                _release(registry, claimed)
                raise
            if isinstance(exc, SoftTimeLimitExceeded) or isinstance(exc.__cause__, SoftTimeLimitExceeded):
                message = f"soft time limit of {worker_settings.soft_time_limit_s} s exceeded"
            elif isinstance(exc, MavisError):
                message = f"{type(exc).__name__}: {exc}"
            else:
                logger.exception("job %s failed", job_id)
                message = f"{type(exc).__name__}: {exc}"
            status = _finish(registry, job_id, "failed", message)
            return {"job_id": job_id, "status": status, "version_id": None}
        finally:
            heartbeat.stopped.set()
    finally:
        if owned_registry:
            registry.close()


def sample_shard(job_id: str, first_prompt: int, end_prompt: int, registry: Registry | None = None) -> dict[str, Any]:
    """Sample the iteration-0 trees of prompts ``[first_prompt, end_prompt)`` of the job and put
    them in the artifact store. Returns ``{"uri", "sha256", "first_prompt"}``, or ``{}`` when
    the job is no longer queued (cancelled or finished)."""
    from mavis_lc.training import format_prompts, load_prompts, sample_trees

    owned_registry = registry is None
    registry = registry if registry is not None else Registry()
    try:
        job = registry.get_job(job_id)
        if job.status != "queued":
            return {}
        config = training_config(job.config)
        if config.prompts is None:
            raise ConfigurationError("TrainingConfig.prompts is required")
        base = config.load_base()
        prompts = format_prompts(base.tokenizer, load_prompts(config.prompts, config.max_prompts), config.chat_template)
        rollouts = sample_trees(base, prompts[first_prompt:end_prompt], config, first_prompt=first_prompt)
        stored = registry.store.put(rollouts.to_bytes())
        return {"uri": stored.uri, "sha256": stored.sha256, "first_prompt": first_prompt}
    finally:
        if owned_registry:
            registry.close()


def merge_shards(job_id: str, shards: Sequence[Mapping[str, Any]], registry: Registry | None = None) -> None:
    """Merge the shard rollouts of ``sample_shard`` into the iteration-0 rollout file
    `train_objective` will start from, then delete the shards from the store."""
    from mavis_lc.training import TreeRollouts, format_prompts, load_prompts, merge_rollouts, rollout_cache_path

    owned_registry = registry is None
    registry = registry if registry is not None else Registry()
    try:
        parts = [shard for shard in shards if shard]
        job = registry.get_job(job_id)
        if not parts or job.status != "queued":
            return
        config = training_config(job.config)
        base = config.load_base()
        prompts = format_prompts(
            base.tokenizer, load_prompts(config.prompts or [], config.max_prompts), config.chat_template
        )
        merged = merge_rollouts([TreeRollouts.load(registry.store.fetch(p["uri"], p["sha256"])) for p in parts])
        if merged.first_prompt != 0 or len(merged.prompts) != len(prompts):
            raise ConfigurationError(
                f"shards cover {len(merged.prompts)} prompts from {merged.first_prompt}, not all {len(prompts)}"
            )
        merged.save(rollout_cache_path(config, base, prompts))
        for part in parts:
            registry.store.delete(part["uri"])
    finally:
        if owned_registry:
            registry.close()


# Celery tasks --------------------------------------------------------------------------------


def fail_queued_job(job_id: str, error: str) -> dict[str, Any]:
    """Fail a job that never started (a sharded job whose rollouts failed)."""
    with Registry() as registry:
        return {"job_id": job_id, "status": _finish(registry, job_id, "failed", error), "version_id": None}
