"""Fit metrics on what the tilt uses: differences of Q between the candidates of one state.

MAVIS samples from ``softmax(log pi_ref^k + beta * Q)`` over one state's candidates, so a
value model is only as good as its ranking of the actions of one state; a per-state offset of
Q changes nothing. Pooled MSE or R² over all tokens mostly measures how well Q predicts a
prompt's overall value, which the tilt never uses. `StateMetrics` measures, on a set of
held-out tokens:

- ``within_prompt_r2``: R² of the predictions against the targets after removing each
  prompt's mean from both (1 - Σ residual² / Σ (target - prompt mean)²);
- at branch states (tree nodes with two or more children), for every pair of children whose
  first tokens (the actions a_i, a_j taken in that state) differ:
  ``sibling_corr``, the Pearson correlation of ``Q(s, a_i) - Q(s, a_j)`` with the Monte Carlo
  difference of the children's targets, ``sibling_sign_agreement``, the fraction of pairs
  where the two differences have the same sign, and ``sibling_pairs``;
- ``sibling_noise_ceiling``: the correlation a perfect predictor of the children's values could
  reach against these noisy Monte Carlo differences. It is estimated by split halves at
  branch states whose children have subtrees of their own: each child's value is estimated
  twice, as the mean target of the first tokens of its even and of its odd children, the two estimates of every sibling
  difference are correlated (rho), and the Spearman-Brown reliability of the whole-tree
  estimate, ``2 rho / (1 + rho)``, gives the ceiling as its square root. It is an upper bound
  for a first-token Q (the child's own segment counts as signal here). NaN where the trees
  have no such states.
- ``candidate_noise_ceiling``: the same bound for the pairs ``sibling_corr`` is measured on,
  single-leaf differences between expanded candidates. Where a tree expanded each candidate
  twice (``ceiling_share``), every pair of distinct candidates has two independent estimates of
  its difference, one from each copy; their correlation rho is the reliability of one
  single-leaf difference, and ``sqrt(rho)`` is the most a perfect predictor of the candidates'
  values could correlate with it. ``candidate_ceiling_pairs`` counts the pairs behind it.
"""

from __future__ import annotations

import math

import torch

from mavis_lc.training.rollouts import TreeRollouts


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 3:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denominator = float((x.square().sum() * y.square().sum()).sqrt())
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan


