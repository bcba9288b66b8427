"""Optional dependencies, grouped as the package's extras, and the error a missing one gives.

The core install is what a LangChain user needs: decoding, the registry on SQLite, the packaged
base model. The rest is an extra: ``worker`` (Celery, Redis, Flower), ``postgres`` (psycopg),
``objectives`` (the built-in rewards' packages), ``eval`` (plots), ``s3`` (s3fs), ``agents``
(langchain).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mavis_lc.errors import MissingExtraError

__all__ = ["MissingExtraError", "require"]


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module``, or raise `MissingExtraError` naming ``extra``.

    Raises:
        MissingExtraError: ``module`` (or something it imports) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{needed_for} needs {module.split('.')[0]!r}, which the {extra!r} extra installs: "
            f"pip install 'mavis-lc[{extra}]' ({exc})"
        ) from exc
