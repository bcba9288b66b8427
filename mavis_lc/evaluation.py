"""Evaluation harness: Pareto sweeps of MAVIS weights against baselines, with what each costs.

`evaluate` decodes held-out prompts x seeds with:

- ``base``: plain top-k sampling of the base model (all weights 0), the reference of every gain;
- ``mavis``: MAVIS decoding at every weight setting of a grid, same prompts and seeds;
- ``best-of-N``: N plain samples per (prompt, seed), keeping the one with the highest weighted
  sum of the objectives' true rewards, each normalised by the base rows' mean and standard
  deviation, for every weight setting of the grid but the all-zero one. Candidate j of row
  (prompt, seed s) is sampled with seed ``s * max(N) + j``, drawn once for the largest N; a
  smaller N keeps the first N candidates, so best-of-2 and best-of-8 see the same samples;
- ``reward-guided`` (with ``reward_guided=True``): token search in the style of ARGS, where
  every step tilts the base's top-k candidates by the weighted, normalised true rewards of the
  response so far plus each candidate (`RewardGuidedScorer`), at MAVIS's beta.

Every row reports the mean reward per objective with a normal 95% confidence interval, its gain
in standard deviations of the base rewards, the KL from the base model (MAVIS: the decoder's
per-response estimate against the base's full distribution; best-of-N: that estimate for the
chosen sample plus log N - (N-1)/N, the bound on what the choice adds), and its cost: base-model
forward passes per generated token (1 for MAVIS, whose shared-backbone heads read the base's
hidden states; N for best-of-N), true-reward calls per generated token (0 for MAVIS; k per
objective for reward-guided search) and wall seconds per generated token. Each method's points give
a hypervolume, all against one reference point (the worst mean reward of any row, per objective).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mavis_lc.base_model import BaseModel
from mavis_lc.decoding import DecodeConfig, Generation, MavisDecoder
from mavis_lc.engine import MavisEngine
from mavis_lc.errors import ConfigurationError
from mavis_lc.objectives import Objective, get_objective
from mavis_lc.plots import FrontPoint, save_fronts_plot
from mavis_lc.training import format_prompts
from mavis_lc.value_model import ValueHeadConfig, ValueModel

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

    def check(self) -> None:
        if self.grid_steps < 2:
            raise ConfigurationError(f"grid_steps must be >= 2, got {self.grid_steps}")
        if self.seeds < 1:
            raise ConfigurationError(f"seeds must be >= 1, got {self.seeds}")
        if any(n < 2 for n in self.best_of):
            raise ConfigurationError(f"best_of values must be >= 2, got {list(self.best_of)}")
        if self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class MethodRow:
    """One method at one weight setting."""

    method: str
    """``base``, ``mavis`` or ``best-of-N``."""
    weights: dict[str, float]
    reward: dict[str, float]
    reward_ci95: dict[str, float]
    gain_sd: dict[str, float]
    """Mean reward minus the base's, in standard deviations of the base rewards."""
    kl: float
    """Mean KL from the base model per response, nats (see `evaluate` for best-of-N)."""
    forwards_per_token: float
    reward_calls_per_token: float
    """True-reward evaluations per generated token, all objectives counted (0 for MAVIS)."""
    seconds_per_token: float
    tokens: int
    n: int


