"""Sampling noise (`mavis_lc.decoding.noise`): each row's Exp(1) draws, as `torch.multinomial`
draws them from the row's generator, bit for bit, whichever path computes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mavis_lc.decoding import noise
from mavis_lc.decoding.noise import RowNoise, fast_path_unavailable_reason, row_noise

SEEDS = [0, 1, 7, 123456789, 2**32 + 5, 2**40 + 7, 2**63 - 1]


def _torch_draws(seed: int, vocab: int, steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.empty(vocab).exponential_(generator=generator) for _ in range(steps)]


def test_row_noise_draws_each_row_from_its_own_generator_exactly() -> None:
    like = torch.empty(7, 5000)
    for inference in (False, True):
        with torch.inference_mode(inference):
            got = row_noise(like, [torch.Generator().manual_seed(s) for s in range(7)])
        want = torch.stack(
            [torch.empty(5000).exponential_(generator=torch.Generator().manual_seed(s)) for s in range(7)]
        )
        assert torch.equal(got, want)
    one = row_noise(like[:1], [torch.Generator().manual_seed(3)])
    assert torch.equal(one[0], want[3])


def test_the_fast_path_is_exact_in_this_build() -> None:
    """If this fails after a torch or numpy upgrade, decoding is still exact (it draws through
    torch), but slower: the reason says what no longer matches."""
    assert fast_path_unavailable_reason() is None
    assert RowNoise.from_seeds([0]).fallback_reason is None


@pytest.mark.parametrize("vocab", [1000, 49152])
@pytest.mark.parametrize("inference", [False, True])
def test_row_noise_at_the_candidates_is_what_a_whole_vocabulary_draw_holds(vocab: int, inference: bool) -> None:
    steps, k = 4, 20
    streams = RowNoise.from_seeds(SEEDS)
    picks = np.random.default_rng(0)
    like = torch.empty(len(SEEDS), vocab)
    want = [_torch_draws(seed, vocab, steps) for seed in SEEDS]
    for step in range(steps):
        candidates = torch.from_numpy(np.stack([picks.choice(vocab, k, replace=False) for _ in SEEDS]))
        candidates[0, :2] = torch.tensor([0, vocab - 1])  # both ends of the vocabulary
        with torch.inference_mode(inference):
            got = streams.at(candidates, like)  # (B, k)
        assert got.dtype == torch.float32 and got.shape == (len(SEEDS), k)
        for b in range(len(SEEDS)):
            assert torch.equal(got[b], want[b][step][candidates[b]]), (SEEDS[b], step)


def test_a_row_streams_alone_as_in_any_batch() -> None:
    vocab, candidates = 3000, torch.tensor([[5, 2999, 0, 17]])
    alone = RowNoise.from_seeds([42])
    batch = RowNoise.from_seeds([1, 42, 3])
    for _ in range(3):
        mine = alone.at(candidates, torch.empty(1, vocab))
        theirs = batch.at(candidates.expand(3, -1), torch.empty(3, vocab))
        assert torch.equal(mine[0], theirs[1])
        assert not torch.equal(theirs[0], theirs[1])


def test_a_row_count_other_than_the_streams_is_refused() -> None:
    streams = RowNoise.from_seeds([1, 2])
    with pytest.raises(ValueError, match="2 noise streams, but 3 rows of candidates and 3 rows of logits"):
        streams.at(torch.zeros(3, 4, dtype=torch.long), torch.empty(3, 100))


def test_the_generators_given_are_read_not_advanced() -> None:
    generator = torch.Generator().manual_seed(9)
    before = generator.get_state().clone()
    streams = RowNoise([generator])
    streams.at(torch.tensor([[1, 2]]), torch.empty(1, 100))
    assert torch.equal(generator.get_state(), before)


def test_the_torch_path_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(noise, "fast_path_unavailable_reason", lambda: "forced for this test")
    vocab, candidates = 2000, torch.tensor([[3, 1999, 0], [10, 11, 12]])
    slow = RowNoise.from_seeds([4, 5])
    assert slow.fallback_reason == "forced for this test"
    want = [_torch_draws(seed, vocab, 2) for seed in (4, 5)]
    for step in range(2):
        got = slow.at(candidates, torch.empty(2, vocab))
        for b in range(2):
            assert torch.equal(got[b], want[b][step][candidates[b]])


def test_a_state_layout_it_cannot_read_is_refused_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check compares against torch's own draws, so a misread state is caught (here: the
    'draws left' field read from the wrong bytes)."""
    monkeypatch.setattr(noise, "_LEFT", slice(12, 16))
    reason = fast_path_unavailable_reason.__wrapped__()
    assert reason is not None and "MT19937" in reason
