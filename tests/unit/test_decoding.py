"""MAVIS decoding on a tiny random model: exactness against plain sampling, the tilt, batching, stops."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder, mavis_step
from mavis_lc.decoding.decoder import _TextTracker
from mavis_lc.errors import DecodingParameterError, InvalidWeightError, UnknownObjectiveError
from mavis_lc.value_models import SharedBackboneQHead, new_shared_head

PROMPTS = ["Hello there", "Tell me about cats please", "The quick brown fox", "I love sunny days"]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir))


def random_head(base: BaseModel, objective: str, seed: int, scale: float = 1.0) -> SharedBackboneQHead:
    head = new_shared_head(base, objective)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return head


def plain_topk_sample(base: BaseModel, prompt: str, cfg: DecodeConfig) -> list[int]:
    """Reference: plain top-k sampling without KV cache, one prompt, torch.multinomial over the vocabulary."""
    ids = base.tokenizer(prompt, return_tensors="pt")["input_ids"]
    generator = torch.Generator().manual_seed(cfg.seed or 0)
    out: list[int] = []
    for _ in range(cfg.max_new_tokens):
        logits = base.model(ids).logits[0, -1].float() / cfg.temperature
        kth = logits.topk(cfg.top_k).values[-1]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator)) if cfg.do_sample else int(probs.argmax())
        out.append(token)
        if token in base.eos_token_ids:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("do_sample", [True, False])
def test_zero_weights_reproduce_plain_topk_sampling(base: BaseModel, do_sample: bool) -> None:
    cfg = DecodeConfig(max_new_tokens=24, top_k=12, temperature=0.8, do_sample=do_sample, seed=11)
    heads = [random_head(base, "positivity", 1), random_head(base, "conciseness", 2)]
    decoder = MavisDecoder(base, heads)
    for prompt in PROMPTS:
        expected = plain_topk_sample(base, prompt, cfg)
        zero = decoder.generate([prompt], {"positivity": 0.0, "conciseness": 0.0}, cfg)[0]
        beta0 = decoder.generate([prompt], {"positivity": 1.0}, DecodeConfig(**{**cfg.__dict__, "beta": 0.0}))[0]
        assert zero.token_ids == expected
        assert beta0.token_ids == expected


def test_matches_transformers_generate_with_same_seed(base: BaseModel) -> None:
    cfg = DecodeConfig(max_new_tokens=20, top_k=15, seed=5)
    ours = MavisDecoder(base).generate([PROMPTS[1]], None, cfg)[0]
    enc = base.tokenizer([PROMPTS[1]], return_tensors="pt")
    torch.manual_seed(5)
    out = base.model.generate(**enc, max_new_tokens=20, do_sample=True, top_k=15, top_p=1.0, temperature=1.0)
    assert ours.token_ids == out[0, enc["input_ids"].shape[1] :].tolist()[: len(ours.token_ids)]


def test_tilt_moves_one_token_exactly_as_the_formula_says(base: BaseModel) -> None:
    head = new_shared_head(base, "positivity")
    target, c, weight, beta, temperature = 7, 1.5, 0.6, 2.0, 0.7
    with torch.no_grad():
        head.token_bias[target] = c
    logits = torch.linspace(-3, 3, base.vocab_size)[
        torch.randperm(base.vocab_size, generator=torch.Generator().manual_seed(0))
    ]
    fourth, fifth = logits.topk(5).values[3:5]
    logits[target] = (fourth + fifth) / 2  # fifth most likely: among the candidates, not the favourite
    hidden = torch.randn(1, base.hidden_size)
    out = mavis_step(
        logits[None],
        hidden,
        [head],
        torch.tensor([[weight]]),
        beta=beta,
        top_k=10,
        temperature=temperature,
        generators=None,
    )
    top = (logits / temperature).topk(10)
    bonus = torch.where(top.indices == target, beta * weight * c, 0.0)
    expected = torch.exp(top.values + bonus) / torch.exp(top.values + bonus).sum()
    assert out.candidates[0].tolist() == top.indices.tolist()
    torch.testing.assert_close(out.probs[0], expected, rtol=1e-6, atol=1e-7)
    ref_p = torch.softmax(logits / temperature, -1)[target]
    pos = top.indices.tolist().index(target)
    assert float(expected[pos]) > float(ref_p)  # the bonus raised it
    # The tilt's reported size for the chosen token: Q(chosen) - E_ref[Q]
    ref_k = torch.softmax(top.values, -1)
    chosen = int(out.tokens[0])
    expected_tilt = (c if chosen == target else 0.0) - float(ref_k[pos]) * c
    assert float(out.tilt[0, 0]) == pytest.approx(expected_tilt, abs=1e-6)


def test_probabilities_sum_to_one_and_kl_is_zero_without_steering_over_full_vocab(base: BaseModel) -> None:
    decoder = MavisDecoder(base, [random_head(base, "positivity", 3)])
    full = DecodeConfig(max_new_tokens=10, top_k=base.vocab_size, seed=1)
    g = decoder.generate([PROMPTS[0]], {"positivity": 0.0}, full)[0]
    assert g.kl == pytest.approx(0.0, abs=1e-4)
    steered = decoder.generate([PROMPTS[0]], {"positivity": 1.0}, full)[0]
    assert steered.kl != pytest.approx(0.0, abs=1e-3)
    logits = torch.randn(3, base.vocab_size)
    out = mavis_step(
        logits,
        torch.randn(3, base.hidden_size),
        decoder.heads,
        torch.ones(3, 1),
        beta=1.0,
        top_k=9,
        temperature=1.0,
        generators=[torch.Generator().manual_seed(i) for i in range(3)],
    )
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(3))


def test_batch_with_per_row_weights_matches_each_prompt_alone(base: BaseModel) -> None:
    heads = [random_head(base, "positivity", 4, 0.3), random_head(base, "conciseness", 5, 0.3)]
    decoder = MavisDecoder(base, heads)
    rows = [
        {"positivity": 1.0},
        {"conciseness": 1.0},
        {"positivity": 0.5, "conciseness": 0.5},
        {},
    ]
    cfg = DecodeConfig(max_new_tokens=16, top_k=20, seed=3, beta=2.0)
    batched = decoder.generate(PROMPTS, rows, cfg)
    alone = [decoder.generate([p], w, cfg)[0] for p, w in zip(PROMPTS, rows, strict=True)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.weights for g in batched] == rows
    for b, a in zip(batched, alone, strict=True):
        assert b.kl == pytest.approx(a.kl, abs=1e-4)
    assert len({tuple(g.token_ids) for g in batched}) == 4


def test_weights_change_the_output(base: BaseModel) -> None:
    decoder = MavisDecoder(base, [random_head(base, "positivity", 6, 0.5)])
    cfg = DecodeConfig(max_new_tokens=16, top_k=20, seed=2, beta=4.0)
    off = decoder.generate([PROMPTS[0]], {"positivity": 0.0}, cfg)[0]
    on = decoder.generate([PROMPTS[0]], {"positivity": 1.0}, cfg)[0]
    assert off.token_ids != on.token_ids
    assert on.mean_tilt["positivity"] > 0  # steering picks tokens with above-average Q


def eos_head(base: BaseModel) -> SharedBackboneQHead:
    head = new_shared_head(base, "brevity")
    with torch.no_grad():
        head.token_bias[base.eos_token_ids[0]] = 100.0
    return head


def test_eos_and_min_new_tokens(base: BaseModel) -> None:
    decoder = MavisDecoder(base, [eos_head(base)])
    cfg = DecodeConfig(max_new_tokens=10, top_k=base.vocab_size, seed=0)
    g = decoder.generate([PROMPTS[0]], {"brevity": 1.0}, cfg)[0]
    assert (g.finish_reason, g.completion_tokens, g.text) == ("stop", 1, "")
    g = decoder.generate([PROMPTS[0]], {"brevity": 1.0}, DecodeConfig(**{**cfg.__dict__, "min_new_tokens": 4}))[0]
    assert g.completion_tokens == 5 and g.token_ids[-1] == base.eos_token_ids[0]
    assert all(t not in base.eos_token_ids for t in g.token_ids[:4])
    g = decoder.generate([PROMPTS[0]], {}, cfg)[0]
    assert g.finish_reason == "length" and g.completion_tokens == 10


def test_stop_string_cuts_output_exactly_and_streaming_never_leaks_it(base: BaseModel) -> None:
    decoder = MavisDecoder(base)
    cfg = DecodeConfig(max_new_tokens=30, top_k=8, seed=9)
    full = decoder.generate([PROMPTS[2]], None, cfg)[0].text
    assert len(full) > 12
    stop = full[6:10]
    cut = full.index(stop)
    stopped_cfg = DecodeConfig(**{**cfg.__dict__, "stop": (stop, "never-appears-xyz")})
    g = decoder.generate([PROMPTS[2]], None, stopped_cfg)[0]
    assert g.text == full[:cut]
    assert (g.finish_reason, g.stop_sequence) == ("stop", stop)
    streamed = "".join(step.deltas[0] for step in decoder.stream([PROMPTS[2]], None, stopped_cfg))
    assert streamed == full[:cut]


def test_stream_deltas_concatenate_to_the_generated_text_per_row(base: BaseModel) -> None:
    decoder = MavisDecoder(base)
    cfg = DecodeConfig(max_new_tokens=12, top_k=10, seed=4)
    texts = ["", "", ""]
    finished = {}
    for step in decoder.stream(PROMPTS[:3], None, cfg):
        for b, d in enumerate(step.deltas):
            texts[b] += d
        finished.update({b: g for b, g in enumerate(step.finished) if g is not None})
    assert texts == [finished[b].text for b in range(3)]


def test_seed_none_gives_fresh_samples_and_fixed_seeds_repeat(base: BaseModel) -> None:
    decoder = MavisDecoder(base)
    cfg = DecodeConfig(max_new_tokens=12, top_k=50, seed=21)
    assert (
        decoder.generate([PROMPTS[0]], None, cfg)[0].token_ids == decoder.generate([PROMPTS[0]], None, cfg)[0].token_ids
    )
    a, b = decoder.generate([PROMPTS[0]] * 2, None, cfg, seeds=[1, 2])
    assert a.token_ids != b.token_ids


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"top_k": 0}, DecodingParameterError, "top_k"),
        ({"top_k": 10_000}, DecodingParameterError, "top_k"),
        ({"temperature": -1.0}, DecodingParameterError, "temperature"),
        ({"temperature": float("nan")}, DecodingParameterError, "temperature"),
        ({"max_new_tokens": 0}, DecodingParameterError, "max_new_tokens"),
        ({"max_new_tokens": 10_000}, DecodingParameterError, "context 1024"),
        ({"beta": -1.0}, DecodingParameterError, "beta"),
        ({"min_new_tokens": 99, "max_new_tokens": 5}, DecodingParameterError, "min_new_tokens"),
        ({"stop": ("",)}, DecodingParameterError, "stop"),
    ],
)
def test_bad_decoding_parameters_are_typed_errors(base: BaseModel, kwargs: dict, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        MavisDecoder(base).generate(["hi"], None, DecodeConfig(**kwargs))


def test_temperature_zero_is_greedy_on_logits_plus_tilt(base: BaseModel) -> None:
    head = random_head(base, "positivity", 8, 0.5)
    decoder = MavisDecoder(base, [head])
    at_zero = DecodeConfig(temperature=0.0, max_new_tokens=8, top_k=10, beta=2.0)
    at_one = DecodeConfig(temperature=1.0, do_sample=False, max_new_tokens=8, top_k=10, beta=2.0)
    for prompt in PROMPTS[:2]:
        greedy = decoder.generate([prompt], {"positivity": 1.0}, at_zero)[0]
        assert greedy.token_ids == decoder.generate([prompt], {"positivity": 1.0}, at_one)[0].token_ids
        assert all(map(lambda x: x == x and abs(x) != float("inf"), (greedy.kl, greedy.kl_topk)))
    # The first step by hand: the argmax of the top-k logits plus the tilt.
    ids = base.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = base.model(ids, output_hidden_states=True)
    logits, hidden = out.logits[0, -1], out.hidden_states[-1][0, -1]
    top = logits.topk(10)
    q = head.q_values(hidden[None], top.indices[None])[0]
    one_step = DecodeConfig(**{**at_zero.__dict__, "max_new_tokens": 1})
    first = decoder.generate([PROMPTS[0]], {"positivity": 1.0}, one_step)
    assert first[0].token_ids == [int(top.indices[(top.values + 2.0 * q).argmax()])]


def test_kl_topk_is_zero_for_plain_sampling_and_kl_counts_the_cut(base: BaseModel) -> None:
    decoder = MavisDecoder(base, [random_head(base, "positivity", 3)])
    cfg = DecodeConfig(max_new_tokens=10, top_k=5, seed=1, beta=2.0)
    plain = decoder.generate([PROMPTS[0]], {"positivity": 0.0}, cfg)[0]
    assert plain.kl_topk == pytest.approx(0.0, abs=1e-5) and plain.kl > 0.1
    steered = decoder.generate([PROMPTS[0]], {"positivity": 1.0}, cfg)[0]
    assert steered.kl_topk != pytest.approx(0.0, abs=1e-3)
    assert steered.info()["kl_topk"] == steered.kl_topk


def test_kl_with_min_new_tokens_is_against_the_unconstrained_base(base: BaseModel) -> None:
    # EOS is made the most likely token; banning it must not move the reference of the KL.
    logits = torch.randn(2, base.vocab_size, generator=torch.Generator().manual_seed(0))
    eos = base.eos_token_ids[0]
    logits[:, eos] = 10.0
    allowed = torch.ones(2, base.vocab_size, dtype=torch.bool)
    allowed[:, eos] = False
    out = mavis_step(
        logits, torch.zeros(2, base.hidden_size), [], torch.zeros(2, 0),
        beta=0.0, top_k=6, temperature=1.0, generators=None, allowed=allowed,
    )  # fmt: skip
    assert eos not in out.candidates.tolist()[0]
    full = torch.log_softmax(logits, -1).gather(1, out.tokens[:, None]).squeeze(1)
    legal_top = logits.masked_fill(~allowed, float("-inf")).topk(6).values  # (2, 6)
    log_pi = legal_top[:, 0] - torch.logsumexp(legal_top, -1)
    torch.testing.assert_close(out.log_ratio, log_pi - full)
    torch.testing.assert_close(out.log_ratio_topk, torch.zeros(2), atol=1e-6, rtol=0)
    # In the decoder: with EOS banned at step 1, the first token's KL is the same as without the ban
    # whenever the same token is drawn; plain sampling has kl_topk 0 either way.
    decoder = MavisDecoder(base, [eos_head(base)])
    cfg = DecodeConfig(max_new_tokens=3, top_k=8, seed=0, min_new_tokens=3)
    g = decoder.generate([PROMPTS[0]], {"brevity": 0.0}, cfg)[0]
    ids = base.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    expected = 0.0
    for token in g.token_ids:
        with torch.no_grad():
            step_logits = base.model(ids).logits[0, -1]
        legal = step_logits.clone()
        legal[base.eos_token_ids] = float("-inf")
        top = legal.topk(8).values
        position = int((legal.topk(8).indices == token).nonzero())
        expected += float(top[position] - torch.logsumexp(top, -1) - torch.log_softmax(step_logits, -1)[token])
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert g.kl == pytest.approx(expected, abs=1e-4)
    assert g.kl_topk == pytest.approx(0.0, abs=1e-5)


def test_tokens_past_a_stop_string_cut_count_in_no_statistic(base: BaseModel) -> None:
    decoder = MavisDecoder(base, [random_head(base, "positivity", 2, 0.3)])
    cfg = DecodeConfig(max_new_tokens=30, top_k=8, seed=9, beta=1.0)
    free = decoder.generate([PROMPTS[2]], {"positivity": 1.0}, cfg)[0]
    tok = base.tokenizer
    pieces = [tok.decode(free.token_ids[:n], skip_special_tokens=True) for n in range(len(free.token_ids) + 1)]
    # A stop string made of the text of tokens 6..7 (distinct from all text before it).
    stop = pieces[8][len(pieces[6]) :]
    assert stop and stop not in pieces[6] + stop[:-1]
    stopped = decoder.generate([PROMPTS[2]], {"positivity": 1.0}, DecodeConfig(**{**cfg.__dict__, "stop": (stop,)}))[0]
    cut = pieces[8].index(stop)
    kept = next(n for n in range(len(pieces)) if len(pieces[n]) >= cut)
    assert stopped.text == pieces[8][:cut]
    assert stopped.completion_tokens == kept < 8
    assert stopped.token_ids == free.token_ids[:kept]
    as_long = DecodeConfig(**{**cfg.__dict__, "max_new_tokens": kept})
    prefix = decoder.generate([PROMPTS[2]], {"positivity": 1.0}, as_long)[0]
    assert stopped.kl == pytest.approx(prefix.kl, abs=1e-5)
    assert stopped.kl_topk == pytest.approx(prefix.kl_topk, abs=1e-5)
    assert stopped.mean_tilt["positivity"] == pytest.approx(prefix.mean_tilt["positivity"], abs=1e-5)


@pytest.mark.parametrize(
    ("weights", "error", "fragment"),
    [
        ({"helpfulness": 1.0}, UnknownObjectiveError, "unknown objective 'helpfulness'; allowed: positivity"),
        ({"positivity": -0.1}, InvalidWeightError, "-0.1"),
        ({"positivity": float("nan")}, InvalidWeightError, "nan"),
        ({"positivity": float("inf")}, InvalidWeightError, "inf"),
        ({"positivity": "high"}, InvalidWeightError, "'high'"),
    ],
)
def test_bad_weights_are_typed_errors(base: BaseModel, weights: dict, error: type, fragment: str) -> None:
    decoder = MavisDecoder(base, [new_shared_head(base, "positivity")])
    with pytest.raises(error, match=fragment):
        decoder.generate(["hi"], weights, DecodeConfig(max_new_tokens=2))


def test_weight_rows_must_match_prompts(base: BaseModel) -> None:
    with pytest.raises(DecodingParameterError, match="2 weight rows for 1 prompts"):
        MavisDecoder(base).generate(["hi"], [{}, {}], DecodeConfig(max_new_tokens=2))


def _track(tracker: _TextTracker, rows: list[list[int]], limit: int) -> list[list[str]]:
    deltas = []
    for step in range(limit):
        tokens = [row[step] for row in rows]
        deltas.append(tracker.push(tokens, last_step=[step == limit - 1] * len(rows)))
    return deltas


def test_incremental_text_equals_decoding_the_whole_row_every_step(base: BaseModel) -> None:
    """The decode stream gives the same deltas, cuts, finish reasons and texts as decoding each
    row's whole token list every step, on text with multi-byte characters split across tokens
    and stop strings, while decoding a row whole only once (at its end)."""
    tok = base.tokenizer
    eos = set(base.eos_token_ids)
    phrases = ["héllo wörld 😀 ünï — end. STOP here", "naïve 中文 café", "abc### tail"]
    rng = random.Random(0)
    rows = []
    for i in range(6):
        ids = tok(phrases[i % 3], add_special_tokens=False)["input_ids"]
        ids = ids + [rng.randrange(len(tok)) for _ in range(12)] + ids
        rows.append(ids)
    n = min(len(r) for r in rows)
    rows = [r[:n] for r in rows]
    rows[5][n // 2] = next(iter(eos))  # one row ends at EOS
    stops = [["STOP"], ["中文"], ["###"], [], ["wör", "é"], []]
    whole = _TextTracker(tok, stops, eos, len(rows))
    whole._streams = None  # the previous path: decode the whole row every step
    calls = []
    decode = tok.decode

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(tok, name)

        def decode(self, ids: list[int], **kw: object) -> str:
            calls.append(len(ids))
            return decode(ids, **kw)

    incremental = _TextTracker(Counting(), stops, eos, len(rows))
    incremental.tokenizer = Counting()
    assert incremental._streams is not None
    expected = _track(whole, rows, n)
    got, decoding_steps = [], []
    for step in range(n):
        before = len(calls)
        got.append(incremental.push([row[step] for row in rows], last_step=[step == n - 1] * len(rows)))
        if len(calls) > before:
            decoding_steps.append(bool(incremental.newly_done))
    assert got == expected
    assert incremental.final_text == whole.final_text and incremental.kept == whole.kept
    assert incremental.finish_reason == whole.finish_reason and incremental.stop_sequence == whole.stop_sequence
    assert ["".join(step[b] for step in got) for b in range(len(rows))] == incremental.final_text
    assert any("\ufffd" not in t and any(ord(c) > 0x7FF for c in t) for t in incremental.final_text)
    assert whole.finish_reason.count("stop") >= 3 and "length" in whole.finish_reason
    # a row is decoded whole only at the step it ends (its text, or where a stop string cuts it)
    assert decoding_steps and all(decoding_steps)
