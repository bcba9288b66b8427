"""`train_objective`: the whole iterative training of one objective's value model, resumable.

For iteration i = 0 .. n_iterations-1 (docs/architecture.md, "Training, registry, workers"):

1. ``rollouts``: sample trees, from pi_ref (i = 0) or from MAVIS(pi_ref, head i-1) at weight 1
   and guidance ``beta``. Iteration-0 rollouts do not depend on the objective, so they are kept
   in a shared folder under a key of everything they depend on, and every objective trained
   with the same base, prompts and tree settings reuses them.
2. ``rewards``: score every leaf, normalise with the iteration-0 mean and std, compute the
   targets (hard at i = 0, soft with ``zeta`` after; `mavis_lc.training.targets`).
   ``labels``: for a shared head and an objective that scores prefixes, label every top-k
   candidate of the sampled states with Φ(s ⊕ a) (`mavis_lc.training.dense`).
3. ``fit``: regress the value model on them, warm-started from iteration i-1; with dense
   labels, the shared head is refitted as Φ-part (on every iteration's labels so far) plus a
   residual on the Monte Carlo targets.

Each stage ends in a checkpoint file in the work folder, written to a temporary name and
renamed, so a rerun of the same job (same config, same work folder) picks up after the last
finished stage, and an interrupted or failed run leaves no half-written file. Nothing is
registered here: the caller stores the artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import ConfigurationError, RewardError, TrainingCancelled, TrainingError
from mavis_lc.objectives import Objective, get_objective
from mavis_lc.settings import get_settings
from mavis_lc.training.config import TrainingConfig
from mavis_lc.training.dense import DenseLabels, fit_dense, label_states
from mavis_lc.training.files import write_atomic
from mavis_lc.training.fit import fit_separate_backbone, fit_shared_head, fit_shared_head_averaged, fit_side_branch
from mavis_lc.training.metrics import candidate_ceiling
from mavis_lc.training.prompts import format_prompts, load_prompts
from mavis_lc.training.rollouts import TreeRollouts, sample_trees
from mavis_lc.training.targets import TreeTargets, compute_targets, reward_stats, score_leaves
from mavis_lc.value_models import (
    SeparateBackboneValueModel,
    SharedBackboneQHead,
    SideBranchValueModel,
    ValueModel,
    load_value_model,
    new_separate_backbone,
    new_shared_head,
    new_side_branch,
)

ProgressCallback = Callable[[str, int, int, int, dict[str, float]], None]
"""``progress(stage, iteration, step, total, metrics)``; stage is rollouts, rewards or fit."""

_ROLLOUT_FIELDS = (
    "k_root", "k_children", "n_layers", "segment_min_tokens", "segment_max_tokens", "t_max_tokens",
    "leaf_completion_tokens", "rollout_prompts_per_batch", "top_k", "temperature", "seed", "min_response_tokens",
    "expand_top_m", "ceiling_share",
)  # fmt: skip
_ROLLOUT_FORMAT = 4  # 2: log Z_k per token, the iteration in every seed; 3: log pi, forced nodes, prompt query;
# 4: the prompt query pooled over the user turn's tokens


@dataclass
class IterationResult:
    """The value model one iteration produced and how well it fits."""

    iteration: int
    artifact_path: Path
    """The safetensors artifact (config in its metadata), inside the work folder."""
    sha256: str
    """sha256 of the artifact's bytes."""
    metrics: dict[str, float]
    """Fit metrics (val_mse, r2, spearman, ...) and rollout statistics (tokens, mean_reward, mean_kl, ...)."""
    reward_mean: float
    reward_std: float

    def read_bytes(self) -> bytes:
        return self.artifact_path.read_bytes()


@dataclass
class TrainingResult:
    """Every iteration's artifact, for the caller to register; the last one is `final`."""

    objective: str
    base_model_id: str
    tokenizer_fingerprint: str
    architecture: str
    params: dict[str, Any]
    """The `TrainingConfig` the run used, as a dict."""
    workdir: Path
    iterations: list[IterationResult]

    @property
    def final(self) -> IterationResult:
        return self.iterations[-1]


