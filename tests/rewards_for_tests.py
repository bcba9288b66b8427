"""Reward functions for the job and worker tests, referenced as ``tests.rewards_for_tests:<name>``.

Worker subprocesses import them by that name, so the tests need /work/main on PYTHONPATH.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence


def length_score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Longer responses score higher: len / 10."""
    return [len(response) / 10 for response in responses]


def slow_length_score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """``length_score``, sleeping ``MAVIS_TEST_REWARD_SLEEP_S`` (default 0.5) per call, so a job lasts long
    enough to be killed, cancelled or re-delivered mid-way."""
    time.sleep(float(os.environ.get("MAVIS_TEST_REWARD_SLEEP_S", "0.5")))
    return length_score(prompts, responses)


def nan_score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Always NaN: the reward check fails the job."""
    return [math.nan for _ in responses]
