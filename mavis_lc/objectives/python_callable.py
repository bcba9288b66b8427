"""Any Python function as a reward: ``CallableObjective("package.module:function")``.

The function takes ``(prompts, responses)``, two equal-length sequences of strings, and
returns one float per pair (a list, tuple, 1-D numpy array or tensor), higher is better.
"""

from __future__ import annotations

import importlib
import re

from mavis_lc.errors import ConfigurationError
from mavis_lc.objectives.base import Objective, RewardFunction

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
CALLABLE_SPEC = re.compile(rf"^(?P<module>{_DOTTED}):(?P<attribute>{_DOTTED})$")
"""``package.module:function`` (the attribute may be dotted, e.g. ``module:Class.method``)."""


def load_callable(spec: str) -> RewardFunction:
    """Import ``package.module:function`` and return the callable.

    Raises:
        ConfigurationError: the spec is malformed, the module cannot be imported (the import
            error is chained), the attribute is missing, or it is not callable.
    """
    match = CALLABLE_SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ConfigurationError(f"expected a callable as 'package.module:function', got {spec!r}")
    module_name, attribute = match["module"], match["attribute"]
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None and (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigurationError(f"no module named {missing!r} (from reward function {spec!r})") from exc
        raise ConfigurationError(f"module {module_name!r} of reward function {spec!r} failed to import: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(f"{getattr(target, '__name__', target)!r} has no attribute {part!r} ({spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigurationError(f"{spec!r} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[return-value]


class CallableObjective(Objective):
    """An objective whose reward function is imported from ``package.module:function``.

    Args:
        spec: ``package.module:function``.
        name: objective name; default the function's name.
        description: default the first line of the function's docstring.
        reward_range: ``(low, high)`` if the function's scores are bounded; checked on every score.
        prefix_scoring: the function's score of a partial response is meaningful, so training
            labels every candidate token with it (`mavis_lc.objectives.Objective`); default False.

    Raises:
        ConfigurationError: see `load_callable`.
    """

    def __init__(
        self,
        spec: str,
        *,
        name: str | None = None,
        description: str | None = None,
        reward_range: tuple[float, float] | None = None,
        prefix_scoring: bool = False,
    ) -> None:
        reward_fn = load_callable(spec)
        self.spec = spec.strip()
        doc = (getattr(reward_fn, "__doc__", None) or "").strip()
        default_name = self.spec.rpartition(":")[2].rpartition(".")[2]
        super().__init__(
            name if name is not None else default_name,
            reward_fn,
            description=description if description is not None else (doc.splitlines()[0] if doc else self.spec),
            reward_range=reward_range,
            prefix_scoring=prefix_scoring,
        )