def train_objective(
    config: TrainingConfig,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    workdir: str | Path | None = None,
) -> TrainingResult:
    """Train ``config.objective``'s value model for ``config.n_iterations`` iterations.

    Args:
        progress: called as stages advance (see `ProgressCallback`).
        should_cancel: polled between batches of every stage.
        workdir: checkpoint folder; default ``$MAVIS_HOME/training/<objective>-<run key>``. A
            folder holds one run: reusing it with another config is refused.

    Raises:
        ConfigurationError: a config field, the prompt source or the work folder is unusable.
        RewardError: the objective's reward function failed (the message names it).
        TrainingCancelled: ``should_cancel()`` returned True.
        TrainingError: any other failure of the run.
    """
    config.validate()
    if config.prompts is None:
        raise ConfigurationError("TrainingConfig.prompts is required: a .jsonl/.txt path or a list of prompts")
    objective = get_objective(config.objective, **config.objective_options)
    base = config.load_base()
    raw_prompts = load_prompts(config.prompts, config.max_prompts)
    prompts = format_prompts(base.tokenizer, raw_prompts, config.chat_template)
    prompts_key = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    keyed = {"config": config.fingerprint(), "prompts": prompts_key, "base": base.fingerprint}
    if objective.version > 1:  # targets scored under another definition are not resumed
        keyed["objective_version"] = str(objective.version)
    run_key = _sha256(keyed)
    folder = (
        Path(workdir) if workdir is not None else get_settings().home / "training" / f"{objective.name}-{run_key[:16]}"
    )
    _claim_folder(folder, run_key, config)
    iteration0_rollouts = rollout_cache_path(config, base, prompts)

    def report(stage: str, iteration: int) -> Callable[..., None]:
        def call(step: int, total: int, metrics: dict[str, float] | None = None) -> None:
            if progress is not None:
                progress(stage, iteration, step, total, dict(metrics or {}))

        return call

    results: list[IterationResult] = []
    labelled: list[tuple[TreeRollouts, DenseLabels]] = []  # every iteration's dense labels so far
    model: ValueModel | None = None
    stats: tuple[float, float] | None = None
    try:
        for iteration in range(config.n_iterations):
            # 1. rollouts
            path = iteration0_rollouts if iteration == 0 else folder / f"rollouts-{iteration}.safetensors"
            rollout_metrics: dict[str, float] = {}
            if path.is_file():
                rollouts = TreeRollouts.load(path)
                report("rollouts", iteration)(len(prompts), len(prompts), {"resumed": 1.0})
            else:
                started = time.perf_counter()
                heads = [] if model is None else [model]
                rollouts = sample_trees(
                    base,
                    prompts,
                    config,
                    heads=heads,
                    iteration=iteration,
                    progress=report("rollouts", iteration),
                    should_cancel=should_cancel,
                    tap_layer=tap_layer(config, base),
                )
                seconds = time.perf_counter() - started
                rollout_metrics = {
                    "rollout_seconds": seconds,
                    "rollout_tokens_per_s": rollouts.tokens.numel() / seconds,
                }
                rollouts.save(path)
            # 2. rewards and targets, read by the objective on the raw prompts of these trees
            tree_prompts = raw_prompts[rollouts.first_prompt : rollouts.first_prompt + len(rollouts.prompts)]
            targets = _targets_stage(
                folder / f"targets-{iteration}.safetensors", rollouts, objective, base, tree_prompts, config,
                iteration=iteration, stats=stats, progress=report("rewards", iteration), should_cancel=should_cancel,
            )  # fmt: skip
            stats = (targets.reward_mean, targets.reward_std)
            dense_metrics: dict[str, float] = {}
            if uses_dense_labels(config, objective):
                labels = _dense_stage(
                    folder / f"dense-{iteration}.safetensors", rollouts, objective, base, tree_prompts, config,
                    iteration=iteration, progress=report("labels", iteration), should_cancel=should_cancel,
                )  # fmt: skip
                labelled.append((rollouts, labels))
                dense_metrics = {
                    "dense_states": float(labels.token_index.numel()),
                    "dense_reward_calls": float(labels.reward_calls),
                    "dense_seconds": labels.seconds,
                }
            # 3. fit
            artifact = folder / f"head-{iteration}.safetensors"
            metrics_file = folder / f"metrics-{iteration}.json"
            if artifact.is_file() and metrics_file.is_file():
                model = load_value_model(artifact, base)
                metrics = json.loads(metrics_file.read_text())
                report("fit", iteration)(config.epochs, config.epochs, {"resumed": 1.0})
            else:
                model = _warm_start(model, base, objective, config, iteration, stats)
                measured = {
                    **_fit(model, base, rollouts, targets, config, report("fit", iteration), should_cancel, labelled),
                    **rollout_metrics,
                    **dense_metrics,
                    **_rollout_stats(rollouts, targets),
                }
                # A metric that is undefined here (a Spearman or R² over constant targets) is left out.
                metrics = {name: value for name, value in measured.items() if math.isfinite(value)}
                write_atomic(artifact, model.to_bytes())
                write_atomic(metrics_file, json.dumps(metrics, sort_keys=True).encode())
            results.append(
                IterationResult(
                    iteration=iteration,
                    artifact_path=artifact,
                    sha256=hashlib.sha256(artifact.read_bytes()).hexdigest(),
                    metrics=metrics,
                    reward_mean=stats[0],
                    reward_std=stats[1],
                )
            )
    except (ConfigurationError, RewardError, TrainingCancelled, TrainingError):
        raise
    except Exception as exc:
        raise TrainingError(f"training {objective.name!r} failed: {type(exc).__name__}: {exc}") from exc
    return TrainingResult(
        objective=objective.name,
        base_model_id=base.model_id,
        tokenizer_fingerprint=base.fingerprint,
        architecture=config.architecture,
        params={**config.to_dict(), "objective_version": objective.version},
        workdir=folder,
        iterations=results,
    )


