"""`TrainingConfig`: every parameter of a value-model training run, with a default and a help line.

Each field's ``metadata["help"]`` is the one-line text a CLI shows for the matching flag.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from mavis_lc.errors import ConfigurationError

if TYPE_CHECKING:
    from mavis_lc.base_model import BaseModel

ARCHITECTURES = ("shared_q_head", "side_branch", "separate_backbone")
SELECTION_METRICS = ("within_prompt_r2", "sibling_corr", "val_mse")
PHI_LOSSES = ("listwise", "centred")

# Fields that change where or how fast a run computes, never what it computes.
_RUNTIME_FIELDS = frozenset({"device", "rollout_cache_dir", "reward_batch_size"})
_LOAD_FIELDS = frozenset({"dtype", "revision", "attn_implementation"})


@dataclass
class TrainingConfig:
    """One value-model training run: trees, targets, fit, for ``n_iterations`` (docs/architecture.md)."""

    objective: str = field(
        default="positivity", metadata={"help": "Objective spec: a built-in name, hf:<dir> or package.module:function."}
    )
    objective_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Keyword options passed to the objective's constructor."}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model (packaged name, local directory or hub id); default MAVIS_BASE_MODEL."},
    )
    prompts: str | list[str] | None = field(
        default=None,
        metadata={"help": "Prompt source: a .jsonl/.jsonl.gz path, a text file (one per line) or a list of prompts."},
    )
    max_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first this many prompts of the source."}
    )
    chat_template: bool = field(
        default=True,
        metadata={"help": "Wrap each prompt as a user turn with the base tokenizer's chat template, when it has one."},
    )
    n_iterations: int = field(
        default=2,
        metadata={"help": "Soft policy-improvement iterations (0 samples from pi_ref, later ones from MAVIS)."},
    )
    k_root: int = field(default=2, metadata={"help": "Branches from the root (the prompt) of each tree."})
    k_children: int = field(default=2, metadata={"help": "Children of every later node of a tree."})
    n_layers: int = field(default=2, metadata={"help": "Segment layers of a tree (L): depth below the root."})
    segment_min_tokens: int = field(default=2, metadata={"help": "Shortest segment a node samples (tokens)."})
    segment_max_tokens: int = field(default=32, metadata={"help": "Longest segment a node samples (tokens)."})
    t_max_tokens: int = field(
        default=1024, metadata={"help": "Token budget of one tree; a layer that does not fit is not sampled."}
    )
    leaf_completion_tokens: int = field(
        default=48,
        metadata={
            "help": "Sample every node of a tree's deepest layer on until EOS or until its response is this many "
            "tokens long, so leaves are scored as whole responses (set it to the decoding max_tokens); 0: leaves "
            "end with their segment and are scored as partial responses. Outside the t_max_tokens budget."
        },
    )
    expand_top_m: int = field(
        default=4,
        metadata={
            "help": "Contrastive expansion: the nodes of layer n_layers are the m most probable distinct candidates "
            "of the base (pi_ref) at their parent's state, each continued by sampling, so that state has m "
            "labelled actions (0: that layer samples k_children like the others)."
        },
    )
    ceiling_share: float = field(
        default=0.25,
        metadata={
            "help": "Share of trees whose expanded candidates are each continued twice (two leaves per candidate), "
            "which measures the candidate-level noise ceiling of the sibling-difference correlation; 0: none."
        },
    )
    rollout_prompts_per_batch: int = field(
        default=8,
        metadata={"help": "Trees sampled together in one batched forward; shard boundaries must be multiples of it."},
    )
    top_k: int = field(default=20, metadata={"help": "Candidate next tokens per step, in rollouts and in the tilt."})
    temperature: float = field(default=1.0, metadata={"help": "Base-model temperature T of the rollouts."})
    beta: float = field(
        default=4.0,
        metadata={
            "help": "The beta you will decode with: iterations >= 1 sample from the previous head at this guidance "
            "strength, and the soft targets price KL in its units (zeta = 1/beta). Recorded with every version."
        },
    )
    zeta: float | None = field(
        default=None,
        metadata={
            "help": "KL penalty per nat of future log(pi/pi_ref^k) in the soft targets of iterations >= 1; "
            "default 1/beta (soft policy improvement at the decoding beta)."
        },
    )
    min_response_tokens: int = field(
        default=1,
        metadata={"help": "Rollouts ban EOS until a response has this many tokens (1: no empty answers; 0: allow)."},
    )
    architecture: str = field(
        default="shared_q_head",
        metadata={
            "help": "Value model: shared_q_head (head on the base's final features), side_branch (head on a trained "
            "copy of the base's last side_layers layers, fed by the base's own states) or separate_backbone "
            "(the reference's own small LM)."
        },
    )
    side_layers: int = field(
        default=2,
        metadata={"help": "Side branch: how many of the base's last layers it copies and trains (L)."},
    )
    side_learning_rate: float = field(
        default=1e-5, metadata={"help": "Side branch: AdamW learning rate of its copied layers."}
    )
    backbone_layers: int = field(
        default=2, metadata={"help": "Separate backbone: how many of the base's first layers it copies."}
    )
    value_mode: str = field(
        default="q_head",
        metadata={"help": "Separate backbone: q_head (Q over candidates) or scalar (V(prefix + candidate))."},
    )
    learning_rate: float = field(
        default=3e-6,
        metadata={"help": "AdamW learning rate of the fit (the shared head's d x d projection diverges at 1e-3)."},
    )
    bias_learning_rate: float = field(
        default=1e-2,
        metadata={
            "help": "AdamW learning rate of the shared head's vectors (per-token bias, projection bias, state value)."
        },
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the fit."})
    n_fits: int = field(
        default=5,
        metadata={
            "help": "Shared head: fit this many heads, each holding out another validation split, and average "
            "their weights (the head is linear in them, so its Q is the mean of theirs)."
        },
    )
    sibling_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Shared head or side branch: weight of a term on what the tilt uses, the MSE of Q centred over "
            "the sibling actions of each branch state against their centred Monte Carlo targets (0: off), beside "
            "the per-token MSE."
        },
    )
    listwise_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Shared head or side branch: weight of a listwise term at branch states, the cross-entropy from "
            "softmax(log pi_ref^k + beta * target) to softmax(log pi_ref^k + beta * Q) over each state's "
            "sibling actions (the decoding distribution itself), beside the per-token MSE (0: off)."
        },
    )
    prompt_query: bool = field(
        default=False,
        metadata={
            "help": "Shared head or side branch: add the prompt-pooled query U p + u * p (p = mean base hidden "
            "state over the user turn's tokens, computed once at prefill; U a matrix, u a vector) to the head's "
            "query, so Q can score how a candidate relates to what the user asked."
        },
    )
    dense_labels: bool = field(
        default=True,
        metadata={
            "help": "Shared head, objectives that score prefixes: label every top-k candidate of the sampled states "
            "with the prefix reward Phi(s + a) and fit Q = Phi-part + residual (the residual on the Monte Carlo "
            "targets); other objectives and architectures learn from the leaves alone."
        },
    )
    residual_contrast: bool = field(
        default=False,
        metadata={
            "help": "Dense fit: the residual (fitted on Monte Carlo targets) may differ between a state's candidates "
            "through its projection (its per-token biases stay zero); False: it only sets each state's level, and "
            "the tilt is the Phi-part's alone."
        },
    )
    phi_loss: str = field(
        default="centred",
        metadata={
            "help": "Dense fit's loss on the prefix-reward labels: listwise (cross-entropy from softmax(log pi_ref^k + "
            "beta * Phi) to softmax(log pi_ref^k + beta * Q): distils reward-guided search at the decoding beta) or "
            "centred (MSE of Q against Phi, both centred over each state's candidates)."
        },
    )
    dense_max_states: int | None = field(
        default=None,
        metadata={
            "help": "States labelled per iteration (top_k reward calls each), drawn evenly from the rollout tokens; "
            "0: all of them; default: the objective's own budget (8192 for the built-in text statistics, 1024 for "
            "objectives that run a model per call: relevance, reward models)."
        },
    )
    epochs: int = field(default=20, metadata={"help": "Most passes over the training targets per iteration."})
    fit_batch_size: int = field(default=256, metadata={"help": "Shared head: (state, token) pairs per minibatch."})
    sequence_batch_size: int = field(
        default=8, metadata={"help": "Side branch: trees per minibatch; separate backbone: leaf paths per minibatch."}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of prompts held out for validation (split by prompt)."}
    )
    patience: int = field(
        default=3, metadata={"help": "Stop after this many epochs without a better selection metric."}
    )
    selection_metric: str = field(
        default="sibling_corr",
        metadata={
            "help": "Validation metric that picks the best epoch: within_prompt_r2 (R² of Q within each prompt), "
            "sibling_corr (correlation of Q differences between sibling actions with their Monte Carlo "
            "differences) or val_mse (pooled)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of trees, segment lengths, the validation split and the fit."})
    reward_batch_size: int = field(default=64, metadata={"help": "Leaves scored per reward-function call."})
    device: str | None = field(default=None, metadata={"help": "auto, cpu, cuda or cuda:N; default MAVIS_DEVICE."})
    dtype: str | None = field(
        default=None,
        metadata={"help": "Base model dtype: auto, float32, bfloat16 or float16; default MAVIS_DTYPE."},
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of a base model given as a hub id."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Base model attention: eager, sdpa, flash_attention_2...; default transformers'."},
    )
    rollout_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of iteration-0 rollouts, reused by other objectives; default $MAVIS_HOME/cache/rollouts."
        },
    )

    def load_base(self) -> BaseModel:
        """The base model this run trains against, loaded as its fields say."""
        from mavis_lc.base_model import LoadOptions, load_base_model

        options = LoadOptions.of(revision=self.revision, attn_implementation=self.attn_implementation)
        return load_base_model(self.base_model, device=self.device, dtype=self.dtype, options=options)

    def validate(self) -> None:
        """Raise `ConfigurationError` naming the first field out of range."""
        positive = (
            "n_iterations",
            "k_root",
            "k_children",
            "n_layers",
            "segment_min_tokens",
            "t_max_tokens",
            "rollout_prompts_per_batch",
            "top_k",
            "backbone_layers",
            "side_layers",
            "epochs",
            "fit_batch_size",
            "sequence_batch_size",
            "patience",
            "reward_batch_size",
            "n_fits",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.leaf_completion_tokens, bool) or not isinstance(self.leaf_completion_tokens, int):
            raise ConfigurationError(
                f"leaf_completion_tokens must be an integer >= 0, got {self.leaf_completion_tokens!r}"
            )
        if self.leaf_completion_tokens < 0:
            raise ConfigurationError(
                f"leaf_completion_tokens must be an integer >= 0, got {self.leaf_completion_tokens!r}"
            )
        if self.segment_max_tokens < self.segment_min_tokens:
            raise ConfigurationError(
                f"segment_max_tokens ({self.segment_max_tokens}) must be >= "
                f"segment_min_tokens ({self.segment_min_tokens})"
            )
        for name in ("temperature", "learning_rate", "bias_learning_rate", "side_learning_rate"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.expand_top_m, bool) or not isinstance(self.expand_top_m, int) or self.expand_top_m < 0:
            raise ConfigurationError(f"expand_top_m must be an integer >= 0, got {self.expand_top_m!r}")
        if self.expand_top_m > self.top_k:
            raise ConfigurationError(
                f"expand_top_m {self.expand_top_m} must be <= top_k {self.top_k} (it expands candidates of the top-k)"
            )
        if not self.listwise_loss_weight >= 0:
            raise ConfigurationError(f"listwise_loss_weight must be >= 0, got {self.listwise_loss_weight!r}")
        if not self.sibling_loss_weight >= 0:
            raise ConfigurationError(f"sibling_loss_weight must be >= 0, got {self.sibling_loss_weight!r}")
        shared_only = {
            "sibling_loss_weight": self.sibling_loss_weight > 0,
            "listwise_loss_weight": self.listwise_loss_weight > 0,
            "prompt_query": bool(self.prompt_query),
        }
        for name, used in shared_only.items():
            if used and self.architecture not in ("shared_q_head", "side_branch"):
                raise ConfigurationError(
                    f"{name} {getattr(self, name)!r} needs architecture shared_q_head or side_branch, "
                    f"got {self.architecture!r}"
                )
        for name in ("beta", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigurationError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.zeta is not None and not self.zeta >= 0:
            raise ConfigurationError(f"zeta must be >= 0 or None (1/beta), got {self.zeta!r}")
        if self.zeta is None and self.n_iterations > 1 and not self.beta > 0:
            raise ConfigurationError(
                f"beta {self.beta!r} leaves zeta = 1/beta undefined for iterations >= 1: give beta > 0 or set zeta"
            )
        if self.dense_max_states is not None and (
            isinstance(self.dense_max_states, bool)
            or not isinstance(self.dense_max_states, int)
            or self.dense_max_states < 0
        ):
            raise ConfigurationError(
                f"dense_max_states must be an integer >= 0 or None (the objective's), got {self.dense_max_states!r}"
            )
        if isinstance(self.min_response_tokens, bool) or not isinstance(self.min_response_tokens, int):
            raise ConfigurationError(f"min_response_tokens must be an integer >= 0, got {self.min_response_tokens!r}")
        if self.min_response_tokens < 0:
            raise ConfigurationError(f"min_response_tokens must be an integer >= 0, got {self.min_response_tokens!r}")
        if self.phi_loss not in PHI_LOSSES:
            raise ConfigurationError(f"phi_loss {self.phi_loss!r} is not allowed; allowed: {', '.join(PHI_LOSSES)}")
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigurationError(
                f"selection_metric {self.selection_metric!r} is not allowed; allowed: {', '.join(SELECTION_METRICS)}"
            )
        if not 0 <= self.ceiling_share <= 1:
            raise ConfigurationError(f"ceiling_share must be in [0, 1], got {self.ceiling_share!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigurationError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigurationError(
                f"architecture {self.architecture!r} is not allowed; allowed: {', '.join(ARCHITECTURES)}"
            )
        if self.n_fits > 1 and self.architecture != "shared_q_head":
            raise ConfigurationError(
                f"n_fits {self.n_fits} needs architecture shared_q_head (the weights of transformer layers "
                f"do not average into the mean of their fits), got {self.architecture!r}: pass n_fits 1"
            )
        if self.value_mode not in ("q_head", "scalar"):
            raise ConfigurationError(f"value_mode {self.value_mode!r} is not allowed; allowed: q_head, scalar")

    @property
    def effective_zeta(self) -> float:
        """The soft targets' KL penalty: ``zeta``, or 1/beta when it is None (inf at beta 0)."""
        if self.zeta is not None:
            return self.zeta
        return 1.0 / self.beta if self.beta > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, ``zeta`` resolved (what a version records)."""
        data = asdict(self)
        if self.zeta is None and self.beta > 0:
            data["zeta"] = self.effective_zeta
        return data

    def fingerprint(self, exclude: frozenset[str] = frozenset()) -> str:
        """sha256 of the fields that determine the result (runtime-only fields and ``exclude`` left
        out; base-loading fields only where set, so runs that leave them unset keep one key)."""
        data = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in _RUNTIME_FIELDS | exclude
            and not (f.name in _LOAD_FIELDS and getattr(self, f.name) is None)
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
