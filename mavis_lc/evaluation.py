"""Evaluation harness: Pareto sweeps of MAVIS weights against baselines, with what each costs.

`evaluate` decodes held-out prompts x seeds with:

- ``base``: plain top-k sampling of the base model (all weights 0), the reference of every gain;
- ``mavis``: MAVIS decoding at every weight setting of a grid, same prompts and seeds;
- ``best-of-N`` (oracle-reward selection): N plain samples per (prompt, seed), keeping the one
  with the highest weighted sum of the objectives' TRUE rewards, each normalised by the base
  rows' mean and standard deviation, for every weight setting of the grid but the all-zero one.
  Candidate j of row (prompt, seed s) is sampled with seed ``s * max(N) + j``, drawn once for
  the largest N; a smaller N keeps the first N candidates, so best-of-2 and best-of-8 see the
  same samples;
- ``reward-guided`` (with ``reward_guided=True``; oracle rewards too): token search in the style
  of ARGS, where every step tilts the base's top-k candidates by the weighted, normalised true
  rewards of the response so far plus each candidate (`RewardGuidedScorer`), at MAVIS's beta.

Every method bans EOS at the first generated token (``min_tokens``, default 1: an empty answer
is not a response). Every row reports, over the prompts x seeds, the mean reward per objective
and its gain in standard deviations of the base rewards, the KL from the base model against its
full distribution (``kl``) and against its top-k renormalised (``kl_topk``, what the steering
itself costs: 0 for plain sampling; best-of-N adds ``log N - (N-1)/N``, the bound on what its
choice adds, to both), the empty-response rate, the degeneracy rate (`mavis_lc.degeneracy`; a
row more than 5 points above the base row's is flagged) and mean response length, and its cost: base
forward passes per generated token (1 for MAVIS, whose shared-backbone heads read the base's
hidden states; N for best-of-N), true-reward calls per generated token (0 for MAVIS; k per
objective for every unfinished row at every step of reward-guided search) and wall seconds per
generated token.

Statistics: 95% intervals come from a cluster bootstrap over prompts (`mavis_lc.bootstrap`: the
seeds of one prompt are not independent samples), paired across rows, so a gain over the base
and every MAVIS − baseline difference has an interval of its own. Each method family's points
give a hypervolume above a fixed reference point, the base row minus one base standard deviation
per objective, so adding a method never moves another's hypervolume; its interval comes from the
same bootstrap with the reference held fixed.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mavis_lc import bootstrap
from mavis_lc.base_model import BaseModel
from mavis_lc.decoding import DecodeConfig, Generation, MavisDecoder
from mavis_lc.decoding.engine import MavisEngine
from mavis_lc.degeneracy import flagged, is_degenerate
from mavis_lc.errors import ConfigurationError
from mavis_lc.extras import MissingExtraError
from mavis_lc.frontier import Frontier, soft_best_of_n
from mavis_lc.objectives import Objective, get_objective
from mavis_lc.plots import FrontPoint, GainPanel, save_fronts_plot, save_gain_kl_plot
from mavis_lc.training import format_prompts
from mavis_lc.value_models import ValueHeadConfig, ValueModel

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(label, done, total)`` after every decoded chunk."""


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how."""

    grid_steps: int = 5
    """Weights per objective in [0, 1] (5: 0, 0.25, ..., 1); settings are the all-zero one and
    every combination on the simplex (weights summing to 1)."""
    seeds: int = 2
    """Samples per prompt (seeds 0, 1, ...)."""
    best_of: tuple[int, ...] = (2, 4, 8)
    """The N of the best-of-N baselines; () for none."""
    frontier_samples: int = 0
    """Base samples per prompt and seed behind the soft best-of-N frontier (`mavis_lc.frontier`;
    reliable to log N − 1 nats); 0: the best-of-N candidates (the largest N). More samples reach
    further at a decoding cost of that many rows."""
    beta: float = 2.0
    """MAVIS guidance strength."""
    top_k: int = 20
    """Candidate next tokens per step, for every method."""
    max_tokens: int = 48
    """Longest response."""
    batch_size: int = 16
    """Rows decoded together."""
    reward_guided: bool = False
    """Also run reward-guided token search (ARGS-style: every step scores the top-k candidate
    texts with the true rewards), at every weight setting; for cheap rewards only."""
    chat_template: bool = True
    """Send each prompt as a user turn through the tokenizer's chat template."""
    min_tokens: int = 1
    """EOS is banned until a response has this many tokens (1: no empty answers; 0: allowed)."""
    bootstrap_resamples: int = bootstrap.RESAMPLES
    """Cluster-bootstrap replicates (over prompts) behind every interval."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap draws."""

    def check(self) -> None:
        if self.grid_steps < 2:
            raise ConfigurationError(f"grid_steps must be >= 2, got {self.grid_steps}")
        if self.seeds < 1:
            raise ConfigurationError(f"seeds must be >= 1, got {self.seeds}")
        if any(n < 2 for n in self.best_of):
            raise ConfigurationError(f"best_of values must be >= 2, got {list(self.best_of)}")
        if self.frontier_samples == 1 or self.frontier_samples < 0:
            raise ConfigurationError(f"frontier_samples must be 0 or >= 2, got {self.frontier_samples}")
        if self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigurationError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.bootstrap_resamples < 100:
            raise ConfigurationError(f"bootstrap_resamples must be >= 100, got {self.bootstrap_resamples}")

    def decode_config(self, beta: float | None = None) -> DecodeConfig:
        """The decoding parameters every method of the evaluation shares."""
        return DecodeConfig(
            max_new_tokens=self.max_tokens,
            min_new_tokens=self.min_tokens,
            top_k=self.top_k,
            beta=self.beta if beta is None else beta,
        )


