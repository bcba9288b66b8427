"""The per-request MAVIS arguments of the vLLM plugin: parsing, validation and the client helper.

A request steers when its ``SamplingParams.extra_args`` (the OpenAI server's ``vllm_xargs``)
carries any ``mavis_*`` key:

- ``mavis_weights``: the objectives' weights, ``"positivity=1,relevance=0.5"`` (or a list of
  ``"name=value"`` strings, or a JSON object as a string); objectives the server's heads do not
  serve are refused; an objective left out weighs 0;
- ``mavis_beta``: the tilt's strength, finite and >= 0 (default 1.0, as `DecodeConfig`);
- ``mavis_top_k``: the candidates per step, an integer in [1, 1024] (default 20).

vLLM's xargs are flat (strings, numbers, lists of them), hence the string form of the weights.
This module imports neither vLLM nor torch, so clients use `vllm_xargs` without either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WEIGHTS = "mavis_weights"
BETA = "mavis_beta"
TOP_K = "mavis_top_k"
KEYS = (WEIGHTS, BETA, TOP_K)
DEFAULT_BETA = 1.0
DEFAULT_TOP_K = 20
MAX_TOP_K = 1024


class MavisArgumentError(ValueError):
    """A request's MAVIS arguments are malformed or name what the server does not serve.

    A `ValueError`, so vLLM's request validation answers it with HTTP 400 and its message."""


@dataclass(frozen=True)
class Steering:
    """One request's resolved MAVIS arguments."""

    weights: dict[str, float]
    beta: float
    top_k: int


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MavisArgumentError(f"{key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise MavisArgumentError(f"{key} must be a number, got {value!r}") from None
    return number


def _weight_items(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MavisArgumentError(f"{WEIGHTS} is not valid JSON: {exc.msg} in {value!r}") from None
            if not isinstance(loaded, dict):
                raise MavisArgumentError(f"{WEIGHTS} as JSON must be an object of objective to weight, got {value!r}")
            return list(loaded.items())
        parts = [p for p in text.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = [str(p) for p in value]
    else:
        raise MavisArgumentError(
            f"{WEIGHTS} must be 'objective=weight,...', a list of 'objective=weight' strings or a JSON object "
            f"string, got {value!r}"
        )
    items = []
    for part in parts:
        name, sep, number = part.partition("=")
        if not sep or not name.strip():
            raise MavisArgumentError(f"{WEIGHTS} entry {part.strip()!r} is not 'objective=weight'")
        items.append((name.strip(), number.strip()))
    return items


def parse_steering(extra_args: Mapping[str, Any] | None, objectives: Iterable[str]) -> Steering | None:
    """A request's `Steering`, or None when it carries no ``mavis_*`` key (plain sampling).

    Raises:
        MavisArgumentError: an unknown ``mavis_*`` key, an objective not in ``objectives``, a
            weight that is not a finite number >= 0, a bad beta or top-k; the message names the
            bad value and what is allowed.
    """
    if not extra_args:
        return None
    mine = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith("mavis_")}
    if not mine:
        return None
    unknown = sorted(set(mine) - set(KEYS))
    if unknown:
        raise MavisArgumentError(f"unknown MAVIS argument(s) {unknown}; allowed: {', '.join(KEYS)}")
    served = sorted(objectives)
    weights: dict[str, float] = {}
    for name, value in _weight_items(mine.get(WEIGHTS, {})):
        if name not in served:
            raise MavisArgumentError(f"{WEIGHTS}: unknown objective {name!r}; this server steers {served}")
        number = _number(f"weight for {name!r}", value)
        if not math.isfinite(number) or number < 0:
            raise MavisArgumentError(f"weight for {name!r} must be finite and >= 0, got {value!r}")
        weights[name] = number
    beta = _number(BETA, mine.get(BETA, DEFAULT_BETA))
    if not math.isfinite(beta) or beta < 0:
        raise MavisArgumentError(f"{BETA} must be finite and >= 0, got {mine.get(BETA)!r}")
    raw_k = mine.get(TOP_K, DEFAULT_TOP_K)
    k = _number(TOP_K, raw_k)
    if not k.is_integer() or not 1 <= k <= MAX_TOP_K:
        raise MavisArgumentError(f"{TOP_K} must be an integer in [1, {MAX_TOP_K}], got {raw_k!r}")
    return Steering(weights=weights, beta=beta, top_k=int(k))


def vllm_xargs(
    weights: Mapping[str, float] | None = None,
    *,
    preset: str | None = None,
    beta: float | None = None,
    top_k: int | None = None,
    database_url: str | None = None,
) -> dict[str, str | int | float]:
    """The ``vllm_xargs`` of a steered request: pass them as ``extra_body={"vllm_xargs": ...}``
    (``ChatOpenAI(..., extra_body=...)``, or per call ``.bind(extra_body=...)``).

    ``preset`` reads a preset's weights from the registry (``database_url`` or the configured
    one); ``weights`` given beside it override the preset's.

    Raises:
        InvalidWeightError: a weight that is not a finite number >= 0 (checked here as the
            server would).
        MavisArgumentError: a bad beta or top-k.
    """
    from mavis_lc.weights import validate_weights

    merged: dict[str, float] = {}
    if preset is not None:
        from mavis_lc.registry import Registry

        registry = Registry(database_url)
        try:
            merged.update(registry.get_preset(preset).weights)
        finally:
            registry.close()
    merged.update(validate_weights(dict(weights or {}), list(weights or {})))
    xargs: dict[str, str | int | float] = {WEIGHTS: ",".join(f"{k}={v!r}" for k, v in merged.items())}
    if beta is not None:
        xargs[BETA] = float(beta)
    if top_k is not None:
        xargs[TOP_K] = int(top_k)
    parse_steering(xargs, merged)  # the server's own checks, here
    return xargs
