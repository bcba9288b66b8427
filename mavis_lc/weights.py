"""Objective weights: validation, parsing, and the per-row [B, M] tensor the decoder uses.

Weights multiply each objective's Q-values as given; they are not renormalised. The paper's
convention, which the built-in presets follow, is that they sum to 1, with ``beta`` setting
the overall guidance strength. A weight of 0 (or a missing objective) switches that head off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from mavis_lc.errors import InvalidWeightError, UnknownObjectiveError

Weights = Mapping[str, float]


def validate_weights(weights: Weights, allowed: Iterable[str]) -> dict[str, float]:
    """Return ``weights`` as a plain dict of floats, or raise.

    Raises:
        UnknownObjectiveError: a key is not in ``allowed``.
        InvalidWeightError: a value is not a real number, or is negative, NaN or infinite.
    """
    allowed_set = set(allowed)
    if not isinstance(weights, Mapping):
        raise InvalidWeightError(f"weights must be a mapping of objective name to number, got {type(weights).__name__}")
    clean: dict[str, float] = {}
    for name, value in weights.items():
        if name not in allowed_set:
            raise UnknownObjectiveError(str(name), allowed_set)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidWeightError(
                f"weight for {name!r} must be a number >= 0, got {value!r} ({type(value).__name__})"
            )
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range (too long even to print)
            raise InvalidWeightError(f"weight for {name!r} is an integer too large for a float") from None
        if math.isnan(number) or math.isinf(number) or number < 0:
            raise InvalidWeightError(f"weight for {name!r} must be finite and >= 0, got {value!r}")
        clean[name] = number
    return clean


def parse_weights(text: str) -> dict[str, float]:
    """Parse ``"positivity=0.7,conciseness=0.3"`` (the CLI's form) into a dict.

    Raises:
        InvalidWeightError: the text is not a comma-separated list of ``name=number`` pairs,
            a name repeats, or a number is negative, NaN or infinite.
    """
    result: dict[str, float] = {}
    stripped = text.strip()
    if not stripped:
        return result
    for part in stripped.split(","):
        name, sep, raw = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidWeightError(f"expected name=number in weights, got {part.strip()!r} in {text!r}")
        if name in result:
            raise InvalidWeightError(f"objective {name!r} appears twice in weights {text!r}")
        try:
            number = float(raw.strip())
        except ValueError:
            raise InvalidWeightError(f"weight for {name!r} is not a number: {raw.strip()!r}") from None
        if math.isnan(number) or math.isinf(number) or number < 0:
            raise InvalidWeightError(f"weight for {name!r} must be finite and >= 0, got {raw.strip()!r}")
        result[name] = number
    return result


def weight_matrix(
    rows: Sequence[Weights], objectives: Sequence[str], *, device: torch.device | None = None
) -> torch.Tensor:
    """Stack per-row weight mappings into a ``(B, M)`` float tensor, column m = ``objectives[m]``.

    Every row is validated against ``objectives``; a missing objective weighs 0.
    """
    matrix = torch.zeros(len(rows), len(objectives), dtype=torch.float32)
    column = {name: m for m, name in enumerate(objectives)}
    for b, row in enumerate(rows):
        for name, value in validate_weights(row, objectives).items():
            matrix[b, column[name]] = value
    return matrix if device is None else matrix.to(device)
