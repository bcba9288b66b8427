"""MAVIS decoding: the frozen base model's top-k next tokens, tilted by weighted value models.

At every step, for each row b of the batch (docs/architecture.md, "One decoding step"):

    pi(a | s) ∝ softmax( topk_logits(s) / T + beta * Σ_m weights[b, m] * Q_m(s, a) ),  a in top-k

`mavis_step` is that step in one function; `MavisDecoder` runs it over a batch of prompts with
a KV-cached base forward, per-row weights and per-row random generators (so a row's output does
not depend on what else is in the batch), stop strings, EOS, and streaming of text deltas.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import DynamicCache

from mavis_lc.base_model import BaseModel, with_cache
from mavis_lc.decoding.grammar import Grammar, GrammarCompiler, GrammarError, RowConstraint
from mavis_lc.decoding.noise import RowNoise, row_noise
from mavis_lc.decoding.static_step import DEFAULT_BUCKET, StaticBranchState, StaticDecodeStep
from mavis_lc.errors import DecodingParameterError, IncompatibleHeadError
from mavis_lc.value_models import (
    LayerTap,
    SideBranchValueModel,
    ValueModel,
    check_compatible,
    prompt_mean,
    prompt_positions,
)
from mavis_lc.weights import Weights, weight_matrix


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding parameters; `MavisDecoder.check` validates them against a base model."""

    max_new_tokens: int = 128
    """Most tokens generated per sequence (EOS included)."""
    min_new_tokens: int = 0
    """EOS is banned until this many tokens have been generated (1: no empty answers). The KL
    is still measured against the unconstrained base."""
    top_k: int = 20
    """Candidate next tokens per step (the paper uses 40; 10-20 is usually enough)."""
    temperature: float = 1.0
    """Base-model temperature T, applied before the tilt; 0 means greedy (the argmax of
    ``topk_logits + beta * tilt``, statistics at T = 1), whatever ``do_sample`` says."""
    beta: float = 1.0
    """Guidance strength: 0 gives plain top-k sampling of the base."""
    do_sample: bool = True
    """Sample from pi; False takes its argmax (greedy)."""
    seed: int | None = 0
    """Seed of every row's generator (None: fresh random seeds); see `MavisDecoder.stream`."""
    stop: tuple[str, ...] = ()
    """Strings that end a sequence; the output is cut just before the first one."""


@dataclass(frozen=True)
class RowOptions:
    """A row's own length limits and stop strings, for batches whose rows come from different
    requests (`MavisDecoder.stream`'s ``row_options``); None fields take the config's."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None

    def resolve(self, config: DecodeConfig) -> DecodeConfig:
        """``config`` with this row's fields in place of its own."""
        return replace(
            config,
            max_new_tokens=config.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens,
            min_new_tokens=config.min_new_tokens if self.min_new_tokens is None else self.min_new_tokens,
            stop=config.stop if self.stop is None else tuple(self.stop),
        )


@dataclass
class Generation:
    """One finished sequence and its statistics."""

    text: str
    token_ids: list[int]
    finish_reason: str
    """``stop`` (EOS or a stop string) or ``length`` (max_new_tokens reached)."""
    stop_sequence: str | None
    """The stop string that ended the sequence, if any."""
    prompt_tokens: int
    completion_tokens: int
    kl: float
    """Estimate of KL(pi || pi_ref) for this sequence: Σ_t log pi(a_t|s_t) - log pi_ref_T(a_t|s_t),
    against the base's full distribution (plain top-k sampling pays the top-k cut here)."""
    kl_topk: float
    """The same sum against the base renormalised over its top-k, pi_ref^k: what the steering
    itself costs (0 for plain top-k sampling)."""
    mean_tilt: dict[str, float]
    """Per objective: mean over steps of Q(chosen) - E_{pi_ref top-k}[Q], in normalised reward units."""
    weights: dict[str, float]
    seed: int
    constrained: bool = False
    """Whether a grammar constrained the row."""
    grammar_complete: bool | None = None
    """For a constrained row: whether its output is a complete match of the grammar (False when
    max_new_tokens cut it short); None without a grammar."""

    def info(self) -> dict[str, object]:
        """The statistics as plain JSON-able values (LangChain generation_info)."""
        return {
            "finish_reason": self.finish_reason,
            "stop_sequence": self.stop_sequence,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "kl": self.kl,
            "kl_topk": self.kl_topk,
            "mean_tilt": dict(self.mean_tilt),
            "weights": dict(self.weights),
            "seed": self.seed,
            "constrained": self.constrained,
            "grammar_complete": self.grammar_complete,
        }


