"""Base-model loading options passed through to transformers, for the LangChain classes and training."""

from __future__ import annotations

from pathlib import Path

import pytest

from mavis_lc import ChatMavis
from mavis_lc.base_model import LoadOptions, load_base_model
from mavis_lc.errors import ConfigurationError, ModelLoadError
from mavis_lc.training import TrainingConfig


def test_options_become_from_pretrained_arguments() -> None:
    import torch

    opts = LoadOptions.of(revision="v1", attn_implementation="eager", device_map="auto")
    assert opts.kwargs(torch.device("cpu")) == {"device_map": "auto", "revision": "v1", "attn_implementation": "eager"}
    assert LoadOptions().kwargs(torch.device("cpu")) == {"device_map": "cpu"}  # straight onto the device
    assert LoadOptions.of(quantization_config={"b": 1, "a": 2}) == LoadOptions.of(
        quantization_config='{"a": 2, "b": 1}'
    )
    with pytest.raises(ConfigurationError, match="revision must be a non-empty string"):
        LoadOptions.of(revision="")
    with pytest.raises(ConfigurationError, match=r"quantization_config .* not one transformers knows"):
        LoadOptions.of(quantization_config={"quant_method": "nope"}).kwargs(torch.device("cpu"))


def test_attention_implementation_reaches_the_model_and_keys_the_cache(tiny_model_dir: Path) -> None:
    default = load_base_model(str(tiny_model_dir))
    eager = load_base_model(str(tiny_model_dir), options=LoadOptions.of(attn_implementation="eager"))
    assert eager is not default
    assert eager.model.config._attn_implementation == "eager"
    assert eager is load_base_model(str(tiny_model_dir), options=LoadOptions.of(attn_implementation="eager"))
    with pytest.raises(ModelLoadError, match="cannot load base model"):
        load_base_model(str(tiny_model_dir), options=LoadOptions.of(attn_implementation="no_such_kernel"))


def test_chat_models_pass_their_loading_options(tiny_model_dir: Path) -> None:
    plain = ChatMavis(base_model=str(tiny_model_dir), max_tokens=6, seed=1)
    eager = plain.model_copy(update={"attn_implementation": "eager"})
    assert eager.engine() is not plain.engine()  # other options: another engine, not a stale one
    assert eager.engine().base.model.config._attn_implementation == "eager"
    assert eager.invoke("Hello").content == plain.invoke("Hello").content  # same model, same sampling


def test_training_loads_its_base_as_configured_and_keeps_its_fingerprint(tiny_model_dir: Path) -> None:
    config = TrainingConfig(base_model=str(tiny_model_dir), prompts=["a"])
    assert (
        config.fingerprint() == TrainingConfig(base_model=str(tiny_model_dir), prompts=["a"], dtype=None).fingerprint()
    )
    bf16 = TrainingConfig(base_model=str(tiny_model_dir), prompts=["a"], dtype="bfloat16")
    assert bf16.fingerprint() != config.fingerprint()
    import torch

    assert bf16.load_base().dtype == torch.bfloat16
    assert config.load_base().dtype == torch.float32
