"""Every error mavis-lc raises on purpose.

    MavisError                      catch this to handle anything below
    ├── ConfigurationError          a setting or an argument has a value that is not allowed
    │   ├── InvalidWeightError      a weight is negative, NaN, infinite, or not a number
    │   ├── UnknownObjectiveError   a weight or head names an objective that is not loaded
    │   ├── DecodingParameterError  top_k, temperature, max_tokens, beta... out of range
    │   └── SpecError               a head spec ("objective@alias") cannot be parsed
    ├── ModelLoadError              a base model or value head cannot be loaded
    │   └── IncompatibleHeadError   a head was trained against another tokenizer / base
    ├── RegistryError               the registry refused a request
    │   ├── NotFoundError           no such objective, version, alias, preset or job
    │   └── ArtifactError           an artifact is missing, tampered with, or outside the store
    ├── RewardError                 an objective's reward function failed or returned bad scores
    ├── TrainingError               a training run failed (not an infrastructure fault)
    │   └── TrainingCancelled       a training run stopped because cancellation was requested
    └── JobError                    a training job cannot be submitted, claimed or changed

Catch `ConfigurationError` around user input, `RegistryError` around registry look-ups,
and `TrainingError` around `train_objective`. Errors carry the bad value and the allowed
ones in their message, so they can be shown to a user as they are.
"""

from __future__ import annotations

from collections.abc import Iterable


class MavisError(Exception):
    """Base class of every error mavis-lc raises on purpose."""


class ConfigurationError(MavisError, ValueError):
    """A setting or argument has a value that is not allowed."""


class InvalidWeightError(ConfigurationError):
    """An objective weight is negative, NaN, infinite, or not a number."""


class MissingExtraError(ConfigurationError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it
    (``pip install 'mavis-lc[<extra>]'``, see `mavis_lc.extras`)."""


class UnknownObjectiveError(ConfigurationError, KeyError):
    """An objective name is not among the loaded or registered ones."""

    def __init__(self, name: str, allowed: Iterable[str], what: str = "objective") -> None:
        self.name = name
        self.allowed = sorted(allowed)
        super().__init__(f"unknown {what} {name!r}; allowed: {', '.join(self.allowed) or '(none)'}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class DecodingParameterError(ConfigurationError):
    """A decoding parameter (top_k, temperature, beta, max_tokens, ...) is out of range."""


class EngineBusyError(MavisError):
    """An engine's request queue is full (``MAVIS_MAX_QUEUE``); retry later."""


class SpecError(ConfigurationError):
    """A value-head spec such as ``positivity@production`` cannot be parsed."""


class ModelLoadError(MavisError):
    """A base model or a value head cannot be loaded."""


class IncompatibleHeadError(ModelLoadError):
    """A value head was trained against another tokenizer or base model."""


class RegistryError(MavisError):
    """The registry refused a request."""


class NotFoundError(RegistryError, LookupError):
    """No such objective, version, alias, preset or job."""


class ArtifactError(RegistryError):
    """An artifact is missing, does not match its sha256, or lies outside the store."""


class RewardError(MavisError):
    """An objective's reward function raised, or returned NaN or the wrong number of scores."""


class TrainingError(MavisError):
    """A training run failed for a reason that retrying will not fix."""


class TrainingCancelled(TrainingError):
    """A training run stopped because cancellation was requested."""


class JobError(MavisError):
    """A training job cannot be submitted, claimed or changed."""
