"""The ``mavis generate`` command on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mavis_lc.cli import app
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.decoding.engine import get_engine


def test_generate_prints_the_decoder_output_as_json(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["generate", "Hello there", "--base-model", str(tiny_model_dir), "--max-tokens", "6", "--json", "--raw"]
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    engine = get_engine(str(tiny_model_dir), [])
    expected = MavisDecoder(engine.base).generate(["Hello there"], None, DecodeConfig(max_new_tokens=6, seed=0))[0]
    assert row["text"] == expected.text
    assert row["completion_tokens"] == expected.completion_tokens


def test_bad_weights_exit_1_with_a_one_line_error(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "hi", "--base-model", str(tiny_model_dir), "--weights", "x=-1"])
    assert result.exit_code == 1
    assert "weight for 'x' must be finite and >= 0" in result.output


def test_rollout_pace_says_the_plan_the_rate_and_the_time_left() -> None:
    from mavis_lc.cli.train import _rollout_pace

    assert _rollout_pace({"planned_tokens": 44_000, "tokens": 0, "tokens_per_s": 0.0}) == "at most 44,000 tokens"
    pace = _rollout_pace({"planned_tokens": 44_000, "tokens": 8_000, "tokens_per_s": 200.0})
    assert pace == "at most 44,000 tokens, 200 tok/s, at most 3.0 min left"


def test_generate_loads_the_base_as_its_flags_say(tiny_model_dir: Path) -> None:
    from mavis_lc.base_model import LoadOptions, load_base_model

    flags = ["--base-model", str(tiny_model_dir), "--max-tokens", "4", "--json", "--raw"]
    result = CliRunner().invoke(
        app, ["generate", "Hello", *flags, "--dtype", "bfloat16", "--attn-implementation", "eager"]
    )
    assert result.exit_code == 0, result.output
    loaded = load_base_model(str(tiny_model_dir), dtype="bfloat16", options=LoadOptions.of(attn_implementation="eager"))
    assert str(loaded.dtype) == "torch.bfloat16" and loaded.model.config._attn_implementation == "eager"
    bad = CliRunner().invoke(app, ["generate", "Hello", *flags, "--dtype", "float8"])
    assert bad.exit_code == 1 and "unknown dtype 'float8'" in bad.output


def test_version() -> None:
    from mavis_lc import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"mavis-lc {__version__}\n"