def rollout_cache_path(config: TrainingConfig, base: BaseModel, prompts: list[str]) -> Path:
    """Where `train_objective` keeps (and looks for) the iteration-0 rollouts of ``prompts``
    (formatted, as `format_prompts` returns them): a file in ``config.rollout_cache_dir`` named
    by everything those rollouts depend on. A worker that samples them in shards writes the
    merged file here, and the run then starts from it."""
    prompts_key = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    layer = tap_layer(config, base)
    rollout_key = _sha256(
        {
            "base": [base.model_id, base.fingerprint, str(base.dtype)],
            "prompts": prompts_key,
            "format": _ROLLOUT_FORMAT,
            **{name: getattr(config, name) for name in _ROLLOUT_FIELDS},
            **({"tap_layer": layer} if layer is not None else {}),
        }
    )
    rollout_dir = Path(config.rollout_cache_dir or get_settings().resolved_cache_dir() / "rollouts")
    return rollout_dir / f"{rollout_key}.safetensors"


def tap_layer(config: TrainingConfig, base: BaseModel) -> int | None:
    """The base layer whose inputs the run's rollouts record: N - side_layers for a side branch, else None.

    Raises:
        ConfigurationError: ``side_layers`` exceeds the base's layers.
    """
    if config.architecture != "side_branch":
        return None
    total = int(base.model.config.num_hidden_layers)
    if config.side_layers > total:
        raise ConfigurationError(f"side_layers {config.side_layers} exceeds the base's {total} decoder layers")
    return total - config.side_layers


