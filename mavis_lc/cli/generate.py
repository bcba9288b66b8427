"""``mavis generate``: steered answers to prompts, in one batch."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mavis_lc.cli.common import (
    console,
    errors,
    load_options,
)
from mavis_lc.decoding import DecodeConfig
from mavis_lc.decoding.engine import get_engine
from mavis_lc.weights import parse_weights


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
    with errors():
        from mavis_lc.training import format_prompts

        load = load_options(dtype, revision, attn_implementation)
        engine = get_engine(base_model, head or [], **load)
        texts = format_prompts(engine.base.tokenizer, prompts, chat_template=not raw)
        config = DecodeConfig(max_new_tokens=max_tokens, top_k=top_k, temperature=temperature, beta=beta, seed=seed)
        results = engine.generate(texts, parse_weights(weights), config)
    for prompt, result in zip(prompts, results, strict=True):
        if as_json:
            console.print_json(json.dumps({"prompt": prompt, "text": result.text, **result.info()}))
        else:
            console.rule(prompt[:80])
            console.print(result.text, markup=False, highlight=False)
            console.print(f"[dim]{result.completion_tokens} tokens, KL {result.kl:.2f}, {result.finish_reason}[/dim]")
