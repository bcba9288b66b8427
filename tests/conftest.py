from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mavis_lc.settings import get_settings
from tests.tiny import build_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` on machines without a CUDA GPU (checked once, only if any is collected)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a ChatML tokenizer, saved once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def _test_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for the session whose ``base`` (converted base models) is the user's, so the
    packaged model converts once per machine, while rollouts the tests cache stay in the session."""
    shared = get_settings().resolved_cache_dir() / "base"
    shared.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("mavis-cache")
    (cache / "base").symlink_to(shared, target_is_directory=True)
    return cache


@pytest.fixture(autouse=True)
def mavis_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _test_cache: Path) -> Iterator[Path]:
    """Every test gets its own MAVIS_HOME (registry, artifacts); the base-model cache stays shared."""
    home = tmp_path / "mavis-home"
    monkeypatch.setenv("MAVIS_HOME", str(home))
    monkeypatch.setenv("MAVIS_CACHE_DIR", str(_test_cache))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
