"""train_objective end to end on a tiny model: iterations, artifacts, resume, cancel, failures."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from mavis_lc.base_model import load_base_model
from mavis_lc.errors import ConfigurationError, RewardError, TrainingCancelled
from mavis_lc.training import TrainingConfig, first_human_turn, load_prompts, train_objective
from mavis_lc.value_models import SharedBackboneQHead, load_value_model, read_head_config

PROMPTS = ["I love cats", "awful rain", "Tell me a story", "Numbers 1 2", "Hi there", "sunny days"]


def length_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return [len(r) / 10 for r in responses]


def nan_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return [math.nan for _ in responses]


@pytest.fixture
def config(tiny_model_dir: Path, tmp_path: Path) -> TrainingConfig:
    return TrainingConfig(
        objective=f"{__name__}:length_reward", base_model=str(tiny_model_dir), prompts=PROMPTS, device="cpu",
        k_root=2, k_children=2, n_layers=2, segment_min_tokens=2, segment_max_tokens=4, top_k=10,
        rollout_prompts_per_batch=3, epochs=3, fit_batch_size=32, val_fraction=0.34,
        rollout_cache_dir=str(tmp_path / "rollouts"),
    )  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int, dict[str, float]]] = []

    def __call__(self, stage: str, iteration: int, step: int, total: int, metrics: dict[str, float]) -> None:
        self.calls.append((stage, iteration, step, total, metrics))

    def resumed(self) -> set[tuple[str, int]]:
        return {(stage, it) for stage, it, _, _, metrics in self.calls if metrics.get("resumed")}


def test_two_iterations_produce_loadable_heads(config: TrainingConfig, tmp_path: Path) -> None:
    progress = Recorder()
    result = train_objective(config, progress=progress, workdir=tmp_path / "job")
    assert [it.iteration for it in result.iterations] == [0, 1]
    base = load_base_model(config.base_model, device="cpu", dtype="float32")
    for it in result.iterations:
        head_config, _ = read_head_config(it.read_bytes())
        assert head_config.iteration == it.iteration and head_config.objective == "length_reward"
        assert (head_config.reward_mean, head_config.reward_std) == (it.reward_mean, it.reward_std)
        assert isinstance(load_value_model(it.artifact_path, base), SharedBackboneQHead)
        assert {"val_mse", "r2", "spearman", "mean_reward", "mean_kl", "rollout_tokens"} <= set(it.metrics)
    # Normalisation is fixed by iteration 0 and reused.
    assert result.iterations[0].reward_mean == result.iterations[1].reward_mean
    assert result.final.sha256 != result.iterations[0].sha256
    assert {stage for stage, *_ in progress.calls} == {"rollouts", "rewards", "fit"}
    assert not progress.resumed()
    # Iteration 1 samples from MAVIS(pi_ref, head 0): its log-ratios are no longer those of top-k alone.
    assert result.iterations[1].metrics["mean_kl"] != result.iterations[0].metrics["mean_kl"]
    assert result.iterations[0].metrics["mean_kl_topk"] == pytest.approx(0.0, abs=1e-4)
    assert result.iterations[1].metrics["mean_kl_topk"] > 0
    assert result.iterations[0].metrics["mean_kl"] > 0  # the top-k cut alone
    # The version records the rollout beta and the zeta it implies.
    assert (result.params["beta"], result.params["zeta"]) == (4.0, 0.25)  # the default decoding beta
    assert json.loads((tmp_path / "job" / "targets-1.json").read_text())["zeta"] == 0.25
    assert json.loads((tmp_path / "job" / "targets-0.json").read_text())["zeta"] == 0.0


def test_zeta_defaults_to_one_over_beta() -> None:
    assert TrainingConfig(beta=4.0).effective_zeta == 0.25
    assert TrainingConfig(beta=4.0, zeta=0.1).effective_zeta == 0.1
    assert TrainingConfig(beta=4.0).to_dict()["zeta"] == 0.25
    with pytest.raises(ConfigurationError, match=r"beta 0\.0 leaves zeta = 1/beta undefined"):
        TrainingConfig(beta=0.0, n_iterations=2).validate()
    TrainingConfig(beta=0.0, n_iterations=1).validate()
    TrainingConfig(beta=0.0, zeta=0.5, n_iterations=2).validate()


def test_rerun_resumes_and_other_objectives_reuse_iteration_0_rollouts(config: TrainingConfig, tmp_path: Path) -> None:
    first = train_objective(config, workdir=tmp_path / "job")
    (tmp_path / "job" / "head-1.safetensors").unlink()  # as if the run died during the last fit
    progress = Recorder()
    again = train_objective(config, progress=progress, workdir=tmp_path / "job")
    assert progress.resumed() == {("rollouts", 0), ("rewards", 0), ("fit", 0), ("rollouts", 1), ("rewards", 1)}
    assert [it.sha256 for it in again.iterations] == [it.sha256 for it in first.iterations]
    other = Recorder()
    train_objective(replace(config, objective="positivity", n_iterations=1), progress=other)
    assert other.resumed() == {("rollouts", 0)}


def test_cancel_stops_before_writing_a_head(config: TrainingConfig, tmp_path: Path) -> None:
    polls = iter(range(1000))
    with pytest.raises(TrainingCancelled):
        train_objective(config, should_cancel=lambda: next(polls) >= 3, workdir=tmp_path / "job")
    assert not list((tmp_path / "job").glob("head-*")) and not list((tmp_path / "job").glob("*.tmp"))


def test_a_failing_reward_names_the_objective_and_leaves_no_targets(config: TrainingConfig, tmp_path: Path) -> None:
    broken = replace(config, objective=f"{__name__}:nan_reward")
    with pytest.raises(RewardError, match="nan_reward"):
        train_objective(broken, workdir=tmp_path / "job")
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["run.json"]


def test_separate_backbone_training(config: TrainingConfig, tmp_path: Path) -> None:
    result = train_objective(
        replace(config, architecture="separate_backbone", backbone_layers=1, value_mode="scalar", n_fits=1),
        workdir=tmp_path / "job",
    )
    head_config, _ = read_head_config(result.final.read_bytes())
    assert head_config.architecture == "separate_backbone" and head_config.options["mode"] == "scalar"
    assert math.isfinite(result.final.metrics["val_mse"])


def test_prompt_sources(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert load_prompts(jsonl) == ["a", "b"]
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\nthird\n")
    assert load_prompts(text, limit=2) == ["first", "second"]
    hh = tmp_path / "hh.jsonl.gz"
    dialogue = "\n\nHuman: How do I bake bread?\n\nAssistant: Like this.\n\nHuman: More?\n\nAssistant: No."
    with gzip.open(hh, "wt") as handle:
        handle.write(json.dumps({"chosen": dialogue, "rejected": dialogue}) + "\n")
    assert load_prompts(hh) == ["How do I bake bread?"]
    assert first_human_turn("\n\nHuman: hi") == "hi"


def test_prompts_are_unique_by_text_before_the_limit(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("a\nb\na\nc\nb\nd\n")
    assert load_prompts(text, limit=3) == ["a", "b", "c"]  # the repeated "a" does not take a place
    assert load_prompts(text) == ["a", "b", "c", "d"]
    assert load_prompts(text, unique=False) == ["a", "b", "a", "c", "b", "d"]
