"""Tree rollouts: the Monte Carlo samples value models learn from (docs/architecture.md, "Training, registry, workers").

For every prompt a tree of continuations is sampled. The root is the prompt; it fans out into
``k_root`` children, every later node into ``k_children``, for at most ``n_layers`` layers
below the root. Each node holds one segment of sampled tokens whose length is drawn uniformly
from ``[segment_min_tokens, segment_max_tokens]``. A segment that samples EOS ends there (EOS
included) and its node is a leaf; so is every node of the last layer. The budget
``t_max_tokens`` caps the planned tokens of a tree: a layer whose planned segments do not fit
in what is left is not sampled (its parents stay leaves); the first layer always is, its
segments shortened to share the budget. The plan (every node's segment length, layer by
layer) is drawn before sampling, as if no segment ended early; the nodes below an EOS are
then simply not sampled. With ``leaf_completion_tokens`` > 0, every node of the deepest
planned layer samples on until EOS or until its response (root to node) has exactly that many
tokens, so leaves are whole responses, scored as a user would see them.

Contrastive expansion (``expand_top_m`` = m > 0): the nodes of layer ``n_layers`` are not
``k_children`` samples but the m most probable distinct candidates of the base at their
parent's state (deterministic, ranks 0..m-1 of pi_ref's top-k; not the tilted policy's, whose
top-m at iteration >= 1 would be the candidates the previous head already favours, which
removes the contrast to learn from), each then continued by sampling. Such a branch state has
m labelled actions instead of two random ones: the contrast the tilt needs. In a share
``ceiling_share`` of the trees (chosen by prompt, not by the plan's generator) each candidate
is expanded twice, two leaves apiece, so the noise of a single-leaf sibling difference can be
measured (`mavis_lc.training.metrics`). Its children are
``node_forced``; a parent's value weighs them by pi renormalised over them
(`mavis_lc.training.targets`), so it still estimates the state's value under pi.

Sampling is MAVIS with the given heads at weight 1 (no heads: plain top-k sampling from
pi_ref), and each token records ``log pi(a|s) - log pi_ref_T(a|s)`` (full-vocabulary
reference), ``log Z_k(s)``, the log of the base's probability mass on the step's top-k (so
``log pi - log pi_ref^k = log_ratio + log_z_k``), the exact ``KL(pi || pi_ref^k)`` of the
step's state over its k candidates (what the soft targets charge: the sampled log-ratio has the
same expectation and far more variance), the base's hidden state h(s) the step read, so the
shared-backbone fit needs no second forward, and ``log pi(a|s)`` itself. Per prompt, the
prompt-pooled query (the mean of the base's final hidden states over the user turn's tokens,
`mavis_lc.query_span`) is kept for heads that read it. EOS is
banned until a response has ``min_response_tokens`` tokens (default 1: no empty answers);
the log-ratios stay against the unconstrained base.

Batching: the trees of ``rollout_prompts_per_batch`` prompts are sampled together on one KV
cache, one row per node being sampled, and the rows never wait for each other: when a node's
segment ends, its row is handed over to its children at the next step (`KVBatch.select`
copies the row's cache into theirs) and they read its last token, so every row of every
forward samples a real token. The KV cache is never recomputed.

Determinism and sharding: every tree draws its plan from a generator seeded with
``(seed, iteration, prompt index)`` and every node samples with its own generator seeded with
``(seed, iteration, prompt index, node index)``, where the prompt index is global (so the
iterations of one run draw fresh randomness). Batches are aligned
to multiples of ``rollout_prompts_per_batch``, so a shard starting at such a multiple runs
exactly the batches an unsharded run does, and `merge_rollouts` of the shards equals it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import ConfigurationError, ModelLoadError, TrainingCancelled
from mavis_lc.training.config import TrainingConfig
from mavis_lc.training.files import write_atomic
from mavis_lc.value_models import KVBatch, ValueModel

_META_KEY = "mavis_rollouts"


@dataclass
class TreeRollouts:
    """The trees of a contiguous range of prompts, flattened into arrays.

    Nodes of one tree are contiguous, root first, parents before children; a node's tokens
    are contiguous in ``tokens``. Roots hold no tokens. N nodes, T tokens, d hidden size.
    """

    first_prompt: int
    """Global index of ``prompts[0]`` in the run's prompt list."""
    prompts: list[str]
    """Formatted prompt texts (what the base model read)."""
    node_prompt: torch.Tensor  # (N,) long: index into ``prompts``
    node_parent: torch.Tensor  # (N,) long: parent node, -1 for roots
    node_start: torch.Tensor  # (N,) long: index of the node's first token
    node_length: torch.Tensor  # (N,) long: tokens in the node's segment
    node_eos: torch.Tensor  # (N,) bool: the segment ended with EOS
    tokens: torch.Tensor  # (T,) long: sampled token ids
    log_ratio: torch.Tensor  # (T,) float32: log pi(a_t|s_t) - log pi_ref_T(a_t|s_t)
    log_z_k: torch.Tensor  # (T,) float32: log of pi_ref_T's mass on the top-k candidates of s_t (<= 0)
    hidden: torch.Tensor  # (T, d) float32: base final hidden state h(s_t) before each token
    log_prob: torch.Tensor  # (T,) float32: log pi(a_t|s_t), the sampling policy's (tilted) probability
    node_forced: torch.Tensor  # (N,) bool: the node's first token was its parent's rank-r candidate, not a sample
    prompt_hidden: torch.Tensor  # (P, d) float32: mean base final hidden state over each prompt's user-turn tokens
    state_kl: torch.Tensor | None = None
    """(T,) float32: KL(pi || pi_ref^k) at s_t, exact over the step's k candidates; None in files
    sampled from pi_ref alone before it was recorded, where it is 0."""
    tap_layer: int | None = None
    """The base decoder layer whose inputs `tap` and `prompt_tap` hold (for side-branch fits); None: not recorded."""
    tap: torch.Tensor | None = None  # (T, d) float32: the input of layer tap_layer at the last token of s_t
    prompt_tap: torch.Tensor | None = None  # (sum of prompt_length, d) float32: its inputs over every prompt's tokens
    prompt_length: torch.Tensor | None = None  # (P,) long: tokens of each prompt (with tap_layer)

    @property
    def log_ratio_topk(self) -> torch.Tensor:
        """(T,) ``log pi(a_t|s_t) - log pi_ref^k(a_t|s_t)``, against the base renormalised over its top-k."""
        return self.log_ratio + self.log_z_k

    @property
    def n_nodes(self) -> int:
        return int(self.node_parent.shape[0])

    def token_node(self) -> torch.Tensor:
        """(T,) the node each token belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_nodes), self.node_length)

    def leaves(self) -> torch.Tensor:
        """Indices of the nodes without children (roots excluded), ascending."""
        has_child = torch.zeros(self.n_nodes, dtype=torch.bool)
        has_child[self.node_parent[self.node_parent >= 0]] = True
        return torch.nonzero(~has_child & (self.node_parent >= 0)).squeeze(1)

    def response_tokens(self, node: int) -> list[int]:
        """The sampled tokens from the root down to the end of ``node``'s segment."""
        path: list[int] = []
        while node >= 0:
            path.append(node)
            node = int(self.node_parent[node])
        out: list[int] = []
        for n in reversed(path):
            start = int(self.node_start[n])
            out.extend(self.tokens[start : start + int(self.node_length[n])].tolist())
        return out

    def prompt_taps(self, prompt: int) -> torch.Tensor:
        """The layer-`tap_layer` inputs over prompt ``prompt``'s tokens, (prompt tokens, d)."""
        if self.tap_layer is None or self.prompt_tap is None or self.prompt_length is None:
            raise ConfigurationError("these rollouts recorded no layer inputs (sample them with tap_layer)")
        start = int(self.prompt_length[:prompt].sum())
        return self.prompt_tap[start : start + int(self.prompt_length[prompt])]

    def to_bytes(self) -> bytes:
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        if self.state_kl is not None:
            tensors["state_kl"] = self.state_kl.contiguous()
        if self.tap_layer is not None:
            tensors.update({name: getattr(self, name).contiguous() for name in _TAP_TENSORS})
        meta = json.dumps({"first_prompt": self.first_prompt, "prompts": self.prompts, "tap_layer": self.tap_layer})
        return bytes(save_safetensors_bytes(tensors, metadata={_META_KEY: meta}))

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (prompts in its metadata), atomically."""
        return write_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> TreeRollouts:
        data = Path(path).read_bytes()
        try:
            tensors = load_safetensors_bytes(data)
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            meta = json.loads(header["__metadata__"][_META_KEY])
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{path} is not a rollout file: {exc}") from exc
        missing = sorted(set(_TENSORS) - set(tensors))
        if missing:
            raise ModelLoadError(f"{path} is a rollout file of an older format (no {', '.join(missing)}): sample again")
        tap_layer = meta.get("tap_layer")
        if tap_layer is not None and not set(_TAP_TENSORS) <= set(tensors):
            raise ModelLoadError(f"{path} names tap layer {tap_layer} but lacks its tensors: sample again")
        return cls(
            first_prompt=int(meta["first_prompt"]), prompts=list(meta["prompts"]), tap_layer=tap_layer, **tensors
        )


_TENSORS = (
    "node_prompt", "node_parent", "node_start", "node_length", "node_eos", "tokens", "log_ratio", "log_z_k", "hidden",
    "log_prob", "node_forced", "prompt_hidden",
)  # fmt: skip
_TAP_TENSORS = ("tap", "prompt_tap", "prompt_length")  # present when a tap layer was recorded


def merge_rollouts(parts: Sequence[TreeRollouts]) -> TreeRollouts:
    """Concatenate shards covering consecutive prompt ranges into one `TreeRollouts`.

    Raises:
        ConfigurationError: the shards leave a gap or overlap.
    """
    ordered = sorted(parts, key=lambda p: p.first_prompt)
    if not ordered:
        raise ConfigurationError("no rollout shards to merge")
    for left, right in itertools.pairwise(ordered):
        if left.first_prompt + len(left.prompts) != right.first_prompt:
            raise ConfigurationError(
                f"rollout shards are not consecutive: prompts from {left.first_prompt} "
                f"({len(left.prompts)} of them), then from {right.first_prompt}"
            )
    tap_layers = {part.tap_layer for part in ordered}
    if len(tap_layers) > 1:
        raise ConfigurationError(f"rollout shards recorded different tap layers: {sorted(map(str, tap_layers))}")
    tap_layer = ordered[0].tap_layer
    with_kl = all(part.state_kl is not None for part in ordered)
    names = _TENSORS + (("state_kl",) if with_kl else ()) + (_TAP_TENSORS if tap_layer is not None else ())
    node_offset = prompt_offset = token_offset = 0
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for part in ordered:
        shifted = {
            "node_prompt": part.node_prompt + prompt_offset,
            "node_parent": torch.where(part.node_parent >= 0, part.node_parent + node_offset, part.node_parent),
            "node_start": part.node_start + token_offset,
        }
        for name in names:
            pieces[name].append(shifted.get(name, getattr(part, name)))
        node_offset += part.n_nodes
        prompt_offset += len(part.prompts)
        token_offset += int(part.tokens.shape[0])
    return TreeRollouts(
        first_prompt=ordered[0].first_prompt,
        prompts=[p for part in ordered for p in part.prompts],
        tap_layer=tap_layer,
        **{name: torch.cat(values) for name, values in pieces.items()},
    )


@torch.no_grad()
def sample_trees(
    base: BaseModel,
    prompts: Sequence[str],
    config: TrainingConfig,
    *,
    heads: Sequence[ValueModel] = (),
    first_prompt: int = 0,
    iteration: int = 0,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    tap_layer: int | None = None,
) -> TreeRollouts:
    """Sample one tree per prompt (see the module docstring for the tree and its batching).

    Args:
        prompts: formatted prompt texts (chat template already applied).
        config: tree shape (``k_root``, ``k_children``, ``n_layers``, segment range,
            ``t_max_tokens``), sampling (``top_k``, ``temperature``, ``beta``), ``seed`` and
            ``rollout_prompts_per_batch``.
        heads: value models to sample MAVIS(pi_ref, heads) with, each at weight 1; none: pi_ref.
        first_prompt: global index of ``prompts[0]``; a multiple of ``rollout_prompts_per_batch``.
        iteration: the training iteration, part of every random seed.
        progress: called with (prompts done, prompts, metrics) after every batch; the metrics are
            ``tokens`` sampled so far, ``tokens_per_s`` and ``planned_tokens`` (`planned_tokens`).
        should_cancel: polled before every decoding step.
        tap_layer: also record the inputs of this base decoder layer (`TreeRollouts.tap`,
            `TreeRollouts.prompt_tap`), which a side branch reading that layer trains on.

    Raises:
        ConfigurationError: ``first_prompt`` is not aligned, or a prompt leaves no room for the tree.
        TrainingCancelled: ``should_cancel()`` returned True.
    """
    size = config.rollout_prompts_per_batch
    if first_prompt % size:
        raise ConfigurationError(
            f"a rollout shard must start at a multiple of rollout_prompts_per_batch={size}, got {first_prompt}"
        )
    if not prompts:
        empty = torch.zeros(0, base.hidden_size)
        taps = (empty, empty, torch.zeros(0, dtype=torch.long)) if tap_layer is not None else None
        return _flatten([], [], first_prompt, [], [], set(), empty, tap_layer, taps)
    parts: list[TreeRollouts] = []
    planned = planned_tokens(config, len(prompts), first_prompt=first_prompt, iteration=iteration)
    if progress is not None:  # the plan, before any token: what this call will generate at most
        progress(0, len(prompts), {"tokens": 0, "tokens_per_s": 0.0, "planned_tokens": planned})
    started = time.perf_counter()
    for start in range(0, len(prompts), size):
        batch = list(prompts[start : start + size])
        parts.append(
            _sample_batch(base, batch, first_prompt + start, iteration, config, heads, should_cancel, tap_layer)
        )
        if progress is not None:
            tokens = sum(int(part.tokens.numel()) for part in parts)
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            progress(
                start + len(batch), len(prompts), {"tokens": tokens, "tokens_per_s": rate, "planned_tokens": planned}
            )
    return merge_rollouts(parts)


def planned_tokens(config: TrainingConfig, n_prompts: int, *, first_prompt: int = 0, iteration: int = 0) -> int:
    """The tokens that `sample_trees` plans for ``n_prompts`` trees (the plans it draws, leaf
    completion included): an upper bound, since a segment that samples EOS ends early and the
    nodes below it are not sampled. Cheap: no model runs."""
    total = 0
    for t in range(n_prompts):
        prompt = first_prompt + t
        plan = _plan_tree(_plan_rng(config, iteration, prompt), config, _doubled(config, iteration, prompt))
        total += sum(plan.length)
    return total


def longest_response(config: TrainingConfig) -> int:
    """The most tokens one root-to-leaf path of a tree can hold: the layers' segments share the
    ``t_max_tokens`` budget, and leaf completion lies outside it."""
    layers = min(config.segment_max_tokens * config.n_layers, config.t_max_tokens)
    return max(layers, config.leaf_completion_tokens)


@dataclass
class _Plan:
    """The planned shape of one tree, drawn before any token is sampled (index 0: the root)."""

    parent: list[int]
    length: list[int]  # planned segment length of every node (0 for the root)
    children: list[list[int]]
    forced: list[int]  # the rank among pi's candidates a node's first token is forced to; -1: sampled


def _plan_tree(rng: random.Random, config: TrainingConfig, doubled: bool = False) -> _Plan:
    """Plan the full tree layer by layer (breadth first), as if no segment ended with EOS;
    ``doubled``: each expanded candidate gets two nodes (ranks 0..m-1, then 0..m-1 again)."""
    plan = _Plan(parent=[-1], length=[0], children=[[]], forced=[-1])
    budget = config.t_max_tokens
    previous = [0]
    for layer in range(1, config.n_layers + 1):
        expand = config.expand_top_m > 0 and layer == config.n_layers
        fan_out = config.k_root if layer == 1 else config.k_children
        if expand:
            fan_out = config.expand_top_m * (2 if doubled else 1)
        count = len(previous) * fan_out
        if layer > 1 and count * config.segment_min_tokens > budget:
            break
        lengths = [rng.randint(config.segment_min_tokens, config.segment_max_tokens) for _ in range(count)]
        if sum(lengths) > budget:
            if layer > 1:
                break
            lengths = [max(1, min(n, budget // count)) for n in lengths]
        budget -= sum(lengths)
        current = []
        for i, length in enumerate(lengths):
            node = len(plan.parent)
            parent = previous[i // fan_out]
            plan.parent.append(parent)
            plan.length.append(length)
            plan.children.append([])
            plan.forced.append((i % fan_out) % config.expand_top_m if expand else -1)
            plan.children[parent].append(node)
            current.append(node)
        previous = current
    if config.leaf_completion_tokens:
        for node in previous:
            depth = sum(plan.length[n] for n in _ancestors(plan, plan.parent[node]))
            plan.length[node] = max(1, config.leaf_completion_tokens - depth)
    return plan


def _plan_rng(config: TrainingConfig, iteration: int, prompt_index: int) -> random.Random:
    """The generator a tree's plan is drawn from."""
    return random.Random(f"tree:{config.seed}:{iteration}:{prompt_index}")


