"""Per-objective value models Q_m(s, a), the interface the decoder calls, and their artifacts.

- `base`: the `ValueModel` interface, `ValueHeadConfig`, reading and checking artifacts;
- `shared_head`: the Q head on the base's final hidden state;
- `stacks`: layer taps and incremental forwards over slices of the base's layers;
- `side_branch`: trainable copies of the base's last layers fed by its hidden states;
- `separate_backbone`: a small causal LM of its own;
- `loading`: `load_value_model` for any of them.

Each module imports only the ones above it in this list.
"""

from mavis_lc.value_models.base import (
    CONFIG_KEY,
    SHARED_Q_HEAD,
    ValueHeadConfig,
    ValueModel,
    check_compatible,
    frozen,
    prompt_mean,
    prompt_positions,
    read_head_config,
)
from mavis_lc.value_models.loading import ARCHITECTURES, load_value_model
from mavis_lc.value_models.separate_backbone import (
    SEPARATE_BACKBONE,
    SeparateBackboneValueModel,
    load_separate_backbone,
    new_separate_backbone,
)
from mavis_lc.value_models.shared_head import SharedBackboneQHead, load_shared_head, new_shared_head
from mavis_lc.value_models.side_branch import SIDE_BRANCH, SideBranchValueModel, load_side_branch, new_side_branch
from mavis_lc.value_models.stacks import KVBatch, LayerTap, layer_stack_config

__all__ = [
    "ARCHITECTURES",
    "CONFIG_KEY",
    "SEPARATE_BACKBONE",
    "SHARED_Q_HEAD",
    "SIDE_BRANCH",
    "KVBatch",
    "LayerTap",
    "SeparateBackboneValueModel",
    "SharedBackboneQHead",
    "SideBranchValueModel",
    "ValueHeadConfig",
    "ValueModel",
    "check_compatible",
    "frozen",
    "layer_stack_config",
    "load_separate_backbone",
    "load_shared_head",
    "load_side_branch",
    "load_value_model",
    "new_separate_backbone",
    "new_shared_head",
    "new_side_branch",
    "prompt_mean",
    "prompt_positions",
    "read_head_config",
]