class StateMetrics:
    """Within-state metrics of predictions on the tokens of ``prompt_mask``'s prompts (see the module docstring).

    Args:
        rollouts: the trees; token_target: (T,) the fit's targets.
        prompt_mask: (P,) bool, the prompts measured (say, the validation prompts).
    """

    def __init__(self, rollouts: TreeRollouts, token_target: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        self.token_target = token_target.double()
        token_prompt = rollouts.node_prompt[rollouts.token_node()]  # (T,)
        self.token_prompt = token_prompt
        self.token_mask = prompt_mask[token_prompt]  # (T,)
        children = branch_states(rollouts, prompt_mask)
        first = rollouts.node_start  # (N,) a child's first token: the action taken in its parent's state
        pairs: list[tuple[int, int]] = []
        for kids in children.values():
            for i, a in enumerate(kids):
                for b in kids[i + 1 :]:
                    if int(rollouts.tokens[first[a]]) != int(rollouts.tokens[first[b]]):
                        pairs.append((int(first[a]), int(first[b])))
        self.pairs = torch.tensor(pairs, dtype=torch.long).view(-1, 2)  # (n_pairs, 2) token indices
        self.noise_ceiling = _split_half_ceiling(rollouts, children, self.token_target)
        self.candidate_ceiling, self.candidate_pairs = _candidate_ceiling(rollouts, children, self.token_target)

    def __call__(self, token_index: torch.Tensor, prediction: torch.Tensor) -> dict[str, float]:
        """The metrics of ``prediction`` (n,) of tokens ``token_index`` (n,); tokens outside the
        measured prompts are ignored, pairs with a token not predicted are left out."""
        full = torch.full_like(self.token_target, math.nan)
        full[token_index] = prediction.double()
        keep = self.token_mask & ~torch.isnan(full)
        target, pred, prompt = self.token_target[keep], full[keep], self.token_prompt[keep]
        metrics = {"within_prompt_r2": _within_group_r2(pred, target, prompt)}
        pairs = self.pairs[~torch.isnan(full[self.pairs]).any(1)] if self.pairs.numel() else self.pairs
        d_pred = full[pairs[:, 0]] - full[pairs[:, 1]]
        d_mc = self.token_target[pairs[:, 0]] - self.token_target[pairs[:, 1]]
        decided = d_mc != 0
        agree = (torch.sign(d_pred[decided]) == torch.sign(d_mc[decided])).double()
        metrics["sibling_corr"] = _pearson(d_pred, d_mc)
        metrics["sibling_sign_agreement"] = float(agree.mean()) if agree.numel() else math.nan
        metrics["sibling_pairs"] = float(pairs.shape[0])
        metrics["sibling_noise_ceiling"] = self.noise_ceiling
        metrics["candidate_noise_ceiling"] = self.candidate_ceiling
        metrics["candidate_ceiling_pairs"] = float(self.candidate_pairs)
        return metrics


def branch_states(rollouts: TreeRollouts, prompt_mask: torch.Tensor) -> dict[int, list[int]]:
    """The tree nodes of ``prompt_mask``'s prompts with two or more children, and their children."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(rollouts.node_parent.tolist()):
        if parent >= 0:
            children.setdefault(parent, []).append(node)
    return {
        state: kids
        for state, kids in children.items()
        if len(kids) >= 2 and bool(prompt_mask[rollouts.node_prompt[state]])
    }


def sibling_groups(rollouts: TreeRollouts, prompt_mask: torch.Tensor) -> torch.Tensor:
    """(G, C) long: per branch state of ``prompt_mask``'s prompts, the first token of each child
    (the actions taken in that state), padded with -1 to the largest fan-out C."""
    groups = [rollouts.node_start[kids].tolist() for kids in branch_states(rollouts, prompt_mask).values()]
    width = max((len(g) for g in groups), default=0)
    return torch.tensor([g + [-1] * (width - len(g)) for g in groups], dtype=torch.long).view(len(groups), width)


def _within_group_r2(prediction: torch.Tensor, target: torch.Tensor, group: torch.Tensor) -> float:
    if target.numel() == 0:
        return math.nan
    _, inverse = torch.unique(group, return_inverse=True)
    count = torch.bincount(inverse).double()

    def centred(x: torch.Tensor) -> torch.Tensor:
        return x - torch.zeros_like(count).index_add_(0, inverse, x)[inverse] / count[inverse]

    spread = float(centred(target).square().sum())
    residual = float((centred(prediction) - centred(target)).square().sum())
    return 1.0 - residual / spread if spread > 0 else math.nan


def candidate_ceiling(rollouts: TreeRollouts, token_target: torch.Tensor) -> tuple[float, int]:
    """``candidate_noise_ceiling`` and its pair count over every tree of ``rollouts`` (a property
    of the trees and targets, not of a fit: all prompts count, not only the held-out ones)."""
    everything = torch.ones(len(rollouts.prompts), dtype=torch.bool)
    return _candidate_ceiling(rollouts, branch_states(rollouts, everything), token_target.double())


def _candidate_ceiling(
    rollouts: TreeRollouts, children: dict[int, list[int]], token_target: torch.Tensor
) -> tuple[float, int]:
    """The candidate-level ceiling and its pair count (see the module docstring)."""
    first = rollouts.node_start
    estimate = token_target[first]  # (N,) each node's Monte Carlo value as an action of its parent
    one: list[float] = []
    two: list[float] = []
    for kids in children.values():
        copies: dict[int, list[int]] = {}
        for kid in kids:
            if bool(rollouts.node_forced[kid]):
                copies.setdefault(int(rollouts.tokens[first[kid]]), []).append(kid)
        doubled = [nodes for nodes in copies.values() if len(nodes) >= 2]
        for i, a in enumerate(doubled):
            for b in doubled[i + 1 :]:
                one.append(float(estimate[a[0]] - estimate[b[0]]))
                two.append(float(estimate[a[1]] - estimate[b[1]]))
    rho = _pearson(torch.tensor(one, dtype=torch.float64), torch.tensor(two, dtype=torch.float64))
    return (math.sqrt(max(rho, 0.0)) if not math.isnan(rho) else math.nan), len(one)


def _split_half_ceiling(
    rollouts: TreeRollouts,
    children: dict[int, list[int]],
    token_target: torch.Tensor,
) -> float:
    soft = token_target[rollouts.node_start]  # (N,) each node's Monte Carlo value as an action of its parent

    def halves(node: int) -> tuple[float, float] | None:
        kids = children.get(node, [])
        if len(kids) < 2:
            return None
        return float(soft[kids[0::2]].mean()), float(soft[kids[1::2]].mean())

    first_half: list[float] = []
    second_half: list[float] = []
    for kids in children.values():
        split = [halves(k) for k in kids]
        for i, a in enumerate(split):
            for b in split[i + 1 :]:
                if a is not None and b is not None:
                    first_half.append(a[0] - b[0])
                    second_half.append(a[1] - b[1])
    rho = _pearson(torch.tensor(first_half, dtype=torch.float64), torch.tensor(second_half, dtype=torch.float64))
    if math.isnan(rho):
        return math.nan
    reliability = 2 * rho / (1 + rho) if rho > -1 else 0.0
    return math.sqrt(max(reliability, 0.0))
