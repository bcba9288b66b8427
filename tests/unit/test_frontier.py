"""The soft best-of-N frontier: hand-checked values, its reach, reading it at a row's KL."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mavis_lc.frontier import soft_best_of_n


def test_two_samples_by_hand() -> None:
    """Utilities 0 and 1: w = (1, e^b) / (1 + e^b), gain = w_1 - 1/2, KL = log 2 + Σ w log w."""
    frontier = soft_best_of_n(np.array([[0.0, 1.0]]), {"x": 1.0}, betas=np.array([0.5, 2.0]))
    for beta, kl, gain in zip((0.5, 2.0), frontier.kl, frontier.gain, strict=True):
        w1 = math.exp(beta) / (1 + math.exp(beta))
        assert gain == pytest.approx(w1 - 0.5)
        assert kl == pytest.approx(math.log(2) + w1 * math.log(w1) + (1 - w1) * math.log(1 - w1))


def test_gain_grows_with_kl_up_to_the_best_sample_and_is_read_within_reach() -> None:
    rng = np.random.default_rng(0)
    utilities = rng.normal(size=(50, 64))
    rewards = {"x": utilities, "y": -utilities}
    frontier = soft_best_of_n(utilities, {"x": 1.0, "y": 0.0}, rewards)
    assert frontier.n_samples == 64 and frontier.reach == pytest.approx(math.log(64) - 1)
    assert all(a <= b for a, b in zip(frontier.kl, frontier.kl[1:], strict=False))
    assert all(a <= b + 1e-9 for a, b in zip(frontier.gain, frontier.gain[1:], strict=False))
    best = float((utilities.max(1) - utilities.mean(1)).mean())
    assert frontier.gain[-1] <= best + 1e-9 and frontier.kl[-1] <= math.log(64)
    assert frontier.gain_at(0.0) == 0.0
    assert 0 < frontier.gain_at(1.0) < frontier.gain_at(2.0)
    assert math.isnan(frontier.gain_at(frontier.reach + 0.01))  # past what 64 samples can show
    at = frontier.rewards_at(2.0)
    assert at["x"] == pytest.approx(-at["y"]) and at["x"] > frontier.rewards[0]["x"]
    with pytest.raises(ValueError, match="at least 2 samples"):
        soft_best_of_n(np.zeros((3, 1)), {"x": 1.0})
