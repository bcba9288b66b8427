"""The compiled static-cache decode step (`MavisDecoder(compile=True)`) on a tiny random model.

Inductor's CPU kernels may sum in another order than eager's, so equality here is of tokens
(sampled with the same per-row noise) and of statistics to 1e-4: the documented tolerance."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder, packed_linear
from mavis_lc.decoding.few_rows import kernel_unavailable_reason
from mavis_lc.decoding.packed_linear import PackedLinears
from mavis_lc.decoding.static_step import StaticDecodeStep, compile_unavailable_reason
from mavis_lc.errors import DecodingParameterError
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
    # The compiled step's linear layers ran the few-rows kernel wherever it is available.
    assert compiled.static_step is not None
    assert compiled.static_step.few_rows_reason == kernel_unavailable_reason()


def test_few_rows_false_keeps_f_linear_and_the_same_tokens(
    base: BaseModel, decoders: tuple[MavisDecoder, MavisDecoder]
) -> None:
    _, compiled = decoders
    plain = MavisDecoder(base, compiled.heads, compile=True, compile_bucket=64, few_rows=False)
    cfg = DecodeConfig(max_new_tokens=12, top_k=20, seed=6, beta=2.0)
    rows = [{"positivity": 1.0}, {"conciseness": 1.0}]
    got = plain.generate(PROMPTS[:2], rows, cfg)
    assert plain.static_step is not None and plain.static_step.few_rows_reason == "few_rows=False"
    assert [g.token_ids for g in got] == [g.token_ids for g in compiled.generate(PROMPTS[:2], rows, cfg)]


def test_side_branch_on_the_compiled_path_reads_the_same_layer_inputs(base: BaseModel) -> None:
    head = random_head(base, "positivity", 7, 0.3)
    branch = new_side_branch(base, "positivity", n_layers=1, head=head).requires_grad_(False)
    with torch.no_grad():
        for p in branch.branch.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(8)) * 0.05)
    cfg = DecodeConfig(max_new_tokens=12, top_k=20, seed=2, beta=3.0)
    eager = MavisDecoder(base, [branch]).generate(PROMPTS[:2], {"positivity": 1.0}, cfg)
    decoder = MavisDecoder(base, [branch], compile=True, compile_bucket=64)
    counters.clear()
    compiled = decoder.generate(PROMPTS[:2], {"positivity": 1.0}, cfg)
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
    # The base's step returns the tap states without breaking its graph (transformers installs its
    # hidden-state hooks under a lock the compiler cannot trace, unless they are in place already).
    assert not counters["graph_break"], dict(counters["graph_break"])
    # The branch's own layers ran on their own compiled static-cache step, fed the tap states.
    _, branch_step = decoder.static_steps
    assert branch_step.compiled and list(branch_step.compile_seconds) == [(2, 64)]
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


def test_decode_attention_is_sdpa_eagerly_and_folds_the_query_heads_when_compiled(base: BaseModel) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mavis_lc.decoding.static_step import decode_attention

    module = base.model.model.layers[0].self_attn
    assert module.num_key_value_groups == 2  # the tiny model is grouped-query: 4 query heads, 2 key/value heads
    g = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 1, 8, generator=g)  # (B, H, 1, d)
    key, value = torch.randn(3, 2, 10, 8, generator=g), torch.randn(3, 2, 10, 8, generator=g)  # (B, H_kv, L, d)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    mask[2, ..., 7:] = False  # cache positions not written yet
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.35)
    got, _ = decode_attention(module, query, key, value, mask, scaling=0.35)
    assert torch.equal(got, want)  # eager: transformers' own function, bit for bit
    compiled = torch.compile(lambda q, k, v, m: decode_attention(module, q, k, v, m, scaling=0.35)[0], dynamic=False)
    folded = compiled(query, key, value, mask)
    assert folded.shape == want.shape == (3, 1, 4, 8)
    torch.testing.assert_close(folded, want, rtol=1e-5, atol=1e-6)
    # Query heads 0-1 read key/value head 0 and heads 2-3 head 1: swapping the key/value heads must show.
    swapped = compiled(query, key.flip(1), value.flip(1), mask)
    assert not torch.allclose(swapped, want, atol=1e-3)


def test_the_decode_attention_swap_is_scoped_and_counted(base: BaseModel) -> None:
    from mavis_lc.decoding.static_step import DECODE_ATTENTION, _decode_attention

    config = base.model.config
    assert config._attn_implementation == "sdpa"
    with _decode_attention(config):
        with _decode_attention(config):  # two compiled steps of one model at once
            assert config._attn_implementation == DECODE_ATTENTION
        assert config._attn_implementation == DECODE_ATTENTION
    assert config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), _decode_attention(config):
        raise RuntimeError("a failing step")
    assert config._attn_implementation == "sdpa"

    class Eager:
        _attn_implementation = "eager"

    other = Eager()
    with _decode_attention(other):
        assert other._attn_implementation == "eager"  # only SDPA models are switched


def test_the_packed_output_head_matches_the_plain_one_or_says_why_not() -> None:
    from torch import nn

    from mavis_lc.base_model import LogitTransform
    from mavis_lc.decoding.static_step import PackedOutputHead

    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(24, 300, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(300, 24, generator=g))
    hidden = torch.randn(5, 24, generator=g)
    head = PackedOutputHead(linear)
    assert head.fallback_reason is None or "oneDNN" in head.fallback_reason
    with torch.inference_mode():
        few = head(hidden[:2])  # under min_rows: the head itself, and no copy made
        assert not head.packed and torch.equal(few, linear(hidden[:2]))
        got = head(hidden)
        assert head.packed == (head.fallback_reason is None)
    torch.testing.assert_close(got, linear(hidden), rtol=1e-5, atol=1e-4)
    assert got.shape == (5, 300) and int(got.argmax(-1)[0]) == int(linear(hidden).argmax(-1)[0])
    capped = PackedOutputHead(linear, LogitTransform(softcap=2.0))(hidden)
    torch.testing.assert_close(capped, torch.tanh(linear(hidden) / 2.0) * 2.0, rtol=1e-5, atol=1e-5)
    assert PackedOutputHead(nn.Linear(24, 300)).fallback_reason == "the LM head is not a bias-free nn.Linear"
    half = PackedOutputHead(nn.Linear(24, 300, bias=False).to(torch.bfloat16))
    assert "bfloat16" in (half.fallback_reason or "")
    torch.testing.assert_close(half(hidden.bfloat16()), half.head(hidden.bfloat16()))  # the head itself


def _count_packed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of `packed_linear` that ran a packed copy (the op is opaque to the compiler,
    so this runs inside compiled graphs too)."""
    served: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(*args: object) -> torch.Tensor:
        served.append(1)
        return real(*args)

    monkeypatch.setattr(packed_linear, "_pointwise", counting)
    return served


