"""CUDA: decoding and training in bfloat16 on a GPU (marked ``cuda``: skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.training import sample_trees
from mavis_lc.value_models import new_shared_head
from tests.unit.test_side_branch import PROMPTS, TREES

pytestmark = pytest.mark.cuda


def test_greedy_zero_weight_decoding_is_generate_on_cuda_in_bf16(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    assert base.device.type == "cuda" and base.dtype == torch.bfloat16
    decoder = MavisDecoder(base, [new_shared_head(base, "obj")])
    cfg = DecodeConfig(max_new_tokens=16, do_sample=False, seed=0)
    for prompt in PROMPTS[:2]:
        ours = decoder.generate([prompt], {"obj": 0.0}, cfg)[0].token_ids
        enc = base.tokenizer([prompt], return_tensors="pt").to("cuda")
        reference = base.model.generate(**enc, max_new_tokens=16, do_sample=False)[0, enc["input_ids"].shape[1] :]
        assert ours == reference.tolist()[: len(ours)]


def test_rows_decode_the_same_alone_or_batched_on_cuda(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    decoder = MavisDecoder(base)
    cfg = DecodeConfig(max_new_tokens=12, seed=None)
    seeds = [11, 12, 13]
    batched = decoder.generate(PROMPTS[:3], None, cfg, seeds=seeds)
    alone = [decoder.generate([p], None, cfg, seeds=[s])[0] for p, s in zip(PROMPTS[:3], seeds, strict=True)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]


def test_rollouts_and_heads_run_on_the_gpu_with_float32_heads(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    rollouts = sample_trees(base, PROMPTS[:2], TREES)
    assert rollouts.tokens.numel() > 0 and rollouts.hidden.dtype == torch.float32
    head = new_shared_head(base, "obj")
    assert {p.dtype for p in head.parameters()} == {torch.float32}
    assert {p.device.type for p in head.parameters()} == {"cuda"}


def test_a_side_branch_fits_on_the_gpu_under_autocast_with_float32_weights(tiny_model_dir: Path) -> None:
    from mavis_lc.training import TrainingConfig
    from mavis_lc.training.fit import fit_side_branch
    from mavis_lc.value_models import new_side_branch

    base = load_base_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    rollouts = sample_trees(base, PROMPTS * 2, TREES, tap_layer=1)
    side = new_side_branch(base, "obj", n_layers=1)
    target = torch.where(rollouts.tokens % 2 == 0, 1.0, -1.0)
    config = TrainingConfig(**{**TREES.to_dict(), "epochs": 2, "val_fraction": 0.25})
    result = fit_side_branch(side, rollouts, target, config)
    assert result.history and {p.dtype for p in side.parameters()} == {torch.float32}


def test_the_compiled_step_decodes_as_the_eager_one_on_cuda(tiny_model_dir: Path) -> None:
    # float32: in bfloat16 a reordered sum can flip the near-ties of a random model's argmax
    base = load_base_model(str(tiny_model_dir), device="cuda", dtype="float32")
    head = new_shared_head(base, "obj")
    cfg = DecodeConfig(max_new_tokens=16, do_sample=False, seed=0, beta=0.0)
    eager = MavisDecoder(base, [head]).generate(PROMPTS[:3], {"obj": 0.0}, cfg)
    compiled_decoder = MavisDecoder(base, [head], compile=True, compile_bucket=64)
    compiled = compiled_decoder.generate(PROMPTS[:3], {"obj": 0.0}, cfg)
    assert compiled_decoder.static_step is not None and compiled_decoder.static_step.compiled
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
