"""The ``mavis`` command line: generate with value heads, and the registry / db sub-commands.

Typed errors (`MavisError`) are printed as one line on stderr with exit status 1.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from mavis_lc.cli_jobs import jobs_app, train, worker
from mavis_lc.cli_registry import db_app, registry_app
from mavis_lc.decoding import DecodeConfig
from mavis_lc.engine import get_engine
from mavis_lc.errors import MavisError
from mavis_lc.weights import parse_weights

app = typer.Typer(help="Steer a frozen language model toward several objectives at once.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.command()(train)
app.command()(worker)

console = Console()
error_console = Console(stderr=True)


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
    raw: Annotated[bool, typer.Option(help="Send prompts as they are, without the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per response.")] = False,
) -> None:
    """Generate responses to PROMPTS, steered by the given heads and weights, in one batch."""
    try:
        engine = get_engine(base_model, head or [])
        tokenizer = engine.base.tokenizer
        texts = [
            p
            if raw or not getattr(tokenizer, "chat_template", None)
            else str(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
            )
            for p in prompts
        ]
        config = DecodeConfig(max_new_tokens=max_tokens, top_k=top_k, temperature=temperature, beta=beta, seed=seed)
        results = engine.generate(texts, parse_weights(weights), config)
    except MavisError as exc:
        error_console.print(f"[red]error:[/red] {exc}")
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
        error_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
