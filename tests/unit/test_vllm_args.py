"""The vLLM plugin's per-request arguments (no vLLM needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mavis_lc.errors import InvalidWeightError
from mavis_lc.vllm import MavisArgumentError, Steering, parse_steering, vllm_xargs

SERVED = ["positivity", "relevance"]


def test_a_request_without_mavis_keys_is_not_steered() -> None:
    assert parse_steering(None, SERVED) is None
    assert parse_steering({"other": 1}, SERVED) is None


@pytest.mark.parametrize(
    "weights",
    ["positivity=1,relevance=0.5", ["positivity=1", "relevance=0.5"], '{"positivity": 1, "relevance": 0.5}'],
)
def test_the_weight_forms_agree(weights: object) -> None:
    steering = parse_steering({"mavis_weights": weights, "mavis_beta": 4, "mavis_top_k": 10}, SERVED)
    assert steering == Steering(weights={"positivity": 1.0, "relevance": 0.5}, beta=4.0, top_k=10)


def test_defaults_are_the_decoders() -> None:
    assert parse_steering({"mavis_weights": "positivity=1"}, SERVED) == Steering({"positivity": 1.0}, 1.0, 20)


@pytest.mark.parametrize(
    ("xargs", "message"),
    [
        (
            {"mavis_weights": "helpfulness=1"},
            "unknown objective 'helpfulness'; this server steers ['positivity', 'relevance']",
        ),
        ({"mavis_weights": "positivity=-1"}, "weight for 'positivity' must be finite and >= 0, got '-1'"),
        ({"mavis_weights": "positivity=nan"}, "must be finite and >= 0"),
        ({"mavis_weights": "positivity=lots"}, "weight for 'positivity' must be a number, got 'lots'"),
        ({"mavis_weights": "positivity"}, "entry 'positivity' is not 'objective=weight'"),
        ({"mavis_weights": "{not json"}, "is not valid JSON"),
        ({"mavis_weights": 3}, "must be 'objective=weight,...'"),
        ({"mavis_beta": -1}, "mavis_beta must be finite and >= 0, got -1"),
        ({"mavis_top_k": 2.5}, "mavis_top_k must be an integer in [1, 1024], got 2.5"),
        ({"mavis_top_k": 5000}, "got 5000"),
        ({"mavis_wieghts": "positivity=1"}, "unknown MAVIS argument(s) ['mavis_wieghts']"),
    ],
)
def test_bad_arguments_are_named(xargs: dict[str, object], message: str) -> None:
    with pytest.raises(MavisArgumentError) as caught:
        parse_steering(xargs, SERVED)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)  # what vLLM's validation answers with HTTP 400


def test_the_client_helper_builds_flat_xargs_the_server_accepts() -> None:
    xargs = vllm_xargs({"positivity": 1.0, "relevance": 0.25}, beta=4, top_k=10)
    assert xargs == {"mavis_weights": "positivity=1.0,relevance=0.25", "mavis_beta": 4.0, "mavis_top_k": 10}
    assert parse_steering(xargs, SERVED) == Steering({"positivity": 1.0, "relevance": 0.25}, 4.0, 10)
    with pytest.raises(InvalidWeightError):
        vllm_xargs({"positivity": -1.0})
    with pytest.raises(MavisArgumentError, match="mavis_top_k"):
        vllm_xargs({"positivity": 1.0}, top_k=0)


def test_the_client_helper_reads_a_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    import mavis_lc.registry
    from mavis_lc.registry.records import PresetInfo

    class Presets:  # the registry's preset lookup, without heads registered for it
        def __init__(self, database_url: str | None = None) -> None:
            self.closed = False

        def get_preset(self, name: str) -> PresetInfo:
            assert name == "cheerful"
            return PresetInfo(name, {"positivity": 1.0, "relevance": 0.5}, (), datetime.now(UTC))

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(mavis_lc.registry, "Registry", Presets)
    assert vllm_xargs(preset="cheerful", beta=2.0) == {
        "mavis_weights": "positivity=1.0,relevance=0.5",
        "mavis_beta": 2.0,
    }
    assert vllm_xargs({"relevance": 0.0}, preset="cheerful")["mavis_weights"] == "positivity=1.0,relevance=0.0"


def test_langchain_clients_carry_the_arguments_per_call() -> None:
    """``.bind`` and a configurable ``extra_body`` both put the xargs into the request body."""
    from langchain_core.runnables import ConfigurableField
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url="http://127.0.0.1:9/v1", api_key="unused", model="smollm2")
    steer = {"vllm_xargs": vllm_xargs({"positivity": 1.0}, beta=4.0)}
    configurable = llm.configurable_fields(extra_body=ConfigurableField(id="steering"))
    chosen, _ = configurable._prepare(configurable.with_config(configurable={"steering": steer}).config)
    assert isinstance(chosen, ChatOpenAI)
    assert chosen._get_request_payload([("human", "hi")])["extra_body"] == steer
    bound = llm.bind(extra_body=steer)
    assert bound.kwargs["extra_body"] == steer
    assert llm._get_request_payload([("human", "hi")], **bound.kwargs)["extra_body"] == steer