def _doubled(config: TrainingConfig, iteration: int, prompt_index: int) -> bool:
    """Whether this tree expands each candidate twice (a ``ceiling_share`` of the trees)."""
    if config.ceiling_share <= 0 or config.expand_top_m <= 0:
        return False
    return random.Random(f"ceiling:{config.seed}:{iteration}:{prompt_index}").random() < config.ceiling_share


def _ancestors(plan: _Plan, node: int) -> list[int]:
    """``node`` and every node above it, up to the root."""
    path = []
    while node >= 0:
        path.append(node)
        node = plan.parent[node]
    return path


def _sample_batch(
    base: BaseModel,
    prompts: list[str],
    first_prompt: int,
    iteration: int,
    config: TrainingConfig,
    heads: Sequence[ValueModel],
    should_cancel: Callable[[], bool] | None,
    tap_layer: int | None,
) -> TreeRollouts:
    device = base.device
    input_ids, attention_mask, user_mask = (t.to(device) for t in base.encode_prompts(prompts))  # (G, P) each
    if input_ids.shape[1] + longest_response(config) > base.max_context:
        raise ConfigurationError(
            f"prompts of up to {input_ids.shape[1]} tokens leave no room for trees in a context of {base.max_context}"
        )
    read = {h.tap_layer for h in heads if h.tap_layer is not None} | ({tap_layer} if tap_layer is not None else set())
    state = KVBatch(base.model.base_model, base.model.get_input_embeddings(), tap_layers=read)
    state.prefill(input_ids, attention_mask, user_mask)
    prompt_hidden = state.prompt_hidden.float().cpu()  # (G, d) the query pooled over each prompt's user turn
    prompt_record = None
    if tap_layer is not None:
        lengths = attention_mask.sum(-1)  # (G,) left padding: a prompt's tokens are its last ones
        inputs = state.prefill_taps[tap_layer]  # (G, P, d)
        flat = torch.cat([inputs[g, inputs.shape[1] - int(n) :] for g, n in enumerate(lengths.tolist())])
        prompt_record = (flat.float().cpu(), lengths.cpu())
    for head in heads:
        head.begin(
            input_ids, attention_mask, state.prefill_taps.get(head.tap_layer) if head.tap_layer is not None else None
        )
    eos = torch.tensor(base.eos_token_ids, device=device, dtype=torch.long)
    plans = [
        _plan_tree(_plan_rng(config, iteration, p), config, _doubled(config, iteration, p))
        for p in range(first_prompt, first_prompt + len(prompts))
    ]
    offsets = list(itertools.accumulate((len(plan.parent) for plan in plans), initial=0))  # global node ids

    def new_row(t: int, node: int) -> tuple[int, int, torch.Generator]:
        seed = _node_seed(config.seed, iteration, first_prompt + t, node)
        return t, node, torch.Generator(device=device).manual_seed(seed)

    rows: list[tuple[int, int, torch.Generator]] = []  # (tree, node, its generator) held by each batch row
    source: list[int] = []  # the prompt row each first-layer node starts from
    for t, plan in enumerate(plans):
        for child in plan.children[0]:
            rows.append(new_row(t, child))
            source.append(t)
    _select(state, heads, torch.tensor(source, device=device))
    count = torch.zeros(len(rows), dtype=torch.long, device=device)  # (R,) tokens each row's node has sampled
    depth = torch.zeros(len(rows), dtype=torch.long, device=device)  # (R,) response tokens before each row's node
    no_eos = torch.ones(1, base.vocab_size, dtype=torch.bool, device=device)  # (1, V)
    no_eos[:, eos] = False
    ended_with_eos: set[int] = set()
    records: list[tuple[torch.Tensor, ...]] = []
    while rows:
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled("rollouts cancelled")
        node_id = torch.tensor([offsets[t] + n for t, n, _ in rows], device=device)  # (R,)
        planned = torch.tensor([plans[t].length[n] for t, n, _ in rows], device=device)  # (R,)
        hidden = state.hidden  # (R, d) h(s) of every row
        short = (depth + count < config.min_response_tokens)[:, None]  # (R, 1) EOS still banned
        rank = [plans[t].forced[n] for t, n, _ in rows]
        forced = torch.tensor(rank, device=device).masked_fill(count > 0, -1)  # (R,) only a node's first token
        tokens, log_ratio, log_z_k, log_prob, state_kl = _sample_step(
            base.logits(hidden),
            hidden,
            heads,
            beta=config.beta,
            top_k=config.top_k,
            temperature=config.temperature,
            generators=[g for _, _, g in rows],
            allowed=no_eos | ~short if bool(short.any()) else None,
            forced=forced if bool((forced >= 0).any()) else None,
            prompt_hidden=state.prompt_hidden,
        )  # (R,) each
        tap = state.taps[tap_layer] if tap_layer is not None else hidden[:, :0]  # (R, d) or (R, 0)
        records.append((node_id, tokens, log_ratio, log_z_k, hidden, log_prob, tap, state_kl))
        count += 1
        hit_eos = torch.isin(tokens, eos)  # (R,)
        done = hit_eos | (count >= planned)  # (R,)
        if bool(done.any()):
            # A finished node hands its row over to its children (none after EOS, none for a leaf).
            next_rows: list[tuple[int, int, torch.Generator]] = []
            source = []
            for r, (is_done, is_eos, row) in enumerate(zip(done.tolist(), hit_eos.tolist(), rows, strict=True)):
                t, node, _ = row
                if not is_done:
                    next_rows.append(row)
                    source.append(r)
                elif is_eos:
                    ended_with_eos.add(offsets[t] + node)
                else:
                    for child in plans[t].children[node]:
                        next_rows.append(new_row(t, child))
                        source.append(r)
            if not next_rows:
                break  # nothing samples after these tokens: they need no forward
            index = torch.tensor(source, device=device)  # (R',)
            depth = torch.where(done, depth + count, depth)[index]  # (R',) children start below their parent
            count = torch.where(done, 0, count)[index]  # (R',) children start at 0
            tokens = tokens[index]  # (R',) every row reads its source row's last token
            rows = next_rows
            _select(state, heads, index)
        state.feed(tokens)
        for head in heads:
            head.advance(tokens, taps=state.taps[head.tap_layer] if head.tap_layer is not None else None)
    taps = None
    if prompt_record is not None:
        step_taps = torch.cat([r[6] for r in records]).float().cpu() if records else torch.zeros(0, base.hidden_size)
        taps = (step_taps, *prompt_record)
    return _flatten(plans, prompts, first_prompt, offsets, records, ended_with_eos, prompt_hidden, tap_layer, taps)