@dataclass
class StreamStep:
    """What one decoding step adds: a text delta per row ("" when nothing new or finished)."""

    deltas: list[str]
    finished: list[Generation | None] = field(default_factory=list)
    """Rows that finished at this step carry their `Generation`; others are None."""


@dataclass
class StepOutput:
    """The result of one `mavis_step` for a batch of B states."""

    tokens: torch.Tensor  # (B,) chosen token ids
    candidates: torch.Tensor  # (B, k) the base model's top-k token ids
    probs: torch.Tensor  # (B, k) pi over the candidates
    log_ratio: torch.Tensor  # (B,) log pi(a|s) - log pi_ref_T(a|s), full-vocabulary reference
    log_ratio_topk: torch.Tensor  # (B,) log pi(a|s) - log pi_ref^k(a|s), reference renormalised over the top-k
    tilt: torch.Tensor  # (B, M) Q_m(chosen) - E_{pi_ref top-k}[Q_m]


def _query_of(head: ValueModel, prompt_hidden: torch.Tensor | Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """The prompt-pooled query ``head`` reads, from one query or one per pool."""
    if isinstance(prompt_hidden, Mapping):
        return prompt_hidden.get(head.query_pool) if head.query_pool is not None else None
    return prompt_hidden


@torch.no_grad()
def mavis_step(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    heads: Sequence[ValueModel],
    weights: torch.Tensor,
    *,
    beta: float,
    top_k: int,
    temperature: float,
    generators: Sequence[torch.Generator] | RowNoise | None,
    allowed: torch.Tensor | None = None,
    prompt_hidden: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
) -> StepOutput:
    """One MAVIS decoding step for a batch.

    Args:
        logits: base next-token logits, (B, V), as the model gives them.
        hidden: base final hidden states at the last position, (B, d).
        heads: M value models; weights: (B, M) per-row objective weights.
        generators: one per row to sample with (each advanced by a vocabulary's draws), or the
            rows' `RowNoise` streams (the decoder's: faster on CPU); None takes the argmax (greedy).
        allowed: (B, V) bool, the tokens a row may take (say, EOS banned); the top-k is taken
            among them, but ``log_ratio`` is still against the unconstrained base.
        prompt_hidden: (B, d) the prompt-pooled query of every row (`prompt_mean`), for heads that
            read it; or one such query per pool (``{"user": ..., "all": ...}``), each head reading
            its own (`ValueModel.query_pool`).
    """
    ref_logits = logits.float() / temperature  # (B, V) pi_ref at temperature T
    ref_logprobs = torch.log_softmax(ref_logits, dim=-1)  # (B, V) the unconstrained base
    legal_logits = ref_logits if allowed is None else ref_logits.masked_fill(~allowed, float("-inf"))  # (B, V)
    topk_logits, candidates = legal_logits.topk(top_k, dim=-1)  # (B, k), (B, k)
    ref_k = torch.softmax(topk_logits, dim=-1)  # (B, k) pi_ref^k: the base renormalised over the candidates
    if heads:
        q = torch.stack(
            [head.q_values(hidden, candidates, _query_of(head, prompt_hidden)).float() for head in heads], dim=-1
        )  # (B, k, M)
    else:
        q = topk_logits.new_zeros(*topk_logits.shape, 0)  # (B, k, 0)
    tilt = beta * (q * weights[:, None, :]).sum(-1)  # (B, k)
    log_probs = torch.log_softmax(topk_logits + tilt, dim=-1)  # (B, k) log pi over the candidates
    scores = log_probs  # (B, k) greedy takes the argmax of pi
    if generators is not None:
        # torch.multinomial(p, 1) is argmax(p / q) with q ~ Exp(1) drawn over the whole vocabulary.
        # Taking the same q from each row's stream samples exactly what plain top-k sampling with
        # that seed samples; only q at the candidates is read (mavis_lc.decoding.noise).
        if isinstance(generators, RowNoise):
            noise = generators.at(candidates, ref_logits)  # (B, k)
        else:
            noise = row_noise(ref_logits, generators).gather(1, candidates)  # (B, k)
        scores = log_probs.exp() / noise  # (B, k)
    choice = scores.argmax(dim=-1, keepdim=True)  # (B, 1)
    tokens = candidates.gather(1, choice).squeeze(1)  # (B,)
    chosen_log_prob = log_probs.gather(1, choice).squeeze(1)  # (B,)
    chosen_q = q.gather(1, choice[:, :, None].expand(-1, 1, q.shape[-1])).squeeze(1)  # (B, M)
    expected_q = (ref_k[:, :, None] * q).sum(1)  # (B, M)
    return StepOutput(
        tokens=tokens,
        candidates=candidates,
        probs=log_probs.exp(),
        log_ratio=chosen_log_prob - ref_logprobs.gather(1, tokens[:, None]).squeeze(1),
        log_ratio_topk=chosen_log_prob - ref_k.gather(1, choice).log().squeeze(1),
        tilt=chosen_q - expected_q,
    )


class MavisDecoder:
    """Batched MAVIS decoding over one base model and a set of value heads (one per objective)."""

    def __init__(
        self,
        base: BaseModel,
        heads: Sequence[ValueModel] = (),
        *,
        allow_other_base: bool = False,
        compile: bool = False,
        compile_bucket: int = DEFAULT_BUCKET,
        pack_weights: bool = False,
        few_rows: bool = True,
    ) -> None:
        """``compile``: decode through a static KV cache and a `torch.compile`d step
        (`mavis_lc.decoding.static_step`); falls back to eager, with a logged reason, where
        compilation is unavailable. ``compile_bucket``: cache lengths are rounded up to a
        multiple of it, so calls of nearby lengths share one compiled step. ``pack_weights``
        (needs ``compile``): that step's large linear layers, the base's and each side branch's,
        run on oneDNN-packed copies of their weights on CPU in float32
        (`mavis_lc.decoding.packed_linear`), for one more copy of those weights in memory (304 MiB
        for SmolLM2): faster steps on some CPUs, slower on others. ``few_rows`` (with ``compile``):
        the compiled step's linear layers run the few-rows kernel on CPU in float32 where it is
        available (`mavis_lc.decoding.few_rows`: AVX-512, built once per machine); False keeps
        MKL's `F.linear`."""
        if pack_weights and not compile:
            raise DecodingParameterError("pack_weights=True needs compile=True (it packs the compiled step's layers)")
        names = [h.objective for h in heads]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise IncompatibleHeadError(f"one head per objective; got several for {', '.join(duplicates)}")
        for head in heads:
            check_compatible(head.config, base, allow_other_base=allow_other_base)
        self.base = base
        self.heads = list(heads)
        self.objectives = names
        self._backbone = base.model.base_model  # the decoder stack, final norm included
        self._tap_layers = sorted({h.tap_layer for h in self.heads if h.tap_layer is not None})
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.static_step: StaticDecodeStep | None = None
        """The compiled static-cache step (``compile=True``); one decode uses it at a time, and a
        decode that starts while it is busy runs on the eager path."""
        self._branch_steps: dict[int, StaticDecodeStep] = {}  # head index -> its side branch's step
        if compile:
            self.static_step = StaticDecodeStep(
                self._backbone,
                base.model.config,
                self._tap_layers,
                bucket=compile_bucket,
                max_length=base.max_context,
                output_head=base.model.get_output_embeddings(),
                logit_transform=base.logit_transform,
                pack_weights=pack_weights,
                few_rows=few_rows,
            )
            # Each side branch's own layers get a compiled static-cache step too, fed the tap states.
            self._branch_steps = {
                i: StaticDecodeStep(
                    head.branch,
                    head.branch.config,
                    bucket=compile_bucket,
                    max_length=base.max_context,
                    compile=self.static_step.compiled,
                    embeds=True,
                    pack_weights=pack_weights,
                    few_rows=few_rows,
                )
                for i, head in enumerate(self.heads)
                if isinstance(head, SideBranchValueModel)
            }
        self._static_lock = threading.Lock()

    @property
    def static_steps(self) -> list[StaticDecodeStep]:
        """Every compiled static-cache step of this decoder: the base's, then each side branch's."""
        return [] if self.static_step is None else [self.static_step, *self._branch_steps.values()]

    def check(self, config: DecodeConfig, prompt_tokens: int = 0) -> None:
        """Raise `DecodingParameterError` naming the first parameter out of range."""
        vocab = self.base.vocab_size
        if isinstance(config.top_k, bool) or not isinstance(config.top_k, int) or not 1 <= config.top_k <= vocab:
            raise DecodingParameterError(f"top_k must be an integer in [1, {vocab}], got {config.top_k!r}")
        if not math.isfinite(config.beta) or config.beta < 0:
            raise DecodingParameterError(f"beta must be finite and >= 0, got {config.beta!r}")
        if not (math.isfinite(config.temperature) and config.temperature >= 0):
            raise DecodingParameterError(f"temperature must be finite and >= 0 (0: greedy), got {config.temperature!r}")
        room = self.base.max_context - prompt_tokens
        if not isinstance(config.max_new_tokens, int) or not 1 <= config.max_new_tokens <= room:
            raise DecodingParameterError(
                f"max_new_tokens must be in [1, {room}] (context {self.base.max_context} minus a "
                f"{prompt_tokens}-token prompt), got {config.max_new_tokens!r}"
            )
        if not 0 <= config.min_new_tokens <= config.max_new_tokens:
            raise DecodingParameterError(
                f"min_new_tokens must be in [0, max_new_tokens={config.max_new_tokens}], got {config.min_new_tokens!r}"
            )
        if any(not isinstance(s, str) or not s for s in config.stop):
            raise DecodingParameterError(f"stop strings must be non-empty strings, got {list(config.stop)!r}")

    def generate(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None = None,
        config: DecodeConfig | None = None,
        *,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | RowConstraint | None] | None = None,
        row_options: Sequence[RowOptions] | None = None,
    ) -> list[Generation]:
        """Decode every prompt in one batched loop; see `stream` for the arguments."""
        results: list[Generation | None] = [None] * len(prompts)
        for step in self.stream(prompts, weights, config, seeds=seeds, grammars=grammars, row_options=row_options):
            for b, finished in enumerate(step.finished):
                if finished is not None:
                    results[b] = finished
        return [r for r in results if r is not None]

    def stream(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None = None,
        config: DecodeConfig | None = None,
        *,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | RowConstraint | None] | None = None,
        row_options: Sequence[RowOptions] | None = None,
    ) -> Iterator[StreamStep]:
        """Decode a batch of prompts, yielding each step's per-row text deltas.

        Args:
            prompts: B prompt strings, already formatted (chat template applied, if any).
            weights: one mapping for every row, or B mappings (per-row weights); None or a
                missing objective means weight 0.
            config: decoding parameters (default `DecodeConfig()`).
            seeds: B per-row seeds; default: ``config.seed`` for every row, so a prompt gives
                the same output alone or in any batch.
            grammars: B per-row grammars (`mavis_lc.decoding.grammar.Grammar`) or None entries for
                unconstrained rows. A row's allowed-token mask is applied to the base logits
                before the top-k, so every candidate is legal; EOS only where the grammar
                accepts. Where ``min_new_tokens`` still bans EOS but the grammar allows nothing
                else, the grammar wins. A compiled `RowConstraint` (from `constraints`) is used as
                given: the row advances it.
            row_options: B per-row `RowOptions` (max/min new tokens, stop strings) in place of
                the config's; the loop runs until the longest row is done.

        Raises:
            DecodingParameterError, InvalidWeightError, UnknownObjectiveError: bad arguments,
                raised before any decoding (a grammar that does not compile: `GrammarError`).
        """
        cfg = config or DecodeConfig()
        batch = len(prompts)
        if batch == 0:
            return
        rows = _weight_rows(weights, batch)
        row_seeds = self.row_seeds(cfg, seeds, batch)
        row_cfgs = self.row_configs(cfg, row_options, batch)
        constraints = self.constraints(grammars, batch)
        device = self.base.device
        input_ids, attention_mask, user_mask = (t.to(device) for t in self.base.encode_prompts(prompts))  # (B, P)
        prompt_lengths = attention_mask.sum(-1).tolist()
        for b, row_cfg in enumerate(row_cfgs):
            self.check(row_cfg, int(prompt_lengths[b]))
        static = self.static_step
        if static is not None and not self._static_lock.acquire(blocking=False):
            static = None  # another decode holds the compiled step: this one runs eagerly
        try:
            yield from self._decode(
                static,
                prompts,
                rows,
                row_seeds,
                row_cfgs,
                constraints,
                cfg,
                input_ids,
                attention_mask,
                user_mask,
                prompt_lengths,
            )
        finally:
            if static is not None:
                self._static_lock.release()

    def _decode(
        self,
        static: StaticDecodeStep | None,
        prompts: Sequence[str],
        rows: list[dict[str, float]],
        row_seeds: list[int],
        row_cfgs: list[DecodeConfig],
        constraints: list[RowConstraint | None],
        cfg: DecodeConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        user_mask: torch.Tensor,
        prompt_lengths: list[int],
    ) -> Iterator[StreamStep]:
        """The decode loop of `stream`, after validation; ``static``: the compiled step, or None (eager)."""
        batch = len(prompts)
        device = self.base.device
        tok = self.base.tokenizer
        max_new = [c.max_new_tokens for c in row_cfgs]
        min_new = [c.min_new_tokens for c in row_cfgs]
        weight_rows = weight_matrix(rows, self.objectives, device=device)  # (B, M)
        generators: RowNoise | None = None
        if cfg.do_sample and cfg.temperature > 0:
            generators = RowNoise.from_seeds(row_seeds, device)
        ban = torch.tensor(self.base.eos_token_ids, device=device, dtype=torch.long)
        position_ids = prompt_positions(attention_mask)  # (B, P)

        tracker = _TextTracker(tok, [c.stop for c in row_cfgs], set(self.base.eos_token_ids), batch)
        temperature = cfg.temperature or 1.0  # greedy at T = 0 reads the tilt and statistics at T = 1
        # Per step, per row: log pi - log pi_ref, log pi - log pi_ref^k and the tilt, kept until a
        # row finishes, so that tokens past a stop-string cut count in none of its statistics.
        steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # Grad mode is per thread and a stream may be resumed on another thread (async
        # callers), so inference mode is entered around each stretch of work, never across a yield.
        with torch.inference_mode():
            cache = DynamicCache(config=self.base.model.config) if static is None else None
            tap = LayerTap(self._backbone, self._tap_layers)
            if static is not None:
                prompt_states = static.start(input_ids, attention_mask, position_ids, max(max_new), tap)  # (B, P, d)
            else:
                with tap:
                    prompt_states = self._backbone(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        **with_cache(self._backbone, cache),
                        use_cache=True,
                    ).last_hidden_state  # (B, P, d)
            for i, head in enumerate(self.heads):  # after the prefill: side branches read its layer inputs
                if static is not None and i in self._branch_steps:
                    assert isinstance(head, SideBranchValueModel)
                    state = StaticBranchState(self._branch_steps[i], max(max_new), head.q_head.proj.weight.dtype)
                    head.begin(input_ids, attention_mask, _tap_of(head, tap), state=state)
                else:
                    head.begin(input_ids, attention_mask, _tap_of(head, tap))
            hidden = prompt_states[:, -1]  # (B, d)
            pools = {"user": user_mask, "all": attention_mask}  # (B, P) each
            prompt_hidden = {
                pool: prompt_mean(prompt_states, pools[pool])  # (B, d) the prompt-pooled query
                for pool in {head.query_pool for head in self.heads if head.query_pool is not None}
            }
            next_position = position_ids[:, -1]  # (B,)
            no_eos = None
            if any(min_new):
                no_eos = torch.ones(batch, self.base.vocab_size, dtype=torch.bool, device=device)  # (B, V)
                for b, m in enumerate(min_new):
                    if m:
                        no_eos[b, ban] = False
        for step in range(max(max_new)):
            with torch.inference_mode():
                # (B, V) the model's own head and post-processing (packed on the compiled path)
                logits = self.base.logits(hidden) if static is None else static.logits(hidden)
                if no_eos is not None:
                    for b, m in enumerate(min_new):
                        if m and step == m:  # row b may end from now on
                            no_eos[b] = True
                allowed = no_eos if step < max(min_new) else None
                if any(c is not None for c in constraints):
                    allowed = _grammar_mask(constraints, tracker.done, allowed, batch, self.base.vocab_size, device)
                out = mavis_step(
                    logits,
                    hidden,
                    self.heads,
                    weight_rows,
                    beta=cfg.beta,
                    top_k=cfg.top_k,
                    temperature=temperature,
                    generators=generators,
                    allowed=allowed,
                    prompt_hidden=prompt_hidden,
                )
                steps.append((out.log_ratio.double().cpu(), out.log_ratio_topk.double().cpu(), out.tilt.double().cpu()))
            chosen = out.tokens.tolist()
            for b, constraint in enumerate(constraints):
                if constraint is not None and not tracker.done[b]:
                    constraint.consume(chosen[b])
            deltas = tracker.push(chosen, last_step=[step + 1 == m for m in max_new])
            finished: list[Generation | None] = [None] * batch
            for b in tracker.newly_done:
                n = tracker.kept[b]
                kl, kl_topk, tilt = (torch.stack([s[i][b] for s in steps[:n]]).sum(0) if n else None for i in range(3))
                finished[b] = Generation(
                    text=tracker.final_text[b],
                    token_ids=tracker.token_ids[b][:n],
                    finish_reason=tracker.finish_reason[b],
                    stop_sequence=tracker.stop_sequence[b],
                    prompt_tokens=int(prompt_lengths[b]),
                    completion_tokens=n,
                    kl=float(kl) if kl is not None else 0.0,
                    kl_topk=float(kl_topk) if kl_topk is not None else 0.0,
                    mean_tilt={
                        m: float(tilt[i]) / n if tilt is not None else 0.0 for i, m in enumerate(self.objectives)
                    },
                    weights=dict(rows[b]),
                    seed=row_seeds[b],
                    constrained=constraints[b] is not None,
                    grammar_complete=_complete(constraints[b]),
                )
            yield StreamStep(deltas=deltas, finished=finished)
            if bool(tracker.done.all()):
                break
            with torch.inference_mode():
                next_position = next_position + 1
                if static is not None:
                    hidden, states = static.step(out.tokens, next_position)  # (B, d), {layer: (B, 1, d)}
                else:
                    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
                    with LayerTap(self._backbone, self._tap_layers) as tap:
                        hidden = self._backbone(
                            input_ids=out.tokens[:, None],
                            attention_mask=attention_mask,
                            position_ids=next_position[:, None],
                            **with_cache(self._backbone, cache),
                            use_cache=True,
                        ).last_hidden_state[:, -1]  # (B, d)
                    states = tap.states
                for head in self.heads:
                    taps = None if head.tap_layer is None else states[head.tap_layer]
                    head.advance(out.tokens, taps=None if taps is None else taps[:, -1])

    def constraints(
        self, grammars: Sequence[Grammar | RowConstraint | None] | None, batch: int
    ) -> list[RowConstraint | None]:
        """One compiled constraint per row (None: unconstrained); compile errors before decoding.
        Compiled constraints pass through as they are. Safe to call from several threads."""
        if grammars is None:
            return [None] * batch
        if len(grammars) != batch:
            raise GrammarError(f"got {len(grammars)} grammars for {batch} prompts; give one per prompt")
        if all(g is None for g in grammars):
            return [None] * batch
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.base.tokenizer, self.base.vocab_size, self.base.eos_token_ids)
        compiled: dict[Grammar, RowConstraint] = {}
        out: list[RowConstraint | None] = []
        for grammar in grammars:
            if isinstance(grammar, RowConstraint):
                out.append(grammar)
                continue
            checked = Grammar.coerce(grammar)
            if checked is None:
                out.append(None)
                continue
            if checked not in compiled:  # compile once per distinct grammar, then a copy per row
                compiled[checked] = self._grammars.constraint(checked)
                out.append(compiled[checked])
            else:
                out.append(compiled[checked].copy())
        return out

    @staticmethod
    def row_configs(cfg: DecodeConfig, row_options: Sequence[RowOptions] | None, batch: int) -> list[DecodeConfig]:
        """Each row's config: ``cfg`` with its `RowOptions` (one per row) in place, else ``cfg``."""
        if row_options is None:
            return [cfg] * batch
        if len(row_options) != batch:
            raise DecodingParameterError(f"got {len(row_options)} row options for {batch} prompts; give one per prompt")
        return [o.resolve(cfg) for o in row_options]

    @staticmethod
    def row_seeds(cfg: DecodeConfig, seeds: Sequence[int] | None, batch: int) -> list[int]:
        """Each row's seed: ``seeds`` (one per row), else ``cfg.seed`` for all, else fresh ones."""
        if seeds is not None:
            if len(seeds) != batch:
                raise DecodingParameterError(f"got {len(seeds)} seeds for {batch} prompts")
            return [int(s) for s in seeds]
        if cfg.seed is not None:
            return [int(cfg.seed)] * batch
        return [random.randrange(2**63) for _ in range(batch)]


