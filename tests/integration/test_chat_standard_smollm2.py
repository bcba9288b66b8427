"""LangChain's standard chat-model integration tests, against the packaged SmolLM2."""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from mavis_lc import ChatMavis

pytestmark = pytest.mark.integration


class TestChatMavisSmolLM2(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatMavis]:
        return ChatMavis

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 24, "top_k": 20, "temperature": 0.7}
