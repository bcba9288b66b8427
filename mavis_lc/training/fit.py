"""Fit a value model to tree targets by regression (docs/architecture.md, "Training, registry, workers").

Every sampled token is one example: the state s_t before it, the token a_t, and its target
(`mavis_lc.training.targets`); the loss is the MSE of Q(s_t, a_t) against it, minimised with
AdamW in minibatches. For the shared head, two optional terms act on what the tilt uses; for
them every minibatch also draws ``fit_batch_size // 4`` branch states of the training trees
(their sibling actions a_1..a_C, with Monte Carlo targets Y and log pi_ref^k from the rollouts):

- ``listwise_loss_weight``: the cross-entropy from ``softmax(log pi_ref^k(a) + beta * Y(a))`` to
  ``softmax(log pi_ref^k(a) + beta * Q(s, a))`` over each state's siblings, i.e. between the
  decoding distribution the Monte Carlo values ask for and the one the head gives;
- ``sibling_loss_weight``: the MSE of Q centred over the siblings against the centred targets.

Neither depends on a per-state offset of Q, which the tilt ignores too.

- Shared-backbone head: the states are the base hidden states the rollouts recorded, so the
  fit never runs the base model (cached features).
- Separate backbone: the examples are read off leaf paths (prompt + response), one forward of
  the small LM per path; a token shared by several paths is supervised on the first path only,
  so every example counts once, as for the shared head.

Validation holds out whole prompts (`split_prompts`), so no tree contributes to both sides.
After every epoch the validation metrics are measured; the epoch best on
``config.selection_metric`` (default ``sibling_corr``: the tilt only uses differences of Q
within a state, see `mavis_lc.training.metrics`) is kept, and training stops after
``patience`` epochs without improvement. Metrics, on the validation tokens: ``val_mse``,
``r2`` (1 - MSE / variance of the targets) and ``spearman`` (rank correlation of predictions
and Monte Carlo targets), pooled over prompts, and the within-state metrics of `StateMetrics`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import nn

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import ConfigurationError, TrainingCancelled
from mavis_lc.training.config import TrainingConfig
from mavis_lc.training.metrics import StateMetrics, sibling_groups
from mavis_lc.training.rollouts import TreeRollouts
from mavis_lc.value_models import SeparateBackboneValueModel, SharedBackboneQHead, SideBranchValueModel

FitProgress = Callable[[int, int, dict[str, float]], None]
"""``progress(epoch, epochs, metrics)`` after every epoch."""


@dataclass
class FitResult:
    """What a fit produced: the metrics of its best epoch and the per-epoch history."""

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def split_prompts(n_prompts: int, val_fraction: float, seed: int) -> list[bool]:
    """Per prompt: True if it is held out for validation. Depends only on the arguments.

    ``round(n_prompts * val_fraction)`` prompts, at least one when ``val_fraction > 0`` and at
    least one is left to train on.
    """
    n_val = round(n_prompts * val_fraction)
    if val_fraction > 0 and n_prompts >= 2:
        n_val = min(max(n_val, 1), n_prompts - 1)
    held_out = set(random.Random(f"split:{seed}").sample(range(n_prompts), n_val))
    return [i in held_out for i in range(n_prompts)]


def regression_metrics(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``mse``, ``r2`` and ``spearman`` of predictions against targets, both (n,)."""
    prediction, target = prediction.double(), target.double()
    mse = float(((prediction - target) ** 2).mean()) if target.numel() else math.nan
    variance = float(target.var(unbiased=False)) if target.numel() else math.nan
    r2 = 1.0 - mse / variance if variance > 0 else math.nan
    varies = target.numel() > 1 and bool(prediction.std() > 0) and variance > 0  # else rank correlation is undefined
    rho = float(spearmanr(prediction.numpy(), target.numpy()).statistic) if varies else math.nan
    return {"mse": mse, "r2": r2, "spearman": rho}


