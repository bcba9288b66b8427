from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mavis_lc.settings import get_settings
from tests.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a ChatML tokenizer, saved once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def mavis_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own MAVIS_HOME (registry, artifacts); the base-model cache stays shared."""
    shared_cache = get_settings().resolved_cache_dir()
    home = tmp_path / "mavis-home"
    monkeypatch.setenv("MAVIS_HOME", str(home))
    monkeypatch.setenv("MAVIS_CACHE_DIR", str(shared_cache))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
