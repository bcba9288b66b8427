"""Training jobs without a broker: the same task code runs in-process (SQLite, tiny model)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from mavis_lc.cli import app
from mavis_lc.errors import ConfigurationError, JobError, TrainingError
from mavis_lc.jobs import cancel, job_status, submit_training, wait
from mavis_lc.registry import Registry
from mavis_lc.registry.db import session_factory
from mavis_lc.registry.models import TrainingJob, utcnow
from worker.app import WorkerSettings, celery_config
from worker.tasks import is_transient, job_workdir, run_job, shard_ranges

REWARD = "tests.rewards_for_tests:length_score"
PROMPTS = ["I love cats", "awful rain", "Tell me a story", "Numbers 1 2", "Hi there", "sunny days"]


@pytest.fixture
def config(tiny_model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    return dict(
        base_model=str(tiny_model_dir), prompts=PROMPTS, device="cpu", k_root=2, k_children=2, n_layers=2,
        segment_min_tokens=2, segment_max_tokens=4, top_k=10, rollout_prompts_per_batch=2, epochs=2,
        fit_batch_size=32, val_fraction=0.34, n_iterations=2, rollout_cache_dir=str(tmp_path / "rollouts"),
    )  # fmt: skip


def test_a_job_runs_in_process_reports_progress_and_registers_one_version(config: dict[str, Any]) -> None:
    snapshots: list[dict[str, Any]] = []
    job_id = submit_training(REWARD, config, on_progress=snapshots.append)
    job = job_status(job_id)
    assert job.status == "succeeded" and job.attempt == 1 and job.error is None
    assert {(s["stage"], s["iteration"]) for s in snapshots} == {
        (stage, it) for stage in ("rollouts", "rewards", "fit") for it in (0, 1)
    }
    assert job.progress["stage"] == "fit" and job.progress["iteration"] == 1 and "heartbeat" in job.progress
    with Registry() as registry:
        [version] = registry.list_versions("length_score")
        assert version.id == job.result_version_id and version.training_job_id == job_id
        assert version.iteration == 1 and len(version.metrics["iterations"]) == 2
        assert registry.fetch_artifact(version).is_file()
        # A second delivery of the finished job does nothing.
        assert run_job(job_id, registry=registry)["status"] == "duplicate"
        assert len(registry.list_versions("length_score")) == 1
    assert not job_workdir(job_id).exists()


def test_cancel_mid_job_registers_nothing(config: dict[str, Any]) -> None:
    seen: list[str] = []

    def cancel_during_fit(snapshot: dict[str, Any]) -> None:
        if snapshot["stage"] == "fit" and not seen:
            seen.append(cancel(snapshot["job_id"]).status)

    job_id = submit_training(REWARD, config, on_progress=cancel_during_fit)
    job = job_status(job_id)
    assert seen == ["running"] and job.status == "cancelled" and job.result_version_id is None
    with Registry() as registry:
        assert registry.list_objectives() == []


def test_a_training_error_fails_the_job_with_the_message(config: dict[str, Any]) -> None:
    job_id = submit_training("tests.rewards_for_tests:nan_score", config)
    job = wait(job_id, timeout_s=0)
    assert job.status == "failed" and "RewardError" in (job.error or "") and "nan_score" in (job.error or "")


def test_bad_options_are_refused_before_a_job_exists(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="unknown training option"):
        submit_training(REWARD, {**config, "epochz": 3})
    with pytest.raises(ConfigurationError, match="epochs"):
        submit_training(REWARD, {**config, "epochs": 0})
    with pytest.raises(JobError, match="no broker"):
        submit_training(REWARD, config, in_process=False)
    with pytest.raises(ConfigurationError, match=r"queue must be 1-64 letters.*got 'gpu queue'"):
        submit_training(REWARD, config, queue="gpu queue")
    with Registry() as registry:
        assert registry.list_jobs() == []


def test_sharded_rollouts_give_the_one_worker_result(config: dict[str, Any], tmp_path: Path) -> None:
    one = job_status(submit_training(REWARD, {**config, "rollout_cache_dir": str(tmp_path / "a")}))
    three = job_status(submit_training(REWARD, {**config, "rollout_cache_dir": str(tmp_path / "b")}, shards=3))
    with Registry() as registry:
        versions = {v.id: v for v in registry.list_versions("length_score")}
    assert versions[one.result_version_id].sha256 == versions[three.result_version_id].sha256  # type: ignore[index]
    assert shard_ranges(6, 2, 3) == [(0, 2), (2, 4), (4, 6)]
    assert shard_ranges(7, 2, 3) == [(0, 2), (2, 4), (4, 7)]
    assert shard_ranges(3, 2, 5) == [(0, 2), (2, 3)]


def test_a_delivery_waits_for_a_running_job_and_takes_it_over_once_its_heartbeat_stops(
    config: dict[str, Any],
) -> None:
    fast = WorkerSettings(heartbeat_s=0.1, stale_after_s=0.5)
    with Registry() as registry:
        # The other worker is alive and finishes the job while this delivery waits: nothing to do.
        job_id = registry.create_job("length_score", {**config, "objective": REWARD})
        assert registry.claim_job(job_id, "live-worker")
        threading.Timer(0.2, registry.finish_job, args=(job_id, "failed", "by the live worker")).start()
        assert run_job(job_id, registry=registry, settings=fast)["status"] == "duplicate"
        assert registry.get_job(job_id).error == "by the live worker"
        # The other worker died (its heartbeat is an hour old): this delivery takes the job over.
        job_id = registry.create_job("length_score", {**config, "objective": REWARD})
        assert registry.claim_job(job_id, "dead-worker")
        with session_factory(registry.engine).begin() as session:
            session.execute(
                update(TrainingJob).where(TrainingJob.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1))
            )
        outcome = run_job(job_id, registry=registry, settings=fast)
        job = registry.get_job(job_id)
    assert outcome["status"] == "succeeded" and job.attempt == 2 and job.worker != "dead-worker"


def test_transient_errors_are_retried_and_training_errors_are_not(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    assert is_transient(lost) and is_transient(TrainingError("wrapped")) is False
    wrapped = TrainingError("training failed")
    wrapped.__cause__ = lost
    assert is_transient(wrapped)

    def db_down(*args: Any, **kwargs: Any) -> None:
        raise lost

    with Registry() as registry:
        job_id = registry.create_job("length_score", {**config, "objective": REWARD})
        monkeypatch.setattr(Registry, "register_version", db_down)
        with pytest.raises(OperationalError):
            run_job(job_id, registry=registry)
        assert registry.get_job(job_id).status == "queued"  # released for the retry
        monkeypatch.undo()
        assert run_job(job_id, registry=registry)["status"] == "succeeded"  # resumes from checkpoints


def test_celery_settings_follow_the_production_rules() -> None:
    settings = WorkerSettings()
    settings.check()
    conf = celery_config(settings, "redis://localhost:6379/0", None)
    assert conf["task_acks_late"] and conf["task_track_started"]
    assert conf["worker_prefetch_multiplier"] == 1 and conf["worker_max_tasks_per_child"] == 1
    assert (
        conf["broker_transport_options"]["visibility_timeout"] > conf["task_time_limit"] > conf["task_soft_time_limit"]
    )
    assert conf["accept_content"] == ["json"] and conf["task_default_queue"] == "training"
    with pytest.raises(ConfigurationError, match="VISIBILITY"):
        WorkerSettings(visibility_timeout_s=60, time_limit_s=120, soft_time_limit_s=100).check()


def train_flags(config: dict[str, Any], tmp_path: Path) -> list[str]:
    """``mavis train`` flags for the tiny model, its settings and PROMPTS (written to a file)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    flags = ["--prompts", str(prompts)]
    for key in ("base_model", "device", "k_root", "k_children", "n_layers", "segment_max_tokens", "top_k", "epochs"):
        flags += [f"--{key.replace('_', '-')}", str(config[key])]
    return flags


