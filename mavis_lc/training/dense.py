"""Dense labels from prefix rewards, and the shared head fitted as Φ-part + residual.

An objective that can score a partial response (`Objective.prefix_scoring`) gives, for a state
s (prompt and response so far) and each candidate a of the base's top-k there, the exact label

    Φ(s ⊕ a) = the reward of the response so far with a appended

and, exactly, ``Q(s, a) = Φ(s ⊕ a) + E[R − Φ(s ⊕ a) | s, a]``. The first term is known without
noise for every candidate of every state the rollouts visit: dense, exact within-state contrast,
the quantity the tilt uses. Only the second (what the prefix score misses: negation, what comes
later) needs the Monte Carlo leaves.

`label_states` labels the states before rollout tokens (all of them, or ``dense_max_states``
drawn evenly; by default the objective's `Objective.dense_states`), one batched reward call
per chunk of states; the candidates are recomputed from the hidden states the rollouts stored
(EOS banned where the rollouts banned it), so no base forward runs. Φ of the EOS candidate is
the score of the response so far.

`fit_dense` fits the shared head in two parts of the same form, then adds them (the head is
linear in its weights, so the saved head costs what any head costs at decoding time):

1. the Φ-part, regressed on the within-state differences of the normalised labels of every
   candidate of the labelled states of this iteration and the earlier ones (Φ does not depend
   on the policy that visited them);
2. the residual, on ``token_target − Q_Φ(s_t, a_t)`` for every rollout token (`fit_shared_head_averaged`,
   its per-token biases held at zero so that no single occurrence moves a token's tilt); the
   soft corrections of iterations >= 1 are in the token targets, so they apply to it alone.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import TrainingCancelled
from mavis_lc.objectives import Objective
from mavis_lc.training.config import TrainingConfig
from mavis_lc.training.files import write_atomic
from mavis_lc.training.fit import (
    FitProgress,
    _param_groups,
    fit_shared_head_averaged,
    listwise_cross_entropy,
    split_prompts,
)
from mavis_lc.training.metrics import StateMetrics
from mavis_lc.training.rollouts import TreeRollouts
from mavis_lc.value_models import SharedBackboneQHead

_STATES_PER_CALL = 64
"""Labelled states per reward call (k candidate texts each)."""


@dataclass
class DenseLabels:
    """Φ(s ⊕ a) for every top-k candidate a of S labelled states of one `TreeRollouts`."""

    token_index: torch.Tensor  # (S,) long: the rollout token whose state s_t is labelled
    candidates: torch.Tensor  # (S, k) long: the base's top-k at s_t (the rollouts' candidates)
    ref_log_prob: torch.Tensor  # (S, k) float32: log pi_ref^k(a | s_t) over them
    phi: torch.Tensor  # (S, k) float64: the raw prefix reward Φ(s_t ⊕ a)
    reward_calls: int
    """Texts scored by the objective."""
    seconds: float
    """Wall time of the labelling."""

    def save(self, path: Path) -> None:
        """Write the labels (safetensors) and their cost (a .json beside), atomically."""
        write_atomic(
            path.with_suffix(".json"), json.dumps({"reward_calls": self.reward_calls, "seconds": self.seconds}).encode()
        )
        tensors = {
            "token_index": self.token_index,
            "candidates": self.candidates,
            "ref_log_prob": self.ref_log_prob,
            "phi": self.phi,
        }
        write_atomic(path, bytes(save(tensors)))

    @classmethod
    def load(cls, path: Path) -> DenseLabels:
        tensors = load_file(path)
        cost = json.loads(path.with_suffix(".json").read_text())
        return cls(
            tensors["token_index"], tensors["candidates"], tensors["ref_log_prob"], tensors["phi"],
            int(cost["reward_calls"]), float(cost["seconds"]),
        )  # fmt: skip


def select_states(rollouts: TreeRollouts, max_states: int, seed: int) -> torch.Tensor:
    """The rollout tokens whose states are labelled: all of them when there are at most
    ``max_states`` (0: all), else every expanded branch state (the first token of its first
    forced child: the sibling actions' shared state, where Φ can be compared with the Monte
    Carlo differences) and the rest of ``max_states`` drawn without replacement, ascending."""
    total = int(rollouts.tokens.numel())
    if max_states <= 0 or total <= max_states:
        return torch.arange(total)
    forced = torch.nonzero(rollouts.node_forced).squeeze(1)
    branch: dict[int, int] = {}
    for node in forced.tolist():
        branch.setdefault(int(rollouts.node_parent[node]), int(rollouts.node_start[node]))
    kept = torch.tensor(sorted(branch.values()), dtype=torch.long)[:max_states]
    rest = torch.ones(total, dtype=torch.bool)
    rest[kept] = False
    pool = torch.nonzero(rest).squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    drawn = pool[torch.randperm(pool.numel(), generator=generator)[: max_states - kept.numel()]]
    return torch.cat([kept, drawn]).sort().values


def label_states(
    rollouts: TreeRollouts,
    objective: Objective,
    base: BaseModel,
    *,
    prompts: Sequence[str],
    config: TrainingConfig,
    iteration: int = 0,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> DenseLabels:
    """Score Φ(s ⊕ a) for every top-k candidate of the selected states (module docstring).

    Args:
        prompts: the raw prompt of each of ``rollouts.prompts`` (what the objective reads).

    Raises:
        RewardError: the objective's reward function failed.
        TrainingCancelled: ``should_cancel()`` returned True between reward calls.
    """
    started = time.perf_counter()
    budget = objective.dense_states if config.dense_max_states is None else config.dense_max_states
    chosen = select_states(rollouts, budget, config.seed + 7919 * (iteration + 1))
    token_node = rollouts.token_node()
    depth = _response_depth(rollouts, token_node)  # (T,) response tokens before each token
    eos = torch.tensor(base.eos_token_ids)
    device = base.device
    candidates_all, ref_all, phi_all = [], [], []
    calls = 0
    paths: dict[int, list[int]] = {}
    for first in range(0, chosen.numel(), _STATES_PER_CALL):
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled("dense labelling cancelled")
        index = chosen[first : first + _STATES_PER_CALL]  # (S',)
        with torch.no_grad():
            hidden = rollouts.hidden[index].to(device=device, dtype=base.dtype)  # (S', d)
            logits = base.logits(hidden).float() / config.temperature  # (S', V)
        banned = (depth[index] < config.min_response_tokens).to(device)  # (S',) EOS still banned there
        logits[:, eos.to(device)] = torch.where(banned[:, None], float("-inf"), logits[:, eos.to(device)])
        top_logits, candidates = logits.topk(config.top_k, dim=-1)  # (S', k)
        ref_log_prob = torch.log_softmax(top_logits, dim=-1).cpu()  # (S', k) pi_ref^k
        candidates = candidates.cpu()
        texts: list[list[int]] = []
        text_prompts: list[str] = []
        for row, t in enumerate(index.tolist()):
            prefix = _prefix_tokens(rollouts, int(token_node[t]), t, paths)
            for a in candidates[row].tolist():
                texts.append(prefix if a in base.eos_token_ids else [*prefix, a])
                text_prompts.append(prompts[int(rollouts.node_prompt[token_node[t]])])
        responses = base.tokenizer.batch_decode(texts, skip_special_tokens=True)
        scores = objective.score(text_prompts, [str(r) for r in responses])
        calls += len(scores)
        phi_all.append(torch.tensor(scores, dtype=torch.float64).view(index.numel(), config.top_k))
        candidates_all.append(candidates)
        ref_all.append(ref_log_prob)
        if progress is not None:
            progress(first + index.numel(), chosen.numel())
    k = config.top_k
    return DenseLabels(
        token_index=chosen,
        candidates=torch.cat(candidates_all) if candidates_all else torch.zeros(0, k, dtype=torch.long),
        ref_log_prob=torch.cat(ref_all) if ref_all else torch.zeros(0, k),
        phi=torch.cat(phi_all) if phi_all else torch.zeros(0, k, dtype=torch.float64),
        reward_calls=calls,
        seconds=time.perf_counter() - started,
    )


def _response_depth(rollouts: TreeRollouts, token_node: torch.Tensor) -> torch.Tensor:
    """(T,) how many response tokens come before each rollout token."""
    node_depth = torch.zeros(rollouts.n_nodes, dtype=torch.long)  # response tokens above each node
    for node in range(rollouts.n_nodes):  # parents come before children
        parent = int(rollouts.node_parent[node])
        if parent >= 0:
            node_depth[node] = node_depth[parent] + rollouts.node_length[parent]
    offset = torch.arange(rollouts.tokens.numel()) - rollouts.node_start[token_node]
    return node_depth[token_node] + offset


def _prefix_tokens(rollouts: TreeRollouts, node: int, token: int, paths: dict[int, list[int]]) -> list[int]:
    """The response tokens before ``token`` (of ``node``); ``paths`` caches each parent's path."""
    parent = int(rollouts.node_parent[node])
    if parent not in paths:
        paths[parent] = rollouts.response_tokens(parent) if parent >= 0 else []
    start = int(rollouts.node_start[node])
    return [*paths[parent], *rollouts.tokens[start:token].tolist()]


