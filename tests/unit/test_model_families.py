"""pi_ref is the model's own distribution: logits through the model's head and post-processing
(Cohere's logit_scale, Gemma-2's final-logit softcapping), checked against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import BaseModel, LogitTransform, load_base_model, logit_transform_of
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.errors import ModelLoadError
from mavis_lc.value_models import new_shared_head
from tests.tiny import build_tiny_family

FAMILIES = ["llama", "cohere", "gemma2"]
PROMPTS = ["Tell me about cats please", "I love sunny days"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    directory = build_tiny_family(tmp_path_factory.mktemp(request.param), request.param)
    return load_base_model(str(directory), device="cpu", dtype="float32")


def random_heads(base: BaseModel) -> list[object]:
    heads = []
    for i, objective in enumerate(("positivity", "conciseness")):
        head = new_shared_head(base, objective)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        heads.append(head)
    return heads


def test_the_post_processing_is_found_for_each_family(family_base: BaseModel) -> None:
    name = type(family_base.model).__name__
    expected = {
        "LlamaForCausalLM": None,
        "CohereForCausalLM": LogitTransform(scale=6.0),
        "Gemma2ForCausalLM": LogitTransform(softcap=3.0),
    }[name]
    assert family_base.logit_transform == expected
    ids = family_base.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        reference = family_base.model(**ids).logits
        hidden = family_base.model.base_model(**ids).last_hidden_state
        assert torch.allclose(family_base.logits(hidden), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("do_sample", [True, False])
def test_zero_weight_mavis_sampling_is_transformers_sampling_token_for_token(
    family_base: BaseModel, do_sample: bool
) -> None:
    decoder = MavisDecoder(family_base, random_heads(family_base))  # type: ignore[arg-type]
    for prompt, seed in zip(PROMPTS, (3, 4), strict=True):
        cfg = DecodeConfig(max_new_tokens=24, top_k=20, temperature=0.9, do_sample=do_sample, seed=seed)
        ours = decoder.generate([prompt], {"positivity": 0.0, "conciseness": 0.0}, cfg)[0]
        enc = family_base.tokenizer([prompt], return_tensors="pt")
        torch.manual_seed(seed)
        reference = family_base.model.generate(
            **enc, max_new_tokens=24, do_sample=do_sample, top_k=20, top_p=1.0, temperature=0.9
        )[0, enc["input_ids"].shape[1] :].tolist()
        assert ours.token_ids == reference[: len(ours.token_ids)]
        assert len(ours.token_ids) >= min(len(reference), 24) - 1


def test_ignoring_the_post_processing_would_sample_other_tokens(tmp_path: Path) -> None:
    """The test above can fail: the families' post-processing changes what is sampled."""
    for family in ("cohere", "gemma2"):
        base = load_base_model(str(build_tiny_family(tmp_path / family, family)), device="cpu", dtype="float32")
        cfg = DecodeConfig(max_new_tokens=24, top_k=20, temperature=0.9, seed=3)
        right = MavisDecoder(base).generate([PROMPTS[0]], None, cfg)[0].token_ids
        naive = BaseModel(base.model, base.tokenizer, base.model_id, base.fingerprint, None)
        wrong = MavisDecoder(naive).generate([PROMPTS[0]], None, cfg)[0].token_ids
        assert right != wrong


def test_a_family_whose_post_processing_is_not_handled_is_refused(tmp_path: Path) -> None:
    base = load_base_model(str(build_tiny_family(tmp_path / "llama", "llama")), device="cpu", dtype="float32")
    model = base.model  # a family that scales its logits without saying so in its config
    original = model.forward

    def scaled_forward(*args: object, **kwargs: object) -> object:
        out = original(*args, **kwargs)
        out.logits = out.logits * 6.0
        return out

    model.forward = scaled_forward  # type: ignore[method-assign]
    with pytest.raises(ModelLoadError, match=r"LlamaForCausalLM post-processes its logits.*largest difference"):
        logit_transform_of(model, base.tokenizer)
