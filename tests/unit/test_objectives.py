"""Objectives: the checked scoring contract, the lexical built-ins, callables, HF reward models."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mavis_lc.objectives as objectives
from mavis_lc.errors import ConfigurationError, ModelLoadError, RewardError, UnknownObjectiveError
from mavis_lc.objectives import (
    CallableObjective,
    HFRewardModelObjective,
    Objective,
    builtin_objective_names,
    builtin_objectives,
    conciseness,
    get_objective,
    load_callable,
    non_profanity,
    positivity,
    readability,
    score_checked,
)
from mavis_lc.objectives.builtin import CONCISENESS_VERSION, count_words, stale_definition

# --------------------------------------------------------------------------- public surface


def test_all_is_the_public_api() -> None:
    assert set(objectives.__all__) == {
        "DEFAULT_REFERENCE_WORDS",
        "DEFAULT_TEMPLATE",
        "SPEC_FORMS",
        "CallableObjective",
        "HFRewardModelObjective",
        "Objective",
        "RewardFunction",
        "builtin_objective_names",
        "builtin_objectives",
        "conciseness",
        "get_objective",
        "load_callable",
        "non_profanity",
        "positivity",
        "readability",
        "relevance",
        "score_checked",
    }
    for name in objectives.__all__:
        assert hasattr(objectives, name), name


@pytest.mark.slow
def test_importing_objectives_loads_no_reward_model() -> None:
    code = (
        "import sys, mavis_lc.objectives as o; o.builtin_objectives(); "
        "print(sorted(m for m in ('sentence_transformers', 'profanity_check', 'vaderSentiment', 'textstat') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_builtins_declare_name_description_and_range() -> None:
    builtins = builtin_objectives()
    assert list(builtins) == builtin_objective_names()
    assert builtin_objective_names() == ["positivity", "readability", "non_profanity", "conciseness", "relevance"]
    for name, objective in builtins.items():
        assert objective.name == name
        assert objective.description
        assert objective.reward_range is not None


# --------------------------------------------------------------------------- checked scoring


def _objective(reward_fn: Any, reward_range: tuple[float, float] | None = None) -> Objective:
    return Objective("probe", reward_fn, description="test reward", reward_range=reward_range)


def test_score_returns_python_floats_in_order() -> None:
    objective = _objective(lambda prompts, responses: [len(r) for r in responses])
    scores = objective.score(["p", "q", "r"], ["a", "bbb", ""])
    assert scores == [1.0, 3.0, 0.0]
    assert all(type(s) is float for s in scores)


@pytest.mark.parametrize(
    "returned",
    [np.array([0.25, -1.5]), torch.tensor([0.25, -1.5]), (0.25, -1.5), [np.float32(0.25), -1.5]],
    ids=["numpy", "tensor", "tuple", "numpy-scalars"],
)
def test_score_accepts_arrays_and_tensors(returned: Any) -> None:
    assert score_checked(_objective(lambda p, r: returned), ["a", "b"], ["x", "y"]) == [0.25, -1.5]


def test_score_of_empty_batch_does_not_call_the_reward_function() -> None:
    def never(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        raise AssertionError("called")

    assert _objective(never).score([], []) == []


def test_raising_reward_function_is_a_reward_error_with_the_cause_chained() -> None:
    cause = ZeroDivisionError("division by zero")

    def broken(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        raise cause

    with pytest.raises(RewardError, match=r"objective 'probe': reward function raised ZeroDivisionError") as info:
        _objective(broken).score(["p"], ["r"])
    assert info.value.__cause__ is cause


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([0.5, math.nan], r"score 1 is nan"),
        ([math.inf, 0.5], r"score 0 is inf"),
        ([-math.inf, 0.5], r"score 0 is -inf"),
        ([0.5], r"returned 1 scores for 2 responses"),
        ([0.5, 0.5, 0.5], r"returned 3 scores for 2 responses"),
        ([0.5, "0.7"], r"score 1 is not a real number: '0.7'"),
        ([None, 0.5], r"score 0 is not a real number: None"),
        ([True, 0.5], r"score 0 is not a real number: True"),
        ([[0.5], [0.5]], r"score 0 is not a real number"),
        (0.5, r"must return a sequence of 2 numbers, got float"),
        ("0.5", r"must return a sequence of 2 numbers, got str"),
        (None, r"must return a sequence of 2 numbers, got NoneType"),
        (np.array([0.5, np.nan]), r"score 1 is nan"),
    ],
)
def test_bad_scores_are_reward_errors_naming_the_objective(returned: Any, message: str) -> None:
    with pytest.raises(RewardError, match=r"objective 'probe'") as info:
        _objective(lambda p, r: returned).score(["p", "q"], ["r", "s"])
    assert info.match(message)


def test_scores_outside_the_declared_range_are_reward_errors() -> None:
    objective = _objective(lambda p, r: [0.5, 1.5], reward_range=(0.0, 1.0))
    with pytest.raises(RewardError, match=r"score 1 is 1.5, outside the declared range \[0.0, 1.0\]"):
        objective.score(["p", "q"], ["r", "s"])


def test_float_rounding_past_the_range_is_clipped_not_rejected() -> None:
    objective = _objective(lambda p, r: [1.0000001, -1.0000001], reward_range=(-1.0, 1.0))
    assert objective.score(["p", "q"], ["r", "s"]) == [1.0, -1.0]


def test_mismatched_or_non_string_inputs_are_configuration_errors() -> None:
    objective = _objective(lambda p, r: [0.0] * len(r))
    with pytest.raises(ConfigurationError, match=r"2 prompts but 1 responses"):
        objective.score(["p", "q"], ["r"])
    with pytest.raises(ConfigurationError, match=r"responses\[1\] must be a string, got int"):
        objective.score(["p", "q"], ["r", 3])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match=r"not a string"):
        objective.score("pq", "rs")


@pytest.mark.parametrize("reward_range", [(1.0, 0.0), (0.0, math.inf), (math.nan, 1.0)])
def test_objective_rejects_a_malformed_range(reward_range: tuple[float, float]) -> None:
    with pytest.raises(ConfigurationError, match="reward_range"):
        _objective(lambda p, r: [], reward_range=reward_range)


def test_objective_rejects_an_empty_name_and_a_non_callable() -> None:
    with pytest.raises(ConfigurationError, match="name"):
        Objective(" ", lambda p, r: [])
    with pytest.raises(ConfigurationError, match="not callable"):
        Objective("x", 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- lexical built-ins


def test_positivity_orders_sentiment() -> None:
    loving, neutral, hateful = positivity().score(["", "", ""], ["I love this, wonderful!", "", "awful, I hate it"])
    assert loving > 0.5 > 0.0 == neutral > -0.5 > hateful


def test_positivity_scores_the_response_not_the_prompt() -> None:
    same = positivity().score(["I hate everything awful", "What a wonderful day"], ["The sky is blue."] * 2)
    assert same[0] == same[1] == 0.0


def test_readability_prefers_plain_sentences_and_stays_in_range() -> None:
    simple, convoluted, empty, one_word = readability().score(
        [""] * 4,
        [
            "The cat sat on the mat. It was warm.",
            "Notwithstanding the aforementioned considerations, institutional heterogeneity "
            "necessitates comprehensive multidimensional reconceptualization.",
            "   ",
            "Yes",
        ],
    )
    assert simple > 0.9
    assert convoluted == 0.0  # Flesch reading ease is about -170 here, clipped to 0
    assert empty == 0.0
    assert one_word == 1.0  # Flesch reading ease of one short word is 121, clipped to 100


def test_non_profanity_orders_offensive_text_below_clean_text() -> None:
    clean, profane = non_profanity().score(["", ""], ["Have a lovely day, friend.", "fuck you, you piece of shit"])
    assert clean > 0.8
    assert profane < 0.2


def test_conciseness_exact_values_and_monotonic_in_words() -> None:
    objective = conciseness(reference_words=10)
    responses = ["", "one", " ".join(["w"] * 10), " ".join(["w"] * 30)]
    assert objective.score([""] * 4, responses) == pytest.approx([1.0, 1 / 1.1, 0.5, 0.25])
    default = conciseness()
    lengths = [0, 1, 5, 20, 50, 200]
    scores = default.score([""] * len(lengths), [" ".join(["word"] * n) for n in lengths])
    assert scores[4] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(scores))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Hello, world!", 2),
        ("I'm well-known here.", 3),  # inner apostrophes and hyphens stay in their word
        ("In 2023 it cost 1,000 euros.", 8),  # a year is two words, 1,000 two
        ("I'm on-tap 1111111111111111111111111111111111111111", 22),  # 40 digits are 20 words
        ("internationalization", 2),  # 20 letters: one word per 12
        ("wow!!!!!!!!", 5),  # 8 symbols: 4 words; up to 3 are free
        ("e.g. this", 3),
        ("", 0),
    ],
)
def test_conciseness_counts_no_run_of_characters_as_one_cheap_word(text: str, words: int) -> None:
    assert count_words(text) == words
    assert conciseness(reference_words=10).score([""], [text]) == pytest.approx([1 / (1 + words / 10)])


def test_conciseness_ranks_a_digit_run_below_a_short_answer() -> None:
    short, digits = conciseness().score(["", ""], ["It is sunny and warm today.", "Sunny " + "1" * 48])
    assert short > digits
    assert conciseness().version == CONCISENESS_VERSION == 2 and positivity().version == 1


def test_a_head_trained_on_an_older_reward_definition_is_told_apart() -> None:
    assert stale_definition("conciseness", {"objective_version": 2}) is None
    assert stale_definition("positivity", {}) is None  # positivity has one definition
    note = stale_definition("conciseness", {})  # recorded before versions: definition 1
    assert note is not None and "definition v1" in note and "current definition is v2" in note
    assert stale_definition("my_reward", {}) is None  # not a built-in
    with pytest.raises(ConfigurationError, match="version of objective 'x' must be an integer >= 1, got 0"):
        Objective("x", lambda p, r: [0.0] * len(r), version=0)


@pytest.mark.parametrize("bad", [0, -3, math.inf, True, "10"])
def test_conciseness_rejects_a_bad_reference(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="reference_words"):
        conciseness(reference_words=bad)


# --------------------------------------------------------------------------- resolver


def test_get_objective_builds_builtins_with_options() -> None:
    objective = get_objective("conciseness", reference_words=2)
    assert objective.name == "conciseness"
    assert objective.score(["p"], ["a b"]) == [0.5]
    with pytest.raises(ConfigurationError, match=r"does not accept options \['temperature'\]"):
        get_objective("positivity", temperature=1.0)


def test_unknown_spec_lists_builtins_and_accepted_forms() -> None:
    with pytest.raises(UnknownObjectiveError) as info:
        get_objective("helpfulness")
    message = str(info.value)
    assert "'helpfulness'" in message
    for allowed in [*builtin_objective_names(), "hf:<model dir>", "package.module:function"]:
        assert allowed in message


# --------------------------------------------------------------------------- callables

REWARDS_MODULE = '''
import itertools
import math

def length_reward(prompts, responses):
    """Longer responses score higher."""
    return [float(len(r)) for r in responses]

def raises(prompts, responses):
    raise RuntimeError("boom")

def returns_nan(prompts, responses):
    return [math.nan for _ in responses]

class Scorer:
    @staticmethod
    def words(prompts, responses):
        return [len(r.split()) for r in responses]

not_callable = 3
'''


@pytest.fixture
def rewards_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "objective_fixture_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rewards.py").write_text(textwrap.dedent(REWARDS_MODULE))
    (package / "broken.py").write_text("import a_module_that_does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("objective_fixture_pkg")]:
        monkeypatch.delitem(sys.modules, name)
    return "objective_fixture_pkg.rewards"


def test_callable_objective_imports_and_scores(rewards_module: str) -> None:
    objective = CallableObjective(f"{rewards_module}:length_reward")
    assert objective.name == "length_reward"
    assert objective.description == "Longer responses score higher."
    assert objective.score(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    nested = get_objective(f"{rewards_module}:Scorer.words", name="words", reward_range=(0, 100))
    assert isinstance(nested, CallableObjective)
    assert (nested.name, nested.reward_range) == ("words", (0.0, 100.0))
    assert nested.score(["p"], ["one two three"]) == [3.0]


def test_callable_failures_surface_as_reward_errors(rewards_module: str) -> None:
    with pytest.raises(RewardError, match=r"objective 'raises': reward function raised RuntimeError: boom"):
        CallableObjective(f"{rewards_module}:raises").score(["p"], ["r"])
    with pytest.raises(RewardError, match=r"objective 'returns_nan': score 0 is nan"):
        CallableObjective(f"{rewards_module}:returns_nan").score(["p"], ["r"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("objective_fixture_pkg.missing:f", r"no module named 'objective_fixture_pkg.missing'"),
        ("no_such_top_level_package_xyz:f", r"no module named 'no_such_top_level_package_xyz'"),
        ("objective_fixture_pkg.broken:f", r"module 'objective_fixture_pkg.broken' .* failed to import"),
        ("objective_fixture_pkg.rewards:absent", r"has no attribute 'absent'"),
        ("objective_fixture_pkg.rewards:Scorer.absent", r"has no attribute 'absent'"),
        ("objective_fixture_pkg.rewards:not_callable", r"is a int, not a callable"),
        ("objective_fixture_pkg.rewards", r"expected a callable as 'package.module:function'"),
        ("a:b:c", r"expected a callable"),
    ],
)
def test_load_callable_explains_what_is_wrong(rewards_module: str, spec: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_callable(spec)


def test_broken_module_chains_its_import_error(rewards_module: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CallableObjective("objective_fixture_pkg.broken:f")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


# --------------------------------------------------------------------------- HF reward models

SENTENCES = [
    "how do I bake bread",
    "mix flour and water then bake it",
    "I hate you and this is awful",
    "the market fell today",
    "hello there friend",
    "< user > < assistant >",
]
PROMPTS = ["how do I bake bread", "hello there", "the market"]
RESPONSES = ["mix flour and water then bake it", "hello friend", "I hate you and this is awful today"]


def _word_level_tokenizer(bert_style: bool) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert_style else ["<unk>", "</s>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token=specials[0] if not bert_style else "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    if bert_style:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
        )
    # No pad token: the objective must pad with eos and tell the model so.
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")
    fast.chat_template = "{% for message in messages %}< {{ message['role'] }} > {{ message['content'] }} {% endfor %}"
    return fast


@pytest.fixture(scope="module")
def bert_reward_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """A 3-label random BERT classifier (labels neg / neutral / pos) and its word-level tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("bert-reward")
    tokenizer = _word_level_tokenizer(bert_style=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
        id2label={0: "neg", 1: "neutral", 2: "pos"},
        label2id={"neg": 0, "neutral": 1, "pos": 2},
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, tokenizer


@pytest.fixture(scope="module")
def llama_reward_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """A single-logit random Llama reward model whose tokenizer has a chat template and no pad token."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    directory = tmp_path_factory.mktemp("llama-reward")
    tokenizer = _word_level_tokenizer(bert_style=False)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, tokenizer


def _direct_logits(model: Any, tokenizer: Any, texts: list[Any], **encode: Any) -> torch.Tensor:
    """Logits of each input run alone (batch of one, no padding), stacked: (N, num_labels)."""
    rows = []
    with torch.inference_mode():
        for text in texts:
            args = text if isinstance(text, tuple) else (text,)
            batch = tokenizer(*args, return_tensors="pt", **encode)
            rows.append(model(**batch).logits[0])
    return torch.stack(rows)


def test_hf_reward_is_the_chosen_label_logit(bert_reward_dir: tuple[Path, Any, Any]) -> None:
    directory, model, tokenizer = bert_reward_dir
    texts = [f"{p}\n\n{r}" for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    expected = _direct_logits(model, tokenizer, texts)  # (3, 3)
    by_label = HFRewardModelObjective(directory, label="pos", batch_size=2)
    assert by_label.name == directory.name
    assert by_label.reward_range is None
    assert by_label.score(PROMPTS, RESPONSES) == pytest.approx(expected[:, 2].tolist(), abs=1e-5)
    by_index = get_objective(f"hf:{directory}", logit_index=0, name="helpful")
    assert isinstance(by_index, HFRewardModelObjective)
    assert by_index.name == "helpful"
    assert by_index.score(PROMPTS, RESPONSES) == pytest.approx(expected[:, 0].tolist(), abs=1e-5)
    assert not torch.allclose(expected[:, 0], expected[:, 2])


def test_hf_reward_templates_and_pairs(bert_reward_dir: tuple[Path, Any, Any]) -> None:
    directory, model, tokenizer = bert_reward_dir
    templated = get_objective(str(directory), label="neutral", template="Q: {prompt} A: {response}")
    expected = _direct_logits(model, tokenizer, [f"Q: {p} A: {r}" for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    assert templated.score(PROMPTS, RESPONSES) == pytest.approx(expected[:, 1].tolist(), abs=1e-5)
    paired = HFRewardModelObjective(directory, label="neutral", template="pair", batch_size=3)
    expected_pairs = _direct_logits(model, tokenizer, list(zip(PROMPTS, RESPONSES, strict=True)))
    assert paired.score(PROMPTS, RESPONSES) == pytest.approx(expected_pairs[:, 1].tolist(), abs=1e-5)


def test_hf_reward_truncates_the_start_by_default(bert_reward_dir: tuple[Path, Any, Any]) -> None:
    directory, model, tokenizer = bert_reward_dir
    objective = HFRewardModelObjective(directory, label="pos", max_length=6)
    tokenizer.truncation_side = "left"
    expected = _direct_logits(model, tokenizer, [f"{PROMPTS[0]}\n\n{RESPONSES[0]}"], truncation=True, max_length=6)
    tokenizer.truncation_side = "right"
    assert objective.score(PROMPTS[:1], RESPONSES[:1]) == pytest.approx([float(expected[0, 2])], abs=1e-5)


def test_hf_reward_uses_the_chat_template_and_pads_with_eos(llama_reward_dir: tuple[Path, Any, Any]) -> None:
    directory, model, tokenizer = llama_reward_dir
    objective = HFRewardModelObjective(directory, batch_size=3)  # one logit: no label needed
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    assert texts[0] == f"< user > {PROMPTS[0]} < assistant > {RESPONSES[0]} "
    expected = _direct_logits(model, tokenizer, texts, add_special_tokens=False)[:, 0]
    # Lengths differ, so the batch is padded; unpadded single runs must give the same logits.
    assert len({len(t.split()) for t in texts}) == 3
    assert objective.score(PROMPTS, RESPONSES) == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"has 3 logits \(0='neg', 1='neutral', 2='pos'\); pass label= or logit_index="),
        ({"label": "positive"}, r"no label 'positive'; labels: 0='neg', 1='neutral', 2='pos'"),
        ({"logit_index": 3}, r"logit_index must be in \[0, 3\), got 3"),
        ({"label": "pos", "logit_index": 2}, r"not both"),
        ({"label": "pos", "template": "{prompt} only"}, r"format string using \{response\}"),
        ({"label": "pos", "template": "{response} {other}"}, r"format string using \{response\}"),
        ({"label": "pos", "batch_size": 0}, r"batch_size must be a positive integer"),
    ],
)
def test_hf_reward_rejects_bad_options_at_construction(
    bert_reward_dir: tuple[Path, Any, Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        HFRewardModelObjective(bert_reward_dir[0], **options)


def test_hf_reward_model_load_failures(tmp_path: Path, bert_reward_dir: tuple[Path, Any, Any]) -> None:
    with pytest.raises(ConfigurationError, match="not a model directory"):
        HFRewardModelObjective(tmp_path / "nowhere")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((bert_reward_dir[0] / "config.json").read_text())
    objective = HFRewardModelObjective(config_only, label="pos")
    with pytest.raises(ModelLoadError, match="cannot load the reward model"):
        objective.load()
    with pytest.raises(RewardError, match=r"reward function raised ModelLoadError") as info:
        objective.score(["p"], ["r"])
    assert isinstance(info.value.__cause__, ModelLoadError)
    with pytest.raises(ModelLoadError, match="has no chat template"):
        HFRewardModelObjective(bert_reward_dir[0], label="pos", template="chat").load()


def test_hf_reward_device_and_dtype_follow_the_settings(
    bert_reward_dir: tuple[Path, Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mavis_lc.settings import get_settings

    directory, model, tokenizer = bert_reward_dir
    texts = [f"{p}\n\n{r}" for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    expected = _direct_logits(model, tokenizer, texts)[:, 2]
    monkeypatch.setenv("MAVIS_DTYPE", "bfloat16")
    get_settings.cache_clear()
    try:
        low = HFRewardModelObjective(directory, label="pos")
        assert (low.torch_device.type, low.torch_dtype) == ("cpu", torch.bfloat16)
        scores = low.score(PROMPTS, RESPONSES)
        assert next(low.load()._model.parameters()).dtype == torch.bfloat16  # type: ignore[union-attr]
        assert all(isinstance(s, float) for s in scores)
        assert scores == pytest.approx(expected.tolist(), abs=0.1)  # bf16 resolution
        assert scores != pytest.approx(expected.tolist(), abs=1e-6)  # and really bf16
    finally:
        get_settings.cache_clear()
    assert HFRewardModelObjective(directory, label="pos", dtype="float32").torch_dtype == torch.float32


def test_hf_reward_hub_id_without_a_hub_says_so() -> None:
    # No hub is reachable here (and this id exists on none): the error names the id and the way out.
    with pytest.raises(ConfigurationError, match=r"(?s)cannot fetch the reward model 'org/reward-x'.*local directory"):
        get_objective("hf:org/reward-x", label="pos")
    with pytest.raises(ConfigurationError, match=r"not a model directory .* and not a hub id"):
        get_objective("hf:./no/such/dir/here")