def _grammar_mask(
    constraints: Sequence[RowConstraint | None],
    done: torch.Tensor,
    no_eos: torch.Tensor | None,
    batch: int,
    vocab: int,
    device: torch.device,
) -> torch.Tensor:
    """(B, V) bool: each constrained, unfinished row's grammar mask, and ``no_eos`` where it
    leaves that row something to take."""
    allowed = torch.ones(batch, vocab, dtype=torch.bool) if no_eos is None else no_eos.cpu().clone()
    for b, constraint in enumerate(constraints):
        if constraint is None or done[b]:
            continue
        legal = constraint.allowed()  # (V,)
        both = legal & allowed[b]
        allowed[b] = both if bool(both.any()) else legal
    return allowed.to(device)


def _complete(constraint: RowConstraint | None) -> bool | None:
    return None if constraint is None else constraint.accepting


def _tap_of(head: ValueModel, tap: LayerTap) -> torch.Tensor | None:
    """The inputs of ``head``'s tap layer that ``tap`` captured, (B, t, d); None for heads that read none."""
    return None if head.tap_layer is None else tap.states[head.tap_layer]


def _weight_rows(weights: Weights | Sequence[Weights] | None, batch: int) -> list[dict[str, float]]:
    if weights is None:
        return [{} for _ in range(batch)]
    if isinstance(weights, Mapping):
        return [dict(weights) for _ in range(batch)]
    rows = list(weights)
    if len(rows) != batch:
        raise DecodingParameterError(f"got {len(rows)} weight rows for {batch} prompts; give one per prompt")
    return [dict(r) for r in rows]