def test_cli_train_in_process_then_jobs_list_show_cancel(config: dict[str, Any], tmp_path: Path) -> None:
    flags = [*train_flags(config, tmp_path), "--objective-options", '{"name": "wordy"}']
    runner = CliRunner()
    result = runner.invoke(app, ["train", REWARD, *flags, "--n-iterations", "1"])
    assert result.exit_code == 0, result.output
    assert "succeeded: registered wordy@1" in result.output
    assert runner.invoke(app, ["jobs", "list"]).exit_code == 0
    [listed] = [json.loads(line) for line in runner.invoke(app, ["jobs", "list", "--json"]).output.splitlines()]
    assert (listed["objective"], listed["status"]) == ("wordy", "succeeded")
    [job] = Registry().list_jobs()
    shown = json.loads(runner.invoke(app, ["jobs", "show", job.id]).output)
    assert shown["status"] == "succeeded" and shown["config"]["n_iterations"] == 1
    assert runner.invoke(app, ["jobs", "cancel", job.id]).output.strip().endswith("succeeded")
    assert runner.invoke(app, ["jobs", "show", "no-such-job"]).exit_code == 1
    assert runner.invoke(app, ["worker"]).exit_code == 1  # no broker configured


def test_cli_train_without_objective_options_uses_the_defaults(config: dict[str, Any], tmp_path: Path) -> None:
    flags = [*train_flags(config, tmp_path), "--n-iterations", "1", "--n-fits", "2"]
    result = CliRunner().invoke(app, ["train", REWARD, *flags])
    assert result.exit_code == 0, result.output
    [job] = Registry().list_jobs()
    assert job.config["objective_options"] == {} and job.config["n_fits"] == 2
    assert "succeeded: registered length_score@1" in result.output


