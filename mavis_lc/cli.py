"""The ``mavis`` command line: generate and evaluate with value heads, train, and the registry / db / jobs sub-commands.

Typed errors (`MavisError`) are printed as one line on stderr with exit status 1.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape

from mavis_lc.cli_jobs import jobs_app, train, worker
from mavis_lc.cli_registry import db_app, registry_app
from mavis_lc.decoding import DecodeConfig
from mavis_lc.engine import get_engine
from mavis_lc.errors import ConfigurationError, MavisError
from mavis_lc.weights import parse_weights

app = typer.Typer(help="Steer a frozen language model toward several objectives at once.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.command()(train)
app.command()(worker)

console = Console()
error_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from mavis_lc import __version__

        typer.echo(f"mavis-lc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Steer a frozen language model toward several objectives at once."""


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Prompts; each goes through the chat template.")],
    head: Annotated[
        list[str] | None, typer.Option("--head", help="Value head: registry spec or .safetensors path.")
    ] = None,
    weights: Annotated[str, typer.Option(help="Objective weights, e.g. positivity=0.7,conciseness=0.3.")] = "",
    beta: Annotated[float, typer.Option(help="Guidance strength; 0 is plain top-k sampling.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Candidate next tokens scored per step.")] = 20,
    temperature: Annotated[float, typer.Option(help="Base-model temperature.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens per response.")] = 128,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    base_model: Annotated[str | None, typer.Option(help="Base model; default MAVIS_BASE_MODEL.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Base model dtype (auto, float32, bfloat16).")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of a base model given as a hub id.")] = None,
    attn_implementation: Annotated[str | None, typer.Option(help="Base model attention (eager, sdpa, ...).")] = None,
    raw: Annotated[bool, typer.Option(help="Send prompts as they are, without the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per response.")] = False,
) -> None:
    """Generate responses to PROMPTS, steered by the given heads and weights, in one batch."""
    try:
        from mavis_lc.training import format_prompts

        load = _load(dtype, revision, attn_implementation)
        engine = get_engine(base_model, head or [], **load)
        texts = format_prompts(engine.base.tokenizer, prompts, chat_template=not raw)
        config = DecodeConfig(max_new_tokens=max_tokens, top_k=top_k, temperature=temperature, beta=beta, seed=seed)
        results = engine.generate(texts, parse_weights(weights), config)
    except MavisError as exc:
        error_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    for prompt, result in zip(prompts, results, strict=True):
        if as_json:
            console.print_json(json.dumps({"prompt": prompt, "text": result.text, **result.info()}))
        else:
            console.rule(prompt[:80])
            console.print(result.text, markup=False, highlight=False)
            console.print(f"[dim]{result.completion_tokens} tokens, KL {result.kl:.2f}, {result.finish_reason}[/dim]")


@app.command()
def quickstart(
    fast: Annotated[bool, typer.Option(help="A small run for a first look (a few minutes on 2 CPU cores).")] = False,
    retrain: Annotated[bool, typer.Option(help="Train again even if matching heads are registered.")] = False,
    output_dir: Annotated[str, typer.Option(help="Folder for the Pareto plot and the summary JSON.")] = (
        "quickstart-output"
    ),
) -> None:
    """Train two objectives, register them, and steer a LangChain chain between them."""
    from mavis_lc.quickstart import run_quickstart

    try:
        run_quickstart(fast=fast, retrain=retrain, output_dir=output_dir, console=console)
    except MavisError as exc:
        error_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None


@app.command("eval")
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

    try:
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
            bootstrap_resamples=bootstrap_resamples,
        )  # fmt: skip
        load = _load(dtype, revision, attn_implementation)
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
    except MavisError as exc:
        error_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    summary = paths["markdown"].read_text()
    console.print(Markdown(summary) if console.is_terminal else summary, markup=False, highlight=False)
    for kind, path in paths.items():
        console.print(f"{kind}: {path.resolve()}")


if __name__ == "__main__":
    app()


def _load(dtype: str | None, revision: str | None, attn_implementation: str | None) -> dict[str, Any]:
    """`get_engine` keyword arguments for the base-model loading flags."""
    from mavis_lc.base_model import LoadOptions

    return {"dtype": dtype, "options": LoadOptions.of(revision=revision, attn_implementation=attn_implementation)}
