"""LangChain's standard chat-model unit tests, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from mavis_lc import ChatMavis
from tests.tiny import build_tiny_model


@pytest.fixture(scope="module")
def _tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-standard"))


class TestChatMavisUnit(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _base_model(self, _tiny_dir: Path) -> None:
        type(self).tiny_dir = str(_tiny_dir)

    @property
    def chat_model_class(self) -> type[ChatMavis]:
        return ChatMavis

    @property
    def chat_model_params(self) -> dict:
        return {"base_model": getattr(type(self), "tiny_dir", None), "top_k": 10, "seed": 0}