def listwise_cross_entropy(
    q: torch.Tensor, target: torch.Tensor, ref_log_prob: torch.Tensor, real: torch.Tensor, beta: float
) -> torch.Tensor:
    """Mean over states of the cross-entropy from ``softmax(log pi_ref^k + beta * target)`` to
    ``softmax(log pi_ref^k + beta * q)``: the decoding distribution the Monte Carlo values ask for
    against the one the head gives, over each state's sibling actions.

    Args:
        q, target, ref_log_prob: (S, C) Q, Monte Carlo targets and log pi_ref^k of each action.
        real: (S, C) bool, False for padding (every state needs two real actions).

    It is minimal where ``q - target`` is constant within each state: a per-state offset of Q,
    which the tilt ignores, costs nothing.
    """
    prior = ref_log_prob.masked_fill(~real, float("-inf"))  # (S, C)
    wanted = torch.softmax(prior + beta * target, dim=-1)  # (S, C)
    log_given = torch.log_softmax(prior + beta * q, dim=-1).masked_fill(~real, 0.0)  # (S, C)
    return -(wanted * log_given).sum(-1).mean()


def state_terms(
    q: torch.Tensor, picked: torch.Tensor, targets: torch.Tensor, ref_log_prob: torch.Tensor, config: TrainingConfig
) -> torch.Tensor:
    """The optional terms on what the tilt uses, weighted by the config, for branch states whose
    sibling actions are ``picked`` (S, C) token indices padded with -1, with Q ``q`` (S, C):

    - ``listwise_loss_weight`` x `listwise_cross_entropy` at the config's beta (1 where beta is 0);
    - ``sibling_loss_weight`` x the MSE of Q centred over each state's siblings against the
      centred targets.
    """
    index = picked.clamp(min=0)  # (S, C)
    real = picked >= 0  # (S, C)
    loss = q.new_zeros(())
    if config.listwise_loss_weight > 0:
        beta = config.beta if config.beta > 0 else 1.0
        listwise = listwise_cross_entropy(q, targets[index], ref_log_prob[index], real, beta)
        loss = loss + config.listwise_loss_weight * listwise
    if config.sibling_loss_weight > 0:
        count = real.sum(1, keepdim=True)  # (S, 1)

        def centred(x: torch.Tensor) -> torch.Tensor:
            return (x - (x * real).sum(1, keepdim=True) / count) * real

        sibling = (centred(q) - centred(targets[index])).square().sum() / real.sum()
        loss = loss + config.sibling_loss_weight * sibling
    return loss


