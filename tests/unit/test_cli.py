"""The ``mavis generate`` command on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mavis_lc.cli import app
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.engine import get_engine


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
