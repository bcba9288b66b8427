"""Within-state fit metrics on hand-built trees: within-prompt R², sibling differences, the noise ceiling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mavis_lc.training.metrics import StateMetrics
from mavis_lc.training.rollouts import TreeRollouts

# One tree per prompt: root -> A, B; A -> C, D; B -> E, F; one token per node, tokens A..F.
PER_TREE = 7


def trees(n_prompts: int, same_action: bool = False) -> TreeRollouts:
    parent, start, prompt, tokens = [], [], [], []
    for p in range(n_prompts):
        offset = p * PER_TREE
        parent += [-1, offset, offset, offset + 1, offset + 1, offset + 2, offset + 2]
        start += [6 * p + i for i in (0, 0, 1, 2, 3, 4, 5)]
        prompt += [p] * PER_TREE
        tokens += [10, 10 if same_action else 11, 12, 13, 14, 15]
    n = n_prompts * PER_TREE
    return TreeRollouts(
        first_prompt=0,
        prompts=[f"p{i}" for i in range(n_prompts)],
        node_prompt=torch.tensor(prompt),
        node_parent=torch.tensor(parent),
        node_start=torch.tensor(start),
        node_length=torch.tensor([0, 1, 1, 1, 1, 1, 1] * n_prompts),
        node_eos=torch.zeros(n, dtype=torch.bool),
        tokens=torch.tensor(tokens),
        log_ratio=torch.zeros(6 * n_prompts),
        log_z_k=torch.zeros(6 * n_prompts),
        hidden=torch.zeros(6 * n_prompts, 2),
        log_prob=torch.zeros(6 * n_prompts),
        node_forced=torch.zeros(n, dtype=torch.bool),
        prompt_hidden=torch.zeros(n_prompts, 2),
    )


def test_sibling_differences_and_sign_agreement_by_hand() -> None:
    rollouts = trees(1)
    target = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, -1.0])  # A B C D E F
    prediction = torch.tensor([0.5, 0.0, 0.0, 1.0, 1.0, 0.0])
    metrics = StateMetrics(rollouts, target, torch.tensor([True]))(torch.arange(6), prediction)
    # Pairs (A, B), (C, D), (E, F): Monte Carlo differences 1, 2, 2; predicted 0.5, -1, 1.
    assert metrics["sibling_pairs"] == 3
    assert metrics["sibling_sign_agreement"] == pytest.approx(2 / 3)
    assert metrics["sibling_corr"] == pytest.approx(np.corrcoef([0.5, -1, 1], [1, 2, 2])[0, 1])
    # Within-prompt R²: each centred on its own mean over the prompt (2.5 / 6 and 3 / 6).
    residual = ((prediction - 2.5 / 6) - (target - 0.5)).square().sum()
    assert metrics["within_prompt_r2"] == pytest.approx(1 - float(residual) / float((target - 0.5).square().sum()))
    assert math.isnan(metrics["sibling_noise_ceiling"])  # one split pair is too few to correlate


def test_a_per_prompt_offset_changes_no_within_state_metric() -> None:
    rollouts = trees(3)
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(18, generator=generator, dtype=torch.float64)
    prediction = target + 0.3 * torch.randn(18, generator=generator, dtype=torch.float64)
    offset = torch.repeat_interleave(torch.tensor([5.0, -3.0, 10.0], dtype=torch.float64), 6)
    states = StateMetrics(rollouts, target, torch.ones(3, dtype=torch.bool))
    a, b = states(torch.arange(18), prediction), states(torch.arange(18), prediction + offset)
    for name in ("within_prompt_r2", "sibling_corr", "sibling_sign_agreement"):
        assert a[name] == pytest.approx(b[name]), name
    assert a["within_prompt_r2"] > 0.5  # a good predictor within prompts


def test_noise_ceiling_from_split_halves_and_held_out_prompts_only() -> None:
    rollouts = trees(4)
    rows = [[1.0, 0.0, 2.0, 0.0, 1.0, -1.0], [0.0, 1.0, 0.5, 0.0, 3.0, 1.0], [2.0, 0.0, 1.0, 2.0, 0.0, 0.5]]
    target = torch.tensor([*rows, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]]).flatten()
    mask = torch.tensor([True, True, True, False])
    metrics = StateMetrics(rollouts, target, mask)(torch.arange(24), target)
    assert metrics["sibling_corr"] == pytest.approx(1.0) and metrics["sibling_sign_agreement"] == 1.0
    assert metrics["sibling_pairs"] == 9  # three pairs in each of the three measured trees
    # Split halves at each root: A's estimates C and D, B's E and F.
    t = target.view(4, 6)[:3]
    first, second = t[:, 2] - t[:, 4], t[:, 3] - t[:, 5]
    rho = np.corrcoef(first, second)[0, 1]
    assert metrics["sibling_noise_ceiling"] == pytest.approx(math.sqrt(max(2 * rho / (1 + rho), 0.0)))


def test_siblings_with_the_same_action_are_not_a_pair() -> None:
    metrics = StateMetrics(trees(1, same_action=True), torch.arange(6.0), torch.tensor([True]))(
        torch.arange(6), torch.arange(6.0)
    )
    assert metrics["sibling_pairs"] == 2  # (A, B) took the same token: the tilt cannot tell them apart


def doubled_trees(n_prompts: int) -> TreeRollouts:
    """One tree per prompt: root -> S; S -> forced children a, b, c, a', b', c' (each candidate
    twice, tokens 20, 21, 22, 20, 21, 22), one token per node."""
    parent, start, prompt, tokens = [], [], [], []
    per_tree = 8
    for p in range(n_prompts):
        offset = p * per_tree
        parent += [-1, offset] + [offset + 1] * 6
        start += [7 * p + i for i in (0, 0, 1, 2, 3, 4, 5, 6)]
        prompt += [p] * per_tree
        tokens += [10, 20, 21, 22, 20, 21, 22]
    n = n_prompts * per_tree
    return TreeRollouts(
        first_prompt=0, prompts=[f"p{i}" for i in range(n_prompts)], node_prompt=torch.tensor(prompt),
        node_parent=torch.tensor(parent), node_start=torch.tensor(start),
        node_length=torch.tensor([0, 1, 1, 1, 1, 1, 1, 1] * n_prompts),
        node_eos=torch.zeros(n, dtype=torch.bool), tokens=torch.tensor(tokens), log_ratio=torch.zeros(7 * n_prompts),
        log_z_k=torch.zeros(7 * n_prompts), hidden=torch.zeros(7 * n_prompts, 2), log_prob=torch.zeros(7 * n_prompts),
        node_forced=torch.tensor([False, False] + [True] * 6).repeat(n_prompts),
        prompt_hidden=torch.zeros(n_prompts, 2),
    )  # fmt: skip


def test_candidate_ceiling_correlates_the_two_copies_of_each_candidate_pair() -> None:
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(5, 3, generator=generator, dtype=torch.float64)  # each tree's true candidate values
    copy_1 = values + 0.5 * torch.randn(5, 3, generator=generator, dtype=torch.float64)
    copy_2 = values + 0.5 * torch.randn(5, 3, generator=generator, dtype=torch.float64)
    target = torch.cat([torch.zeros(5, 1, dtype=torch.float64), copy_1, copy_2], dim=1).flatten()  # S, a..c, a'..c'
    metrics = StateMetrics(doubled_trees(5), target, torch.ones(5, dtype=torch.bool))(torch.arange(35), target)
    one = torch.stack([copy_1[:, 0] - copy_1[:, 1], copy_1[:, 0] - copy_1[:, 2], copy_1[:, 1] - copy_1[:, 2]], 1)
    two = torch.stack([copy_2[:, 0] - copy_2[:, 1], copy_2[:, 0] - copy_2[:, 2], copy_2[:, 1] - copy_2[:, 2]], 1)
    rho = np.corrcoef(one.flatten(), two.flatten())[0, 1]
    assert metrics["candidate_ceiling_pairs"] == 15
    assert metrics["candidate_noise_ceiling"] == pytest.approx(math.sqrt(max(rho, 0.0)))
    # Copies of one candidate took the same action: never a sibling pair (3 x 3 cross pairs + ... per tree).
    assert metrics["sibling_pairs"] == 5 * 12
    assert math.isnan(
        StateMetrics(trees(3), torch.zeros(18), torch.ones(3, dtype=torch.bool))(torch.arange(18), torch.zeros(18))[
            "candidate_noise_ceiling"
        ]
    )  # no doubled candidates