def _targets_stage(
    path: Path,
    rollouts: TreeRollouts,
    objective: Objective,
    base: BaseModel,
    prompts: list[str],
    config: TrainingConfig,
    *,
    iteration: int,
    stats: tuple[float, float] | None,
    progress: Callable[..., None],
    should_cancel: Callable[[], bool] | None,
) -> TreeTargets:
    """Score the leaves (the objective reads ``prompts``, the raw prompts of these trees) and
    compute the targets, or read them from ``path``."""
    if path.is_file():
        tensors = load_file(path)
        stored = json.loads(path.with_suffix(".json").read_text())
        progress(1, 1, {"resumed": 1.0})
        return TreeTargets(
            leaf_reward=tensors["leaf_reward"],
            node_value=tensors["node_value"],
            token_target=tensors["token_target"],
            reward_mean=stored["reward_mean"],
            reward_std=stored["reward_std"],
            zeta=stored["zeta"],
        )
    leaf_reward = score_leaves(
        rollouts,
        objective,
        base.tokenizer,
        prompts=prompts,
        batch_size=config.reward_batch_size,
        progress=progress,
        should_cancel=should_cancel,
    )
    mean, std = stats if stats is not None else reward_stats(leaf_reward)
    targets = compute_targets(
        rollouts, leaf_reward, reward_mean=mean, reward_std=std, zeta=config.effective_zeta if iteration > 0 else 0.0
    )
    # The statistics go first: a targets file is only trusted with its .json beside it.
    write_atomic(
        path.with_suffix(".json"),
        json.dumps({"reward_mean": mean, "reward_std": std, "zeta": targets.zeta}).encode(),
    )
    tensors = {"leaf_reward": leaf_reward, "node_value": targets.node_value, "token_target": targets.token_target}
    write_atomic(path, bytes(save(tensors)))
    return targets


def uses_dense_labels(config: TrainingConfig, objective: Objective) -> bool:
    """Whether the run fits Φ-part + residual on dense prefix-reward labels (`mavis_lc.training.dense`)."""
    return config.dense_labels and config.architecture == "shared_q_head" and objective.prefix_scoring


def _dense_stage(
    path: Path,
    rollouts: TreeRollouts,
    objective: Objective,
    base: BaseModel,
    prompts: list[str],
    config: TrainingConfig,
    *,
    iteration: int,
    progress: Callable[..., None],
    should_cancel: Callable[[], bool] | None,
) -> DenseLabels:
    """Label the iteration's states with Φ, or read the labels from ``path``."""
    if path.is_file() and path.with_suffix(".json").is_file():
        progress(1, 1, {"resumed": 1.0})
        return DenseLabels.load(path)
    labels = label_states(
        rollouts, objective, base, prompts=prompts, config=config, iteration=iteration,
        progress=lambda done, total: progress(done, total, {}), should_cancel=should_cancel,
    )  # fmt: skip
    labels.save(path)
    return labels


def _warm_start(
    previous: ValueModel | None,
    base: BaseModel,
    objective: Objective,
    config: TrainingConfig,
    iteration: int,
    stats: tuple[float, float],
) -> ValueModel:
    """Iteration i's model before fitting: a fresh one at i = 0, else i-1's weights."""
    mean, std = stats
    if previous is None:
        if config.architecture == "separate_backbone":
            return new_separate_backbone(
                base, objective.name, n_layers=config.backbone_layers, mode=config.value_mode,
                reward_mean=mean, reward_std=std, iteration=iteration,
            )  # fmt: skip
        if config.architecture == "side_branch":
            return new_side_branch(
                base, objective.name, n_layers=config.side_layers, prompt_query=config.prompt_query,
                reward_mean=mean, reward_std=std, iteration=iteration,
            )  # fmt: skip
        options = {"prompt_query": True} if config.prompt_query else {}
        return new_shared_head(
            base, objective.name, reward_mean=mean, reward_std=std, iteration=iteration, options=options
        )
    previous.config = dataclasses.replace(previous.config, iteration=iteration, reward_mean=mean, reward_std=std)
    return _trainable(previous)


def _trainable(model: ValueModel) -> ValueModel:
    model.requires_grad_(True)
    return model