def fit_dense(
    head: SharedBackboneQHead,
    rollouts: TreeRollouts,
    token_target: torch.Tensor,
    labels: Sequence[tuple[TreeRollouts, DenseLabels]],
    config: TrainingConfig,
    *,
    progress: FitProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Set ``head`` (zero-initialised or not: it is refitted) to Φ-part + residual (module docstring).

    Args:
        rollouts, token_target: this iteration's trees and their Monte Carlo targets (normalised).
        labels: the dense labels of this iteration and earlier ones, each with its trees.

    Returns:
        The residual fit's metrics, ``phi_*`` metrics of the Φ-part on held-out states, and the
        combined head's within-state metrics against the Monte Carlo targets.
    """
    mean, std = head.config.reward_mean, head.config.reward_std
    phi_head = _zero_like(head)
    phi_metrics = fit_phi(phi_head, labels, mean, std, config, progress=progress, should_cancel=should_cancel)
    with torch.no_grad():
        taken = _predict_tokens(phi_head, rollouts, torch.arange(rollouts.tokens.numel()))  # (T,)
    residual_head = _zero_like(head)
    residual_head.token_bias.requires_grad_(False)
    if not config.residual_contrast:  # only the state value: nothing that differs between candidates
        residual_head.proj.requires_grad_(False)
        if residual_head.prompt_proj is not None:
            residual_head.prompt_proj.requires_grad_(False)
    residual = fit_shared_head_averaged(
        residual_head, rollouts, token_target.float() - taken, config, should_cancel=should_cancel
    )
    combined = {name: phi + residual_head.state_dict()[name] for name, phi in phi_head.state_dict().items()}
    head.load_state_dict(combined)
    head.requires_grad_(False)
    held_out = torch.tensor(split_prompts(len(rollouts.prompts), config.val_fraction, config.seed))
    measured = held_out if held_out.any() else ~held_out
    token_prompt = rollouts.node_prompt[rollouts.token_node()]
    val_tokens = torch.nonzero(measured[token_prompt]).squeeze(1)
    with torch.no_grad():
        prediction = _predict_tokens(head, rollouts, val_tokens)
    states = StateMetrics(rollouts, token_target, measured)
    within = states(val_tokens, prediction)
    agreement = phi_agreement(head, labels[-1:], mean, std, config)
    prefix = states(*_phi_of_actions(rollouts, labels[-1][1], mean, std))
    return {
        **{f"residual_{name}": value for name, value in residual.metrics.items()},
        **phi_metrics,
        **within,
        "combined_phi_corr": agreement,
        "prefix_sibling_corr": prefix["sibling_corr"],
        "prefix_sibling_pairs": prefix["sibling_pairs"],
    }


def _phi_of_actions(
    rollouts: TreeRollouts, labels: DenseLabels, mean: float, std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens taken in labelled states and their normalised Φ(s ⊕ a_t), read from the labels:
    each token itself, and at an expanded branch state every sibling's first token (they share
    the state). With `StateMetrics`, how well the prefix reward alone predicts the Monte Carlo
    differences between sibling actions (``prefix_sibling_corr``)."""
    labelled = {int(t): row for row, t in enumerate(labels.token_index.tolist())}
    token_node = rollouts.token_node()
    index: list[int] = []
    value: list[float] = []
    siblings: dict[int, list[int]] = {}
    for node in torch.nonzero(rollouts.node_forced).squeeze(1).tolist():
        siblings.setdefault(int(rollouts.node_parent[node]), []).append(int(rollouts.node_start[node]))
    for t, row in labelled.items():
        node = int(token_node[t])
        shared = siblings.get(int(rollouts.node_parent[node]), []) if bool(rollouts.node_forced[node]) else []
        for token in shared if t in shared else [t]:
            hit = torch.nonzero(labels.candidates[row] == rollouts.tokens[token]).squeeze(1)
            if hit.numel():
                index.append(token)
                value.append((float(labels.phi[row, int(hit[0])]) - mean) / std)
    return torch.tensor(index, dtype=torch.long), torch.tensor(value, dtype=torch.float64)


def fit_phi(
    head: SharedBackboneQHead,
    labels: Sequence[tuple[TreeRollouts, DenseLabels]],
    reward_mean: float,
    reward_std: float,
    config: TrainingConfig,
    *,
    progress: FitProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Fit ``head`` to the normalised Φ of every candidate of the labelled states, prompts split
    as `split_prompts`, with the loss ``config.phi_loss``:

    - ``listwise``: the cross-entropy from ``softmax(log pi_ref^k + beta·Φ)`` (reward-guided
      search's distribution at the decoding beta) to ``softmax(log pi_ref^k + beta·Q)`` over each
      state's candidates: distillation of that search, weighting the candidates as decoding does;
      the epoch kept has the lowest held-out ``phi_kl``, the mean KL between the two;
    - ``centred``: the MSE of Q against Φ, both centred over each state's candidates; the epoch
      kept has the best held-out ``phi_corr``.

    Returns ``phi_corr`` (the within-state correlation of Q with Φ), ``phi_within_r2``,
    ``phi_kl``, ``phi_states`` and the epochs run."""
    data = _PhiData.of(labels, reward_mean, reward_std, config, head.proj.weight.device)
    optimizer = torch.optim.AdamW(
        _param_groups(head, config), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    listwise = config.phi_loss == "listwise"
    beta = config.beta if config.beta > 0 else 1.0
    best, best_state, stale, epochs_run = -math.inf, copy.deepcopy(head.state_dict()), 0, 0
    head.train()
    for epoch in range(1, config.epochs + 1):
        for batch in data.batches(generator):
            if should_cancel is not None and should_cancel():
                raise TrainingCancelled("fit cancelled")
            q, y = data.predict(head, batch), data.target[batch]  # (n, k) each
            if listwise:
                real = torch.ones_like(q, dtype=torch.bool)
                loss = listwise_cross_entropy(q, y, data.ref_log_prob[batch], real, beta)
            else:  # within-state differences only: the tilt ignores a state's level
                loss = nn.functional.mse_loss(q - q.mean(1, keepdim=True), y - y.mean(1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epochs_run = epoch
        score = data.agreement(head, beta)
        if progress is not None:
            progress(epoch, config.epochs, {"phi_corr": score["phi_corr"], "phi_kl": score["phi_kl"]})
        value = -score["phi_kl"] if listwise else score["phi_corr"]
        if value > best:
            best, best_state, stale = value, copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return {
        **data.agreement(head, beta),
        "phi_states": float(data.target.shape[0]),
        "phi_epochs_run": float(epochs_run),
    }


def phi_agreement(
    head: SharedBackboneQHead,
    labels: Sequence[tuple[TreeRollouts, DenseLabels]],
    reward_mean: float,
    reward_std: float,
    config: TrainingConfig,
) -> float:
    """``phi_corr`` of ``head`` on the held-out labelled states of ``labels`` (see `fit_phi`)."""
    if not labels or all(lab.phi.numel() == 0 for _, lab in labels):
        return math.nan
    data = _PhiData.of(labels, reward_mean, reward_std, config, head.proj.weight.device)
    return data.agreement(head, config.beta if config.beta > 0 else 1.0)["phi_corr"]


@dataclass
class _PhiData:
    """Labelled states of one or more iterations, flattened: features, candidates, targets, split."""

    hidden: torch.Tensor  # (S, d)
    prompt_hidden: torch.Tensor  # (S, d)
    candidates: torch.Tensor  # (S, k)
    ref_log_prob: torch.Tensor  # (S, k) log pi_ref^k
    target: torch.Tensor  # (S, k) normalised Φ
    train: torch.Tensor  # (S_train,) state indices
    val: torch.Tensor  # (S_val,) state indices
    batch_states: int

    @classmethod
    def of(
        cls,
        labels: Sequence[tuple[TreeRollouts, DenseLabels]],
        mean: float,
        std: float,
        config: TrainingConfig,
        device: torch.device,
    ) -> _PhiData:
        hidden, prompt_hidden, candidates, ref_log_prob, target, is_val = [], [], [], [], [], []
        for rollouts, lab in labels:
            prompt = rollouts.node_prompt[rollouts.token_node()[lab.token_index]]  # (S,)
            held_out = torch.tensor(split_prompts(len(rollouts.prompts), config.val_fraction, config.seed))
            hidden.append(rollouts.hidden[lab.token_index])
            prompt_hidden.append(rollouts.prompt_hidden[prompt])
            candidates.append(lab.candidates)
            ref_log_prob.append(lab.ref_log_prob)
            target.append(((lab.phi - mean) / std).float())
            is_val.append(held_out[prompt])
        val_mask = torch.cat(is_val)
        if not bool(val_mask.any()):
            val_mask = ~val_mask  # no held-out prompts: measure on the training states
        return cls(
            hidden=torch.cat(hidden).to(device),
            prompt_hidden=torch.cat(prompt_hidden).to(device),
            candidates=torch.cat(candidates).to(device),
            ref_log_prob=torch.cat(ref_log_prob).float().to(device),
            target=torch.cat(target).to(device),
            train=torch.nonzero(~torch.cat(is_val)).squeeze(1),
            val=torch.nonzero(val_mask).squeeze(1),
            batch_states=max(1, config.fit_batch_size // config.top_k),
        )

    def predict(self, head: SharedBackboneQHead, states: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_hidden[states] if head.prompt_query else None
        return head.q_values(self.hidden[states], self.candidates[states], prompt)  # (n, k)

    def batches(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        yield from self.train[torch.randperm(self.train.numel(), generator=generator)].split(self.batch_states)

    def agreement(self, head: SharedBackboneQHead, beta: float) -> dict[str, float]:
        """On the held-out states: ``phi_corr`` and ``phi_within_r2`` of Q against Φ within
        states, and ``phi_kl``, the mean KL from softmax(log pi_ref^k + beta·Φ) to
        softmax(log pi_ref^k + beta·Q) (0: the head decodes as reward-guided search would)."""
        with torch.no_grad():
            q = torch.cat([self.predict(head, b) for b in self.val.split(2048)]) if self.val.numel() else None
        if q is None:
            return {"phi_corr": math.nan, "phi_within_r2": math.nan, "phi_kl": math.nan}
        prior = self.ref_log_prob[self.val].double()
        wanted = torch.log_softmax(prior + beta * self.target[self.val].double(), dim=-1)
        given = torch.log_softmax(prior + beta * q.double(), dim=-1)
        kl = float((wanted.exp() * (wanted - given)).sum(-1).mean())
        y = self.target[self.val].double()
        q = q.double()
        qc, yc = q - q.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        denominator = float((qc.square().sum() * yc.square().sum()).sqrt())
        corr = float((qc * yc).sum()) / denominator if denominator > 0 else math.nan
        spread = float(yc.square().sum())
        r2 = 1 - float((qc - yc).square().sum()) / spread if spread > 0 else math.nan
        return {"phi_corr": corr, "phi_within_r2": r2, "phi_kl": kl}


def _predict_tokens(head: SharedBackboneQHead, rollouts: TreeRollouts, index: torch.Tensor) -> torch.Tensor:
    """(n,) Q(s_t, a_t) of rollout tokens ``index`` (float32, on the CPU)."""
    device = head.proj.weight.device
    token_prompt = rollouts.node_prompt[rollouts.token_node()]
    out = []
    for chunk in index.split(4096):
        prompt = rollouts.prompt_hidden[token_prompt[chunk]].to(device) if head.prompt_query else None
        q = head.q_values(rollouts.hidden[chunk].to(device), rollouts.tokens[chunk, None].to(device), prompt)
        out.append(q.squeeze(1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _zero_like(head: SharedBackboneQHead) -> SharedBackboneQHead:
    """A zero-initialised, trainable head of ``head``'s configuration on the same embeddings."""
    fresh = SharedBackboneQHead(head.config, head._embeddings).to(head.proj.weight.device)
    fresh.requires_grad_(True)
    return fresh