class _TextTracker:
    """Per-row generated ids and text: EOS, stop strings (cut exactly), and safe stream deltas.

    A delta never contains text that might still turn out to be the start of a stop string,
    nor a trailing partial UTF-8 character.

    Text grows incrementally: with a fast tokenizer that does no clean-up of spaces, each
    row has a `tokenizers.decoders.DecodeStream`, so a step decodes only the new token (not the
    row's whole token list again); it holds back a trailing partial UTF-8 character itself. A
    finished row's text is its whole token list decoded once, exactly as before. Other
    tokenizers decode the whole list every step.
    """

    def __init__(self, tokenizer: object, stops: Sequence[Sequence[str]], eos_ids: set[int], batch: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [list(s) for s in stops]
        """Each row's stop strings."""
        self.eos_ids = eos_ids
        self.token_ids: list[list[int]] = [[] for _ in range(batch)]
        self.kept = [0] * batch
        """Per finished row: its tokens that made the output (those past a stop-string cut do not)."""
        self.emitted = [0] * batch
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.newly_done: list[int] = []
        self.final_text = [""] * batch
        self.finish_reason = [""] * batch
        self.stop_sequence: list[str | None] = [None] * batch
        self.text = [""] * batch
        """Each row's text so far (from its decode stream, or decoded whole)."""
        backend = getattr(tokenizer, "_tokenizer", None)
        incremental = isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend: Any = backend if incremental else None
        self._streams = [DecodeStream(skip_special_tokens=True) for _ in range(batch)] if incremental else None

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))  # type: ignore[attr-defined]

    def _grow(self, b: int, token: int) -> str:
        """Row ``b``'s text after ``token`` (its ids already include it)."""
        if self._streams is None:
            self.text[b] = self._decode(self.token_ids[b])
        else:
            piece = self._streams[b].step(self._backend, token)
            if piece:
                self.text[b] += piece
        return self.text[b]

    def push(self, tokens: list[int], *, last_step: Sequence[bool]) -> list[str]:
        """Take one token per row (``last_step[b]``: row b's length limit is reached)."""
        self.newly_done = []
        deltas = [""] * len(tokens)
        for b, token in enumerate(tokens):
            if self.done[b]:
                continue
            self.token_ids[b].append(token)
            before = len(self.text[b].rstrip("\ufffd"))  # text up to here cannot change
            text = self._grow(b, token)
            cut, matched = self._find_stop(text, self.stops[b], before)
            if matched is not None:
                self._finish(b, text[:cut], "stop", matched)
                self.kept[b] = self._tokens_for(b, cut)
            elif token in self.eos_ids:
                self._finish(b, self._decode(self.token_ids[b]), "stop", None)
            elif last_step[b]:
                self._finish(b, self._decode(self.token_ids[b]), "length", None)
            if self.done[b]:
                final = self.final_text[b]
                deltas[b] = final[self.emitted[b] :]
                self.emitted[b] = len(final)
                continue
            safe = len(text) - self._holdback(text, self.stops[b])
            if safe > self.emitted[b]:
                deltas[b] = text[self.emitted[b] : safe]
                self.emitted[b] = safe
        return deltas

    def _tokens_for(self, b: int, cut: int) -> int:
        """The fewest leading tokens of row ``b`` whose text reaches ``cut`` characters."""
        ids = self.token_ids[b]
        n = len(ids)
        while n > 0 and len(self._decode(ids[: n - 1])) >= cut:
            n -= 1
        return n

    def _finish(self, b: int, text: str, reason: str, matched: str | None) -> None:
        self.done[b] = True
        self.kept[b] = len(self.token_ids[b])
        self.newly_done.append(b)
        self.final_text[b] = text
        self.finish_reason[b] = reason
        self.stop_sequence[b] = matched

    @staticmethod
    def _find_stop(text: str, stop: Sequence[str], grown_from: int = 0) -> tuple[int, str | None]:
        """The earliest stop string in ``text`` and where it starts; only matches that end past
        ``grown_from`` (the text's length before this step) are new, so the search starts there."""
        best: tuple[int, str | None] = (len(text), None)
        for s in stop:
            i = text.find(s, max(0, grown_from - len(s) + 1))
            if i != -1 and i < best[0]:
                best = (i, s)
        return best

    @staticmethod
    def _holdback(text: str, stop: Sequence[str]) -> int:
        """Characters at the end of ``text`` that must not be streamed yet.

        A trailing replacement character may still become another character when the next
        token completes its bytes; before it, the longest suffix that could begin a stop
        string is held back too.
        """
        stable = text.rstrip("\ufffd")
        hold = 0
        for s in stop:
            for n in range(min(len(s) - 1, len(stable)), hold, -1):
                if stable.endswith(s[:n]):
                    hold = n
                    break
        return len(text) - len(stable) + hold