@dataclass
class EvalReport:
    objectives: list[str]
    settings: EvalSettings
    n_prompts: int
    rows: list[MethodRow]
    reference: list[float]
    """The hypervolume reference point: the worst mean reward of any row, per objective."""
    hypervolume: dict[str, float] = field(default_factory=dict)
    """Per method family (``mavis``, variants, ``best-of-N``), the base row counted in every family."""
    calibration: BetaCalibration | None = None
    """How beta was chosen, when it was calibrated to a KL budget."""

    def family(self, name: str) -> list[MethodRow]:
        return [r for r in self.rows if r.method in (name, "base")]

    def single_objective_gain(self, method: str, objective: str) -> float:
        """The gain (base SD) on ``objective`` of ``method`` at weight 1 on it alone."""
        for row in self.rows:
            if row.method == method and row.weights.get(objective) == 1.0:
                return row.gain_sd[objective]
        raise KeyError(f"no {method} row with {objective} at weight 1")


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
    MAVIS; each step scores all B x k candidate texts in one reward call. Set `prompts` (the raw
    user turns of the batch's rows) before decoding; reward functions receive them.
    """

    def __init__(self, base: BaseModel, objective: Objective, mean: float, std: float) -> None:
        super().__init__()
        self.config = ValueHeadConfig.for_base(
            base, objective.name, architecture="reward_guided", reward_mean=mean, reward_std=std
        )
        self.reward = objective
        self.tokenizer = base.tokenizer
        self.prompts: list[str] = []
        self.generated: list[list[int]] = []
        self.calls = 0
        """Texts scored so far."""

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if len(self.prompts) != input_ids.shape[0]:
            raise ConfigurationError(f"set prompts for all {input_ids.shape[0]} rows before decoding")
        self.generated = [[] for _ in range(input_ids.shape[0])]

    def advance(self, token_ids: torch.Tensor) -> None:
        for row, token in zip(self.generated, token_ids.tolist(), strict=True):
            row.append(token)

    def q_values(self, hidden: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        rows, k = candidate_ids.shape
        texts = self.tokenizer.batch_decode(
            [[*row, a] for row, cands in zip(self.generated, candidate_ids.tolist(), strict=True) for a in cands],
            skip_special_tokens=True,
        )
        scores = self.reward.score([p for p in self.prompts for _ in range(k)], texts)
        self.calls += len(texts)
        q = (torch.tensor(scores, dtype=torch.float32) - self.config.reward_mean) / self.config.reward_std
        return q.view(rows, k).to(hidden.device)


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
    config = DecodeConfig(max_new_tokens=settings.max_tokens, top_k=settings.top_k, beta=settings.beta)
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
        scores, _ = score([p for p, _ in rows], generations)
        kls = [g.kl for g in generations]
        return _Run(method, weights, scores, kls, tokens=sum(g.completion_tokens for g in generations), **cost)

    grid = weight_grid(objectives, settings.grid_steps)
    results: list[_Run] = []
    sweeps = [("base", engine, grid[:1]), ("mavis", engine, grid[1:])]
    sweeps += [(name, other, grid[1:]) for name, other in variants.items()]
    for method, by, settings_of in sweeps:
        for weights in settings_of:
            generations, seconds = decode(f"{method} {weights_label(weights)}", weights, rows, by)
            results.append(run(method, weights, generations, forwards=1.0, reward_calls=0.0, seconds=seconds))

    norm = {o: (statistics.fmean(v), _stdev(v)) for o, v in results[0].scores.items()}  # the base rows
    if settings.reward_guided:
        guides = [RewardGuidedScorer(engine.base, scorers[o], *norm[o]) for o in objectives]
        guided = MavisDecoder(engine.base, guides)
        for weights in grid[1:]:
            calls_before = sum(g.calls for g in guides)
            generations, seconds = decode(f"reward-guided {weights_label(weights)}", weights, rows, guided, guides)
            calls = sum(g.calls for g in guides) - calls_before
            tokens = max(sum(g.completion_tokens for g in generations), 1)
            results.append(
                run("reward-guided", weights, generations, forwards=1.0, reward_calls=calls / tokens, seconds=seconds)
            )
    if settings.best_of:
        largest = max(settings.best_of)
        candidate_rows = [(p, s * largest + j) for p, s in rows for j in range(largest)]
        zero = dict.fromkeys(objectives, 0.0)
        candidates, decode_s = decode(f"best-of-{largest} samples", zero, candidate_rows)
        cand_scores, score_s = score([p for p, _ in candidate_rows], candidates)
        z = {o: [(x - norm[o][0]) / norm[o][1] for x in cand_scores[o]] for o in objectives}
        utilities = [[sum(w[o] * z[o][c] for o in objectives) for c in range(len(candidates))] for w in grid[1:]]
        for n in sorted(settings.best_of):
            share = n / largest  # of the candidate decode and scoring time this N would spend
            for weights, utility in zip(grid[1:], utilities, strict=True):
                chosen = [max(range(r * largest, r * largest + n), key=utility.__getitem__) for r in range(len(rows))]
                tokens = sum(candidates[c].completion_tokens for c in chosen)
                # KL of a best-of-n choice over its sampler is at most log n - (n-1)/n (Beirami et al.).
                bound = math.log(n) - (n - 1) / n
                results.append(
                    _Run(
                        f"best-of-{n}", weights, {o: [cand_scores[o][c] for c in chosen] for o in objectives},
                        [candidates[c].kl + bound for c in chosen], forwards=float(n),
                        reward_calls=n * len(objectives) * len(rows) / max(tokens, 1),
                        seconds=(decode_s + score_s) * share, tokens=tokens,
                    )
                )  # fmt: skip

    table = [r.row(norm, len(rows)) for r in results]
    reference = [min(r.reward[o] for r in table) for o in objectives]
    report = EvalReport(list(objectives), settings, len(prompts), table, reference)
    families = ["mavis", *variants, *(["reward-guided"] if settings.reward_guided else [])]
    for family in [*families, *(f"best-of-{n}" for n in sorted(settings.best_of))]:
        points = [[r.reward[o] for o in objectives] for r in report.family(family)]
        report.hypervolume[family] = hypervolume(points, reference)
    return report


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
        config = DecodeConfig(max_new_tokens=settings.max_tokens, top_k=settings.top_k, beta=beta)
        out = _generate_rows(engine, texts, rows, weights, config, settings.batch_size)
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
        stats = [f"{o}{suffix}" for o in objectives for suffix in ("", "_ci95", "_gain_sd")]
        costs = ["kl", "forwards_per_token", "reward_calls_per_token", "seconds_per_token", "tokens", "n"]
        writer.writerow(["method", *(f"w_{o}" for o in objectives), *stats, *costs])
        for r in report.rows:
            writer.writerow(
                [r.method, *(r.weights[o] for o in objectives)]
                + [v for o in objectives for v in (r.reward[o], r.reward_ci95[o], r.gain_sd[o])]
                + [r.kl, r.forwards_per_token, r.reward_calls_per_token, r.seconds_per_token, r.tokens, r.n]
            )
    paths["json"].write_text(json.dumps(asdict(report), indent=2))
    paths["markdown"].write_text(summary_markdown(report))
    if len(objectives) >= 2:
        series: dict[str, list[FrontPoint]] = {}
        for r in report.rows:
            point = FrontPoint(
                weights_label(r.weights) if r.method in ("base", "mavis") else "",
                r.reward[objectives[0]],
                r.reward[objectives[1]],
                r.reward_ci95[objectives[0]],
                r.reward_ci95[objectives[1]],
            )
            series.setdefault(r.method, []).append(point)
        x_label, y_label = (f"{o} reward" for o in objectives[:2])
        paths["plot"] = save_fronts_plot(series, out / "pareto.png", title=title, x_label=x_label, y_label=y_label)
    return paths


def summary_markdown(report: EvalReport) -> str:
    """The report as Markdown: the table of rows, then hypervolumes and single-objective gains."""
    s, objectives = report.settings, report.objectives
    lines = [
        f"{report.n_prompts} prompts x {s.seeds} seeds, top-k {s.top_k}, MAVIS beta {s.beta:.3g}, "
        f"max {s.max_tokens} tokens; mean (95% CI) and gain in base SD.",
        "",
        "| method | weights | " + " | ".join(objectives) + " | KL | base forwards / token | reward calls / token"
        " | ms / token |",
        "|---|---|" + "---|" * len(objectives) + "---|---|---|---|",
    ]
    for r in report.rows:
        cells = [f"{r.reward[o]:+.3f} ± {r.reward_ci95[o]:.3f} ({r.gain_sd[o]:+.2f} SD)" for o in objectives]
        lines.append(
            f"| {r.method} | {weights_label(r.weights)} | "
            + " | ".join(cells)
            + f" | {r.kl:.2f} | {r.forwards_per_token:g} | {r.reward_calls_per_token:.2f}"
            + f" | {1000 * r.seconds_per_token:.1f} |"
        )
    reference = ", ".join(f"{o} {v:+.3f}" for o, v in zip(objectives, report.reference, strict=True))
    lines += ["", f"Hypervolume (reference point: {reference}):", ""]
    lines += [f"- {family}: {volume:.4f}" for family, volume in report.hypervolume.items()]
    if report.calibration is not None:
        c = report.calibration
        at = weights_label(c.weights)
        lines += ["", f"beta {c.beta:.3g} calibrated to a KL budget of {c.kl_budget:g} nats at {at}: "
                  f"KL {c.kl:.2f} ({len(c.trials)} trials)"]  # fmt: skip
    lines += ["", "Gain at weight 1 on one objective alone (base SD):", ""]
    for family in report.hypervolume:
        gains = ", ".join(f"{o} {report.single_objective_gain(family, o):+.2f}" for o in objectives)
        lines.append(f"- {family}: {gains}")
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
    """One method at one weight setting, before its statistics: every row's rewards and KL."""

    method: str
    weights: dict[str, float]
    scores: dict[str, list[float]]
    kls: list[float]
    forwards: float
    reward_calls: float
    seconds: float
    tokens: int

    def row(self, norm: Mapping[str, tuple[float, float]], n: int) -> MethodRow:
        stats = {o: mean_ci(v) for o, v in self.scores.items()}
        return MethodRow(
            method=self.method,
            weights=dict(self.weights),
            reward={o: m for o, (m, _) in stats.items()},
            reward_ci95={o: h for o, (_, h) in stats.items()},
            gain_sd={o: (stats[o][0] - norm[o][0]) / norm[o][1] for o in self.scores},
            kl=statistics.fmean(self.kls),
            forwards_per_token=self.forwards,
            reward_calls_per_token=self.reward_calls,
            seconds_per_token=self.seconds / max(self.tokens, 1),
            tokens=self.tokens,
            n=n,
        )


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal 95% confidence interval (NaN for one value)."""
    mean = statistics.fmean(values)
    return mean, (1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def _stdev(values: Sequence[float]) -> float:
    """The base rewards' standard deviation, 1 when they do not vary (so gains stay finite)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return sd if sd > 0 else 1.0


def weights_label(weights: Mapping[str, float]) -> str:
    """``pos=0.75 con=0.25``: each objective's first three letters and its weight."""
    return " ".join(f"{name[:3]}={value:g}" for name, value in weights.items())