def _select(state: KVBatch, heads: Sequence[ValueModel], index: torch.Tensor) -> None:
    """Keep (and repeat) rows ``index`` (R,) of the base's KV batch and of every head with its own cache."""
    state.select(index)
    for head in heads:
        head.select_rows(index)


def _sample_step(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    heads: Sequence[ValueModel],
    *,
    beta: float,
    top_k: int,
    temperature: float,
    generators: Sequence[torch.Generator],
    allowed: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
    prompt_hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rollout step: `mavis_step`'s pi with every head at weight 1, sampled from each row's generator.

    The distribution is exactly `mavis_step`'s; the randomness differs: the exponential race
    runs over the k candidates only (k draws per row instead of one per vocabulary entry),
    which is what makes per-node generators cheap at tree batch sizes.

    Args:
        logits: base next-token logits, (R, V); hidden: base hidden states, (R, d).
        generators: one per row.
        allowed: (R, V) or (1, V) bool, the tokens the top-k is taken among (None: all).
        forced: (R,) long: where >= 0, the row takes the base's candidate of that rank (0: the
            most probable under pi_ref) instead of a sample; -1: it samples.
        prompt_hidden: (R, d) the prompt-pooled query of every row.

    Returns:
        The sampled tokens (R,), their ``log pi(a|s) - log pi_ref_T(a|s)`` against the
        unconstrained base (R,), ``log Z_k(s)``, the log of the base's mass on the
        candidates (R,), ``log pi(a|s)`` (R,), and ``KL(pi || pi_ref^k)`` at each row's state (R,).
    """
    ref_logits = logits.float() / temperature  # (R, V) pi_ref at temperature T
    log_normaliser = torch.logsumexp(ref_logits, dim=-1)  # (R,)
    legal_logits = ref_logits if allowed is None else ref_logits.masked_fill(~allowed, float("-inf"))  # (R, V)
    topk_logits, candidates = legal_logits.topk(top_k, dim=-1)  # (R, k), (R, k)
    log_z_k = torch.logsumexp(topk_logits, dim=-1) - log_normaliser  # (R,)
    tilt = torch.zeros_like(topk_logits)  # (R, k)
    for head in heads:
        tilt += beta * head.q_values(hidden, candidates, prompt_hidden).float()
    log_probs = torch.log_softmax(topk_logits + tilt, dim=-1)  # (R, k) log pi over the candidates
    noise = torch.stack([torch.empty(top_k, device=logits.device).exponential_(generator=g) for g in generators])
    choice = (log_probs.exp() / noise).argmax(dim=-1, keepdim=True)  # (R, 1) the exponential race
    if forced is not None:  # topk sorts the candidates by the base's logits: rank r is index r
        choice = torch.where(forced[:, None] >= 0, forced.clamp(min=0)[:, None], choice)  # (R, 1)
    tokens = candidates.gather(1, choice).squeeze(1)  # (R,)
    log_prob = log_probs.gather(1, choice).squeeze(1)  # (R,)
    ref_log_prob = topk_logits.gather(1, choice).squeeze(1) - log_normaliser  # (R,)
    ref_k = torch.log_softmax(topk_logits, dim=-1)  # (R, k) log pi_ref^k
    state_kl = (log_probs.exp() * (log_probs - ref_k)).sum(-1).clamp(min=0.0)  # (R,)
    return tokens, log_prob - ref_log_prob, log_z_k, log_prob, state_kl


def _flatten(
    plans: list[_Plan],
    prompts: list[str],
    first_prompt: int,
    offsets: list[int],
    records: list[tuple[torch.Tensor, ...]],
    ended_with_eos: set[int],
    prompt_hidden: torch.Tensor,
    tap_layer: int | None = None,
    taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> TreeRollouts:
    """Gather the per-step records (node id, token, log-ratio, log Z_k, hidden state, log pi of
    every row) into trees; ``prompt_hidden`` (P, d) is every prompt's pooled query. With
    ``tap_layer``, ``taps`` holds the per-step layer inputs (in record order, (T, d)), the
    prompts' (sum of lengths, d) and their lengths (P,).

    Nodes keep their planned (breadth-first) order, so parents come before children; a node
    is stored when it sampled at least one token (roots always).
    """
    if records:
        node_id = torch.cat([r[0] for r in records]).cpu()  # (T,) global node id of every token
        order = torch.sort(node_id, stable=True).indices  # by node, in sampling order within a node
        node_id = node_id[order]
        tokens = torch.cat([r[1] for r in records]).cpu()[order]
        log_ratio = torch.cat([r[2] for r in records]).float().cpu()[order]
        log_z_k = torch.cat([r[3] for r in records]).float().cpu()[order]
        hidden = torch.cat([r[4] for r in records]).float().cpu()[order]
        log_prob = torch.cat([r[5] for r in records]).float().cpu()[order]
        state_kl = torch.cat([r[7] for r in records]).float().cpu()[order]
        if taps is not None:
            taps = (taps[0][order], taps[1], taps[2])
    else:
        node_id = tokens = torch.zeros(0, dtype=torch.long)
        log_ratio = log_z_k = log_prob = state_kl = torch.zeros(0)
        hidden = torch.zeros(0, prompt_hidden.shape[1])
    length = torch.bincount(node_id, minlength=offsets[-1] if offsets else 0).tolist()
    stored: dict[int, int] = {}  # global node id -> index among the stored nodes
    node_prompt: list[int] = []
    node_parent: list[int] = []
    node_length: list[int] = []
    forced: list[bool] = []
    for t, plan in enumerate(plans):
        for node, parent in enumerate(plan.parent):
            g = offsets[t] + node
            if parent >= 0 and length[g] == 0:
                continue  # never sampled: below an EOS
            stored[g] = len(node_prompt)
            node_prompt.append(t)
            node_parent.append(stored[offsets[t] + parent] if parent >= 0 else -1)
            node_length.append(length[g])
            forced.append(plan.forced[node] >= 0)
    lengths = torch.tensor(node_length, dtype=torch.long)
    return TreeRollouts(
        first_prompt=first_prompt,
        prompts=prompts,
        node_prompt=torch.tensor(node_prompt, dtype=torch.long),
        node_parent=torch.tensor(node_parent, dtype=torch.long),
        node_start=torch.cumsum(lengths, 0) - lengths,
        node_length=lengths,
        node_eos=torch.tensor([g in ended_with_eos for g in stored], dtype=torch.bool),
        tokens=tokens,
        log_ratio=log_ratio,
        log_z_k=log_z_k,
        hidden=hidden,
        log_prob=log_prob,
        state_kl=state_kl,
        node_forced=torch.tensor(forced, dtype=torch.bool),
        prompt_hidden=prompt_hidden,
        tap_layer=tap_layer if taps is not None else None,
        tap=taps[0] if taps is not None else None,
        prompt_tap=taps[1] if taps is not None else None,
        prompt_length=taps[2] if taps is not None else None,
    )


def _node_seed(seed: int, iteration: int, prompt_index: int, node_index: int) -> int:
    digest = hashlib.sha256(f"node:{seed}:{iteration}:{prompt_index}:{node_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
