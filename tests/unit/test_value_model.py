"""The shared-backbone Q head: formula, zero init, safetensors round trip, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.errors import IncompatibleHeadError, ModelLoadError
from mavis_lc.value_models import (
    SharedBackboneQHead,
    ValueHeadConfig,
    load_value_model,
    new_shared_head,
    prompt_mean,
    read_head_config,
)


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir))


def test_q_values_follow_the_formula(base: BaseModel) -> None:
    head = new_shared_head(base, "positivity")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    hidden = torch.randn(2, base.hidden_size, generator=g)
    candidates = torch.tensor([[3, 5, 7], [11, 13, 3]])
    with torch.no_grad():
        q = head.q_values(hidden, candidates)
    e = base.token_embeddings.detach()
    for b in range(2):
        for j, a in enumerate(candidates[b].tolist()):
            with torch.no_grad():
                u = head.proj.weight @ hidden[b] + head.proj.bias
                v = head.state_value.weight[0] @ hidden[b] + head.state_value.bias[0]
                expected = u @ e[a] + head.token_bias[a] + v
            assert float(q[b, j]) == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


def test_prompt_query_adds_u_p_to_the_query_and_round_trips(base: BaseModel, tmp_path: Path) -> None:
    head = new_shared_head(base, "relevance", options={"prompt_query": True})
    assert head.prompt_proj is not None and float(head.prompt_proj.weight.abs().sum()) == 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.prompt_proj.weight.copy_(torch.randn(head.prompt_proj.weight.shape, generator=g))
    hidden = torch.randn(2, base.hidden_size, generator=g)
    prompt = torch.randn(2, base.hidden_size, generator=g)
    candidates = torch.tensor([[3, 5], [7, 3]])
    with torch.no_grad():
        q = head.q_values(hidden, candidates, prompt)
        expected = torch.einsum("bd,bkd->bk", prompt @ head.prompt_proj.weight.T, base.token_embeddings[candidates])
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)  # the other parameters are zero
    with pytest.raises(IncompatibleHeadError, match="pass prompt_hidden"):
        head.q_values(hidden, candidates)
    loaded = load_value_model(head.save(tmp_path / "head.safetensors"), base)
    assert "prompt_proj.weight" in loaded.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded.q_values(hidden, candidates, prompt), q)


def test_prompt_mean_ignores_left_padding() -> None:
    hidden = torch.arange(12, dtype=torch.float32).view(2, 3, 2)  # (B, P, d)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    torch.testing.assert_close(prompt_mean(hidden, mask), torch.tensor([[3.0, 4.0], [8.0, 9.0]]))


def test_the_decoder_passes_each_row_its_prompt_mean(base: BaseModel) -> None:
    seen: list[torch.Tensor] = []

    class Recording(SharedBackboneQHead):
        def q_values(
            self, hidden: torch.Tensor, candidate_ids: torch.Tensor, prompt_hidden: torch.Tensor | None = None
        ) -> torch.Tensor:
            assert prompt_hidden is not None
            seen.append(prompt_hidden.clone())
            return super().q_values(hidden, candidate_ids, prompt_hidden)

    fresh = new_shared_head(base, "positivity", options={"prompt_query": True})
    head = Recording(fresh.config, base.token_embeddings)
    texts = ["Hello there", "A much longer prompt than the first one"]
    MavisDecoder(base, [head]).generate(texts, {"positivity": 1.0}, DecodeConfig(max_new_tokens=3))
    for row, text in enumerate(texts):
        ids = base.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = base.model.base_model(input_ids=ids).last_hidden_state  # (1, P, d)
        torch.testing.assert_close(seen[0][row], states[0].mean(0), atol=1e-4, rtol=1e-4)
        assert all(torch.equal(step[row], seen[0][row]) for step in seen)  # computed once, at prefill


def test_the_decoder_pools_each_head_over_its_own_tokens(base: BaseModel) -> None:
    """A new head pools the query over the user turn; a head saved before that, over every token."""
    seen: dict[str, list[torch.Tensor]] = {"user": [], "all": []}

    class Recording(SharedBackboneQHead):
        def q_values(
            self, hidden: torch.Tensor, candidate_ids: torch.Tensor, prompt_hidden: torch.Tensor | None = None
        ) -> torch.Tensor:
            assert prompt_hidden is not None and self.query_pool is not None
            seen[self.query_pool].append(prompt_hidden.clone())
            return super().q_values(hidden, candidate_ids, prompt_hidden)

    user = new_shared_head(base, "positivity", options={"prompt_query": True})
    old = new_shared_head(base, "relevance", options={"prompt_query": True, "query_pool": "all"})
    assert user.query_pool == "user" and user.prompt_scale is not None
    assert old.query_pool == "all" and old.prompt_scale is None
    heads = [Recording(user.config, base.token_embeddings), Recording(old.config, base.token_embeddings)]
    question = "Tell me about cats."
    text = str(
        base.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    )
    MavisDecoder(base, heads).generate([text], {"positivity": 1.0, "relevance": 1.0}, DecodeConfig(max_new_tokens=2))
    ids = base.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        states = base.model.base_model(input_ids=ids).last_hidden_state[0]  # (P, d)
    n_user = len(base.tokenizer(question)["input_ids"])
    footer = len(base.tokenizer("<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    user_states = states[-footer - n_user : -footer]  # the question's tokens
    torch.testing.assert_close(seen["user"][0][0], user_states.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen["all"][0][0], states.mean(0), atol=1e-4, rtol=1e-4)


def test_the_prompt_scale_multiplies_the_query_elementwise(base: BaseModel, tmp_path: Path) -> None:
    head = new_shared_head(base, "relevance", options={"prompt_query": True})
    assert head.prompt_scale is not None
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        head.prompt_scale.copy_(torch.randn(base.hidden_size, generator=g))
    hidden = torch.randn(2, base.hidden_size, generator=g)
    prompt = torch.randn(2, base.hidden_size, generator=g)
    candidates = torch.tensor([[3, 5], [7, 3]])
    with torch.no_grad():
        q = head.q_values(hidden, candidates, prompt)
        expected = torch.einsum("bd,bkd->bk", head.prompt_scale * prompt, base.token_embeddings[candidates])
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)
    loaded = load_value_model(head.save(tmp_path / "head.safetensors"), base)
    assert loaded.query_pool == "user"
    with torch.no_grad():
        torch.testing.assert_close(loaded.q_values(hidden, candidates, prompt), q)


def test_a_fresh_head_is_zero_and_reproduces_base_sampling(base: BaseModel) -> None:
    head = new_shared_head(base, "positivity")
    assert all(float(p.detach().abs().sum()) == 0.0 for p in head.parameters())
    cfg = DecodeConfig(max_new_tokens=16, top_k=30, seed=4, beta=5.0)
    steered = MavisDecoder(base, [head]).generate(["Hello there"], {"positivity": 1.0}, cfg)[0]
    plain = MavisDecoder(base).generate(["Hello there"], None, cfg)[0]
    assert steered.token_ids == plain.token_ids
    assert steered.kl == pytest.approx(plain.kl, abs=1e-6)


def test_round_trip_through_one_safetensors_file(base: BaseModel, tmp_path: Path) -> None:
    head = new_shared_head(base, "positivity", reward_mean=0.25, reward_std=2.0, iteration=1)
    with torch.no_grad():
        head.token_bias.copy_(torch.arange(base.vocab_size, dtype=torch.float32))
        head.proj.weight.fill_(0.5)
    path = head.save(tmp_path / "head.safetensors")
    config, tensors = read_head_config(path)
    assert config == head.config
    assert set(tensors) == {"proj.weight", "proj.bias", "token_bias", "state_value.weight", "state_value.bias"}
    loaded = load_value_model(path, base)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert all(not p.requires_grad for p in loaded.parameters())
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert list(header["__metadata__"]) == ["mavis_config"]
    assert load_value_model(path.read_bytes(), base).config == head.config


def test_foreign_tokenizer_and_sizes_are_refused(base: BaseModel) -> None:
    head = new_shared_head(base, "positivity")
    foreign = ValueHeadConfig(**{**head.config.__dict__, "tokenizer_fingerprint": "f" * 64})
    head.config = foreign
    with pytest.raises(IncompatibleHeadError, match="ffffffffffff"):
        load_value_model(head.to_bytes(), base)
    wrong_size = ValueHeadConfig(**{**foreign.__dict__, "tokenizer_fingerprint": base.fingerprint, "hidden_size": 7})
    head.config = wrong_size
    with pytest.raises(IncompatibleHeadError, match="hidden size 7"):
        load_value_model(head.to_bytes(), base)


def test_not_a_head_is_a_model_load_error(base: BaseModel, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ModelLoadError):
        load_value_model(junk, base)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_value_model(tmp_path / "missing.safetensors", base)


def test_import_touches_neither_cuda_nor_the_model_hub() -> None:
    code = "import torch, mavis_lc, mavis_lc.langchain, mavis_lc.decoding;print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_head_is_refused_on_other_base_weights_with_the_same_tokenizer(tmp_path: Path) -> None:
    from tests.tiny import build_tiny_model

    one = load_base_model(str(build_tiny_model(tmp_path / "one", seed=0)), device="cpu", dtype="float32")
    other = load_base_model(str(build_tiny_model(tmp_path / "other", seed=1)), device="cpu", dtype="float32")
    same_low = load_base_model(str(tmp_path / "one"), device="cpu", dtype="bfloat16")
    assert one.fingerprint == other.fingerprint  # same tokenizer
    assert one.weights_fingerprint != other.weights_fingerprint
    assert one.weights_fingerprint == same_low.weights_fingerprint  # one checkpoint, any dtype
    head = new_shared_head(one, "obj")
    assert head.config.base_weights_fingerprint == one.weights_fingerprint
    data = head.to_bytes()
    with pytest.raises(
        IncompatibleHeadError,
        match=rf"trained on base weights {one.weights_fingerprint[:12]}.*has weights {other.weights_fingerprint[:12]}",
    ):
        load_value_model(data, other)
    with pytest.raises(IncompatibleHeadError, match="other weights"):
        MavisDecoder(other, [head])
    assert load_value_model(data, other, allow_other_base=True).objective == "obj"  # deliberate transfer
    assert load_value_model(data, same_low).objective == "obj"
