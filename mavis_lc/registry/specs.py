"""Head specs: the text a user writes to pick a value head.

    positivity              the newest ready version
    positivity@latest       the same, said explicitly
    positivity@3            version 3
    positivity@production   the version the alias ``production`` points to

Objective and alias names match ``[a-z0-9][a-z0-9_.-]{0,63}``; input is lower-cased first.
An alias is never all digits (that would read as a version) and never ``latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mavis_lc.errors import SpecError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
"""What an objective, alias or preset name looks like (after lower-casing)."""

MAX_VERSION = 2**31 - 1
"""Largest version number a spec may name (the database column is a 32-bit integer)."""

LATEST = "latest"

ACCEPTED_FORMS = "OBJECTIVE, OBJECTIVE@latest, OBJECTIVE@VERSION (e.g. positivity@3) or OBJECTIVE@ALIAS"

Selector = int | str | None
"""``None`` (newest ready), a version number, ``"latest"``, or an alias name."""


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head spec. ``str(spec)`` gives its canonical text."""

    objective: str
    selector: Selector = None

    def __str__(self) -> str:
        return self.objective if self.selector is None else f"{self.objective}@{self.selector}"


def _bad(text: object, why: str) -> SpecError:
    return SpecError(f"invalid head spec {text!r}: {why}; accepted forms: {ACCEPTED_FORMS}")


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` lower-cased if it is a valid objective / alias / preset name.

    Raises:
        SpecError: ``name`` is not a string or does not match ``NAME_PATTERN``.
    """
    if not isinstance(name, str):
        raise SpecError(f"{what} must be a string, got {type(name).__name__}")
    normalized = name.strip().lower()
    if not NAME_PATTERN.fullmatch(normalized):
        raise SpecError(
            f"invalid {what} {name!r}: use 1-64 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return normalized


def validate_alias(name: object) -> str:
    """Return ``name`` lower-cased if it can be an alias (a valid name, not all digits, not ``latest``).

    Raises:
        SpecError: otherwise.
    """
    alias = validate_name(name, "alias")
    if alias.isdigit() or alias == LATEST:
        raise SpecError(f"invalid alias {name!r}: an alias cannot be all digits or {LATEST!r}")
    return alias


def parse_spec(text: object) -> HeadSpec:
    """Parse a head spec (see the module docstring for the accepted forms).

    Raises:
        SpecError: ``text`` is not a string or not one of the accepted forms; the message
            names the text and lists the accepted forms.
    """
    if not isinstance(text, str):
        raise _bad(text, f"expected a string, got {type(text).__name__}")
    normalized = text.strip().lower()
    objective, at, selector = normalized.partition("@")
    if not NAME_PATTERN.fullmatch(objective):
        raise _bad(text, "the objective name must be 1-64 characters from a-z, 0-9, '_', '.', '-'")
    if not at:
        return HeadSpec(objective)
    if re.fullmatch(r"[0-9]+", selector):
        digits = selector.lstrip("0")
        # Bound the length before int(): huge digit strings would exceed Python's int parsing limit.
        version = int(digits) if 0 < len(digits) <= len(str(MAX_VERSION)) else 0
        if not 1 <= version <= MAX_VERSION:
            raise _bad(text, f"a version number must be between 1 and {MAX_VERSION}")
        return HeadSpec(objective, version)
    if selector == LATEST:
        return HeadSpec(objective, LATEST)
    if not NAME_PATTERN.fullmatch(selector):
        raise _bad(text, "after '@' put a version number, 'latest' or an alias name")
    return HeadSpec(objective, selector)
