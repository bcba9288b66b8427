"""``mavis quickstart``: train two objectives that pull apart, register them, and steer between them.

On the embedded defaults (SQLite registry and artifacts under ``MAVIS_HOME``, no broker, the
packaged SmolLM2) it trains value heads for positivity and conciseness (iterations 0 and 1;
``--fast``: iteration 0 only, on fewer prompts) on prompts shipped with the package, registers
every iteration with lineage, points the ``quickstart`` alias (``quickstart-fast`` for
``--fast``) at the last one, creates presets, then runs a LangChain chain over held-out prompts
at several weight settings and reports the rewards, the KL from the base model, and a Pareto
plot. A rerun reuses registered heads whose training settings match, unless asked to retrain.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from langchain_core.prompts import ChatPromptTemplate
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mavis_lc.bootstrap import mean_ci
from mavis_lc.degeneracy import flagged, is_degenerate
from mavis_lc.evaluation import weights_label
from mavis_lc.extras import MissingExtraError
from mavis_lc.langchain import ChatMavis
from mavis_lc.objectives import get_objective
from mavis_lc.plots import FrontPoint, save_fronts_plot
from mavis_lc.registry import Registry, VersionInfo
from mavis_lc.training import TrainingConfig, TrainingResult, train_objective

OBJECTIVES = ("positivity", "conciseness")
SETTINGS: tuple[dict[str, float], ...] = (
    {"positivity": 0.0, "conciseness": 0.0},
    {"positivity": 1.0, "conciseness": 0.0},
    {"positivity": 0.75, "conciseness": 0.25},
    {"positivity": 0.5, "conciseness": 0.5},
    {"positivity": 0.0, "conciseness": 1.0},
)
SHOWN_PROMPTS = 3
PRESETS = {
    "positive": {"positivity": 1.0, "conciseness": 0.0},
    "balanced": {"positivity": 0.5, "conciseness": 0.5},
    "concise": {"positivity": 0.0, "conciseness": 1.0},
}


@dataclass(frozen=True)
class QuickstartPlan:
    """Sizes of one quickstart run."""

    alias: str
    """Registry alias the trained heads get."""
    training: TrainingConfig
    """Training settings shared by both objectives (the objective field is replaced per objective)."""
    train_prompts: int
    """Shipped training prompts used."""
    eval_prompts: int
    """Shipped held-out prompts used."""
    beta: float
    """Guidance strength of the evaluation."""
    max_tokens: int
    """Longest response of the evaluation (training rollouts complete their leaves to this length too)."""
    eval_seeds: int
    """Samples per held-out prompt and weight setting (seeds 0, 1, ...)."""


def shipped_prompts(split: str) -> list[str]:
    """The quickstart prompts written for this package (``train`` or ``held_out``)."""
    text = resources.files("mavis_lc").joinpath("data/quickstart_prompts.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [row["prompt"] for row in rows if row["split"] == split]


def make_plan(fast: bool) -> QuickstartPlan:
    """The sizes of a run: ``fast`` (iteration 0 only, on fewer prompts: a first look) or the full
    run (iterations 0 and 1). Training is `mavis train`'s default recipe on the shipped prompts;
    the evaluation decodes at its beta and its response length."""
    n_train = 64 if fast else 80
    defaults = TrainingConfig()
    training = TrainingConfig(prompts=shipped_prompts("train")[:n_train], n_iterations=1 if fast else 2)
    alias = "quickstart-fast" if fast else "quickstart"
    return QuickstartPlan(
        alias,
        training,
        n_train,
        eval_prompts=24,
        beta=defaults.beta,
        max_tokens=defaults.leaf_completion_tokens,
        eval_seeds=2 if fast else 3,
    )


def run_quickstart(
    *,
    fast: bool = False,
    retrain: bool = False,
    output_dir: str | Path = "quickstart-output",
    console: Console | None = None,
) -> dict[str, Any]:
    """Train or reuse the heads, evaluate the weight settings, print the tables; returns the summary."""
    out = console or Console()
    plan = make_plan(fast)
    registry = Registry()
    out.rule(f"mavis quickstart{' --fast' if fast else ''}")
    versions = {name: _train_or_reuse(registry, plan, name, retrain, out) for name in OBJECTIVES}
    for name, weights in PRESETS.items():
        specs = [f"{objective}@{versions[objective].version}" for objective in OBJECTIVES]
        registry.create_preset(f"{plan.alias}-{name}", weights, pinned_specs=specs, replace=True)
    out.print(f"presets: {', '.join(f'{plan.alias}-{n}' for n in PRESETS)}")
    return _evaluate(plan, versions, Path(output_dir), out)


def _train_or_reuse(
    registry: Registry, plan: QuickstartPlan, objective: str, retrain: bool, out: Console
) -> VersionInfo:
    config = replace(plan.training, objective=objective)
    key = config.fingerprint()
    if not retrain and _has_alias(registry, objective, plan.alias):
        current = registry.resolve(f"{objective}@{plan.alias}")
        if (
            current.training_params.get("config_fingerprint") == key
            and current.training_params.get("objective_version", 1) == get_objective(objective).version
        ):
            out.print(
                f"{objective}: reusing version {current.version} ({objective}@{plan.alias}); --retrain to train again"
            )
            return current
    result = _train(config, out)
    parent: VersionInfo | None = None
    for it in result.iterations:
        parent = registry.register_version(
            objective,
            it.read_bytes(),
            base_model_id=result.base_model_id,
            tokenizer_fingerprint=result.tokenizer_fingerprint,
            architecture={"architecture": result.architecture},
            iteration=it.iteration,
            training_params={**result.params, "config_fingerprint": key},
            metrics=it.metrics,
            normalization={"mean": it.reward_mean, "std": it.reward_std},
            parents=[parent.id] if parent is not None else [],
        )
        fit = {name: it.metrics.get(name, float("nan")) for name in ("within_prompt_r2", "sibling_corr", "r2")}
        third = (
            f"agreement with the prefix reward {it.metrics['phi_corr']:.3f}"
            if "phi_corr" in it.metrics
            else f"pooled R² {fit['r2']:.3f}"
        )
        out.print(
            f"{objective}: registered version {parent.version} (iteration {it.iteration}; validation: "
            f"within-prompt R² {fit['within_prompt_r2']:.3f}, sibling-difference corr {fit['sibling_corr']:.3f}, "
            f"{third})"
        )
    assert parent is not None
    registry.set_alias(objective, plan.alias, parent.version)
    return parent


def _has_alias(registry: Registry, objective: str, alias: str) -> bool:
    known = {o.name for o in registry.list_objectives()}
    return objective in known and alias in registry.list_aliases(objective)


def _train(config: TrainingConfig, out: Console) -> TrainingResult:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out) as bar:
        tasks: dict[tuple[str, int], Any] = {}

        def progress(stage: str, iteration: int, step: int, total: int, metrics: dict[str, float]) -> None:
            key = (stage, iteration)
            if key not in tasks:
                tasks[key] = bar.add_task(f"{config.objective} iteration {iteration}: {stage}", total=max(total, 1))
            bar.update(tasks[key], completed=step, total=max(total, 1))

        return train_objective(config, progress=progress)


def _evaluate(plan: QuickstartPlan, versions: dict[str, VersionInfo], output_dir: Path, out: Console) -> dict[str, Any]:
    prompts = shipped_prompts("held_out")[: plan.eval_prompts]
    chat = ChatMavis(
        heads=[f"{o}@{versions[o].version}" for o in OBJECTIVES],
        beta=plan.beta,
        max_tokens=plan.max_tokens,
        min_tokens=1,  # no empty answers, as in training and `mavis eval`
        top_k=20,
    )
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | chat
    seeds = range(plan.eval_seeds)
    inputs = [{"question": p} for _ in SETTINGS for p in prompts for _ in seeds]
    rows = [settings for settings in SETTINGS for _ in prompts for _ in seeds]
    row_seeds = [seed for _ in SETTINGS for _ in prompts for seed in seeds]
    per_setting_n = len(prompts) * plan.eval_seeds
    out.print(
        f"decoding {len(inputs)} responses ({len(prompts)} held-out prompts x {plan.eval_seeds} seeds x "
        f"{len(SETTINGS)} weight settings) in one batch through a LangChain chain..."
    )
    # One batched decode for every (prompt, seed, weights) row; the messages carry each row's KL.
    configs: list[Any] = [
        {"configurable": {"mavis": {"weights": w, "seed": s}}} for w, s in zip(rows, row_seeds, strict=True)
    ]
    messages = chain.batch(inputs, configs)
    responses = [str(m.content) for m in messages]
    kls = [float(m.response_metadata["kl"]) for m in messages]
    kls_topk = [float(m.response_metadata["kl_topk"]) for m in messages]
    rewards = {o: get_objective(o).score([r["question"] for r in inputs], responses) for o in OBJECTIVES}

    shown = prompts[:SHOWN_PROMPTS]
    detail = Table(title=f"Responses to {len(shown)} of the prompts (seed 0)", show_lines=False, expand=True)
    detail.add_column("prompt", ratio=1, max_width=28, no_wrap=True, overflow="ellipsis")
    detail.add_column("weights", min_width=17, no_wrap=True)
    detail.add_column("response", ratio=3, no_wrap=True, overflow="ellipsis")
    for column in (*OBJECTIVES, "KL"):
        detail.add_column(column[:4], justify="right", no_wrap=True)
    for i, (inp, w) in enumerate(zip(inputs, rows, strict=True)):
        if row_seeds[i] != 0 or inp["question"] not in shown:
            continue  # a few samples in the table; the means below use them all
        detail.add_row(
            inp["question"],
            weights_label(w),
            " ".join(responses[i].split()),
            *(f"{rewards[o][i]:+.3f}" for o in OBJECTIVES),
            f"{kls[i]:.2f}",
        )
    out.print(detail)

    summary = Table(
        title=f"Mean over {len(prompts)} held-out prompts x {plan.eval_seeds} seeds [95% bootstrap CI over prompts]"
    )
    for column in ("weights", *(f"{o} reward" for o in OBJECTIVES), "KL (nats)", "KL top-k", "empty", "degenerate"):
        summary.add_column(column)
    zero = next(i for i, w in enumerate(SETTINGS) if not any(w.values()))
    degenerate = [is_degenerate(r) for r in responses]
    base_degenerate = statistics.fmean(degenerate[i] for i in range(zero * per_setting_n, (zero + 1) * per_setting_n))
    prompt_of = [p for p in range(len(prompts)) for _ in seeds]  # the prompt of each row of one setting
    per_setting: list[dict[str, Any]] = []
    values: dict[str, list[list[float]]] = {o: [] for o in OBJECTIVES}
    for s, settings in enumerate(SETTINGS):
        idx = range(s * per_setting_n, (s + 1) * per_setting_n)
        for o in OBJECTIVES:
            values[o].append([rewards[o][i] for i in idx])
        stats = {o: mean_ci(values[o][-1], prompt_of) for o in OBJECTIVES}
        kl = mean_ci([kls[i] for i in idx], prompt_of)
        kl_topk = mean_ci([kls_topk[i] for i in idx], prompt_of)
        empty_rate = statistics.fmean(not responses[i].strip() for i in idx)
        degenerate_rate = statistics.fmean(degenerate[i] for i in idx)
        flag = flagged(degenerate_rate, base_degenerate)
        per_setting.append(
            {
                "weights": settings,
                **stats,
                "kl": kl,
                "kl_topk": kl_topk,
                "empty_rate": empty_rate,
                "degenerate_rate": degenerate_rate,
                "degenerate_flagged": flag,
            }
        )
        summary.add_row(
            weights_label(settings),
            *(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in stats.values()),
            "{:.2f} [{:.2f}, {:.2f}]".format(*kl),
            "{:.2f} [{:.2f}, {:.2f}]".format(*(round(v, 2) + 0.0 for v in kl_topk)),  # + 0.0: no "-0.00"
            f"{100 * empty_rate:.1f}%",
            f"{100 * degenerate_rate:.1f}%" + (" [red](!)[/red]" if flag else ""),
        )
    out.print(summary)
    out.print(
        "KL is measured against the base model's full distribution, so the all-zero row (plain top-k "
        "sampling) shows the cost of the top-k cut alone; KL top-k, against the base renormalised over "
        "its top-k, is what the steering itself costs. Degenerate: responses with a run of 8+ repeated "
        "characters, digits or symbols, a word 4+ times in a row, or a loop of repeated phrases (mavis_lc."
        "degeneracy); (!) marks a row more than 5 points above the all-zero row."
    )

    checks = {}
    for o in OBJECTIVES:
        one = next(i for i, w in enumerate(SETTINGS) if w[o] == 1.0)
        gain, low, high = mean_ci([a - b for a, b in zip(values[o][one], values[o][zero], strict=True)], prompt_of)
        checks[o] = {
            "weight_1": per_setting[one][o][0],
            "weight_0": per_setting[zero][o][0],
            "gain": gain,
            "gain_ci": [low, high],
            "higher": gain > 0,
            "ci_excludes_zero": low > 0,
        }
        verdict = "[green]higher[/green]" if low > 0 else "[yellow]not clearly higher[/yellow]"
        out.print(
            f"{o}: mean reward at weight 1 = {per_setting[one][o][0]:+.3f} vs weight 0 (base) = "
            f"{per_setting[zero][o][0]:+.3f}, paired gain {gain:+.3f} [{low:+.3f}, {high:+.3f}]: {verdict}"
        )

    points = [
        FrontPoint(
            weights_label(p["weights"]),
            p[OBJECTIVES[0]][0],
            p[OBJECTIVES[1]][0],
            (p[OBJECTIVES[0]][2] - p[OBJECTIVES[0]][1]) / 2,
            (p[OBJECTIVES[1]][2] - p[OBJECTIVES[1]][1]) / 2,
        )
        for p in per_setting
    ]
    plot: Path | None
    try:
        plot = save_fronts_plot(
            {"Pareto front": points},
            output_dir / f"{plan.alias}-pareto.png",
            x_label=f"{OBJECTIVES[0]} reward (mean)",
            y_label=f"{OBJECTIVES[1]} reward (mean)",
            title=f"MAVIS on SmolLM2, beta={plan.beta}",
        )
    except MissingExtraError as exc:  # the tables and the summary do not need matplotlib
        plot = None
        out.print(f"Pareto plot skipped: {exc}", markup=False, highlight=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary_path = output_dir / f"{plan.alias}-summary.json"
    result = {
        "settings": per_setting,
        "checks": checks,
        "plot": str(plot) if plot is not None else None,
        "versions": {o: versions[o].version for o in OBJECTIVES},
    }
    summary_path.write_text(json.dumps(result, indent=2))
    if plot is not None:
        out.print(f"Pareto plot: {plot.resolve()}")
    out.print(f"summary: {summary_path.resolve()}")
    return result
