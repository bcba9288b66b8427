"""The side branch: layer taps, equality with the shared head at step 0, the tree-packed training
forward against the decoder's incremental one, rollouts that record the taps, the fit, artifacts."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.errors import ConfigurationError, IncompatibleHeadError, ModelLoadError
from mavis_lc.training import TrainingConfig, sample_trees
from mavis_lc.training.fit import _pack_trees, fit_side_branch
from mavis_lc.training.rollouts import TreeRollouts, merge_rollouts
from mavis_lc.value_models import (
    LayerTap,
    SharedBackboneQHead,
    SideBranchValueModel,
    load_side_branch,
    load_value_model,
    new_shared_head,
    new_side_branch,
    read_head_config,
)
from tests.tiny import build_tiny_model

TREES = TrainingConfig(
    k_root=2,
    n_layers=2,
    segment_min_tokens=2,
    segment_max_tokens=4,
    leaf_completion_tokens=9,
    expand_top_m=3,
    top_k=8,
    rollout_prompts_per_batch=2,
    architecture="side_branch",
    n_fits=1,
)
PROMPTS = ["hello there", "Tell me about cats, please", "the dog", "why is the sky blue today?"]


@pytest.fixture
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")


def random_head(base: BaseModel, seed: int, prompt_query: bool = False) -> SharedBackboneQHead:
    head = new_shared_head(base, "obj", options={"prompt_query": True} if prompt_query else {})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return head.requires_grad_(False)


def perturb(model: SideBranchValueModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.branch.parameters():
            p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=generator))


def test_layer_tap_captures_a_layers_input_in_its_own_thread_only(base: BaseModel) -> None:
    enc = base.tokenizer(["hello there", "cats"], padding=True, return_tensors="pt")
    stack = base.model.base_model
    with torch.no_grad():
        reference = stack(**enc, output_hidden_states=True).hidden_states  # [i]: the input of layer i
        with LayerTap(stack, [1]) as tap:
            stack(**enc)
            seen: list[int] = []
            other = threading.Thread(target=lambda: seen.append(len(stack(**enc).last_hidden_state)))
            captured = tap.states[1]
            tap.states.clear()
            other.start()
            other.join()
    assert seen == [2]
    assert tap.states == {}  # the other thread's forward was not captured
    assert torch.allclose(captured, reference[1], atol=1e-6)
    assert all(not layer._forward_pre_hooks for layer in stack.layers)  # hooks removed on exit
    with pytest.raises(ConfigurationError, match="layer 5"), LayerTap(stack, [5]):
        pass


@pytest.mark.parametrize("prompt_query", [False, True])
def test_a_fresh_branch_decodes_exactly_as_the_head_it_starts_from(base: BaseModel, prompt_query: bool) -> None:
    head = random_head(base, seed=3, prompt_query=prompt_query)
    side = new_side_branch(base, "obj", n_layers=1, head=head).requires_grad_(False)
    assert side.tap_layer == 1 and side.q_head.prompt_query is prompt_query
    assert all(p.dtype == torch.float32 for p in side.parameters())
    config = DecodeConfig(max_new_tokens=10, beta=3.0, top_k=8)
    prompts = ["hello there", "Tell me about cats, please"]
    shared = MavisDecoder(base, [head]).generate(prompts, {"obj": 1.0}, config, seeds=[1, 2])
    branch = MavisDecoder(base, [side]).generate(prompts, {"obj": 1.0}, config, seeds=[1, 2])
    assert [g.token_ids for g in branch] == [g.token_ids for g in shared]
    assert [g.kl_topk for g in branch] == pytest.approx([g.kl_topk for g in shared], abs=1e-4)
    assert shared[0].kl_topk > 0.01  # the head does tilt


def test_decoding_state_matches_the_full_sequence_forward(base: BaseModel) -> None:
    side = new_side_branch(base, "obj", n_layers=1, head=random_head(base, seed=4))
    perturb(side, seed=5)
    side.requires_grad_(False)
    prompts = ["hello there", "Tell me about cats, please"]
    config = DecodeConfig(max_new_tokens=7, min_new_tokens=7, beta=2.0, top_k=8)
    out = MavisDecoder(base, [side]).generate(prompts, {"obj": 1.0}, config, seeds=[7, 8])
    state = side._require_state().hidden  # (2, d) the features of prompt + all tokens but the last
    for row, (prompt, generation) in enumerate(zip(prompts, out, strict=True)):
        ids = base.tokenizer(prompt)["input_ids"] + generation.token_ids[:-1]
        with torch.no_grad():
            taps = base.model.base_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
            full = side.features(taps, torch.ones(1, len(ids), dtype=torch.long), torch.arange(len(ids))[None])
        assert torch.allclose(state[row], full[0, -1], atol=1e-4)
    fresh = new_side_branch(base, "obj", n_layers=1, head=random_head(base, seed=4)).requires_grad_(False)
    MavisDecoder(base, [fresh]).generate(prompts, {"obj": 1.0}, config, seeds=[7, 8])
    assert not torch.allclose(fresh._require_state().hidden, state, atol=1e-3)  # the perturbation matters


def test_rollouts_record_the_tap_layer_and_packed_trees_reproduce_the_base_states(base: BaseModel) -> None:
    rollouts = sample_trees(base, PROMPTS, TREES, tap_layer=1)
    assert rollouts.tap is not None and rollouts.tap.shape == rollouts.hidden.shape
    assert rollouts.prompt_length is not None
    assert rollouts.prompt_length.tolist() == [len(base.tokenizer(p)["input_ids"]) for p in PROMPTS]
    # The tap of a prompt's first child's first token is the input of layer 1 at the prompt's last token.
    enc = base.tokenizer(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        taps = base.model.base_model(**enc, output_hidden_states=True).hidden_states[1][0]
    assert torch.allclose(rollouts.prompt_taps(1), taps, atol=1e-5)
    first_child = int(torch.nonzero((rollouts.node_prompt == 1) & (rollouts.node_parent >= 0))[0])
    assert torch.allclose(rollouts.tap[rollouts.node_start[first_child]], taps[-1], atol=1e-5)
    # A fresh branch (copies of the last layer) over each packed tree gives the recorded h(s_t).
    side = new_side_branch(base, "obj", n_layers=1).requires_grad_(False)
    for tree in _pack_trees(rollouts):
        n_prompt = tree.prompt_length - 1
        inputs = torch.cat([rollouts.prompt_taps(tree.prompt)[:-1], rollouts.tap[tree.first_token :][: tree.n_tokens]])
        allowed = torch.zeros(len(inputs), len(inputs), dtype=torch.bool)
        allowed[:n_prompt, :n_prompt] = torch.ones(n_prompt, n_prompt, dtype=torch.bool).tril()
        allowed[n_prompt:, :n_prompt] = True
        allowed[n_prompt:, n_prompt:] = tree.token_mask
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        positions = torch.cat([torch.arange(n_prompt), tree.token_position])[None]
        with torch.no_grad():
            features = side.features(inputs[None], mask[None, None], positions)[0, n_prompt:]
        recorded = rollouts.hidden[tree.first_token :][: tree.n_tokens]
        assert torch.allclose(features, recorded, atol=1e-4)


def test_tap_tensors_survive_save_merge_and_old_files_load_without_them(base: BaseModel, tmp_path: Path) -> None:
    whole = sample_trees(base, PROMPTS, TREES, tap_layer=1)
    halves = [sample_trees(base, PROMPTS[:2], TREES, tap_layer=1)]
    halves.append(sample_trees(base, PROMPTS[2:], TREES, tap_layer=1, first_prompt=2))
    merged = merge_rollouts([TreeRollouts.load(h.save(tmp_path / f"{i}.safetensors")) for i, h in enumerate(halves)])
    assert merged.tap_layer == 1
    for name in ("tap", "prompt_tap", "prompt_length", "tokens"):
        assert torch.equal(getattr(merged, name), getattr(whole, name))
    plain = sample_trees(base, PROMPTS[:2], TREES)
    loaded = TreeRollouts.load(plain.save(tmp_path / "plain.safetensors"))
    assert loaded.tap_layer is None and loaded.tap is None
    with pytest.raises(ConfigurationError, match="different tap layers"):
        merge_rollouts([plain, halves[1]])
    with pytest.raises(ConfigurationError, match="recorded none"):
        fit_side_branch(new_side_branch(base, "obj", n_layers=1), plain, torch.zeros(plain.tokens.numel()), TREES)


def test_fit_trains_the_layers_on_a_context_dependent_target(base: BaseModel) -> None:
    rollouts = sample_trees(base, PROMPTS * 3, TREES, tap_layer=1)
    # The target of a token depends on the token before it, which the head alone reads only
    # through the frozen features; the copied layer can learn it.
    previous = torch.cat([torch.zeros(1, dtype=torch.long), rollouts.tokens[:-1]])
    target = torch.where(previous % 2 == 0, 1.0, -1.0)
    side = new_side_branch(base, "obj", n_layers=1)
    before = {k: v.clone() for k, v in side.branch.state_dict().items()}
    config = TrainingConfig(**{**TREES.to_dict(), "epochs": 4, "val_fraction": 0.25, "side_learning_rate": 3e-3})
    result = fit_side_branch(side, rollouts, target, config)
    assert result.metrics["start_sibling_corr"] != result.metrics["sibling_corr"] or result.metrics["best_epoch"] == 0
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    changed = [name for name, value in side.branch.state_dict().items() if not torch.equal(value, before[name])]
    assert any("layers.0" in name for name in changed) and "norm.weight" in changed


def test_the_start_is_kept_when_no_epoch_beats_it(base: BaseModel) -> None:
    rollouts = sample_trees(base, PROMPTS * 2, TREES, tap_layer=1)
    head = random_head(base, seed=1)
    with torch.no_grad():  # targets the start predicts exactly: a fresh branch's features are h(s)
        exact = head.q_values(rollouts.hidden, rollouts.tokens[:, None]).squeeze(1)
    side = new_side_branch(base, "obj", n_layers=1, head=head)
    start = {k: v.clone() for k, v in side.state_dict().items()}
    config = TrainingConfig(
        **{**TREES.to_dict(), "epochs": 2, "selection_metric": "val_mse", "side_learning_rate": 1.0}
    )
    result = fit_side_branch(side, rollouts, exact, config)  # a rate of 1 wrecks the layers
    assert result.metrics["start_val_mse"] < 1e-8
    assert result.metrics["best_epoch"] == 0
    assert all(torch.equal(v, start[k]) for k, v in side.state_dict().items())


def test_artifacts_round_trip_and_refuse_another_layer_count(base: BaseModel, tmp_path: Path) -> None:
    side = new_side_branch(base, "obj", n_layers=1, head=random_head(base, seed=2, prompt_query=True))
    perturb(side, seed=3)
    loaded = load_value_model(side.to_bytes(), base)
    assert isinstance(loaded, SideBranchValueModel) and loaded.config.options["prompt_query"] is True
    for name, value in side.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    config, tensors = read_head_config(side.to_bytes())
    tensors.pop("branch.norm.weight")
    with pytest.raises(ModelLoadError, match="value model for 'obj' has unexpected tensors"):
        load_side_branch(config, tensors, base)
    deeper = load_base_model(str(build_tiny_model(tmp_path / "deeper", layers=3)), device="cpu", dtype="float32")
    with pytest.raises(IncompatibleHeadError, match="other weights"):
        load_value_model(side.to_bytes(), deeper)
    with pytest.raises(IncompatibleHeadError, match="2 layers"):  # a transfer cannot change the layer count
        load_value_model(side.to_bytes(), deeper, allow_other_base=True)


def test_trainable_parameters_stay_float32_on_a_bfloat16_base(tiny_model_dir: Path) -> None:
    low = load_base_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    side = new_side_branch(low, "obj", n_layers=1)
    assert {p.dtype for p in side.parameters()} == {torch.float32}
    out = MavisDecoder(low, [side.requires_grad_(False)]).generate(
        ["hello"], {"obj": 1.0}, DecodeConfig(max_new_tokens=3)
    )
    assert len(out[0].token_ids) >= 1


def test_config_checks(base: BaseModel) -> None:
    with pytest.raises(ConfigurationError, match="n_fits 5 needs architecture shared_q_head"):
        TrainingConfig(architecture="side_branch").validate()
    TrainingConfig(architecture="side_branch", n_fits=1, listwise_loss_weight=1.0, prompt_query=True).validate()
    with pytest.raises(ConfigurationError, match="n_layers must be an integer in"):
        new_side_branch(base, "obj", n_layers=3)
    with pytest.raises(ConfigurationError, match="side_learning_rate"):
        TrainingConfig(architecture="side_branch", n_fits=1, side_learning_rate=0.0).validate()


def test_chat_mavis_steers_with_a_side_branch_beside_a_shared_head(
    base: BaseModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mavis_lc.langchain import ChatMavis

    shared = random_head(base, seed=6)
    shared.config = dataclasses.replace(shared.config, objective="other")
    side = new_side_branch(base, "obj", n_layers=1, head=random_head(base, seed=7))
    perturb(side, seed=8)
    paths = [str(shared.save(tmp_path / "other.safetensors")), str(side.save(tmp_path / "side.safetensors"))]
    chat = ChatMavis(base_model=str(tiny_model_dir), heads=paths, max_tokens=8, top_k=8, beta=3.0, seed=0)
    both = chat.invoke("hello there", weights={"obj": 1.0, "other": 0.5})
    decoder = MavisDecoder(base, [load_value_model(p, base) for p in paths])
    prompt = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True
    )
    direct = decoder.generate([prompt], {"obj": 1.0, "other": 0.5}, DecodeConfig(max_new_tokens=8, top_k=8, beta=3.0))
    assert both.content == direct[0].text
    assert chat.invoke("hello there", weights={"other": 0.5}).content != both.content


def test_training_on_a_bfloat16_base_keeps_float32_master_weights(tiny_model_dir: Path) -> None:
    low = load_base_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    rollouts = sample_trees(low, PROMPTS * 3, TREES, tap_layer=1)
    previous = torch.cat([torch.zeros(1, dtype=torch.long), rollouts.tokens[:-1]])
    target = torch.where(previous % 2 == 0, 1.0, -1.0)
    side = new_side_branch(low, "obj", n_layers=1)
    before = {k: v.clone() for k, v in side.branch.state_dict().items()}
    config = TrainingConfig(
        **{
            **TREES.to_dict(),
            "epochs": 2,
            "val_fraction": 0.25,
            "side_learning_rate": 1e-5,
            "selection_metric": "val_mse",
        }
    )
    result = fit_side_branch(side, rollouts, target, config)
    assert result.metrics["best_epoch"] > 0  # an epoch was kept, not the start
    assert {p.dtype for p in side.parameters()} == {torch.float32}
    moved = lost = 0
    for name, value in side.branch.state_dict().items():
        delta = value != before[name]
        moved += int(delta.sum())
        # Updates that bfloat16 storage would have rounded away: the value moved, its bf16 did not.
        lost += int((delta & (value.bfloat16() == before[name].bfloat16())).sum())
    assert moved > 0
    assert lost > moved // 2  # most updates are below bf16 resolution at this rate
