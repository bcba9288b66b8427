"""Turn an objective spec (what a user types) into an `Objective`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mavis_lc.errors import UnknownObjectiveError
from mavis_lc.objectives.base import Objective
from mavis_lc.objectives.builtin import builtin_objective, builtin_objective_names
from mavis_lc.objectives.hf_reward_model import HFRewardModelObjective
from mavis_lc.objectives.python_callable import CALLABLE_SPEC, CallableObjective

SPEC_FORMS = ("hf:<model dir>", "<model dir>", "package.module:function")
"""The spec forms accepted besides a built-in name."""


def get_objective(spec: str, **options: Any) -> Objective:
    """Build the objective that ``spec`` names, passing ``options`` to its constructor.

    ``spec`` is, in the order tried:
        a built-in name (``positivity``, ``readability``, ``non_profanity``, ``conciseness``,
        ``relevance``); options are that objective's keyword arguments;
        ``hf:<model dir>`` or an existing directory: a local sequence-classification reward
        model; options are those of `HFRewardModelObjective` (``label``, ``template``...);
        ``package.module:function``: a Python reward function; options are those of
        `CallableObjective` (``name``, ``reward_range``...).

    Raises:
        UnknownObjectiveError: ``spec`` is none of the above (the message lists them).
        ConfigurationError: the objective rejects an option, or a directory or callable
            cannot be used (see the constructors).
    """
    if spec in builtin_objective_names():
        return builtin_objective(spec, **options)
    if spec.startswith("hf:"):
        return HFRewardModelObjective(spec.removeprefix("hf:"), **options)
    if Path(spec).expanduser().is_dir():
        return HFRewardModelObjective(spec, **options)
    if CALLABLE_SPEC.match(spec.strip()):
        return CallableObjective(spec, **options)
    raise UnknownObjectiveError(spec, [*builtin_objective_names(), *SPEC_FORMS])
