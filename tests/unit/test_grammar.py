"""Grammar-constrained decoding: masks before the top-k, EOS where the grammar accepts, mixed
batches, the tilt and seeds unchanged, KL against the unconstrained base, typed errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.decoding.grammar import Grammar, GrammarCompiler, GrammarError, unpack_bitmask
from mavis_lc.value_models import new_shared_head

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0}},
    "required": ["name", "n"],
    "additionalProperties": False,
}
PROMPTS = ["hello there", "Tell me about cats", "the dog", "why"]


@pytest.fixture
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")


def steered(base: BaseModel) -> MavisDecoder:
    head = new_shared_head(base, "obj")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return MavisDecoder(base, [head.requires_grad_(False)])


def test_unpack_bitmask_reads_bit_j_of_word_w_as_token_32w_plus_j() -> None:
    words = torch.tensor([[0b101, -(1 << 31), 0]], dtype=torch.int32)  # tokens 0, 2 and 63 (the sign bit)
    mask = unpack_bitmask(words, 70)
    assert mask.shape == (1, 70)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 2, 63]


def test_every_constrained_output_matches_its_grammar_in_a_mixed_batch(base: BaseModel) -> None:
    grammars = [Grammar.json_schema(SCHEMA), None, Grammar.regex(r"(yes|no)!"), Grammar.json_schema(SCHEMA)]
    decoder = steered(base)
    out = decoder.generate(PROMPTS, {"obj": 1.0}, DecodeConfig(max_new_tokens=80, beta=2.0), grammars=grammars)
    for g in (out[0], out[3]):
        data = json.loads(g.text)
        assert set(data) == {"name", "n"} and isinstance(data["n"], int) and data["n"] >= 0
        assert len(data["name"]) <= 6
        assert g.finish_reason == "stop" and g.constrained and g.grammar_complete
    assert re.fullmatch(r"(yes|no)!", out[2].text) and out[2].grammar_complete
    assert not out[1].constrained and out[1].grammar_complete is None
    # The unconstrained row is exactly what it is without any grammar in the batch.
    alone = decoder.generate([PROMPTS[1]], {"obj": 1.0}, DecodeConfig(max_new_tokens=80, beta=2.0))
    assert alone[0].token_ids == out[1].token_ids
    # A constrained row does not depend on its batch either.
    single = decoder.generate(
        [PROMPTS[3]], {"obj": 1.0}, DecodeConfig(max_new_tokens=80, beta=2.0), grammars=[grammars[3]]
    )
    assert single[0].token_ids == out[3].token_ids


def test_the_mask_comes_before_the_top_k_and_kl_is_against_the_free_base(base: BaseModel) -> None:
    decoder = MavisDecoder(base)
    config = DecodeConfig(max_new_tokens=30, top_k=3)
    free = decoder.generate(["hello"], None, config)[0]
    ruled = decoder.generate(["hello"], None, config, grammars=[Grammar.regex(r"[0-9]{3}")])[0]
    assert re.fullmatch(r"[0-9]{3}", ruled.text)  # digits are rarely in the free top-3: masked first
    assert ruled.kl > free.kl + 1.0  # forcing digits costs KL against the unconstrained base
    assert ruled.kl_topk == pytest.approx(0.0, abs=1e-5)  # no tilt: pi is the legal top-k of the base


def test_the_tilt_still_moves_constrained_rows(base: BaseModel) -> None:
    grammar = [Grammar.regex(r"[a-z]{8}")] * 3
    plain = MavisDecoder(base).generate(PROMPTS[:3], None, DecodeConfig(max_new_tokens=12), grammars=grammar)
    tilted = steered(base).generate(
        PROMPTS[:3], {"obj": 1.0}, DecodeConfig(max_new_tokens=12, beta=8.0), grammars=grammar
    )
    assert all(re.fullmatch(r"[a-z]{8}", g.text) for g in plain + tilted)
    assert [g.text for g in plain] != [g.text for g in tilted]
    assert all(g.kl_topk > 0 for g in tilted)


def test_a_row_cut_by_max_tokens_says_its_grammar_is_incomplete(base: BaseModel) -> None:
    out = MavisDecoder(base).generate(
        ["hi"], None, DecodeConfig(max_new_tokens=3), grammars=[Grammar.json_schema(SCHEMA)]
    )[0]
    assert out.finish_reason == "length" and out.constrained and out.grammar_complete is False
    assert out.info()["grammar_complete"] is False


def test_min_tokens_and_a_grammar_that_only_allows_eos(base: BaseModel) -> None:
    # "ab" is complete after two tokens or fewer; min_new_tokens 6 would ban EOS, the grammar wins.
    out = MavisDecoder(base).generate(
        ["hi"], None, DecodeConfig(max_new_tokens=10, min_new_tokens=6), grammars=[Grammar.regex("ab")]
    )[0]
    assert out.text == "ab" and out.finish_reason == "stop" and out.grammar_complete


def test_bad_grammars_are_typed_errors_before_decoding(base: BaseModel) -> None:
    decoder = MavisDecoder(base)
    with pytest.raises(GrammarError, match="grammar kind 'yaml' is not allowed"):
        Grammar("yaml", "a: b")
    with pytest.raises(GrammarError, match="lark grammar does not compile"):
        decoder.generate(["hi"], None, DecodeConfig(max_new_tokens=2), grammars=[Grammar.lark("start: (")])
    with pytest.raises(GrammarError, match="does not compile"):
        decoder.generate(["hi"], None, DecodeConfig(max_new_tokens=2), grammars=[Grammar.json_schema("{not json")])
    with pytest.raises(GrammarError, match="2 grammars for 1 prompts"):
        decoder.generate(["hi"], None, DecodeConfig(max_new_tokens=2), grammars=[None, None])
    assert Grammar.coerce({"type": "json_schema", "value": SCHEMA}) == Grammar.json_schema(SCHEMA)
    with pytest.raises(GrammarError, match="grammar must be"):
        Grammar.coerce({"schema": SCHEMA})


def test_a_token_outside_the_mask_is_refused(base: BaseModel) -> None:
    constraint = GrammarCompiler(base.tokenizer, base.vocab_size, base.eos_token_ids).constraint(Grammar.regex("a+"))
    allowed = constraint.allowed()
    refused = int(torch.nonzero(~allowed)[0])
    with pytest.raises(GrammarError, match=f"token {refused} left the grammar"):
        constraint.consume(refused)
