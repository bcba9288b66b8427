"""MAVIS decoding on the packaged SmolLM2-135M: exactness against transformers' sampling, batching."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import PACKAGED_BASE_MODEL, BaseModel, load_base_model, packaged_smollm2_dir
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.value_models import SharedBackboneQHead, new_shared_head

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What should I cook for dinner tonight?",
    "How do I fix a flat bicycle tyre?",
    "Tell me something about the moon.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def smollm2() -> BaseModel:
    return load_base_model(PACKAGED_BASE_MODEL)


def chat_prompt(base: BaseModel, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return str(base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def random_head(base: BaseModel, objective: str, seed: int) -> SharedBackboneQHead:
    head = new_shared_head(base, objective)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=generator) * 0.02)
        head.token_bias.copy_(torch.randn(head.token_bias.shape, generator=generator))
    return head


def test_packaged_model_is_smollm2_from_the_safetensors_cache(smollm2: BaseModel) -> None:
    assert (packaged_smollm2_dir() / "model.safetensors").is_file()
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    assert (smollm2.vocab_size, smollm2.hidden_size) == (49_152, 576)
    assert smollm2.tokenizer.convert_ids_to_tokens(smollm2.eos_token_ids) == ["<|im_end|>"]


@pytest.mark.parametrize("do_sample", [False, True])
def test_zero_weights_are_token_for_token_transformers_top_k_sampling(smollm2: BaseModel, do_sample: bool) -> None:
    decoder = MavisDecoder(smollm2, [random_head(smollm2, "positivity", 1), random_head(smollm2, "brevity", 2)])
    for question, seed in zip(QUESTIONS[:2], (3, 4), strict=True):
        prompt = chat_prompt(smollm2, question)
        cfg = DecodeConfig(max_new_tokens=24, top_k=20, temperature=0.9, do_sample=do_sample, seed=seed)
        ours = decoder.generate([prompt], {"positivity": 0.0, "brevity": 0.0}, cfg)[0]
        unsteered = decoder.generate([prompt], {"positivity": 1.0}, DecodeConfig(**{**cfg.__dict__, "beta": 0.0}))[0]
        enc = smollm2.tokenizer([prompt], return_tensors="pt")
        torch.manual_seed(seed)
        reference = smollm2.model.generate(
            **enc, max_new_tokens=24, do_sample=do_sample, top_k=20, top_p=1.0, temperature=0.9
        )[0, enc["input_ids"].shape[1] :].tolist()
        assert ours.token_ids == reference[: len(ours.token_ids)]
        assert unsteered.token_ids == ours.token_ids


def test_four_rows_with_four_weightings_match_decoding_each_alone(smollm2: BaseModel) -> None:
    decoder = MavisDecoder(smollm2, [random_head(smollm2, "positivity", 5), random_head(smollm2, "brevity", 6)])
    prompts = [chat_prompt(smollm2, q) for q in QUESTIONS]
    rows = [{"positivity": 1.0}, {"brevity": 1.0}, {"positivity": 0.5, "brevity": 0.5}, {}]
    cfg = DecodeConfig(max_new_tokens=20, top_k=20, seed=8, beta=2.0)
    batched = decoder.generate(prompts, rows, cfg)
    alone = [decoder.generate([p], w, cfg)[0] for p, w in zip(prompts, rows, strict=True)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]


async def test_eight_concurrent_async_callers_share_batches_and_equal_their_solo_decodes(
    smollm2: BaseModel, tmp_path: Path
) -> None:
    from mavis_lc import ChatMavis

    files = []
    for i, objective in enumerate(("positivity", "brevity")):
        files.append(str(random_head(smollm2, objective, 20 + i).save(tmp_path / f"{objective}.safetensors")))
    chat = ChatMavis(heads=files, max_tokens=16, beta=2.0)
    calls = [(QUESTIONS[i % 4], {"positivity": i / 7, "brevity": 1 - i / 7}, 500 + i) for i in range(8)]
    solo = [chat.invoke(q, weights=w, seed=s) for q, w, s in calls]
    scheduler = chat.engine().scheduler
    before = scheduler.stats.batches
    merged = await asyncio.gather(*(chat.ainvoke(q, weights=w, seed=s) for q, w, s in calls))
    assert [m.content for m in merged] == [m.content for m in solo]
    assert [m.response_metadata["weights"] for m in merged] == [w for _, w, _ in calls]
    assert scheduler.stats.batches - before <= 2  # shared batches, not eight decodes
    assert scheduler.stats.largest_batch >= 4
