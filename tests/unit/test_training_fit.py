"""Fitting value models: every trainable parameter moves, the loss drops, validation is by prompt."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.errors import ConfigurationError, TrainingCancelled
from mavis_lc.training import (
    TrainingConfig,
    compute_targets,
    fit_shared_head,
    fit_shared_head_averaged,
    format_prompts,
    regression_metrics,
    sample_trees,
    split_prompts,
)
from mavis_lc.training.fit import listwise_cross_entropy
from mavis_lc.training.metrics import sibling_groups
from mavis_lc.training.rollouts import TreeRollouts
from mavis_lc.value_models import new_shared_head

CONFIG = TrainingConfig(
    k_root=2, k_children=2, n_layers=2, segment_min_tokens=2, segment_max_tokens=4, top_k=10,
    rollout_prompts_per_batch=4, epochs=8, fit_batch_size=16, learning_rate=1e-2, val_fraction=0.25, patience=8,
    expand_top_m=0, leaf_completion_tokens=0, n_fits=1, bias_learning_rate=3e-3,
)  # fmt: skip
TEXTS = ["I love cats", "awful rain", "Tell me", "Numbers 1 2", "Hi there", "sunny days", "bad news", "fox"]


@pytest.fixture
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")


def tree_data(base: BaseModel) -> tuple[TreeRollouts, torch.Tensor]:
    """Rollouts and targets whose reward depends on the tokens, so there is something to learn."""
    rollouts = sample_trees(base, format_prompts(base.tokenizer, TEXTS), CONFIG)
    leaves = rollouts.leaves()
    reward = torch.full((rollouts.n_nodes,), float("nan"), dtype=torch.float64)
    for leaf in leaves.tolist():
        reward[leaf] = sum(t % 7 for t in rollouts.response_tokens(leaf)) / 10
    targets = compute_targets(rollouts, reward, reward_mean=float(reward[leaves].mean()), reward_std=1.0, zeta=0.0)
    return rollouts, targets.token_target


@pytest.mark.parametrize("prompt_query", [False, True])
def test_fit_changes_every_trainable_parameter_and_lowers_the_loss(base: BaseModel, prompt_query: bool) -> None:
    rollouts, target = tree_data(base)
    head = new_shared_head(base, "obj", options={"prompt_query": True} if prompt_query else {})
    assert (head.prompt_proj is not None) == prompt_query
    before = {name: p.detach().clone() for name, p in head.named_parameters() if p.requires_grad}
    result = fit_shared_head(head, rollouts, target, CONFIG)
    for name, p in head.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.metrics["val_mse"] < float(target.double().var()) * 2
    assert {"val_mse", "r2", "spearman", "n_train", "n_val", "best_epoch"} <= set(result.metrics)
    assert result.metrics["n_train"] + result.metrics["n_val"] == rollouts.tokens.numel()


def test_fit_keeps_the_best_epoch_and_stops_early(base: BaseModel) -> None:
    rollouts, target = tree_data(base)
    head = new_shared_head(base, "obj")
    # A huge learning rate makes validation worse after the first epochs: training must stop
    # after `patience` stale epochs and restore the best weights.
    config = replace(CONFIG, learning_rate=3.0, epochs=30, patience=2)
    result = fit_shared_head(head, rollouts, target, config)
    best = int(result.metrics["best_epoch"])
    assert len(result.history) <= best + 2
    assert result.metrics["val_mse"] == pytest.approx(result.history[best - 1]["val_mse"], rel=1e-5)


def test_a_warm_start_that_no_epoch_beats_is_kept(base: BaseModel) -> None:
    rollouts, target = tree_data(base)
    head = new_shared_head(base, "obj")
    fit_shared_head(head, rollouts, target, replace(CONFIG, selection_metric="val_mse"))
    warm = {name: p.detach().clone() for name, p in head.named_parameters()}
    # A learning rate that only makes things worse: every epoch loses to the warm start (epoch 0).
    result = fit_shared_head(head, rollouts, target, replace(CONFIG, learning_rate=30.0, selection_metric="val_mse"))
    assert result.metrics["best_epoch"] == 0
    assert all(torch.equal(p, warm[name]) for name, p in head.named_parameters())


@pytest.mark.parametrize(("metric", "better"), [("within_prompt_r2", max), ("sibling_corr", max), ("val_mse", min)])
def test_fit_selects_the_epoch_best_on_the_selection_metric(base: BaseModel, metric: str, better: Any) -> None:
    rollouts, target = tree_data(base)
    config = replace(CONFIG, learning_rate=0.3, epochs=6, patience=6, selection_metric=metric)
    result = fit_shared_head(new_shared_head(base, "obj"), rollouts, target, config)
    values = [row[metric] for row in result.history]
    assert result.metrics[metric] == better(values)
    assert result.metrics["best_epoch"] == values.index(better(values)) + 1
    assert {"within_prompt_r2", "sibling_corr", "sibling_sign_agreement", "sibling_noise_ceiling"} <= set(
        result.metrics
    )
    assert result.metrics["sibling_pairs"] > 0


@pytest.mark.parametrize(
    ("term", "weight", "ratio"), [("sibling_loss_weight", 20.0, 0.75), ("listwise_loss_weight", 20.0, 0.9)]
)
def test_state_terms_teach_the_differences_between_sibling_actions(
    base: BaseModel, term: str, weight: float, ratio: float
) -> None:
    rollouts, target = tree_data(base)
    groups = sibling_groups(rollouts, torch.ones(len(rollouts.prompts), dtype=torch.bool))  # (G, C)
    real = groups >= 0

    def centred_error(q: torch.Tensor) -> float:
        """Mean squared error of Q against the targets, both centred over each state's siblings."""
        diff = (q - target)[groups.clamp(min=0)] * real  # (G, C)
        centred = (diff - diff.sum(1, keepdim=True) / real.sum(1, keepdim=True)) * real
        return float(centred.square().sum() / real.sum())

    config = replace(CONFIG, learning_rate=1e-2, epochs=8, patience=8, val_fraction=0.0, selection_metric="val_mse")

    def listwise(q: torch.Tensor) -> float:
        """The listwise cross-entropy over the same states."""
        index = groups.clamp(min=0)
        prior = (rollouts.log_prob - rollouts.log_ratio_topk)[index]
        return float(listwise_cross_entropy(q[index], target[index], prior, real, config.beta))

    errors, cross_entropy = {}, {}
    for w in (0.0, weight):
        head = new_shared_head(base, "obj")
        fit_shared_head(head, rollouts, target, replace(config, **{term: w}))
        with torch.no_grad():
            q = head.q_values(rollouts.hidden, rollouts.tokens[:, None]).squeeze(1)
        errors[w], cross_entropy[w] = centred_error(q), listwise(q)
    assert errors[weight] < ratio * errors[0.0]
    if term == "listwise_loss_weight":
        assert cross_entropy[weight] < cross_entropy[0.0]
    with pytest.raises(ConfigurationError, match=rf"{term} 1\.0 needs architecture shared_q_head"):
        replace(CONFIG, architecture="separate_backbone", **{term: 1.0}).validate()


