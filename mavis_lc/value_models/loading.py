"""Load a value-head artifact of any kind for a base model."""

from __future__ import annotations

from pathlib import Path

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import ModelLoadError
from mavis_lc.value_models.base import SHARED_Q_HEAD, ValueModel, check_compatible, read_head_config
from mavis_lc.value_models.separate_backbone import SEPARATE_BACKBONE, load_separate_backbone
from mavis_lc.value_models.shared_head import load_shared_head
from mavis_lc.value_models.side_branch import SIDE_BRANCH, load_side_branch

ARCHITECTURES = (SHARED_Q_HEAD, SIDE_BRANCH, SEPARATE_BACKBONE)


def load_value_model(source: str | Path | bytes, base: BaseModel, *, allow_other_base: bool = False) -> ValueModel:
    """Load a value head artifact for use with ``base``.

    Raises:
        ModelLoadError: unreadable file, bad format, unknown architecture.
        IncompatibleHeadError: the head was trained against another tokenizer, or other base
            weights (unless ``allow_other_base``).
    """
    config, tensors = read_head_config(source)
    check_compatible(config, base, allow_other_base=allow_other_base)
    if config.architecture == SEPARATE_BACKBONE:
        return load_separate_backbone(config, tensors, base)
    if config.architecture == SIDE_BRANCH:
        return load_side_branch(config, tensors, base)
    if config.architecture != SHARED_Q_HEAD:
        raise ModelLoadError(
            f"value head for {config.objective!r} has architecture {config.architecture!r}; "
            f"allowed: {', '.join(ARCHITECTURES)}"
        )
    return load_shared_head(config, tensors, base)
