"""The limit to measure steering against: the soft best-of-N frontier.

For a reward R and base pi_ref, the KL-regularised optimum ``pi_beta ∝ pi_ref · exp(beta · R)``
has the best expected reward for its KL from pi_ref. From N samples of the base per prompt it
is estimated by self-normalised importance weights: with utilities u_1..u_N of one prompt's
samples (the weighted sum of the objectives' normalised rewards, in base standard deviations),

    w_i = softmax(beta · u)_i,   gain(beta) = Σ w_i u_i − mean(u),   KL(beta) = log N + Σ w_i log w_i

averaged over prompts (and seeds). KL(beta) grows from 0 to log N; the estimate is reliable up
to about ``log N − 1`` nats (`Frontier.reach`), beyond which a handful of samples carry all the
weight. The samples are the base's plain top-k samples, so the frontier's KL is against the
top-k base, the ``kl_topk`` every steered row reports. `Frontier.gain_at` reads the frontier's
gain at a row's ``kl_topk`` (NaN past its reach), and a row's KL-efficiency is its own gain
divided by that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BETAS = np.geomspace(0.01, 200.0, 160)
"""The inverse temperatures the frontier is traced at."""


@dataclass
class Frontier:
    """The soft best-of-N frontier of one weight setting: gain (base SD) against KL (nats)."""

    weights: dict[str, float]
    n_samples: int
    """Base samples per prompt and seed behind it (N)."""
    kl: list[float]
    """Mean KL at each traced beta, increasing."""
    gain: list[float]
    """Mean utility gain over the base samples' mean at each traced beta."""
    rewards: list[dict[str, float]] = field(default_factory=list)
    """Mean normalised reward per objective at each traced beta."""

    @property
    def reach(self) -> float:
        """The largest KL the estimate is trusted at: ``log N − 1`` nats."""
        return math.log(self.n_samples) - 1.0

    def gain_at(self, kl: float) -> float:
        """The frontier's gain at ``kl`` nats (linear between traced points); NaN past `reach`."""
        if not math.isfinite(kl) or kl > self.reach:
            return math.nan
        return float(np.interp(max(kl, 0.0), [0.0, *self.kl], [0.0, *self.gain]))

    def rewards_at(self, kl: float) -> dict[str, float]:
        """Mean normalised reward per objective on the frontier at ``kl`` nats (clipped to `reach`)."""
        target = min(max(kl, 0.0), self.reach)
        return {name: float(np.interp(target, self.kl, [r[name] for r in self.rewards])) for name in self.rewards[0]}


def soft_best_of_n(
    utilities: np.ndarray,
    weights: dict[str, float],
    rewards: dict[str, np.ndarray] | None = None,
    betas: np.ndarray = BETAS,
) -> Frontier:
    """The frontier from ``utilities`` (rows, N): each row's N base samples' utilities.

    Args:
        rewards: per objective, (rows, N) normalised rewards of the same samples, whose
            weighted means along the frontier go into `Frontier.rewards`.
    """
    n = utilities.shape[1]
    if n < 2:
        raise ValueError(f"the frontier needs at least 2 samples per row, got {n}")
    logits = betas[:, None, None] * utilities[None]  # (B, rows, N)
    log_w = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)  # (B, rows, N)
    w = np.exp(log_w)
    gain = (w * utilities[None]).sum(-1) - utilities.mean(-1)[None]  # (B, rows)
    kl = math.log(n) + (w * log_w).sum(-1)  # (B, rows)
    mean_rewards = [
        {name: float((w[b] * values).sum(-1).mean()) for name, values in (rewards or {}).items()}
        for b in range(len(betas))
    ]
    kl_mean, gain_mean = kl.mean(1), gain.mean(1)
    order = np.argsort(kl_mean, kind="stable")
    return Frontier(
        weights=dict(weights),
        n_samples=n,
        kl=[float(v) for v in np.maximum.accumulate(kl_mean[order])],
        gain=[float(v) for v in gain_mean[order]],
        rewards=[mean_rewards[i] for i in order] if rewards else [],
    )