def test_listwise_cross_entropy_by_hand_and_its_invariances() -> None:
    prior = torch.tensor([[0.5, 0.3, 0.2]]).log()  # (1, 3) log pi_ref^k; the third action is padding
    real = torch.tensor([[True, True, False]])
    target = torch.tensor([[1.0, 0.0, 9.0]])
    q = torch.tensor([[0.0, 1.0, -9.0]], requires_grad=True)
    loss = listwise_cross_entropy(q, target, prior, real, beta=2.0)
    wanted = torch.softmax(torch.tensor([math.log(0.5) + 2.0, math.log(0.3)]), dim=0)
    given = torch.log_softmax(torch.tensor([math.log(0.5), math.log(0.3) + 2.0]), dim=0)
    assert float(loss) == pytest.approx(float(-(wanted * given).sum()), rel=1e-6)
    # A per-state offset of Q changes nothing; Q = target + c is the minimum.
    shifted = listwise_cross_entropy(q.detach() + 5.0, target, prior, real, beta=2.0)
    assert float(shifted) == pytest.approx(float(loss), rel=1e-6)
    best = (target + 3.0).requires_grad_(True)
    listwise_cross_entropy(best, target, prior, real, beta=2.0).backward()
    assert best.grad is not None and float(best.grad.abs().max()) < 1e-6


def test_selection_metric_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="selection_metric 'r3' is not allowed; allowed: within_prompt_r2"):
        replace(CONFIG, selection_metric="r3").validate()


def test_fit_polls_cancellation(base: BaseModel) -> None:
    rollouts, target = tree_data(base)
    with pytest.raises(TrainingCancelled):
        fit_shared_head(new_shared_head(base, "obj"), rollouts, target, CONFIG, should_cancel=lambda: True)


def test_split_is_by_prompt_and_deterministic() -> None:
    split = split_prompts(20, 0.25, seed=3)
    assert sum(split) == 5 and split == split_prompts(20, 0.25, seed=3)
    assert split != split_prompts(20, 0.25, seed=4)
    assert sum(split_prompts(3, 0.1, seed=0)) == 1  # at least one held out
    assert sum(split_prompts(1, 0.5, seed=0)) == 0  # never all of them
    assert sum(split_prompts(10, 0.0, seed=0)) == 0


def test_regression_metrics_on_known_values() -> None:
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    exact = regression_metrics(target, target)
    assert exact == {"mse": 0.0, "r2": 1.0, "spearman": pytest.approx(1.0)}
    shifted = regression_metrics(torch.tensor([2.0, 3.0, 4.0, 5.0]), target)
    assert shifted["mse"] == 1.0 and shifted["r2"] == pytest.approx(1 - 1 / 1.25)
    assert shifted["spearman"] == pytest.approx(1.0)
    assert regression_metrics(-target, target)["spearman"] == pytest.approx(-1.0)


def test_averaged_fit_is_the_mean_of_fits_with_successive_seeds(base: BaseModel) -> None:
    rollouts, target = tree_data(base)
    config = replace(CONFIG, n_fits=3, seed=5)
    singles = []
    for i in range(3):
        head = new_shared_head(base, "obj")
        fit_shared_head(head, rollouts, target, replace(config, n_fits=1, seed=5 + i))
        singles.append(head.state_dict())
    averaged = new_shared_head(base, "obj")
    ticks: list[tuple[int, int]] = []
    result = fit_shared_head_averaged(averaged, rollouts, target, config, progress=lambda e, n, m: ticks.append((e, n)))
    for name, value in averaged.state_dict().items():
        torch.testing.assert_close(value, torch.stack([s[name] for s in singles]).mean(0))
    assert not torch.equal(singles[0]["token_bias"], singles[1]["token_bias"])  # the fits differ
    assert result.metrics["n_fits"] == 3.0
    assert [n for _, n in ticks] == [3 * CONFIG.epochs] * len(ticks)
    assert [e for e, _ in ticks] == sorted(e for e, _ in ticks)  # one running count over the fits


def test_n_fits_needs_the_shared_head() -> None:
    with pytest.raises(ConfigurationError, match="n_fits 2 needs architecture shared_q_head"):
        replace(CONFIG, n_fits=2, architecture="separate_backbone").validate()
    with pytest.raises(ConfigurationError, match="n_fits must be an integer >= 1, got 0"):
        replace(CONFIG, n_fits=0).validate()
