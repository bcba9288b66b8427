"""How long a training run's rollouts will take, before it starts: the plan and a short calibration.

The rollouts dominate a run's wall time (scoring and the shared-head fits take a minute or two
on 2 cores). Their token count is known before any sampling (`planned_tokens`: an upper bound,
since a segment that samples EOS ends early); their pace is measured by a calibration that
runs a few batched decoding steps of the base model at the number of rows a rollout batch
holds on average, on this machine. A queued job runs on a worker, whose pace may differ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mavis_lc.base_model import BaseModel
from mavis_lc.training.config import TrainingConfig
from mavis_lc.training.rollouts import longest_response, planned_tokens
from mavis_lc.value_models import KVBatch


@dataclass(frozen=True)
class RolloutEstimate:
    """The rollouts a run plans and the time they should take."""

    planned_tokens_per_iteration: list[int]
    """`planned_tokens` of every iteration (plans are drawn per iteration)."""
    tokens_per_s: float
    """Calibrated pace of rollout sampling on this machine."""
    rows: int
    """Rows of the calibration batch (the mean rows of a rollout batch)."""

    @property
    def planned_tokens(self) -> int:
        return sum(self.planned_tokens_per_iteration)

    @property
    def seconds(self) -> float:
        """Estimated rollout wall time of the whole run."""
        return self.planned_tokens / self.tokens_per_s if self.tokens_per_s > 0 else float("inf")

    def describe(self) -> str:
        per = self.planned_tokens_per_iteration
        return (
            f"rollouts: at most {self.planned_tokens:,} tokens over {len(per)} iteration(s) "
            f"({', '.join(f'{n:,}' for n in per)}); calibrated at {self.tokens_per_s:.0f} tok/s "
            f"({self.rows} rows), about {self.seconds / 60:.1f} min of sampling"
        )


@torch.no_grad()
def estimate_rollouts(
    base: BaseModel, prompts: Sequence[str], config: TrainingConfig, *, steps: int = 4
) -> RolloutEstimate:
    """Plan every iteration's rollouts of ``prompts`` (formatted) and time ``steps`` decoding steps.

    The calibration batch is the first ``rollout_prompts_per_batch`` prompts, prefilled and
    fanned out to the mean number of rows a batch of trees holds (its planned tokens over its
    longest path), then advanced ``steps`` tokens after one untimed warm-up step, each step a
    base forward, the LM head and a top-k, as in sampling.
    """
    per_iteration = [planned_tokens(config, len(prompts), iteration=i) for i in range(config.n_iterations)]
    batch = list(prompts[: config.rollout_prompts_per_batch])
    if not batch:
        return RolloutEstimate(per_iteration, 0.0, 0)
    rows = max(1, round(planned_tokens(config, len(batch)) / max(longest_response(config), 1)))
    enc = base.tokenizer(batch, padding=True, return_tensors="pt")
    state = KVBatch(base.model.base_model, base.model.get_input_embeddings())
    state.prefill(enc["input_ids"].to(base.device), enc["attention_mask"].to(base.device))
    state.select(torch.arange(rows, device=base.device) % len(batch))
    token = torch.zeros(rows, dtype=torch.long, device=base.device)
    elapsed = 0.0
    for step in range(steps + 1):
        started = time.perf_counter()
        token = base.logits(state.hidden).float().topk(config.top_k, dim=-1).indices[:, 0]  # (rows,)
        state.feed(token)
        if step:  # the first step warms up kernels and allocations
            elapsed += time.perf_counter() - started
    return RolloutEstimate(per_iteration, rows * steps / max(elapsed, 1e-9), rows)
