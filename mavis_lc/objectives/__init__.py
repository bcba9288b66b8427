"""Objectives: the rewards MAVIS value models learn to predict.

An `Objective` is a name, a batched reward function ``(prompts, responses) -> scores``
(higher is better) and what the scores mean. `Objective.score` checks every score before it
reaches training. Build one with `get_objective` from a built-in name, a local reward-model
directory (``hf:<dir>``) or a Python function (``package.module:function``).
"""

from mavis_lc.objectives.base import Objective, RewardFunction, score_checked
from mavis_lc.objectives.builtin import (
    DEFAULT_REFERENCE_WORDS,
    builtin_objective_names,
    builtin_objectives,
    conciseness,
    non_profanity,
    positivity,
    readability,
)
from mavis_lc.objectives.hf_reward_model import DEFAULT_TEMPLATE, HFRewardModelObjective
from mavis_lc.objectives.python_callable import CallableObjective, load_callable
from mavis_lc.objectives.relevance import relevance
from mavis_lc.objectives.resolve import SPEC_FORMS, get_objective

__all__ = [
    "DEFAULT_REFERENCE_WORDS",
    "DEFAULT_TEMPLATE",
    "SPEC_FORMS",
    "CallableObjective",
    "HFRewardModelObjective",
    "Objective",
    "RewardFunction",
    "builtin_objective_names",
    "builtin_objectives",
    "conciseness",
    "get_objective",
    "load_callable",
    "non_profanity",
    "positivity",
    "readability",
    "relevance",
    "score_checked",
]
