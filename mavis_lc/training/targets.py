"""Labels and targets: leaf rewards, their normalisation, node values, dense per-token targets.

Definitions (N nodes, T tokens of a `TreeRollouts`):

- Leaf reward ``R_l``: the objective's score of (prompt, text of the leaf's response), where
  the response is every sampled token from the root to the end of the leaf's segment, decoded
  without special tokens.
- Normalisation: ``r_l = (R_l - mean) / std`` with mean and std of the iteration-0 leaf rewards
  (std floored at `MIN_REWARD_STD`); later iterations reuse them, so Q keeps its units.
- Log-ratios are against the top-k base: ``l_t = log pi(a_t|s_t) - log pi_ref^k(a_t|s_t)``,
  where ``pi_ref^k`` is the base renormalised over the step's top-k (the distribution MAVIS
  tilts). The full-vocabulary ratio would add ``-log Z_k`` (the top-k cut, about 0.17 nats per
  token on SmolLM2 at k = 20) to every future token, a cost that no tilt can avoid except by
  ending the response: a hidden length bonus. Plain top-k sampling has ``l_t = 0``. The soft
  targets charge, for every token, not its sampled ``l_t`` but its expectation at the token's
  state, the exact ``KL(pi || pi_ref^k)`` over the step's candidates that the rollouts record:
  the same mean, without the per-token sampling noise (SD about 0.65 nats on SmolLM2 at beta 4).
  Rollouts that recorded no per-state KL (older files) fall back to the sampled ratios.
- Node value, with ``zeta >= 0`` (1/beta by default: pi_{i+1} ∝ pi_ref^k · exp(beta · Q_soft))
  and ``g_u`` the sum of the log-ratios ``l_t`` of node u's own segment tokens::

      V(leaf) = r_leaf
      V(u)    = sum over children c of  w_c * ( V(c) - zeta * g_c )

  where ``w_c = 1 / (number of children)`` for sampled children (the Monte Carlo mean), and
  for the forced children of a contrastive expansion (the top-m candidates a_c of pi at u's
  state, `mavis_lc.training.rollouts`) ``w_c = pi(a_c) / sum over siblings of pi(a_c')``: pi
  renormalised over them, so V(u) still estimates the state's value under pi. With ``zeta = 0``
  (iteration 0) and sampled children this is the plain mean of the children's values.
- Token target (dense supervision): token j (1-based) of node u's segment, with log-ratios
  ``l_1..l_m``, is the action taken in the state before it, and its target is::

      target = V(u) - zeta * (l_{j+1} + ... + l_m)

  i.e. the value of the node that contains it, less zeta times the log-ratios still to come in
  its own segment. Unrolled, it is the soft return ``r_leaf - zeta * (sum of log-ratios after
  token j on the path to the leaf)`` averaged over the leaves below, each child's subtree
  weighted equally at every branching (the tree's Monte Carlo estimate). Only FUTURE tokens
  count: the token's own log-ratio and those before it do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from mavis_lc.errors import RewardError, TrainingCancelled, TrainingError
from mavis_lc.objectives import Objective
from mavis_lc.training.rollouts import TreeRollouts

MIN_REWARD_STD = 1e-6


@dataclass
class TreeTargets:
    """Targets for one `TreeRollouts`, aligned with its nodes and tokens."""

    leaf_reward: torch.Tensor  # (N,) float64 raw objective score at leaves, NaN elsewhere
    node_value: torch.Tensor  # (N,) float64 V(u) in normalised units (NaN for roots)
    token_target: torch.Tensor  # (T,) float32 Q target of every token
    reward_mean: float
    reward_std: float
    zeta: float


def score_leaves(
    rollouts: TreeRollouts,
    objective: Objective,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompts: list[str],
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Raw objective scores of every leaf's (prompt, response text), (N,) float64, NaN off leaves.

    Args:
        prompts: the prompt text the objective sees for each of ``rollouts.prompts`` (the raw
            user prompt, not the chat-formatted one).

    Raises:
        RewardError: the objective's reward function failed (the message names the objective).
        TrainingCancelled: ``should_cancel()`` returned True between batches.
    """
    leaves = rollouts.leaves().tolist()
    rewards = torch.full((rollouts.n_nodes,), math.nan, dtype=torch.float64)
    for start in range(0, len(leaves), batch_size):
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled("reward scoring cancelled")
        chunk = leaves[start : start + batch_size]
        responses = [str(tokenizer.decode(rollouts.response_tokens(n), skip_special_tokens=True)) for n in chunk]
        chunk_prompts = [prompts[int(rollouts.node_prompt[n])] for n in chunk]
        rewards[chunk] = torch.tensor(objective.score(chunk_prompts, responses), dtype=torch.float64)
        if progress is not None:
            progress(start + len(chunk), len(leaves))
    return rewards


