"""``mavis eval``: the Pareto front of a set of heads against best-of-N, with bootstrap CIs."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer
from rich.markdown import Markdown

from mavis_lc.cli.common import (
    console,
    errors,
    load_options,
)
from mavis_lc.decoding.engine import get_engine
from mavis_lc.errors import ConfigurationError


def eval_command(
    head: Annotated[list[str], typer.Option("--head", help="Value head per objective: registry spec or path.")],
    prompts: Annotated[
        str | None, typer.Option(help="Prompt file (.jsonl, .jsonl.gz, .txt); default the shipped held-out prompts.")
    ] = None,
    n_prompts: Annotated[int, typer.Option(help="Prompts evaluated.")] = 8,
    skip: Annotated[int, typer.Option(help="Prompts skipped at the start of the file (e.g. the training ones).")] = 0,
    seeds: Annotated[int, typer.Option(help="Samples per prompt.")] = 2,
    grid_steps: Annotated[int, typer.Option(help="Weights per objective in [0, 1] (5: 0, 0.25, ..., 1).")] = 5,
    best_of: Annotated[str, typer.Option(help="Best-of-N baselines, e.g. 2,4,8; empty for none.")] = "2,4,8",
    frontier_samples: Annotated[
        int,
        typer.Option(help="Base samples per prompt for the soft best-of-N frontier (0: the largest best-of N)."),
    ] = 0,
    beta: Annotated[float, typer.Option(help="MAVIS guidance strength.")] = 2.0,
    top_k: Annotated[int, typer.Option(help="Candidate next tokens per step.")] = 20,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens per response.")] = 48,
    batch_size: Annotated[int, typer.Option(help="Rows decoded together.")] = 16,
    kl_budget: Annotated[
        float | None, typer.Option(help="Choose beta so that equal weights spend at most this KL (nats) per response.")
    ] = None,
    reward_guided: Annotated[
        bool, typer.Option(help="Also run ARGS-style reward-guided token search (k reward calls per token).")
    ] = False,
    calibration_prompts: Annotated[int, typer.Option(help="Prompts of the --kl-budget calibration run.")] = 4,
    min_tokens: Annotated[
        int, typer.Option(help="EOS is banned until a response has this many tokens (1: no empty answers).")
    ] = 1,
    bootstrap_resamples: Annotated[
        int, typer.Option(help="Cluster-bootstrap replicates over prompts behind every interval.")
    ] = 2000,
    exclude_training_prompts: Annotated[
        bool,
        typer.Option(
            help="Skip evaluation prompts that a head was trained on (read from its registry version or work folder)."
        ),
    ] = True,
    variant: Annotated[
        list[str] | None, typer.Option(help="More head sets to sweep, as NAME=SPEC,SPEC (e.g. it0=pos@1,con@1).")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model; default MAVIS_BASE_MODEL.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Base model dtype (auto, float32, bfloat16).")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of a base model given as a hub id.")] = None,
    attn_implementation: Annotated[str | None, typer.Option(help="Base model attention (eager, sdpa, ...).")] = None,
    output_dir: Annotated[str, typer.Option(help="Folder for results.csv/.json, summary.md, pareto.png.")] = (
        "eval-output"
    ),
) -> None:
    """Sweep MAVIS weights against base sampling and best-of-N; write tables, a summary and a Pareto plot."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mavis_lc.evaluation import EvalSettings, calibrate_beta, evaluate, training_prompts, write_report
    from mavis_lc.quickstart import shipped_prompts
    from mavis_lc.training import load_prompts

    with errors():
        try:
            ns = tuple(int(n) for n in best_of.split(",") if n.strip())
        except ValueError:
            raise ConfigurationError(f"--best-of must be integers separated by commas, got {best_of!r}") from None
        if n_prompts < 1 or skip < 0:
            raise ConfigurationError(f"need --n-prompts >= 1 and --skip >= 0, got {n_prompts} and {skip}")
        source = load_prompts(prompts) if prompts else shipped_prompts("held_out")
        every_head = [*head, *(spec for entry in variant or [] for spec in entry.partition("=")[2].split(","))]
        seen = training_prompts(every_head) if exclude_training_prompts else set()
        chosen: list[str] = []
        excluded = 0
        for candidate in source[skip:]:
            if len(chosen) == n_prompts:
                break
            if candidate in seen:
                excluded += 1
            else:
                chosen.append(candidate)
        if len(chosen) < n_prompts:
            left_out = f" once {excluded} training prompts are left out" if excluded else ""
            raise ConfigurationError(f"{prompts or 'the shipped prompts'} has {len(source)} distinct prompts, fewer "
                                     f"than --skip {skip} + --n-prompts {n_prompts}{left_out}")  # fmt: skip
        if excluded:
            console.print(f"left out {excluded} evaluation prompts that the heads were trained on")
        settings = EvalSettings(
            grid_steps=grid_steps, seeds=seeds, best_of=ns, beta=beta, top_k=top_k, max_tokens=max_tokens,
            batch_size=batch_size, reward_guided=reward_guided, min_tokens=min_tokens,
            bootstrap_resamples=bootstrap_resamples, frontier_samples=frontier_samples,
        )  # fmt: skip
        load = load_options(dtype, revision, attn_implementation)
        engine = get_engine(base_model, head, **load)
        variants = {}
        for entry in variant or []:
            name, _, specs = entry.partition("=")
            if not name or not specs:
                raise ConfigurationError(f"--variant must be NAME=SPEC,SPEC,..., got {entry!r}")
            variants[name] = get_engine(base_model, specs.split(","), **load)
        calibration = None
        if kl_budget is not None:
            equal = dict.fromkeys(engine.objectives, 1 / len(engine.objectives))
            calibration = calibrate_beta(engine, chosen[:calibration_prompts], equal, kl_budget, settings)
            settings = dataclasses.replace(settings, beta=calibration.beta)
            console.print(f"beta {calibration.beta:.3g}: KL {calibration.kl:.2f} within the budget of {kl_budget:g}")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as bar:
            tasks: dict[str, Any] = {}

            def progress(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = bar.add_task(label, total=total)
                bar.update(tasks[label], completed=done)
                if done == total and not console.is_terminal:  # a log file gets a line per finished stage
                    console.print(f"{label}: {total} rows, {bar.tasks[tasks[label]].elapsed or 0:.0f} s")

            report = evaluate(engine, chosen, settings, variants=variants, progress=progress)
        report.calibration = calibration
        report.excluded_prompts = excluded
        paths = write_report(report, output_dir)
    summary = paths["markdown"].read_text()
    console.print(Markdown(summary) if console.is_terminal else summary, markup=False, highlight=False)
    for kind, path in paths.items():
        console.print(f"{kind}: {path.resolve()}")
