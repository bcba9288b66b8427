"""Cluster bootstrap over prompts: confidence intervals that hold when a prompt has several samples.

Samples of one prompt (its seeds, its candidates) are not independent: they share the prompt,
and a hard prompt is hard for every seed. A normal interval over all samples treats them as
independent and comes out too narrow. The cluster bootstrap resamples whole prompts with
replacement and recomputes the statistic on each resample; the 2.5% and 97.5% quantiles of
those replicates are the 95% interval (percentile method). Statistics of several rows resampled
with the same indices are paired, so differences between rows (a gain over the base, MAVIS
against best-of-N) get intervals of their own that account for the shared prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
"""Bootstrap replicates, unless a caller asks for another number."""


def resample_prompts(n_prompts: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n_prompts) prompt indices drawn with replacement; the same arguments give the same draw."""
    return np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))


def prompt_means(values: Sequence[float], prompt: Sequence[int], n_prompts: int) -> np.ndarray:
    """(n_prompts,) the mean of ``values`` per prompt (``prompt[i]`` is the prompt of ``values[i]``)."""
    data = np.asarray(values, dtype=np.float64)
    index = np.asarray(prompt, dtype=np.int64)
    counts = np.bincount(index, minlength=n_prompts)
    if (counts == 0).any():
        raise ValueError(f"prompts {np.nonzero(counts == 0)[0].tolist()} have no values")
    return np.bincount(index, weights=data, minlength=n_prompts) / counts


def interval(replicates: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap replicates (NaN when fewer than two prompts)."""
    if replicates.size == 0 or not np.isfinite(replicates).all():
        return math.nan, math.nan
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(low), float(high)


def mean_ci(
    values: Sequence[float], prompt: Sequence[int], *, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """The mean of per-prompt means and its 95% cluster-bootstrap interval: (mean, low, high).

    With one prompt the interval is (NaN, NaN): one prompt says nothing about the spread over prompts.
    """
    n_prompts = int(max(prompt)) + 1
    means = prompt_means(values, prompt, n_prompts)
    if n_prompts < 2:
        return float(means.mean()), math.nan, math.nan
    low, high = interval(means[resample_prompts(n_prompts, resamples, seed)].mean(axis=1))
    return float(means.mean()), low, high
