"""Target arithmetic on a hand-built tree, leaf scoring and normalisation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import load_base_model
from mavis_lc.errors import RewardError
from mavis_lc.objectives import Objective
from mavis_lc.training import TrainingConfig, compute_targets, reward_stats, sample_trees, score_leaves
from mavis_lc.training.rollouts import TreeRollouts


def hand_tree() -> TreeRollouts:
    """root -> A (2 tokens) -> {C (2 tokens), D (1 token)};  root -> B (1 token, EOS).

    Nodes in order: 0 root, 1 A, 2 B, 3 C, 4 D. Tokens in order: A0 A1 B0 C0 C1 D0.
    """
    return TreeRollouts(
        first_prompt=0,
        prompts=["p"],
        node_prompt=torch.zeros(5, dtype=torch.long),
        node_parent=torch.tensor([-1, 0, 0, 1, 1]),
        node_start=torch.tensor([0, 0, 2, 3, 5]),
        node_length=torch.tensor([0, 2, 1, 2, 1]),
        node_eos=torch.tensor([False, False, True, False, False]),
        tokens=torch.tensor([10, 11, 12, 13, 14, 15]),
        log_ratio=torch.tensor([0.1, 0.2, 0.3, 0.5, 0.25, 1.0]),
        log_z_k=torch.zeros(6),
        hidden=torch.zeros(6, 4),
        log_prob=torch.full((6,), -1.0),
        node_forced=torch.zeros(5, dtype=torch.bool),
        prompt_hidden=torch.zeros(1, 4),
    )


LEAF_REWARD = torch.tensor([math.nan, math.nan, 3.0, 5.0, 1.0], dtype=torch.float64)  # B=3, C=5, D=1


def test_hand_built_tree_hard_targets() -> None:
    # Normalised with mean 1, std 2: r_B = 1, r_C = 2, r_D = 0; V(A) = mean(2, 0) = 1.
    targets = compute_targets(hand_tree(), LEAF_REWARD, reward_mean=1.0, reward_std=2.0, zeta=0.0)
    assert targets.node_value[1:].tolist() == [1.0, 1.0, 2.0, 0.0]
    assert targets.token_target.tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 0.0]


def test_forced_children_are_weighted_by_pi_renormalised_over_them() -> None:
    # C and D are A's top-2 candidates with pi(C0) = 0.6, pi(D0) = 0.2: weights 0.75 and 0.25.
    tree = hand_tree()
    log_prob = tree.log_prob.clone()
    log_prob[3], log_prob[5] = math.log(0.6), math.log(0.2)
    forced = TreeRollouts(**{**vars(tree), "log_prob": log_prob, "node_forced": torch.tensor([0, 0, 0, 1, 1]).bool()})
    hard = compute_targets(forced, LEAF_REWARD, reward_mean=1.0, reward_std=2.0, zeta=0.0)
    assert hard.node_value[1:].tolist() == pytest.approx([0.75 * 2.0 + 0.25 * 0.0, 1.0, 2.0, 0.0])
    soft = compute_targets(forced, LEAF_REWARD, reward_mean=1.0, reward_std=2.0, zeta=0.5)
    # V(A) = 0.75 * (2 - .5 * (.5 + .25)) + 0.25 * (0 - .5 * 1.0) = 1.21875
    assert float(soft.node_value[1]) == pytest.approx(0.75 * 1.625 + 0.25 * -0.5)


def test_hand_built_tree_soft_targets_count_only_future_log_ratios() -> None:
    targets = compute_targets(hand_tree(), LEAF_REWARD, reward_mean=1.0, reward_std=2.0, zeta=0.5)
    # V(A) = mean(V(C) - .5 * (.5 + .25), V(D) - .5 * 1.0) = mean(1.625, -0.5) = 0.5625
    # V(root) = mean(V(A) - .5 * (.1 + .2), V(B) - .5 * .3) = mean(0.4125, 0.85) = 0.63125
    assert targets.node_value.tolist()[1:] == pytest.approx([0.5625, 1.0, 2.0, 0.0], abs=1e-6)
    assert float(targets.node_value[0]) == pytest.approx(0.63125, abs=1e-6)
    expected = [
        0.5625 - 0.5 * 0.2,  # A0: A1's log-ratio is still to come
        0.5625,  # A1: last token of A, the children's log-ratios are inside V(A)
        1.0,  # B0
        2.0 - 0.5 * 0.25,  # C0
        2.0,  # C1
        0.0,  # D0
    ]
    assert targets.token_target.tolist() == pytest.approx(expected, abs=1e-6)
    # Unrolled for A0: the mean over its two leaves of r - zeta * (log-ratios after A0 on the path).
    via_c = 2.0 - 0.5 * (0.2 + 0.5 + 0.25)
    via_d = 0.0 - 0.5 * (0.2 + 1.0)
    assert float(targets.token_target[0]) == pytest.approx((via_c + via_d) / 2, abs=1e-6)


def test_soft_targets_use_the_ratio_to_the_top_k_base() -> None:
    # log pi - log pi_ref^k = log_ratio + log Z_k: the top-k cut (log Z_k < 0) is not a cost.
    tree = hand_tree()
    cut = torch.tensor([-0.1, -0.2, -0.3, -0.5, -0.25, -1.0])
    with_cut = TreeRollouts(**{**vars(tree), "log_z_k": cut})
    torch.testing.assert_close(with_cut.log_ratio_topk, torch.zeros(6))
    soft = compute_targets(with_cut, LEAF_REWARD, reward_mean=1.0, reward_std=2.0, zeta=0.5)
    hard = compute_targets(tree, LEAF_REWARD, reward_mean=1.0, reward_std=2.0, zeta=0.0)
    torch.testing.assert_close(soft.token_target, hard.token_target)


def test_plain_top_k_rollouts_carry_no_length_bonus(tiny_model_dir: Path) -> None:
    # Sampled from pi_ref^k itself, every log-ratio to it is 0, so soft targets equal hard ones
    # at any zeta; against the full vocabulary each future token would cost -log Z_k > 0.
    base = load_base_model(str(tiny_model_dir))
    config = TrainingConfig(k_root=2, k_children=2, n_layers=2, segment_min_tokens=2, segment_max_tokens=3, top_k=4)
    rollouts = sample_trees(base, ["<a>", "<b>"], config)
    assert float(rollouts.log_ratio_topk.abs().max()) < 1e-5
    assert float(rollouts.log_z_k.max()) < 0 and float(rollouts.log_ratio.min()) > 0
    rewards = torch.where(torch.isin(torch.arange(rollouts.n_nodes), rollouts.leaves()), 1.0, math.nan).double()
    rewards[rollouts.leaves()] = torch.arange(rollouts.leaves().numel()).double()
    soft = compute_targets(rollouts, rewards, reward_mean=0.0, reward_std=1.0, zeta=1.0)
    hard = compute_targets(rollouts, rewards, reward_mean=0.0, reward_std=1.0, zeta=0.0)
    torch.testing.assert_close(soft.token_target, hard.token_target, atol=1e-4, rtol=0)


def test_reward_stats_ignore_non_leaves_and_floor_std() -> None:
    mean, std = reward_stats(LEAF_REWARD)
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt(8 / 3))
    assert reward_stats(torch.tensor([math.nan, 2.0, 2.0], dtype=torch.float64))[1] > 0


def test_score_leaves_scores_each_leaf_response_with_its_prompt(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")
    config = TrainingConfig(k_root=2, k_children=2, n_layers=2, segment_min_tokens=2, segment_max_tokens=3)
    rollouts = sample_trees(base, ["<a>", "<b>"], config)
    seen: list[tuple[str, str]] = []

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        seen.extend(zip(prompts, responses, strict=True))
        return [float(len(r)) for r in responses]

    rewards = score_leaves(rollouts, Objective("length", reward), base.tokenizer, prompts=["A", "B"], batch_size=3)
    leaves = rollouts.leaves()
    assert torch.isnan(rewards).sum() == rollouts.n_nodes - leaves.numel()
    for leaf, (prompt, response) in zip(leaves.tolist(), seen, strict=True):
        assert prompt == "AB"[int(rollouts.node_prompt[leaf])]
        assert response == base.tokenizer.decode(rollouts.response_tokens(leaf), skip_special_tokens=True)
        assert float(rewards[leaf]) == len(response)


def test_score_leaves_names_the_objective_on_a_bad_reward(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")
    config = TrainingConfig(k_root=2, n_layers=1, segment_min_tokens=2, segment_max_tokens=2)
    rollouts = sample_trees(base, ["<a>"], config)
    broken = Objective("broken", lambda prompts, responses: [math.nan] * len(responses))
    with pytest.raises(RewardError, match="broken"):
        score_leaves(rollouts, broken, base.tokenizer, prompts=["a"])
