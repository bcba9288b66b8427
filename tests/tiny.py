"""Tiny random-weight Llama models with a tokenizer built in code, for fast tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "I love sunny days, they are wonderful and happy!",
    "This is awful, I hate rainy weather and bad news.",
    "Tell me about cats. Cats are small, curious animals.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9. Punctuation: , . ; : ! ? ' \" ( )",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text round-trips) with ChatML and ``<|im_end|>`` as EOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(directory: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Save a 2-layer random Llama and its tokenizer to ``directory``; returns it."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits make sampling less uniform, so tests see real choices
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_random_heads(model_dir: Path, names: list[str], folder: Path, *, seed: int) -> list[str]:
    """Save a shared-backbone head with standard-normal parameters per objective in ``names``
    (seeds ``seed``, ``seed + 1``, ...) to ``folder``; returns their paths."""
    from mavis_lc.base_model import load_base_model
    from mavis_lc.value_models import new_shared_head

    base = load_base_model(str(model_dir))
    paths = []
    for i, name in enumerate(names):
        head = new_shared_head(base, name)
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        paths.append(str(head.save(folder / f"{name}.safetensors")))
    return paths


def build_tiny_family(directory: Path, family: str, *, seed: int = 0) -> Path:
    """Save a 2-layer random model of ``family`` (``llama``, ``cohere``: logit_scale, ``gemma2``:
    final-logit softcapping) with the tiny tokenizer to ``directory``; returns it. The
    post-processing is set strong enough that ignoring it changes what is sampled."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    if family == "llama":
        return build_tiny_model(directory, seed=seed)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "tie_word_embeddings": False,
    }
    model: Any
    if family == "cohere":
        model = CohereForCausalLM(CohereConfig(**common, logit_scale=6.0))
    elif family == "gemma2":
        config = Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0, query_pre_attn_scalar=8)
        model = Gemma2ForCausalLM(config)
    else:
        raise ValueError(f"unknown family {family!r}")
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