def _fit(
    model: ValueModel,
    base: BaseModel,
    rollouts: TreeRollouts,
    targets: TreeTargets,
    config: TrainingConfig,
    progress: Callable[..., None],
    should_cancel: Callable[[], bool] | None,
    labelled: list[tuple[TreeRollouts, DenseLabels]],
) -> dict[str, float]:
    if isinstance(model, SharedBackboneQHead) and labelled:
        # fit_dense leaves the head frozen
        return fit_dense(
            model, rollouts, targets.token_target, labelled, config, progress=progress, should_cancel=should_cancel
        )
    if isinstance(model, SideBranchValueModel):
        prefit: dict[str, float] = {}
        if model.config.iteration == 0:
            # Iteration 0 starts from a shared head fitted on the base's final states, which the
            # fresh branch reproduces exactly; the branch's own fit then starts where that head is.
            shared = new_shared_head(base, model.objective, options={"prompt_query": model.q_head.prompt_query})
            fitted = fit_shared_head(
                shared, rollouts, targets.token_target, config, progress=progress, should_cancel=should_cancel
            )
            model.q_head.load_state_dict(shared.state_dict())
            prefit = {f"shared_{name}": value for name, value in fitted.metrics.items()}
        result = fit_side_branch(
            model, rollouts, targets.token_target, config, progress=progress, should_cancel=should_cancel
        )
        result.metrics.update(prefit)
    elif isinstance(model, SeparateBackboneValueModel):
        result = fit_separate_backbone(
            model, base, rollouts, targets.token_target, config, progress=progress, should_cancel=should_cancel
        )
    elif isinstance(model, SharedBackboneQHead):
        result = fit_shared_head_averaged(
            model, rollouts, targets.token_target, config, progress=progress, should_cancel=should_cancel
        )
    else:
        raise TrainingError(f"cannot fit a value model of type {type(model).__name__}")
    model.requires_grad_(False)
    return result.metrics


def _rollout_stats(rollouts: TreeRollouts, targets: TreeTargets) -> dict[str, float]:
    """Tokens, leaves, mean raw leaf reward, the leaves' mean KL estimates (sums of log-ratios on
    their paths, against the full and the top-k base), response length and EOS rate."""
    leaves = rollouts.leaves()
    token_node = rollouts.token_node()

    def path_sums(per_token: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(rollouts.n_nodes, dtype=torch.float64).index_add_(0, token_node, per_token.double())
        for node in range(rollouts.n_nodes):  # parents come before children
            parent = int(rollouts.node_parent[node])
            if parent >= 0:
                total[node] += total[parent]
        return total[leaves]

    ceiling, pairs = candidate_ceiling(rollouts, targets.token_target)
    return {
        "trees_candidate_noise_ceiling": ceiling,
        "trees_candidate_ceiling_pairs": float(pairs),
        "rollout_tokens": float(rollouts.tokens.numel()),
        "leaves": float(leaves.numel()),
        "mean_reward": float(targets.leaf_reward[leaves].mean()),
        "mean_kl": float(path_sums(rollouts.log_ratio).mean()),
        "mean_kl_topk": float(path_sums(rollouts.log_ratio_topk).mean()),
        "mean_leaf_tokens": float(path_sums(torch.ones_like(rollouts.log_ratio)).mean()),
        "leaf_eos_rate": float(rollouts.node_eos[leaves].double().mean()),
    }


def _claim_folder(folder: Path, run_key: str, config: TrainingConfig) -> None:
    """Make ``folder`` this run's work folder, or refuse if it holds another run."""
    marker = folder / "run.json"
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored.get("run_key") != run_key:
            raise ConfigurationError(
                f"work folder {str(folder)!r} holds another training run (key {stored.get('run_key', '?')[:12]}, "
                f"this one {run_key[:12]}); pass another workdir"
            )
        return
    write_atomic(marker, json.dumps({"run_key": run_key, "config": config.to_dict()}, default=str, indent=1).encode())


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