Interval = tuple[float, float]
"""A 95% interval (low, high)."""


@dataclass
class MethodRow:
    """One method at one weight setting: means over prompts x seeds, 95% cluster-bootstrap intervals."""

    method: str
    """``base``, ``mavis``, a variant's name, ``reward-guided`` or ``best-of-N``."""
    oracle: bool
    """The method reads the objectives' true rewards while choosing (best-of-N, reward-guided)."""
    weights: dict[str, float]
    reward: dict[str, float]
    reward_ci: dict[str, Interval]
    gain_sd: dict[str, float]
    """Mean reward minus the base's, in standard deviations of the base rewards."""
    gain_ci: dict[str, Interval]
    """The gain's interval, paired with the base row over the same resampled prompts."""
    kl: float
    """Mean KL from the base model per response against its full distribution, nats."""
    kl_ci: Interval
    kl_topk: float
    """Mean KL per response against the base renormalised over its top-k (0 for plain sampling)."""
    kl_topk_ci: Interval
    empty_rate: float
    """Fraction of responses that are empty (or only whitespace)."""
    degenerate_rate: float
    """Fraction of responses that are degenerate text (`mavis_lc.degeneracy`: character or digit
    runs, a word repeated, loops): a gain made of them is reward hacking, not steering."""
    eos_rate: float
    """Fraction of responses that ended with EOS (the rest reached ``max_tokens``)."""
    mean_tokens: float
    """Mean response length in tokens."""
    mean_tokens_ci: Interval
    forwards_per_token: float
    reward_calls_per_token: float
    """True-reward evaluations per generated token, all objectives counted (0 for MAVIS)."""
    seconds_per_token: float
    tokens: int
    n: int
    kl_efficiency: float = math.nan
    """The row's utility gain (Σ weight x gain, base SD) over the soft best-of-N frontier's gain at
    the row's ``kl_topk`` (`mavis_lc.frontier`); NaN where that KL is past the frontier's reach."""

    @property
    def label(self) -> str:
        """The method's name, marked when it selects with the true rewards."""
        return f"{self.method} (oracle reward)" if self.oracle else self.method


@dataclass
class Comparison:
    """A steered family against a baseline family (or against a steered family listed after it:
    ``mavis`` against each variant, a variant against each later one), paired over the same
    resampled prompts. Per-objective differences are between the two families' rows at weight
    1 on that objective alone."""

    family: str
    baseline: str
    hypervolume_diff: float
    hypervolume_diff_ci: Interval
    gain_diff: dict[str, float]
    """The family's gain minus the baseline's (base SD)."""
    gain_diff_ci: dict[str, Interval]
    kl_topk_diff: dict[str, float]
    kl_topk_diff_ci: dict[str, Interval]
    tokens_diff: dict[str, float]
    """Mean response length, family minus baseline (tokens)."""
    tokens_diff_ci: dict[str, Interval]


@dataclass
class EvalReport:
    objectives: list[str]
    settings: EvalSettings
    n_prompts: int
    rows: list[MethodRow]
    reference: list[float]
    """The hypervolume reference point: the base row's mean minus one base SD, per objective."""
    hypervolume: dict[str, float] = field(default_factory=dict)
    """Per method family (``mavis``, variants, ``best-of-N``), the base row counted in every family."""
    hypervolume_ci: dict[str, Interval] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    excluded_prompts: int = 0
    """Evaluation prompts dropped because a head was trained on them."""
    calibration: BetaCalibration | None = None
    """How beta was chosen, when it was calibrated to a KL budget."""
    frontiers: list[Frontier] = field(default_factory=list)
    """The soft best-of-N frontier of every steered weight setting (none without base samples)."""

    def family(self, name: str) -> list[MethodRow]:
        return [r for r in self.rows if r.method in (name, "base")]

    def single_objective_row(self, method: str, objective: str) -> MethodRow:
        """``method``'s row at weight 1 on ``objective`` alone."""
        for row in self.rows:
            if row.method == method and row.weights.get(objective) == 1.0:
                return row
        raise KeyError(f"no {method} row with {objective} at weight 1")

    def degenerate_flag(self, row: MethodRow) -> bool:
        """Whether ``row`` writes degenerate text more than 5 points above the base row (`flagged`)."""
        return flagged(row.degenerate_rate, self.rows[0].degenerate_rate)

    def single_objective_gain(self, method: str, objective: str) -> float:
        """The gain (base SD) on ``objective`` of ``method`` at weight 1 on it alone."""
        return self.single_objective_row(method, objective).gain_sd[objective]