def reward_stats(leaf_reward: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the finite entries of ``leaf_reward``; std floored at `MIN_REWARD_STD`."""
    values = leaf_reward[~torch.isnan(leaf_reward)]
    if values.numel() == 0:
        raise RewardError("no leaf rewards to normalise")
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    return float(values.mean()), max(std, MIN_REWARD_STD)


def child_weights(rollouts: TreeRollouts) -> torch.Tensor:
    """(N,) float64: every node's weight ``w_c`` among its siblings (see the module docstring);
    the weights of one parent's children sum to 1 (roots: 1)."""
    parent = rollouts.node_parent
    has_parent = parent >= 0
    slot = parent.clamp(min=0)  # (N,) roots put their (unused) weight in slot 0
    # A forced child weighs pi(a_c); a sampled child weighs 1: normalised per parent, the mean.
    first = rollouts.node_start.clamp(max=max(rollouts.tokens.numel() - 1, 0))
    log_prob = rollouts.log_prob.double()[first] if rollouts.tokens.numel() else torch.zeros(rollouts.n_nodes)
    raw = torch.where(rollouts.node_forced, log_prob.exp(), torch.ones_like(log_prob))
    raw = torch.where(has_parent, raw, torch.zeros_like(raw))
    total = torch.zeros(rollouts.n_nodes, dtype=torch.float64).index_add_(0, slot, raw)
    return torch.where(has_parent, raw / total[slot].clamp(min=1e-300), torch.ones_like(raw))


def compute_targets(
    rollouts: TreeRollouts, leaf_reward: torch.Tensor, *, reward_mean: float, reward_std: float, zeta: float
) -> TreeTargets:
    """Node values and token targets as defined in the module docstring.

    Args:
        leaf_reward: (N,) raw rewards, finite at every leaf (other entries ignored).
        zeta: KL penalty per nat of future log-ratio (against pi_ref^k); 0 gives the hard
            (iteration-0) targets.
    """
    parent = rollouts.node_parent.tolist()
    start = rollouts.node_start.tolist()
    length = rollouts.node_length.tolist()
    log_ratio = (rollouts.state_kl if rollouts.state_kl is not None else rollouts.log_ratio_topk).double()
    segment_sum = [float(log_ratio[s : s + n].sum()) for s, n in zip(start, length, strict=True)]
    weight = child_weights(rollouts).tolist()
    child_sum = [0.0] * len(parent)
    child_count = [0] * len(parent)
    value = [math.nan] * len(parent)
    normalised = ((leaf_reward - reward_mean) / reward_std).tolist()
    for u in reversed(range(len(parent))):  # children come after their parents
        if child_count[u] == 0:
            value[u] = normalised[u] if parent[u] >= 0 else math.nan
        else:
            value[u] = child_sum[u]
        if parent[u] >= 0:
            child_sum[parent[u]] += weight[u] * (value[u] - zeta * segment_sum[u])
            child_count[parent[u]] += 1
    token_target = torch.empty(rollouts.tokens.shape[0], dtype=torch.float64)
    for u, (s, n) in enumerate(zip(start, length, strict=True)):
        if n == 0:
            continue
        seg = log_ratio[s : s + n]
        after = seg.flip(0).cumsum(0).flip(0) - seg  # (n,) sum of the log-ratios after each token
        token_target[s : s + n] = value[u] - zeta * after
    if torch.isnan(token_target).any():
        raise TrainingError("a leaf has no reward: every leaf must be scored before computing targets")
    return TreeTargets(
        leaf_reward=leaf_reward,
        node_value=torch.tensor(value, dtype=torch.float64),
        token_target=token_target.float(),
        reward_mean=reward_mean,
        reward_std=reward_std,
        zeta=zeta,
    )
