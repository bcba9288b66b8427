"""Dense prefix-reward labels and the Φ-part + residual fit, on the tiny model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.errors import ConfigurationError
from mavis_lc.objectives import CallableObjective, Objective
from mavis_lc.training import TrainingConfig, train_objective
from mavis_lc.training.dense import DenseLabels, fit_dense, fit_phi, label_states, select_states
from mavis_lc.training.fit import _param_groups
from mavis_lc.training.rollouts import TreeRollouts, sample_trees
from mavis_lc.training.targets import TreeTargets, compute_targets, reward_stats, score_leaves
from mavis_lc.value_models import new_shared_head

PROMPTS = ["I love cats", "awful rain", "Tell me a story", "Numbers 1 2", "Hi there", "sunny days"]


def vowel_share(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """A prefix-scorable reward: the number of vowels in the response, divided by 10."""
    return [sum(c in "aeiou" for c in r) / 10 for r in responses]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def config(tiny_model_dir: Path, tmp_path: Path) -> TrainingConfig:
    return TrainingConfig(
        objective=f"{__name__}:vowel_share", objective_options={"prefix_scoring": True},
        base_model=str(tiny_model_dir), prompts=PROMPTS, device="cpu",
        k_root=2, k_children=2, n_layers=2, segment_min_tokens=2, segment_max_tokens=4, top_k=10,
        leaf_completion_tokens=12, rollout_prompts_per_batch=3, epochs=6, fit_batch_size=64, val_fraction=0.34,
        rollout_cache_dir=str(tmp_path / "rollouts"), n_fits=2,
    )  # fmt: skip


@pytest.fixture
def rollouts(base: BaseModel, config: TrainingConfig) -> TreeRollouts:
    prompts = [
        str(base.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False)) for p in PROMPTS
    ]
    return sample_trees(base, prompts, config)


def objective() -> Objective:
    return CallableObjective(f"{__name__}:vowel_share", prefix_scoring=True)


def labelled(
    base: BaseModel, config: TrainingConfig, rollouts: TreeRollouts
) -> tuple[DenseLabels, TreeTargets, float, float]:
    """The trees' dense labels, their iteration-0 targets and the reward statistics."""
    labels = label_states(rollouts, objective(), base, prompts=PROMPTS, config=config)
    leaf_reward = score_leaves(rollouts, objective(), base.tokenizer, prompts=PROMPTS)
    mean, std = reward_stats(leaf_reward)
    return labels, compute_targets(rollouts, leaf_reward, reward_mean=mean, reward_std=std, zeta=0.0), mean, std


