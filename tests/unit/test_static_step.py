"""The compiled static-cache decode step (`MavisDecoder(compile=True)`) on a tiny random model.

Inductor's CPU kernels may sum in another order than eager's, so equality here is of tokens
(sampled with the same per-row noise) and of statistics to 1e-4: the documented tolerance."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.decoding.static_step import StaticDecodeStep, compile_unavailable_reason
from mavis_lc.value_models import new_side_branch
from tests.unit.test_decoding import PROMPTS, plain_topk_sample, random_head

pytestmark = pytest.mark.skipif(compile_unavailable_reason() is not None, reason="torch.compile unavailable")


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def decoders(base: BaseModel) -> tuple[MavisDecoder, MavisDecoder]:
    """The same heads, eager and compiled (one compiled decoder for the module: compiling is the slow part)."""
    heads = [random_head(base, "positivity", 4, 0.3), random_head(base, "conciseness", 5, 0.3)]
    return MavisDecoder(base, heads), MavisDecoder(base, heads, compile=True, compile_bucket=64)


def test_zero_weights_on_the_compiled_path_reproduce_plain_topk_sampling(
    base: BaseModel, decoders: tuple[MavisDecoder, MavisDecoder]
) -> None:
    _, compiled = decoders
    cfg = DecodeConfig(max_new_tokens=20, top_k=12, temperature=0.8, seed=11)
    for prompt in PROMPTS[:2]:
        out = compiled.generate([prompt], {"positivity": 0.0, "conciseness": 0.0}, cfg)[0]
        assert out.token_ids == plain_topk_sample(base, prompt, cfg)
    assert compiled.static_step is not None and compiled.static_step.compiled
    assert compiled.static_step.compile_seconds  # the first step's compile was timed


def test_compiled_batch_matches_eager_and_each_row_alone(decoders: tuple[MavisDecoder, MavisDecoder]) -> None:
    eager, compiled = decoders
    rows = [{"positivity": 1.0}, {"conciseness": 1.0}, {"positivity": 0.5, "conciseness": 0.5}, {}]
    cfg = DecodeConfig(max_new_tokens=16, top_k=20, seed=3, beta=2.0)
    batched = compiled.generate(PROMPTS, rows, cfg)
    reference = eager.generate(PROMPTS, rows, cfg)
    alone = [compiled.generate([p], w, cfg)[0] for p, w in zip(PROMPTS, rows, strict=True)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in reference]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    for c, e in zip(batched, reference, strict=True):
        assert c.kl == pytest.approx(e.kl, abs=1e-4)
        assert c.kl_topk == pytest.approx(e.kl_topk, abs=1e-4)
        for name in c.mean_tilt:
            assert c.mean_tilt[name] == pytest.approx(e.mean_tilt[name], abs=1e-4)
    assert len({tuple(g.token_ids) for g in batched}) == 4


def test_side_branch_on_the_compiled_path_reads_the_same_layer_inputs(base: BaseModel) -> None:
    head = random_head(base, "positivity", 7, 0.3)
    branch = new_side_branch(base, "positivity", n_layers=1, head=head).requires_grad_(False)
    with torch.no_grad():
        for p in branch.branch.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(8)) * 0.05)
    cfg = DecodeConfig(max_new_tokens=12, top_k=20, seed=2, beta=3.0)
    eager = MavisDecoder(base, [branch]).generate(PROMPTS[:2], {"positivity": 1.0}, cfg)
    compiled = MavisDecoder(base, [branch], compile=True, compile_bucket=64).generate(
        PROMPTS[:2], {"positivity": 1.0}, cfg
    )
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
    for c, e in zip(compiled, eager, strict=True):
        assert c.mean_tilt["positivity"] == pytest.approx(e.mean_tilt["positivity"], abs=1e-4)


def test_a_failing_compile_falls_back_to_eager_with_a_logged_reason(
    base: BaseModel, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = MavisDecoder(base, [random_head(base, "positivity", 4, 0.3)], compile=True)
    step = decoder.static_step
    assert isinstance(step, StaticDecodeStep)

    def broken(*args: object) -> object:
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(step, "_compiled", broken)
    cfg = DecodeConfig(max_new_tokens=10, top_k=20, seed=1, beta=2.0)
    with caplog.at_level(logging.WARNING, logger="mavis_lc.decoding.static_step"):
        out = decoder.generate([PROMPTS[0]], {"positivity": 1.0}, cfg)[0]
    eager = MavisDecoder(base, decoder.heads).generate([PROMPTS[0]], {"positivity": 1.0}, cfg)[0]
    assert out.token_ids == eager.token_ids
    assert not step.compiled and "no C compiler" in (step.fallback_reason or "")
    assert any("runs eagerly" in r.getMessage() and "no C compiler" in r.getMessage() for r in caplog.records)


def test_a_decode_started_while_the_compiled_step_is_busy_runs_eagerly(
    decoders: tuple[MavisDecoder, MavisDecoder],
) -> None:
    eager, compiled = decoders
    cfg = DecodeConfig(max_new_tokens=8, top_k=20, seed=4, beta=2.0)
    first = compiled.stream([PROMPTS[0]], {"positivity": 1.0}, cfg)
    next(first)  # holds the compiled step
    second = compiled.generate([PROMPTS[1]], {"conciseness": 1.0}, cfg)[0]
    rest = [s for s in first]
    assert second.token_ids == eager.generate([PROMPTS[1]], {"conciseness": 1.0}, cfg)[0].token_ids
    assert rest and rest[-1].finished[0] is not None


def test_cache_lengths_round_up_to_the_bucket_within_the_context() -> None:
    step = StaticDecodeStep.__new__(StaticDecodeStep)
    step.bucket, step.max_length = 128, 300
    assert step.cache_length(10, 20) == 128
    assert step.cache_length(100, 100) == 256
    assert step.cache_length(200, 90) == 300  # capped at the context
