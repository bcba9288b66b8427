"""Training per-objective value models: tree rollouts -> targets -> fit, iterated
(docs/architecture.md, "Training, registry, workers").

`train_objective` runs the whole pipeline from one `TrainingConfig`; the stages are public for
workers that shard rollouts (`sample_trees` on prompt ranges, then `merge_rollouts`) and for
sharing iteration-0 rollouts between objectives.
"""

from mavis_lc.training.config import ARCHITECTURES, TrainingConfig
from mavis_lc.training.fit import (
    FitResult,
    fit_separate_backbone,
    fit_shared_head,
    fit_shared_head_averaged,
    regression_metrics,
    split_prompts,
)
from mavis_lc.training.prompts import first_human_turn, format_prompts, load_prompts
from mavis_lc.training.rollouts import TreeRollouts, merge_rollouts, sample_trees
from mavis_lc.training.run import IterationResult, ProgressCallback, TrainingResult, rollout_cache_path, train_objective
from mavis_lc.training.targets import TreeTargets, compute_targets, reward_stats, score_leaves

__all__ = [
    "ARCHITECTURES",
    "FitResult",
    "IterationResult",
    "ProgressCallback",
    "TrainingConfig",
    "TrainingResult",
    "TreeRollouts",
    "TreeTargets",
    "compute_targets",
    "first_human_turn",
    "fit_separate_backbone",
    "fit_shared_head",
    "fit_shared_head_averaged",
    "format_prompts",
    "load_prompts",
    "merge_rollouts",
    "regression_metrics",
    "reward_stats",
    "rollout_cache_path",
    "sample_trees",
    "score_leaves",
    "split_prompts",
    "train_objective",
]
