"""The separate-backbone value model: incremental scoring, training forward, artifacts, fitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, MavisDecoder
from mavis_lc.errors import ConfigurationError
from mavis_lc.training import TrainingConfig, compute_targets, fit_separate_backbone, format_prompts, sample_trees
from mavis_lc.value_models import KVBatch, SeparateBackboneValueModel, load_value_model, new_separate_backbone


@pytest.fixture
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")


def randomise(model: SeparateBackboneValueModel) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.5)


def encode(base: BaseModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = base.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_copies_the_first_layers_and_starts_at_zero(base: BaseModel) -> None:
    model = new_separate_backbone(base, "obj", n_layers=1)
    source = base.model.base_model.layers[0].state_dict()
    for name, tensor in model.backbone.layers[0].state_dict().items():
        assert torch.equal(tensor, source[name])
    ids, mask = encode(base, ["hello", "a longer prompt here"])
    model.begin(ids, mask)
    assert torch.equal(model.q_values(torch.zeros(2, 32), torch.tensor([[1, 2, 3]] * 2)), torch.zeros(2, 3))
    with pytest.raises(ConfigurationError, match="n_layers"):
        new_separate_backbone(base, "obj", n_layers=3)


@pytest.mark.parametrize("mode", ["q_head", "scalar"])
def test_incremental_q_values_match_the_training_forward(base: BaseModel, mode: str) -> None:
    model = new_separate_backbone(base, "obj", n_layers=2, mode=mode)
    randomise(model)
    ids, mask = encode(base, ["cats are small", "I love sunny days, they are wonderful"])
    continuation = torch.tensor([[40, 41, 42], [50, 51, 52]])
    candidates = torch.tensor([[40, 7, 9], [50, 8, 3]])
    with torch.no_grad():
        model.begin(ids, mask)
        incremental = []
        for step in range(3):
            q = model.q_values(torch.zeros(2, 32), candidates if step == 0 else continuation[:, step : step + 1])
            incremental.append(q[:, 0])
            model.advance(continuation[:, step])
        full_ids = torch.cat([ids, continuation], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
        sequence = model.sequence_q(full_ids, full_mask)[:, -3:]  # Q of the 3 continuation tokens
    torch.testing.assert_close(torch.stack(incremental, dim=1), sequence, atol=1e-4, rtol=1e-4)


def test_holes_and_row_selection_do_not_change_other_rows(base: BaseModel) -> None:
    ids, mask = encode(base, ["cats", "rainy weather"])
    embed = base.model.get_input_embeddings()
    with torch.no_grad():
        state = KVBatch(base.model.base_model, embed)
        state.prefill(ids, mask)
        state.select(torch.tensor([0, 0, 1]))
        state.feed(torch.tensor([40, 41, 42]), torch.tensor([True, False, True]))  # row 1 sits out
        state.feed(torch.tensor([43, 44, 45]))
        reference = KVBatch(base.model.base_model, embed)
        reference.prefill(*encode(base, ["cats"]))
        reference.feed(torch.tensor([44]))
    torch.testing.assert_close(state.hidden[1], reference.hidden[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["q_head", "scalar"])
def test_artifact_round_trip_and_decoding(base: BaseModel, mode: str) -> None:
    model = new_separate_backbone(base, "obj", n_layers=1, mode=mode)
    randomise(model)
    loaded = load_value_model(model.to_bytes(), base)
    assert isinstance(loaded, SeparateBackboneValueModel) and loaded.mode == mode
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert not any(name.startswith("backbone.embed_tokens") for name in loaded.state_dict())
    decoder = MavisDecoder(base, [loaded])
    out = decoder.generate(["hello", "a longer prompt"], {"obj": 1.0}, DecodeConfig(max_new_tokens=5, top_k=5))
    assert len(out) == 2 and all(g.completion_tokens >= 1 for g in out)


@pytest.mark.parametrize("mode", ["q_head", "scalar"])
def test_fit_changes_every_trainable_parameter_and_lowers_the_loss(base: BaseModel, mode: str) -> None:
    config = TrainingConfig(
        k_root=2, k_children=2, n_layers=2, segment_min_tokens=2, segment_max_tokens=3, top_k=10,
        rollout_prompts_per_batch=4, epochs=4, sequence_batch_size=4, learning_rate=1e-2, val_fraction=0.25,
        patience=4,
    )  # fmt: skip
    texts = format_prompts(base.tokenizer, ["I love cats", "awful rain", "Tell me", "Numbers 1 2"])
    rollouts = sample_trees(base, texts, config)
    reward = torch.full((rollouts.n_nodes,), float("nan"), dtype=torch.float64)
    for leaf in rollouts.leaves().tolist():
        reward[leaf] = sum(t % 5 for t in rollouts.response_tokens(leaf)) / 10
    target = compute_targets(rollouts, reward, reward_mean=0.5, reward_std=1.0, zeta=0.0).token_target
    model = new_separate_backbone(base, "obj", n_layers=1, mode=mode)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    result = fit_separate_backbone(model, base, rollouts, target, config)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    # Every token is supervised exactly once, on the first leaf path that contains it.
    assert result.metrics["n_train"] + result.metrics["n_val"] == rollouts.leaves().numel()


def test_a_base_whose_padding_token_is_not_token_0(base: BaseModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # SmolLM2's pad token is id 2: the small model's borrowed 1-row embedding table must not
    # inherit it (nn.Embedding refuses a padding_idx outside the table).
    monkeypatch.setattr(base.model.config, "pad_token_id", 2)  # the base model is shared by the process
    model = new_separate_backbone(base, "obj", n_layers=1)
    loaded = load_value_model(model.to_bytes(), base)
    assert isinstance(loaded, SeparateBackboneValueModel)