def test_cli_train_prints_the_rollout_estimate_and_refuses_a_recipe_over_budget(
    config: dict[str, Any], tmp_path: Path
) -> None:
    flags = [*train_flags(config, tmp_path), "--n-iterations", "2"]  # iteration 1 is never cached
    runner = CliRunner()
    refused = runner.invoke(app, ["train", REWARD, *flags, "--budget-minutes", "0.000001"])
    assert refused.exit_code == 1
    assert "over --budget-minutes" in " ".join(refused.output.split())
    assert Registry().list_jobs() == []  # refused before any job exists
    result = runner.invoke(app, ["train", REWARD, *flags, "--budget-minutes", "60"])
    assert result.exit_code == 0, result.output
    assert "rollouts: at most" in result.output and "tok/s" in result.output and "wall time:" in result.output


def test_mavis_train_against_an_hf_reward_model_folder_then_decode_with_it(
    config: dict[str, Any], tmp_path: Path
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from mavis_lc import ChatMavis
    from tests.tiny import build_tokenizer

    folder = tmp_path / "reward-model"
    tokenizer = build_tokenizer()
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
            id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1}, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    flags = [*train_flags(config, tmp_path), "--objective-options", '{"label": "good", "name": "goodness"}']
    result = CliRunner().invoke(app, ["train", f"hf:{folder}", *flags, "--n-iterations", "1"])
    assert result.exit_code == 0, result.output
    assert "succeeded: registered goodness@1" in result.output
    with Registry() as registry:
        [version] = registry.list_versions("goodness")
        assert version.normalization["std"] > 0  # rewards were scored: the leaves' spread
    chat = ChatMavis(base_model=config["base_model"], heads=["goodness"], max_tokens=6, seed=0, beta=4.0)
    message = chat.invoke("Tell me a story", weights={"goodness": 1.0})
    assert message.response_metadata["heads"][0]["objective"] == "goodness"
    assert message.response_metadata["heads"][0]["version"] == 1
    assert message.response_metadata["mean_tilt"]["goodness"] != 0.0  # the head steers


def test_ctrl_c_in_an_in_process_run_marks_the_job_cancelled(config: dict[str, Any], tmp_path: Path) -> None:
    def interrupt(snapshot: dict[str, Any]) -> None:
        if snapshot["stage"] == "rewards":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        submit_training(REWARD, config, on_progress=interrupt)
    [job] = Registry().list_jobs()
    assert job.status == "cancelled" and "KeyboardInterrupt" in (job.error or "")
    assert not job_workdir(job.id).exists()


def test_cli_exit_codes_say_how_the_job_ended(config: dict[str, Any], tmp_path: Path) -> None:
    from mavis_lc.cli.common import EXIT_FAILED

    runner = CliRunner()
    failed = runner.invoke(app, ["train", "tests.rewards_for_tests:nan_score", *train_flags(config, tmp_path)])
    assert failed.exit_code == EXIT_FAILED == 3, failed.output
    assert "failed" in failed.output


def test_retry_submits_a_failed_job_again_and_refuses_a_succeeded_one(config: dict[str, Any]) -> None:
    from mavis_lc.jobs import retry

    failed = submit_training("tests.rewards_for_tests:nan_score", config)
    again = retry(failed)
    assert again != failed
    old, new = job_status(failed), job_status(again)
    assert new.config == old.config and new.objective == old.objective and new.status == "failed"  # same reward
    good = submit_training(REWARD, config)
    with pytest.raises(JobError, match="is succeeded; only a failed or cancelled job"):
        retry(good)
    assert CliRunner().invoke(app, ["jobs", "retry", good]).exit_code == 1


def test_reap_fails_running_jobs_without_a_heartbeat_and_only_those(config: dict[str, Any]) -> None:
    from mavis_lc.jobs import reap

    with Registry() as registry:
        lost = registry.create_job("length_score", {"objective": REWARD, **config})
        alive = registry.create_job("length_score", {"objective": REWARD, **config})
        with session_factory(registry.engine).begin() as session:
            for job_id, age in ((lost, timedelta(hours=1)), (alive, timedelta(seconds=1))):
                session.execute(
                    update(TrainingJob)
                    .where(TrainingJob.id == job_id)
                    .values(status="running", worker="w@gone", heartbeat_at=utcnow() - age)
                )
        assert [j.id for j in reap(stale_after_s=600, dry_run=True)] == [lost]
        assert job_status(lost).status == "running"  # a dry run changes nothing
        listed = CliRunner().invoke(app, ["jobs", "reap", "--stale-after-s", "600", "--json"])
        assert listed.exit_code == 0 and [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [lost]
        job = job_status(lost)
        assert job.status == "failed" and "no heartbeat for more than 600 s" in (job.error or "")
        assert job_status(alive).status == "running"
        assert reap(stale_after_s=600) == []