def fit_shared_head(
    head: SharedBackboneQHead,
    rollouts: TreeRollouts,
    token_target: torch.Tensor,
    config: TrainingConfig,
    *,
    progress: FitProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> FitResult:
    """Regress ``head`` (updated in place, warm start = its current weights) on the targets.

    Args:
        token_target: (T,) target of every rollout token.

    Raises:
        TrainingCancelled: ``should_cancel()`` returned True between minibatches.
    """
    device = head.proj.weight.device
    features = rollouts.hidden.to(device)  # (T, d) h(s_t)
    actions = rollouts.tokens.to(device)  # (T,) a_t
    targets = token_target.to(device).float()  # (T,)
    token_prompt = rollouts.node_prompt[rollouts.token_node()].to(device)  # (T,)
    prompt_features = rollouts.prompt_hidden.to(device)  # (P, d) the prompt-pooled queries
    ref_log_prob = (rollouts.log_prob - rollouts.log_ratio_topk).to(device)  # (T,) log pi_ref^k(a_t|s_t)
    held_out = torch.tensor(split_prompts(len(rollouts.prompts), config.val_fraction, config.seed))
    is_val = held_out[token_prompt.cpu()].to(device)  # (T,)
    train_idx = torch.nonzero(~is_val).squeeze(1)
    val_idx = torch.nonzero(is_val).squeeze(1)
    measured = held_out if val_idx.numel() else ~held_out

    def predict(idx: torch.Tensor) -> torch.Tensor:
        prompt = prompt_features[token_prompt[idx]] if head.prompt_query else None  # (n, d)
        return head.q_values(features[idx], actions[idx, None], prompt).squeeze(1)  # (n,)

    def batches(generator: torch.Generator) -> Iterator[torch.Tensor]:
        order = train_idx[torch.randperm(train_idx.numel(), generator=generator).to(device)]
        yield from order.split(config.fit_batch_size)

    def evaluate(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return idx.cpu(), torch.cat([predict(b) for b in idx.split(4096)]).cpu()

    trained_on = ~held_out if val_idx.numel() else torch.ones_like(held_out)  # (P,) the training prompts
    groups = sibling_groups(rollouts, trained_on).to(device)  # (G, C) sibling actions of each branch state
    draw = torch.Generator().manual_seed(config.seed + 1)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(predict(batch), targets[batch])
        if (config.sibling_loss_weight > 0 or config.listwise_loss_weight > 0) and groups.numel():
            picked = groups[torch.randint(groups.shape[0], (max(1, config.fit_batch_size // 4),), generator=draw)]
            index = picked.clamp(min=0)  # (S, C)
            q = predict(index.flatten()).view(index.shape)  # (S, C)
            loss = loss + state_terms(q, picked, targets, ref_log_prob, config)
        return loss

    states = StateMetrics(rollouts, token_target, measured)
    # A warm start (iteration >= 1) competes as epoch 0: it is kept when no epoch beats it.
    warm = any(bool(p.detach().abs().sum() > 0) for p in head.parameters())
    return _train(
        head, batches, loss_of, train_idx, val_idx, evaluate, states, config, progress, should_cancel,
        measure_start=warm,
    )  # fmt: skip


def fit_shared_head_averaged(
    head: SharedBackboneQHead,
    rollouts: TreeRollouts,
    token_target: torch.Tensor,
    config: TrainingConfig,
    *,
    progress: FitProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> FitResult:
    """`fit_shared_head` ``config.n_fits`` times from ``head``'s current weights, fit i with seed
    ``config.seed + i`` (its own validation split and minibatch order), then set ``head`` to the
    mean of the fitted weights. Q is linear in the head's weights, so the averaged head's Q is the
    mean of the fits' Q: a bagged ensemble that costs one head at decoding time. Every prompt
    trains most of the fits, and averaging cancels much of what each fit learned from its own
    split's noise.

    Metrics are the means over the fits of their metrics, each measured on its own held-out
    prompts (a cross-validated estimate of one fit's quality), plus ``n_fits``.
    """
    if config.n_fits == 1:
        return fit_shared_head(head, rollouts, token_target, config, progress=progress, should_cancel=should_cancel)
    start = copy.deepcopy(head.state_dict())
    states: list[dict[str, torch.Tensor]] = []
    results: list[FitResult] = []
    for i in range(config.n_fits):
        head.load_state_dict(start)

        def report(epoch: int, epochs: int, metrics: dict[str, float], i: int = i) -> None:
            if progress is not None:
                progress(i * epochs + epoch, config.n_fits * epochs, metrics)

        member = replace(config, seed=config.seed + i)
        result = fit_shared_head(head, rollouts, token_target, member, progress=report, should_cancel=should_cancel)
        results.append(result)
        states.append(copy.deepcopy(head.state_dict()))
    head.load_state_dict({name: torch.stack([s[name] for s in states]).mean(0) for name in start})
    metrics = {name: statistics.fmean(r.metrics[name] for r in results) for name in results[0].metrics}
    history = [row for r in results for row in r.history]
    return FitResult(metrics={**metrics, "n_fits": float(config.n_fits)}, history=history)


def fit_separate_backbone(
    model: SeparateBackboneValueModel,
    base: BaseModel,
    rollouts: TreeRollouts,
    token_target: torch.Tensor,
    config: TrainingConfig,
    *,
    progress: FitProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> FitResult:
    """Fine-tune a separate-backbone value model (in place, warm start) on leaf paths.

    Args:
        base: the base model whose tokenizer encodes the prompts.
        token_target: (T,) target of every rollout token.
    """
    paths = _leaf_paths(rollouts, base)
    held_out = split_prompts(len(rollouts.prompts), config.val_fraction, config.seed)
    train_paths = torch.tensor([i for i, p in enumerate(paths) if not held_out[p.prompt]], dtype=torch.long)
    val_paths = torch.tensor([i for i, p in enumerate(paths) if held_out[p.prompt]], dtype=torch.long)
    measured = torch.tensor(held_out) if val_paths.numel() else ~torch.tensor(held_out, dtype=torch.bool)
    pad_id = int(base.tokenizer.pad_token_id)
    device = base.device
    targets = token_target.float()

    def forward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollout token indices and predictions of the supervised tokens of paths ``batch``, each (n,)."""
        chosen = [paths[i] for i in batch.tolist()]
        width = max(len(p.input_ids) for p in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chosen), width, dtype=torch.long)
        supervised = torch.zeros(len(chosen), width - 1, dtype=torch.bool)
        token_index = torch.zeros(len(chosen), width - 1, dtype=torch.long)
        for row, path in enumerate(chosen):
            pad = width - len(path.input_ids)
            ids[row, pad:] = torch.tensor(path.input_ids)
            mask[row, pad:] = 1
            first = pad + path.prompt_length - 1  # q index of the first response token
            supervised[row, first : first + len(path.tokens)] = torch.tensor(path.supervised)
            token_index[row, first : first + len(path.tokens)] = torch.tensor(path.tokens)
        q = model.sequence_q(ids.to(device), mask.to(device))  # (B, width-1)
        return token_index[supervised], q[supervised.to(device)].float()

    batches, evaluate = _sequence_batches(train_paths, forward, config.sequence_batch_size)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        index, prediction = forward(batch)
        target = targets[index].to(prediction.device)
        return nn.functional.mse_loss(prediction, target) if target.numel() else prediction.sum() * 0.0

    states = StateMetrics(rollouts, token_target, measured)
    return _train(model, batches, loss_of, train_paths, val_paths, evaluate, states, config, progress, should_cancel)


@dataclass
class _PackedTree:
    """One tree as a side-branch input: the prompt's layer inputs but its last, then one element
    per sampled token, the layer input at the last token of the state that token was sampled in."""

    prompt: int
    first_token: int  # the tree's tokens are rollout tokens [first_token, first_token + n_tokens)
    n_tokens: int
    prompt_length: int
    token_position: torch.Tensor  # (n_tokens,) position of each token's state: prompt length - 1 + depth
    token_mask: torch.Tensor  # (n_tokens, n_tokens) bool: token i's state attends to token j's state


def _pack_trees(rollouts: TreeRollouts) -> list[_PackedTree]:
    """Per tree, the positions and the tree attention mask of its tokens' states (see `_PackedTree`).

    The state before token t is the prompt plus the tokens on t's path above it; its element in
    the packed sequence holds the layer input at that state's last token (``rollouts.tap[t]``),
    so it attends to the prompt's elements and to the elements of the tokens on its path up to
    itself: the tokens of its node's ancestors and its node's tokens up to t.
    """
    assert rollouts.prompt_length is not None
    token_node = rollouts.token_node()
    node_depth = torch.zeros(rollouts.n_nodes, dtype=torch.long)  # response tokens above each node
    for node in range(rollouts.n_nodes):  # parents come before children
        parent = int(rollouts.node_parent[node])
        if parent >= 0:
            node_depth[node] = node_depth[parent] + rollouts.node_length[parent]
    depth = node_depth[token_node] + torch.arange(token_node.numel()) - rollouts.node_start[token_node]  # (T,)
    trees: list[_PackedTree] = []
    for prompt in range(len(rollouts.prompts)):
        nodes = torch.nonzero(rollouts.node_prompt == prompt).squeeze(1)  # contiguous, root first
        local = {int(n): i for i, n in enumerate(nodes.tolist())}
        ancestor = torch.zeros(len(local), len(local), dtype=torch.bool)  # [a, b]: b is a or above it
        for n, i in local.items():
            up = n
            while up >= 0:
                ancestor[i, local[up]] = True
                up = int(rollouts.node_parent[up])
        first = int(rollouts.node_start[nodes[0]])
        count = int(rollouts.node_length[nodes].sum())
        span = torch.arange(first, first + count)
        owner = torch.tensor([local[int(n)] for n in token_node[span].tolist()], dtype=torch.long)
        same = owner[:, None] == owner[None, :]
        mask = ancestor[owner][:, owner] & (~same | (span[None, :] <= span[:, None]))
        length = int(rollouts.prompt_length[prompt])
        trees.append(_PackedTree(prompt, first, count, length, length - 1 + depth[span], mask))
    return trees


def fit_side_branch(
    model: SideBranchValueModel,
    rollouts: TreeRollouts,
    token_target: torch.Tensor,
    config: TrainingConfig,
    *,
    progress: FitProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> FitResult:
    """Fine-tune a side branch (in place, warm start) on the layer inputs the rollouts recorded.

    Each minibatch is ``sequence_batch_size`` trees, each one packed sequence (`_pack_trees`)
    under a tree attention mask, so every state's features see exactly its prompt and path and
    the base model is not run. The loss is the per-token MSE plus the config's optional terms
    on sibling actions (`state_terms`) over the batch's branch states. The starting weights are
    measured first and kept if no epoch beats them on the selection metric.

    Raises:
        ConfigurationError: the rollouts recorded no inputs of the branch's tap layer.
        TrainingCancelled: ``should_cancel()`` returned True between minibatches.
    """
    lengths = rollouts.prompt_length
    if rollouts.tap_layer != model.tap_layer or rollouts.tap is None or rollouts.prompt_tap is None or lengths is None:
        raise ConfigurationError(
            f"a side branch reading layer {model.tap_layer} needs rollouts that recorded that layer's inputs; "
            f"these recorded {rollouts.tap_layer if rollouts.tap_layer is not None else 'none'}"
        )
    device = model.q_head.proj.weight.device
    trees = _pack_trees(rollouts)
    taps, prompt_taps = rollouts.tap, rollouts.prompt_tap
    tokens = rollouts.tokens
    prompt_features = rollouts.prompt_hidden
    targets = token_target.float()
    ref_log_prob = rollouts.log_prob - rollouts.log_ratio_topk  # (T,) log pi_ref^k(a_t|s_t)
    prompt_start = torch.cumsum(lengths, 0) - lengths  # (P,)
    held_out = split_prompts(len(rollouts.prompts), config.val_fraction, config.seed)
    train_trees = torch.tensor([i for i, held in enumerate(held_out) if not held], dtype=torch.long)
    val_trees = torch.tensor([i for i, held in enumerate(held_out) if held], dtype=torch.long)
    measured = torch.tensor(held_out) if val_trees.numel() else ~torch.tensor(held_out, dtype=torch.bool)
    trained_on = ~torch.tensor(held_out) if val_trees.numel() else torch.ones(len(held_out), dtype=torch.bool)
    groups = sibling_groups(rollouts, trained_on)  # (G, C)
    group_prompt = rollouts.node_prompt[rollouts.token_node()][groups[:, 0]] if groups.numel() else groups[:, 0]
    use_prompt = model.q_head.prompt_query
    d = taps.shape[1]

    def forward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollout token indices and Q(s_t, a_t) of every token of trees ``batch``, each (n,)."""
        chosen = [trees[i] for i in batch.tolist()]
        width = max(t.prompt_length - 1 + t.n_tokens for t in chosen)
        inputs = torch.zeros(len(chosen), width, d)
        positions = torch.zeros(len(chosen), width, dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(chosen), 1, 1)  # padding attends to itself
        rows, columns, index = [], [], []
        for row, tree in enumerate(chosen):
            n_prompt = tree.prompt_length - 1
            start = int(prompt_start[tree.prompt])
            inputs[row, :n_prompt] = prompt_taps[start : start + n_prompt]
            inputs[row, n_prompt : n_prompt + tree.n_tokens] = taps[tree.first_token : tree.first_token + tree.n_tokens]
            positions[row, :n_prompt] = torch.arange(n_prompt)
            positions[row, n_prompt : n_prompt + tree.n_tokens] = tree.token_position
            allowed[row, :n_prompt, :n_prompt] = torch.ones(n_prompt, n_prompt, dtype=torch.bool).tril()
            allowed[row, n_prompt : n_prompt + tree.n_tokens, :n_prompt] = True
            allowed[row, n_prompt : n_prompt + tree.n_tokens, n_prompt : n_prompt + tree.n_tokens] = tree.token_mask
            rows.append(torch.full((tree.n_tokens,), row))
            columns.append(torch.arange(n_prompt, n_prompt + tree.n_tokens))
            index.append(torch.arange(tree.first_token, tree.first_token + tree.n_tokens))
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        with _autocast(device):  # bf16 matmuls on a GPU; the parameters and optimizer state stay float32
            features = model.features(inputs.to(device), mask[:, None].to(device), positions.to(device)).float()
        row_index, column_index, token_index = torch.cat(rows), torch.cat(columns), torch.cat(index)
        states = features[row_index.to(device), column_index.to(device)]  # (n, d)
        prompt = prompt_features[[chosen[r].prompt for r in row_index.tolist()]].to(device) if use_prompt else None
        q = model.q_head.q_values(states, tokens[token_index, None].to(device), prompt).squeeze(1)  # (n,)
        return token_index, q

    batches, evaluate = _sequence_batches(train_trees, forward, config.sequence_batch_size)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        index, q = forward(batch)
        loss = nn.functional.mse_loss(q.float(), targets[index].to(q.device))
        if (config.sibling_loss_weight > 0 or config.listwise_loss_weight > 0) and groups.numel():
            picked = groups[torch.isin(group_prompt, batch)]  # (S, C) the batch's branch states
            if picked.numel():
                full = torch.zeros(tokens.numel(), device=q.device).index_put((index.to(q.device),), q.float())
                q_picked = full[picked.clamp(min=0).to(q.device)]  # (S, C)
                loss = loss + state_terms(
                    q_picked, picked.to(q.device), targets.to(q.device), ref_log_prob.to(q.device), config
                )
        return loss

    states = StateMetrics(rollouts, token_target, measured)
    return _train(
        model, batches, loss_of, train_trees, val_trees, evaluate, states, config, progress, should_cancel,
        measure_start=True,
    )  # fmt: skip


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bfloat16 autocast for a forward on a CUDA device that supports it; nothing elsewhere (on
    the CPU the branch trains in float32 throughout)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sequence_batches(
    train: torch.Tensor, forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], size: int
) -> tuple[
    Callable[[torch.Generator], Iterator[torch.Tensor]], Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
]:
    """`_train`'s ``batches`` and ``evaluate`` for fits whose examples are sequences (trees, paths):
    shuffled minibatches of ``size`` of ``train``, and predictions of any examples in such batches,
    ``forward(batch)`` giving the rollout token indices and predictions of a batch."""

    def batches(generator: torch.Generator) -> Iterator[torch.Tensor]:
        yield from train[torch.randperm(train.numel(), generator=generator)].split(size)

    def evaluate(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            outs = [forward(b) for b in idx.split(size)]
        if not outs:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]).float().cpu()

    return batches, evaluate


def _train(
    model: nn.Module,
    batches: Callable[[torch.Generator], Iterator[torch.Tensor]],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    states: StateMetrics,
    config: TrainingConfig,
    progress: FitProgress | None,
    should_cancel: Callable[[], bool] | None,
    *,
    measure_start: bool = False,
) -> FitResult:
    """The shared loop: AdamW epochs over minibatches, the epoch best on ``config.selection_metric`` kept.

    ``evaluate(idx)`` gives the rollout token indices and predictions of examples ``idx``. With
    no validation examples, selection and metrics use the training examples. With
    ``measure_start``, the starting weights compete as epoch 0 (a warm start worth keeping).
    """
    optimizer = torch.optim.AdamW(
        _param_groups(model, config), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    select_on = val_idx if val_idx.numel() else train_idx
    targets = states.token_target

    def measure() -> dict[str, float]:
        index, prediction = evaluate(select_on)
        pooled = regression_metrics(prediction, targets[index])
        within = states(index, prediction)
        return {"val_mse": pooled["mse"], "r2": pooled["r2"], "spearman": pooled["spearman"], **within}

    def rank(metrics: dict[str, float]) -> tuple[bool, float, float]:
        """Higher is better: a finite selection metric first, then it, then the pooled MSE."""
        value = metrics[config.selection_metric]
        value = -value if config.selection_metric == "val_mse" else value
        return (math.isfinite(value), value if math.isfinite(value) else 0.0, -metrics["val_mse"])

    best_metrics: dict[str, float] | None = None
    best_state, best_epoch, stale = copy.deepcopy(model.state_dict()), 0, 0
    history: list[dict[str, float]] = []
    start_metrics: dict[str, float] = {}
    if measure_start:
        model.eval()
        best_metrics = measure()
        start_metrics = {f"start_{config.selection_metric}": best_metrics[config.selection_metric]}
    model.train()
    for epoch in range(1, config.epochs + 1):
        total, count = 0.0, 0
        for batch in batches(generator):
            if should_cancel is not None and should_cancel():
                raise TrainingCancelled("fit cancelled")
            loss = loss_of(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.numel()
            count += batch.numel()
        model.eval()
        scores = measure()
        model.train()
        row = {"epoch": float(epoch), "train_loss": total / max(count, 1), **scores}
        history.append(row)
        if progress is not None:
            progress(epoch, config.epochs, row)
        if best_metrics is None or rank(scores) > rank(best_metrics):
            best_metrics, best_state, best_epoch, stale = scores, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    metrics = {
        **(best_metrics if best_metrics is not None else measure()),
        **start_metrics,
        "train_loss": history[best_epoch - 1]["train_loss"] if best_epoch else math.nan,
        "best_epoch": float(best_epoch),
        "epochs_run": float(len(history)),
        "n_train": float(train_idx.numel()),
        "n_val": float(val_idx.numel()),
    }
    return FitResult(metrics=metrics, history=history)


@dataclass
class _LeafPath:
    prompt: int  # index into rollouts.prompts
    input_ids: list[int]  # prompt + response token ids
    prompt_length: int
    tokens: list[int]  # flat rollout index of every response token
    supervised: list[bool]  # first path to contain that token


def _leaf_paths(rollouts: TreeRollouts, base: BaseModel) -> list[_LeafPath]:
    prompt_ids = base.tokenizer(rollouts.prompts)["input_ids"]  # as the rollouts encoded them
    seen: set[int] = set()
    paths: list[_LeafPath] = []
    for leaf in rollouts.leaves().tolist():
        chain: list[int] = []
        node = leaf
        while node >= 0:
            chain.append(node)
            node = int(rollouts.node_parent[node])
        index = [
            t
            for n in reversed(chain)
            for t in range(int(rollouts.node_start[n]), int(rollouts.node_start[n] + rollouts.node_length[n]))
        ]
        supervised = [t not in seen for t in index]
        seen.update(index)
        prompt = int(rollouts.node_prompt[leaf])
        ids = list(prompt_ids[prompt])
        paths.append(
            _LeafPath(
                prompt=prompt,
                input_ids=ids + rollouts.tokens[index].tolist(),
                prompt_length=len(ids),
                tokens=index,
                supervised=supervised,
            )
        )
    return paths


def _param_groups(model: nn.Module, config: TrainingConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the shared head's vectors (per-token bias, projection bias, state
    value) learn at ``bias_learning_rate``; matrices, and every separate-backbone parameter, at
    ``learning_rate``; a side branch's layers at ``side_learning_rate``, its head as a shared
    head. Adam moves a parameter by about its rate per step whatever the gradient's scale, so at
    the matrix rate a per-token bias could not reach a useful size in a short fit."""
    if isinstance(model, SideBranchValueModel):
        layers = [p for p in model.branch.parameters() if p.requires_grad]
        return [{"params": layers, "lr": config.side_learning_rate}, *_param_groups(model.q_head, config)]
    if not isinstance(model, SharedBackboneQHead):
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    # The d x d projections are the matrices; the state value's weight is 2-D (1 x d) but a vector.
    matrices = [p for name, p in model.named_parameters() if p.requires_grad and name.endswith("proj.weight")]
    vectors = [p for name, p in model.named_parameters() if p.requires_grad and not name.endswith("proj.weight")]
    return [{"params": matrices}, {"params": vectors, "lr": config.bias_learning_rate}]