def weight_grid(objectives: Sequence[str], steps: int) -> list[dict[str, float]]:
    """The all-zero setting, then every setting of weights in {0, 1/(steps-1), ..., 1} summing to 1."""
    simplex = [
        {o: c / (steps - 1) for o, c in zip(objectives, combo, strict=True)}
        for combo in itertools.product(range(steps), repeat=len(objectives))
        if sum(combo) == steps - 1
    ]
    return [dict.fromkeys(objectives, 0.0), *sorted(simplex, key=lambda w: tuple(-w[o] for o in objectives))]


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The volume dominated by ``points`` (higher is better on every axis) above ``reference``;
    exact, by slicing along the last axis (fine for the tens of points of a sweep)."""
    dims = len(reference)
    kept = [list(p) for p in points if all(p[i] > reference[i] for i in range(dims))]
    if not kept:
        return 0.0
    if dims == 1:
        return max(p[0] for p in kept) - reference[0]
    levels = sorted({p[-1] for p in kept}, reverse=True)
    volume = 0.0
    for upper, lower in zip(levels, [*levels[1:], reference[-1]], strict=True):
        above = [p[:-1] for p in kept if p[-1] >= upper]
        volume += hypervolume(above, reference[:-1]) * (upper - lower)
    return volume


class RewardGuidedScorer(ValueModel):
    """Reward-guided token search in the style of ARGS: "Q" of a candidate is the objective's true
    reward of the response so far plus that token, normalised by ``mean`` and ``std``.

    It plugs into `MavisDecoder` as a value model, so the tilt, weights and beta work as for
    MAVIS; each step scores the k candidate texts of every unfinished row in one reward call (a
    row that has sampled EOS is finished; the evaluation uses no stop strings). Set `prompts`
    (the raw user turns of the batch's rows) before decoding; reward functions receive them.
    """

    def __init__(self, base: BaseModel, objective: Objective, mean: float, std: float) -> None:
        super().__init__()
        self.config = ValueHeadConfig.for_base(
            base, objective.name, architecture="reward_guided", reward_mean=mean, reward_std=std
        )
        self.reward = objective
        self.tokenizer = base.tokenizer
        self.eos_ids = set(base.eos_token_ids)
        self.prompts: list[str] = []
        self.generated: list[list[int]] = []
        self.calls = 0
        """Texts scored so far."""

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, taps: torch.Tensor | None = None) -> None:
        if len(self.prompts) != input_ids.shape[0]:
            raise ConfigurationError(f"set prompts for all {input_ids.shape[0]} rows before decoding")
        self.generated = [[] for _ in range(input_ids.shape[0])]

    def advance(
        self, token_ids: torch.Tensor, active: torch.Tensor | None = None, taps: torch.Tensor | None = None
    ) -> None:
        for row, token in zip(self.generated, token_ids.tolist(), strict=True):
            if not row or row[-1] not in self.eos_ids:
                row.append(token)

    def q_values(
        self, hidden: torch.Tensor, candidate_ids: torch.Tensor, prompt_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows, k = candidate_ids.shape
        active = [b for b, row in enumerate(self.generated) if not row or row[-1] not in self.eos_ids]
        q = torch.zeros(rows, k)  # finished rows: their samples are discarded, so they are not scored
        if active:
            cands = candidate_ids.tolist()
            texts = self.tokenizer.batch_decode(
                [[*self.generated[b], a] for b in active for a in cands[b]], skip_special_tokens=True
            )
            scores = self.reward.score([self.prompts[b] for b in active for _ in range(k)], texts)
            self.calls += len(texts)
            normalised = (torch.tensor(scores, dtype=torch.float32) - self.config.reward_mean) / self.config.reward_std
            q[active] = normalised.view(len(active), k)
        return q.to(hidden.device)


def evaluate(
    engine: MavisEngine,
    prompts: Sequence[str],
    settings: EvalSettings | None = None,
    *,
    variants: Mapping[str, MavisEngine] | None = None,
    rewards: Mapping[str, Objective] | None = None,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Run the sweep and the baselines on ``prompts`` (raw user turns); see the module docstring.

    Args:
        engine: the base model and one value head per objective.
        variants: more MAVIS head sets over the same base and objectives, swept over the same grid
            and reported under their names (say ``it0`` against ``it1`` heads, or shared against
            separate backbones).
        rewards: the true reward of each head's objective; default ``get_objective(name)``.
    """
    settings = settings or EvalSettings()
    settings.check()
    objectives = engine.objectives
    if not objectives:
        raise ConfigurationError("evaluation needs at least one value head")
    if not prompts:
        raise ConfigurationError("evaluation needs at least one prompt")
    texts = format_prompts(engine.base.tokenizer, prompts, settings.chat_template)
    rows = [(p, s) for p in range(len(prompts)) for s in range(settings.seeds)]
    row_prompt = [p for p, _ in rows]
    config = settings.decode_config()
    report_progress = progress or (lambda label, done, total: None)

    variants = dict(variants or {})
    for name, other in variants.items():
        if other.objectives != objectives or other.base.model_id != engine.base.model_id:
            raise ConfigurationError(
                f"variant {name!r} has objectives {other.objectives} on {other.base.model_id}; "
                f"it must match {objectives} on {engine.base.model_id}"
            )
        if name in ("base", "mavis", "reward-guided") or name.startswith("best-of-"):
            raise ConfigurationError(f"variant name {name!r} is taken; use another")
    scorers = {o: (rewards or {}).get(o) or get_objective(o) for o in objectives}

    def decode(
        label: str,
        weights: dict[str, float],
        row_seeds: Sequence[tuple[int, int]],
        by: MavisEngine | MavisDecoder = engine,
        scorers_to_feed: Sequence[RewardGuidedScorer] = (),
    ) -> tuple[list[Generation], float]:
        def feed(chunk: list[int]) -> None:
            for scorer in scorers_to_feed:
                scorer.prompts = [prompts[p] for p in chunk]

        start = time.perf_counter()
        out = _generate_rows(
            by, texts, row_seeds, weights, config, settings.batch_size,
            before_chunk=feed, after_chunk=lambda done: report_progress(label, done, len(row_seeds)),
        )  # fmt: skip
        return out, time.perf_counter() - start

    def score(row_prompts: Sequence[int], generations: Sequence[Generation]) -> tuple[dict[str, list[float]], float]:
        start = time.perf_counter()
        raw = [prompts[p] for p in row_prompts]
        scores = {o: scorers[o].score(raw, [g.text for g in generations]) for o in objectives}
        return scores, time.perf_counter() - start

    def run(method: str, weights: dict[str, float], generations: Sequence[Generation], **cost: float) -> _Run:
        """A one-forward-per-token method's run; reward-guided search reads the true rewards."""
        scores, _ = score(row_prompt, generations)
        oracle = method == "reward-guided"
        return _Run.of(method, weights, scores, generations, forwards=1.0, oracle=oracle, **cost)

    grid = weight_grid(objectives, settings.grid_steps)
    results: list[_Run] = []
    sweeps = [("base", engine, grid[:1]), ("mavis", engine, grid[1:])]
    sweeps += [(name, other, grid[1:]) for name, other in variants.items()]
    for method, by, settings_of in sweeps:
        for weights in settings_of:
            generations, seconds = decode(f"{method} {weights_label(weights)}", weights, rows, by)
            results.append(run(method, weights, generations, reward_calls=0.0, seconds=seconds))

    norm = {o: (statistics.fmean(v), _stdev(v)) for o, v in results[0].values.items() if o in objectives}
    if settings.reward_guided:
        guides = [RewardGuidedScorer(engine.base, scorers[o], *norm[o]) for o in objectives]
        guided = MavisDecoder(engine.base, guides)
        for weights in grid[1:]:
            calls_before = sum(g.calls for g in guides)
            generations, seconds = decode(f"reward-guided {weights_label(weights)}", weights, rows, guided, guides)
            calls = sum(g.calls for g in guides) - calls_before
            tokens = max(sum(g.completion_tokens for g in generations), 1)
            results.append(run("reward-guided", weights, generations, reward_calls=calls / tokens, seconds=seconds))
    frontiers: list[Frontier] = []
    if settings.best_of or settings.frontier_samples:
        largest = max((*settings.best_of, settings.frontier_samples))
        candidate_rows = [(p, s * largest + j) for p, s in rows for j in range(largest)]
        zero = dict.fromkeys(objectives, 0.0)
        candidates, decode_s = decode(f"best-of-{largest} samples", zero, candidate_rows)
        cand_scores, score_s = score([p for p, _ in candidate_rows], candidates)
        z = {o: [(x - norm[o][0]) / norm[o][1] for x in cand_scores[o]] for o in objectives}
        utilities = [[sum(w[o] * z[o][c] for o in objectives) for c in range(len(candidates))] for w in grid[1:]]
        by_row = {o: np.array(z[o]).reshape(len(rows), largest) for o in objectives}
        for weights, utility in zip(grid[1:], utilities, strict=True):
            frontiers.append(soft_best_of_n(np.array(utility).reshape(len(rows), largest), weights, by_row))
        for n in sorted(settings.best_of):
            share = n / largest  # of the candidate decode and scoring time this N would spend
            # KL of a best-of-n choice over its sampler is at most log n - (n-1)/n (Beirami et al.).
            bound = math.log(n) - (n - 1) / n
            for weights, utility in zip(grid[1:], utilities, strict=True):
                chosen = [max(range(r * largest, r * largest + n), key=utility.__getitem__) for r in range(len(rows))]
                picked = [candidates[c] for c in chosen]
                tokens = sum(g.completion_tokens for g in picked)
                results.append(
                    _Run.of(
                        f"best-of-{n}", weights, {o: [cand_scores[o][c] for c in chosen] for o in objectives},
                        picked, forwards=float(n), reward_calls=n * len(objectives) * len(rows) / max(tokens, 1),
                        seconds=(decode_s + score_s) * share, kl_bound=bound, oracle=True,
                    )
                )  # fmt: skip
    report = _report(results, objectives, norm, row_prompt, len(prompts), settings, [*variants])
    report.frontiers = frontiers
    for row in report.rows[1:]:
        frontier = next((f for f in frontiers if f.weights == row.weights), None)
        if frontier is not None:
            at = frontier.gain_at(row.kl_topk)
            gain = sum(w * row.gain_sd[o] for o, w in row.weights.items())
            row.kl_efficiency = gain / at if at > 0 else math.nan
    return report


def _report(
    results: list[_Run],
    objectives: Sequence[str],
    norm: Mapping[str, tuple[float, float]],
    row_prompt: Sequence[int],
    n_prompts: int,
    settings: EvalSettings,
    variants: Sequence[str],
) -> EvalReport:
    """Every row's statistics, the hypervolumes and the comparisons, all on one set of bootstrap draws."""
    draws = bootstrap.resample_prompts(n_prompts, settings.bootstrap_resamples, settings.bootstrap_seed)
    metrics = [*objectives, "kl", "kl_topk", "tokens"]
    kl, kl_topk, tokens = (metrics.index(m) for m in ("kl", "kl_topk", "tokens"))
    # (runs, metrics, prompts) per-prompt means, then (runs, metrics, resamples) replicate means.
    means = np.stack([[bootstrap.prompt_means(r.values[m], row_prompt, n_prompts) for m in metrics] for r in results])
    replicates = means[:, :, draws].mean(axis=-1)
    point = means.mean(axis=-1)  # (runs, metrics)
    base_sd = np.array([norm[o][1] for o in objectives])
    gain = (point[:, : len(objectives)] - point[:1, : len(objectives)]) / base_sd  # (runs, objectives)
    gain_reps = (replicates[:, : len(objectives)] - replicates[:1, : len(objectives)]) / base_sd[:, None]
    n_rows = len(row_prompt)

    def ci(values: np.ndarray) -> Interval:
        return bootstrap.interval(values) if n_prompts > 1 else (math.nan, math.nan)

    table = []
    for i, r in enumerate(results):
        table.append(
            MethodRow(
                method=r.method, oracle=r.oracle, weights=dict(r.weights),
                reward={o: float(point[i, j]) for j, o in enumerate(objectives)},
                reward_ci={o: ci(replicates[i, j]) for j, o in enumerate(objectives)},
                gain_sd={o: float(gain[i, j]) for j, o in enumerate(objectives)},
                gain_ci={o: ci(gain_reps[i, j]) if i else (0.0, 0.0) for j, o in enumerate(objectives)},
                kl=float(point[i, kl]), kl_ci=ci(replicates[i, kl]),
                kl_topk=float(point[i, kl_topk]), kl_topk_ci=ci(replicates[i, kl_topk]),
                empty_rate=statistics.fmean(r.values["empty"]), eos_rate=statistics.fmean(r.values["eos"]),
                degenerate_rate=statistics.fmean(r.values["degenerate"]),
                mean_tokens=float(point[i, tokens]), mean_tokens_ci=ci(replicates[i, tokens]),
                forwards_per_token=r.forwards, reward_calls_per_token=r.reward_calls,
                seconds_per_token=r.seconds / max(r.tokens, 1), tokens=r.tokens, n=n_rows,
            )
        )  # fmt: skip
    reference = [float(point[0, j] - base_sd[j]) for j in range(len(objectives))]
    report = EvalReport(list(objectives), settings, n_prompts, table, reference)
    steered = ["mavis", *variants]
    baselines = [
        *(["reward-guided"] if settings.reward_guided else []),
        *(f"best-of-{n}" for n in sorted(settings.best_of)),
    ]
    volume_reps: dict[str, np.ndarray] = {}
    for family in [*steered, *baselines]:
        members = [i for i, r in enumerate(results) if r.method in (family, "base")]
        report.hypervolume[family] = hypervolume(point[members, : len(objectives)].tolist(), reference)
        volume_reps[family] = np.array(
            [hypervolume(replicates[members, : len(objectives), b].tolist(), reference) for b in range(len(draws))]
        )
        report.hypervolume_ci[family] = ci(volume_reps[family])

    def single(family: str, j: int) -> int:
        return next(i for i, r in enumerate(results) if r.method == family and r.weights.get(objectives[j]) == 1.0)

    columns = {o: j for j, o in enumerate(objectives)}
    at_kl, at_tokens = dict.fromkeys(objectives, kl_topk), dict.fromkeys(objectives, tokens)
    pairs_of_steered = [(f, g) for i, f in enumerate(steered) for g in steered[i + 1 :]]
    for family, baseline in pairs_of_steered + [(f, b) for f in steered for b in baselines]:
        pairs = {o: (single(family, j), single(baseline, j)) for j, o in enumerate(objectives)}

        def diff(values: np.ndarray, column: dict[str, int], pairs: dict[str, tuple[int, int]] = pairs) -> np.ndarray:
            """(objectives, ...) the two rows' difference of ``values`` (runs, metrics, ...) per objective."""
            return np.stack([values[a, column[o]] - values[b, column[o]] for o, (a, b) in pairs.items()])

        report.comparisons.append(
            Comparison(
                family=family,
                baseline=baseline,
                hypervolume_diff=report.hypervolume[family] - report.hypervolume[baseline],
                hypervolume_diff_ci=ci(volume_reps[family] - volume_reps[baseline]),
                gain_diff=dict(zip(objectives, diff(gain, columns).tolist(), strict=True)),
                gain_diff_ci={o: ci(d) for o, d in zip(objectives, diff(gain_reps, columns), strict=True)},
                kl_topk_diff=dict(zip(objectives, diff(point, at_kl).tolist(), strict=True)),
                kl_topk_diff_ci={o: ci(d) for o, d in zip(objectives, diff(replicates, at_kl), strict=True)},
                tokens_diff=dict(zip(objectives, diff(point, at_tokens).tolist(), strict=True)),
                tokens_diff_ci={o: ci(d) for o, d in zip(objectives, diff(replicates, at_tokens), strict=True)},
            )
        )
    return report


def training_prompts(head_specs: Sequence[str], database_url: str | None = None) -> set[str]:
    """The raw prompts the given heads were trained on, as far as their records tell.

    A registry spec reads its version's training parameters; a head file reads the ``run.json``
    of the training work folder it sits in. A prompt source that is no longer readable (or a
    head file outside a work folder) contributes nothing.
    """
    from mavis_lc.training.prompts import load_prompts

    found: set[str] = set()
    for spec in head_specs:
        path = Path(spec).expanduser()
        if path.suffix == ".safetensors" or path.is_file():
            marker = path.parent / "run.json"
            params = json.loads(marker.read_text()).get("config", {}) if marker.is_file() else {}
        else:
            from mavis_lc.registry import Registry

            with Registry(database_url) as registry:
                params = registry.resolve(spec).training_params
        source = params.get("prompts")
        if not source:
            continue
        try:
            found.update(load_prompts(source, params.get("max_prompts")))
        except ConfigurationError:
            continue
    return found


@dataclass
class BetaCalibration:
    """The beta `calibrate_beta` chose and every trial it ran."""

    beta: float
    kl: float
    """Mean KL per response at ``beta`` on the calibration prompts (nats)."""
    kl_budget: float
    weights: dict[str, float]
    trials: list[tuple[float, float]]
    """(beta, mean KL) in the order they ran."""


def calibrate_beta(
    engine: MavisEngine,
    prompts: Sequence[str],
    weights: Mapping[str, float],
    kl_budget: float,
    settings: EvalSettings | None = None,
    *,
    max_beta: float = 32.0,
    steps: int = 6,
) -> BetaCalibration:
    """The largest beta (found by bisection on log beta, ``steps`` trials after the two ends) whose
    mean KL per response on ``prompts`` x ``settings.seeds`` stays within ``kl_budget``.

    The KL is the decoder's estimate against the base's full distribution, so it counts the
    top-k cut too: at beta = 0 it is already above 0. Every trial uses the same seeds, so the
    trials differ by beta alone.

    Raises:
        ConfigurationError: the budget is not a positive number, or even beta = 0 exceeds it.
    """
    settings = settings or EvalSettings()
    if not (math.isfinite(kl_budget) and kl_budget > 0):
        raise ConfigurationError(f"kl_budget must be a finite number > 0, got {kl_budget!r}")
    if not (math.isfinite(max_beta) and max_beta > 0) or steps < 1:
        raise ConfigurationError(f"need max_beta > 0 and steps >= 1, got {max_beta!r} and {steps!r}")
    texts = format_prompts(engine.base.tokenizer, prompts, settings.chat_template)
    rows = [(p, s) for p in range(len(texts)) for s in range(settings.seeds)]
    trials: list[tuple[float, float]] = []

    def mean_kl(beta: float) -> float:
        out = _generate_rows(engine, texts, rows, weights, settings.decode_config(beta), settings.batch_size)
        trials.append((beta, statistics.fmean(g.kl for g in out)))
        return trials[-1][1]

    floor = mean_kl(0.0)
    if floor > kl_budget:
        raise ConfigurationError(
            f"kl_budget {kl_budget:g} is below the KL of plain top-{settings.top_k} sampling ({floor:.2f} nats "
            "per response, the top-k cut alone): raise the budget or top_k"
        )
    best = (0.0, floor)
    if mean_kl(max_beta) <= kl_budget:
        best = trials[-1]
    else:
        low, high = 0.0, max_beta
        for _ in range(steps):
            beta = math.sqrt(low * high) if low > 0 else high / 8
            if mean_kl(beta) <= kl_budget:
                low, best = beta, trials[-1]
            else:
                high = beta
    return BetaCalibration(best[0], best[1], kl_budget, dict(weights), trials)


def write_report(report: EvalReport, folder: str | Path, *, title: str = "MAVIS against best-of-N") -> dict[str, Path]:
    """Write ``results.csv``, ``results.json``, ``summary.md`` and (2+ objectives) ``pareto.png``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    objectives = report.objectives
    paths = {"csv": out / "results.csv", "json": out / "results.json", "markdown": out / "summary.md"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        stats = [
            f"{o}{suffix}"
            for o in objectives
            for suffix in ("", "_low", "_high", "_gain_sd", "_gain_low", "_gain_high")
        ]
        costs = ["kl", "kl_low", "kl_high", "kl_topk", "kl_topk_low", "kl_topk_high", "kl_efficiency", "empty_rate",
                 "degenerate_rate", "mean_tokens",
                 "forwards_per_token", "reward_calls_per_token", "seconds_per_token", "tokens", "n"]  # fmt: skip
        writer.writerow(["method", "oracle", *(f"w_{o}" for o in objectives), *stats, *costs])
        for r in report.rows:
            writer.writerow(
                [r.method, r.oracle, *(r.weights[o] for o in objectives)]
                + [v for o in objectives for v in (r.reward[o], *r.reward_ci[o], r.gain_sd[o], *r.gain_ci[o])]
                + [r.kl, *r.kl_ci, r.kl_topk, *r.kl_topk_ci, r.kl_efficiency, r.empty_rate, r.degenerate_rate]
                + [r.mean_tokens]
                + [r.forwards_per_token, r.reward_calls_per_token, r.seconds_per_token, r.tokens, r.n]
            )
    paths["json"].write_text(json.dumps(asdict(report), indent=2))
    paths["markdown"].write_text(summary_markdown(report))
    if len(objectives) >= 2:
        series: dict[str, list[FrontPoint]] = {}
        x, y = objectives[:2]
        for r in report.rows:
            point = FrontPoint(
                weights_label(r.weights) if r.method in ("base", "mavis") else "",
                r.reward[x],
                r.reward[y],
                _half_width(r.reward_ci[x]),
                _half_width(r.reward_ci[y]),
            )
            series.setdefault(r.label, []).append(point)
        if report.frontiers:
            series[f"soft best-of-{report.frontiers[0].n_samples} frontier"] = _frontier_points(report, x, y)
        try:
            paths["plot"] = save_fronts_plot(
                series, out / "pareto.png", title=title, x_label=f"{x} reward", y_label=f"{y} reward"
            )
        except MissingExtraError as exc:  # the tables are written; only the picture needs the [eval] extra
            warnings.warn(f"pareto.png not written: {exc}", RuntimeWarning, stacklevel=2)
    panels = _gain_panels(report)
    if panels:
        try:
            paths["frontier_plot"] = save_gain_kl_plot(panels, out / "frontier.png", title=f"{title}: gain against KL")
        except MissingExtraError as exc:
            warnings.warn(f"frontier.png not written: {exc}", RuntimeWarning, stacklevel=2)
    return paths


def _frontier_points(report: EvalReport, x: str, y: str) -> list[FrontPoint]:
    """Every weight setting's frontier point at its reach, in raw rewards: the base row's mean
    plus the frontier's gain over the base samples' mean, per objective."""
    base = report.rows[0].reward
    sd = {o: base[o] - ref for o, ref in zip(report.objectives, report.reference, strict=True)}
    points = []
    for f in report.frontiers:
        z, start = f.rewards_at(f.reach), f.rewards[0]
        label = f"{f.reach:.1f} nats" if f is report.frontiers[0] else ""
        points.append(FrontPoint(label, base[x] + sd[x] * (z[x] - start[x]), base[y] + sd[y] * (z[y] - start[y])))
    return points


def _single_objective(weights: Mapping[str, float]) -> str | None:
    """The objective a setting weighs 1 while every other weighs 0; None for a mixed setting."""
    ones = [o for o, w in weights.items() if w == 1.0]
    return ones[0] if len(ones) == 1 and not any(w for o, w in weights.items() if o != ones[0]) else None


def _gain_panels(report: EvalReport) -> list[GainPanel]:
    """Per objective with a one-objective frontier: its curve and each method's row at weight 1."""
    panels = []
    for frontier in report.frontiers:
        objective = _single_objective(frontier.weights)
        if objective is None:
            continue
        curve = [(k, g) for k, g in zip(frontier.kl, frontier.gain, strict=True) if k <= frontier.reach]
        points: dict[str, list[FrontPoint]] = {}
        for r in report.rows:
            if r.weights == frontier.weights:
                low, high = r.gain_ci[objective]
                x_err = _half_width(r.kl_topk_ci) if not math.isnan(r.kl_topk_ci[0]) else 0.0
                y_err = (high - low) / 2 if not math.isnan(low) else 0.0
                points.setdefault(r.label, []).append(FrontPoint("", r.kl_topk, r.gain_sd[objective], x_err, y_err))
        panels.append(GainPanel(f"{objective} at weight 1", curve, points))
    return panels


def _efficiency(row: MethodRow) -> str:
    if row.method == "base":
        return ""
    return "past reach" if math.isnan(row.kl_efficiency) else f"{row.kl_efficiency:.2f}"


def _frontier_lines(report: EvalReport) -> list[str]:
    """The frontier's gains at a few KLs for each one-objective setting, and what its reach is."""
    singles = [f for f in report.frontiers if _single_objective(f.weights) is not None]
    if not singles:
        return []
    n = singles[0].n_samples
    at = [kl for kl in (0.25, 0.5, 1.0, 2.0, 3.0, 4.0) if kl <= singles[0].reach]
    lines = [
        "",
        f"Soft best-of-N frontier ({n} base samples per prompt and seed, reliable to log N − 1 = "
        f"{singles[0].reach:.2f} nats of kl_topk); gain in base SD at each KL. 'gain / frontier' above is a "
        "row's gain over the frontier's at the row's kl_topk ('past reach': beyond what N samples can show).",
        "",
    ]
    for f in singles:
        lines.append(
            f"- {_single_objective(f.weights)}: " + ", ".join(f"{kl:g} nats {f.gain_at(kl):+.2f}" for kl in at)
        )
    return lines


def _half_width(ci: Interval) -> float:
    return (ci[1] - ci[0]) / 2


def _ci(ci: Interval, digits: int = 2, sign: str = "+") -> str:
    low, high = (round(v, digits) + 0.0 for v in ci)  # + 0.0: no "-0.00" for a rounding of zero
    return f"[{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def summary_markdown(report: EvalReport) -> str:
    """The report as Markdown: the table of rows, then hypervolumes, single-objective gains and comparisons."""
    s, objectives = report.settings, report.objectives
    lines = [
        f"{report.n_prompts} prompts x {s.seeds} seeds, top-k {s.top_k}, MAVIS beta {s.beta:.3g}, "
        f"max {s.max_tokens} tokens, EOS banned for the first {s.min_tokens}; mean [95% cluster-bootstrap "
        f"interval over prompts, {s.bootstrap_resamples} resamples] and gain in base SD. KL in nats per response "
        "against the full base (kl) and its top-k (kl_topk). Oracle rows select with the true rewards.",
    ]
    if report.excluded_prompts:
        lines[0] += f" {report.excluded_prompts} evaluation prompts that heads were trained on were skipped."
    lines += [
        "",
        "| method | weights | " + " | ".join(objectives) + " | kl | kl_topk | gain / frontier | empty | degenerate"
        " | EOS | tokens | base fwd / token | reward calls / token | ms / token |",
        "|---|---|" + "---|" * len(objectives) + "---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        cells = [
            f"{r.reward[o]:+.3f} {_ci(r.reward_ci[o], 3)} ({r.gain_sd[o]:+.2f} SD {_ci(r.gain_ci[o])})"
            for o in objectives
        ]
        lines.append(
            f"| {r.label} | {weights_label(r.weights)} | "
            + " | ".join(cells)
            + f" | {r.kl:.2f} {_ci(r.kl_ci, sign='')} | {round(r.kl_topk, 2) + 0.0:.2f} {_ci(r.kl_topk_ci, sign='')}"
            + f" | {_efficiency(r) if report.frontiers else 'no samples'}"
            + f" | {100 * r.empty_rate:.1f}% | {100 * r.degenerate_rate:.1f}%"
            + (" (!)" if report.degenerate_flag(r) else "")
            + f" | {100 * r.eos_rate:.0f}%"
            + f" | {r.mean_tokens:.1f} {_ci(r.mean_tokens_ci, 1, '')}"
            + f" | {r.forwards_per_token:g}"
            + f" | {r.reward_calls_per_token:.2f} | {1000 * r.seconds_per_token:.1f} |"
        )
    lines += _frontier_lines(report)
    reference = ", ".join(f"{o} {v:+.3f}" for o, v in zip(objectives, report.reference, strict=True))
    lines += ["", f"Hypervolume (reference point: the base row minus one base SD, {reference}):", ""]
    lines += [
        f"- {family}: {volume:.4f} {_ci(report.hypervolume_ci[family], 4, '')}"
        for family, volume in report.hypervolume.items()
    ]
    if report.calibration is not None:
        c = report.calibration
        at = weights_label(c.weights)
        lines += ["", f"beta {c.beta:.3g} calibrated to a KL budget of {c.kl_budget:g} nats at {at}: "
                  f"KL {c.kl:.2f} ({len(c.trials)} trials)"]  # fmt: skip
    lines += ["", "Gain at weight 1 on one objective alone (base SD):", ""]
    for family in report.hypervolume:
        rows = {o: report.single_objective_row(family, o) for o in objectives}
        gains = ", ".join(f"{o} {row.gain_sd[o]:+.2f} {_ci(row.gain_ci[o])}" for o, row in rows.items())
        lines.append(f"- {family}: {gains}")
    if report.comparisons:
        lines += ["", "Steered minus baseline, paired over the same resampled prompts:", ""]
        for d in report.comparisons:
            gains = "; ".join(
                f"at {o}=1: gain {d.gain_diff[o]:+.2f} SD {_ci(d.gain_diff_ci[o])}, kl_topk {d.kl_topk_diff[o]:+.2f} "
                f"{_ci(d.kl_topk_diff_ci[o])}, length {d.tokens_diff[o]:+.1f} {_ci(d.tokens_diff_ci[o], 1)} tokens"
                for o in objectives
            )
            lines.append(
                f"- {d.family} − {d.baseline}: hypervolume {d.hypervolume_diff:+.4f} "
                f"{_ci(d.hypervolume_diff_ci, 4)}; {gains}"
            )
    return "\n".join(lines) + "\n"


def _generate_rows(
    by: MavisEngine | MavisDecoder,
    texts: Sequence[str],
    rows: Sequence[tuple[int, int]],
    weights: Mapping[str, float],
    config: DecodeConfig,
    batch_size: int,
    *,
    before_chunk: Callable[[list[int]], None] | None = None,
    after_chunk: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Decode ``rows`` (index into the formatted ``texts``, seed), ``batch_size`` rows at a time;
    ``before_chunk`` gets each chunk's text indices, ``after_chunk`` the rows decoded so far."""
    out: list[Generation] = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first : first + batch_size]
        if before_chunk is not None:
            before_chunk([p for p, _ in chunk])
        out += by.generate([texts[p] for p, _ in chunk], dict(weights), config, seeds=[s for _, s in chunk])
        if after_chunk is not None:
            after_chunk(len(out))
    return out


@dataclass
class _Run:
    """One method at one weight setting, before its statistics: every row's values.

    ``values`` holds, per row (in the order prompts x seeds), each objective's reward, ``kl``,
    ``kl_topk``, ``tokens`` and ``empty`` (1.0 for an empty response).
    """

    method: str
    weights: dict[str, float]
    values: dict[str, list[float]]
    forwards: float
    reward_calls: float
    seconds: float
    tokens: int
    oracle: bool = False

    @classmethod
    def of(
        cls,
        method: str,
        weights: dict[str, float],
        scores: dict[str, list[float]],
        generations: Sequence[Generation],
        *,
        forwards: float,
        reward_calls: float,
        seconds: float,
        kl_bound: float = 0.0,
        oracle: bool = False,
    ) -> _Run:
        """The run of ``generations`` scored ``scores``; ``kl_bound`` is added to both KLs (a selection's cost)."""
        values = {
            **scores,
            "kl": [g.kl + kl_bound for g in generations],
            "kl_topk": [g.kl_topk + kl_bound for g in generations],
            "tokens": [float(g.completion_tokens) for g in generations],
            "empty": [float(not g.text.strip()) for g in generations],
            "degenerate": [float(is_degenerate(g.text)) for g in generations],
            "eos": [float(g.finish_reason == "stop" and g.stop_sequence is None) for g in generations],
        }
        tokens = sum(g.completion_tokens for g in generations)
        return cls(method, weights, values, forwards, reward_calls, seconds, tokens, oracle)


def _stdev(values: Sequence[float]) -> float:
    """The base rewards' standard deviation, 1 when they do not vary (so gains stay finite)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return sd if sd > 0 else 1.0


def weights_label(weights: Mapping[str, float]) -> str:
    """``pos=0.75 con=0.25``: each objective's first three letters and its weight."""
    return " ".join(f"{name[:3]}={value:g}" for name, value in weights.items())