def test_every_candidate_is_labelled_with_the_prefix_reward(
    base: BaseModel, config: TrainingConfig, rollouts: TreeRollouts
) -> None:
    labels = label_states(rollouts, objective(), base, prompts=PROMPTS, config=config)
    tokens = rollouts.tokens.numel()
    assert labels.token_index.tolist() == list(range(tokens))  # all states (fewer than dense_max_states)
    assert labels.candidates.shape == labels.phi.shape == labels.ref_log_prob.shape == (tokens, config.top_k)
    assert labels.reward_calls == tokens * config.top_k
    assert torch.allclose(labels.ref_log_prob.exp().sum(1), torch.ones(tokens), atol=1e-5)  # pi_ref^k
    token_node = rollouts.token_node()
    eos = base.eos_token_ids
    for t in (0, tokens // 3, tokens - 1):
        node = int(token_node[t])
        # The candidates are the base's top-k at the state the rollout token was sampled in.
        logits = base.logits(rollouts.hidden[t])
        parent = int(rollouts.node_parent[node])
        prefix = (rollouts.response_tokens(parent) if parent >= 0 else []) + rollouts.tokens[
            int(rollouts.node_start[node]) : t
        ].tolist()
        if not prefix:  # EOS is banned before the first response token, as in the rollouts
            logits[eos] = float("-inf")
        assert set(labels.candidates[t].tolist()) == set(logits.topk(config.top_k).indices.tolist())
        assert int(rollouts.tokens[t]) in labels.candidates[t].tolist()  # the token taken was a candidate
        for j, a in enumerate(labels.candidates[t].tolist()):
            text = base.tokenizer.decode(prefix if a in eos else [*prefix, a], skip_special_tokens=True)
            assert float(labels.phi[t, j]) == pytest.approx(vowel_share([], [text])[0])
    # A budget draws that many states, the same ones for the same seed, every expanded branch
    # state (its first forced child's first token) among them.
    branch = {int(rollouts.node_parent[n]) for n in torch.nonzero(rollouts.node_forced).squeeze(1).tolist()}
    firsts = {int(rollouts.node_start[torch.nonzero(rollouts.node_parent == b).squeeze(1)[0]]) for b in branch}
    budget = len(firsts) + 5
    drawn = select_states(rollouts, budget, seed=3)
    assert drawn.numel() == budget and drawn.tolist() == sorted(set(drawn.tolist())) and firsts <= set(drawn.tolist())
    assert torch.equal(drawn, select_states(rollouts, budget, seed=3))
    assert not torch.equal(drawn, select_states(rollouts, budget, seed=4))


def test_the_phi_part_learns_a_per_token_prefix_reward(
    base: BaseModel, config: TrainingConfig, rollouts: TreeRollouts
) -> None:
    """Φ(s ⊕ a) − Φ(s) here depends on the candidate alone (its vowels), which the per-token
    biases can represent exactly: the held-out within-state agreement must be near perfect."""
    labels = label_states(rollouts, objective(), base, prompts=PROMPTS, config=config)
    head = new_shared_head(base, "vowel_share")
    head.requires_grad_(True)
    metrics = fit_phi(head, [(rollouts, labels)], 0.0, 1.0, replace(config, epochs=40, patience=40))
    assert metrics["phi_corr"] > 0.95 and metrics["phi_within_r2"] > 0.9
    untrained = new_shared_head(base, "vowel_share")
    assert (
        fit_phi(untrained, [(rollouts, labels)], 0.0, 1.0, replace(config, epochs=1))["phi_corr"] < metrics["phi_corr"]
    )


def test_the_saved_head_is_phi_part_plus_residual(
    base: BaseModel, config: TrainingConfig, rollouts: TreeRollouts
) -> None:
    labels, targets, mean, std = labelled(base, config, rollouts)
    head = new_shared_head(base, "vowel_share", reward_mean=mean, reward_std=std)
    metrics = fit_dense(head, rollouts, targets.token_target, [(rollouts, labels)], config)
    phi = new_shared_head(base, "vowel_share", reward_mean=mean, reward_std=std)
    phi.requires_grad_(True)
    fit_phi(phi, [(rollouts, labels)], mean, std, config)
    # The residual never moves a token's bias: the head's per-token biases are the Φ-part's.
    assert torch.allclose(head.token_bias, phi.token_bias)
    assert not head.token_bias.requires_grad
    for name in ("phi_corr", "combined_phi_corr", "sibling_corr", "within_prompt_r2", "residual_val_mse"):
        assert name in metrics
    # The prefix reward itself, read at every expanded candidate, against the Monte Carlo differences.
    assert metrics["prefix_sibling_pairs"] == metrics["sibling_pairs"] > 0
    assert -1.0 <= metrics["prefix_sibling_corr"] <= 1.0
    assert metrics["combined_phi_corr"] > 0.5


def test_state_values_learn_at_the_vector_rate(base: BaseModel, config: TrainingConfig) -> None:
    head = new_shared_head(base, "x", options={"prompt_query": True})
    head.requires_grad_(True)
    matrices, vectors = _param_groups(head, config)
    assert {id(p) for p in matrices["params"]} == {id(head.proj.weight), id(head.prompt_proj.weight)}
    assert id(head.state_value.weight) in {id(p) for p in vectors["params"]}
    assert vectors["lr"] == config.bias_learning_rate


def test_training_labels_densely_only_objectives_that_score_prefixes(config: TrainingConfig, tmp_path: Path) -> None:
    result = train_objective(replace(config, n_iterations=2), workdir=tmp_path / "dense")
    for it in result.iterations:
        assert it.metrics["dense_reward_calls"] == it.metrics["dense_states"] * config.top_k > 0
        assert it.metrics["dense_seconds"] > 0 and "phi_corr" in it.metrics
    # Iteration 1's Φ-part is fitted on both iterations' labels.
    assert result.iterations[1].metrics["phi_states"] > result.iterations[0].metrics["dense_states"]
    assert DenseLabels.load(tmp_path / "dense" / "dense-1.safetensors").reward_calls > 0
    leaves_only = train_objective(
        replace(config, objective_options={}, n_iterations=1), workdir=tmp_path / "leaves"
    )  # the same reward without the flag
    assert "dense_reward_calls" not in leaves_only.iterations[0].metrics
    off = train_objective(replace(config, dense_labels=False, n_iterations=1), workdir=tmp_path / "off")
    assert "phi_corr" not in off.iterations[0].metrics


def test_without_residual_contrast_the_tilt_is_the_phi_parts(
    base: BaseModel, config: TrainingConfig, rollouts: TreeRollouts
) -> None:
    labels, targets, mean, std = labelled(base, config, rollouts)
    level_only = replace(config, residual_contrast=False)
    head = new_shared_head(base, "vowel_share", reward_mean=mean, reward_std=std)
    fit_dense(head, rollouts, targets.token_target, [(rollouts, labels)], level_only)
    phi = new_shared_head(base, "vowel_share", reward_mean=mean, reward_std=std)
    phi.requires_grad_(True)
    fit_phi(phi, [(rollouts, labels)], mean, std, level_only)
    for name in ("proj.weight", "proj.bias", "token_bias"):
        assert torch.equal(head.state_dict()[name], phi.state_dict()[name]), name
    assert not torch.equal(head.state_value.bias, phi.state_value.bias)  # the residual set the levels
    hidden, candidates = rollouts.hidden[:5], labels.candidates[:5]
    q, q_phi = head.q_values(hidden, candidates), phi.q_values(hidden, candidates)
    torch.testing.assert_close(q - q.mean(1, keepdim=True), q_phi - q_phi.mean(1, keepdim=True))


def test_the_objectives_budget_sets_the_labelled_states_unless_the_config_does(
    base: BaseModel, config: TrainingConfig, rollouts: TreeRollouts
) -> None:
    tokens = rollouts.tokens.numel()
    costly = Objective("costly", objective().reward_fn, prefix_scoring=True, dense_states=tokens // 2)
    labels = label_states(rollouts, costly, base, prompts=PROMPTS, config=config)
    assert labels.token_index.numel() == tokens // 2
    assert labels.reward_calls == tokens // 2 * config.top_k
    everything = label_states(rollouts, costly, base, prompts=PROMPTS, config=replace(config, dense_max_states=0))
    assert everything.token_index.numel() == tokens
    with pytest.raises(ConfigurationError, match="dense_states of objective 'x' must be an integer >= 1, got 0"):
        Objective("x", objective().reward_fn, dense_states=0)


def test_model_rewards_label_fewer_states_by_default() -> None:
    from mavis_lc.objectives import get_objective
    from mavis_lc.objectives.base import DENSE_STATES, MODEL_DENSE_STATES

    assert get_objective("relevance").dense_states == MODEL_DENSE_STATES == 1024
    assert get_objective("positivity").dense_states == DENSE_STATES == 8192