def test_packed_linears_match_f_linear_follow_in_place_updates_and_route_only_inside_the_block() -> None:
    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 24, bias=False), torch.nn.Linear(24, 2))
    x = torch.randn(5, 3, 24)
    want = stack(x)
    packed = PackedLinears(stack, min_parameters=900, batch_hint=4)
    assert sorted(packed.layers) == ["0", "1"]  # the 24x2 layer is under the size floor
    assert packed.nbytes == (24 * 40 + 40 * 24) * 4
    assert "forward" not in stack[0].__dict__
    with packed.routed(), packed.routed():  # nested blocks: routed until the outer one ends
        got = stack(x)
        assert "forward" in stack[0].__dict__
    assert "forward" not in stack[0].__dict__ and "forward" not in stack[1].__dict__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        stack[1].weight.mul_(2.0)  # the copy is stale now: the live weight is used
    with packed.routed():
        torch.testing.assert_close(stack(x), stack.forward(x), rtol=0, atol=0)
    again = PackedLinears(stack, min_parameters=900, batch_hint=4)  # a new user repacks the stale copy
    with again.routed():
        repacked = stack(x)
    torch.testing.assert_close(repacked, stack.forward(x), rtol=1e-5, atol=1e-5)
    assert packed_linear._registry[stack[1].weight.data_ptr()].users == 2
    again.release()
    packed.release()
    assert not {w.data_ptr() for w in (stack[0].weight, stack[1].weight)} & set(packed_linear._registry)


def test_packed_linears_leave_unsupported_layers_plain_with_a_reason() -> None:
    stack = torch.nn.Sequential(torch.nn.Linear(32, 32).to(torch.float64))
    packed = PackedLinears(stack, min_parameters=0)
    assert not packed.layers and "float64" in packed.skipped["0"]


def test_pack_weights_on_the_compiled_path_keeps_the_tokens_and_needs_compile(
    base: BaseModel, decoders: tuple[MavisDecoder, MavisDecoder], monkeypatch: pytest.MonkeyPatch
) -> None:
    eager, _ = decoders
    with pytest.raises(DecodingParameterError, match="pack_weights=True needs compile=True"):
        MavisDecoder(base, eager.heads, pack_weights=True)
    monkeypatch.setattr(packed_linear, "MIN_PACKED_PARAMETERS", 0)  # the tiny model's layers are small
    served = _count_packed_calls(monkeypatch)
    packed = MavisDecoder(base, eager.heads, compile=True, compile_bucket=64, pack_weights=True)
    rows = [{"positivity": 1.0}, {"conciseness": 1.0}, {"positivity": 0.5, "conciseness": 0.5}, {}]
    cfg = DecodeConfig(max_new_tokens=16, top_k=20, seed=3, beta=2.0)
    got = packed.generate(PROMPTS, rows, cfg)
    want = eager.generate(PROMPTS, rows, cfg)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    for c, e in zip(got, want, strict=True):
        assert c.kl == pytest.approx(e.kl, abs=1e-4)
    step = packed.static_step
    assert step is not None and step.compiled and step.packed is not None
    # q, k, v, o, gate, up, down of each of the tiny model's layers, all packed, used in every step
    assert len(step.packed.layers) == 7 * base.model.config.num_hidden_layers
    assert len(served) >= len(step.packed.layers) * 16
    assert not any("forward" in layer.__dict__ for layer in step.packed.layers.values())
    plain = DecodeConfig(max_new_tokens=12, top_k=12, temperature=0.8, seed=11)
    assert packed.generate([PROMPTS[0]], {}, plain)[0].token_ids == plain_topk_sample(base, PROMPTS[0], plain)
