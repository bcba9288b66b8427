"""The evaluation harness on a tiny model: weight grid, hypervolume, best-of-N selection, reports, CLI."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mavis_lc import bootstrap
from mavis_lc.base_model import load_base_model
from mavis_lc.cli import app
from mavis_lc.decoding import DecodeConfig
from mavis_lc.decoding.engine import get_engine
from mavis_lc.degeneracy import is_degenerate
from mavis_lc.errors import ConfigurationError
from mavis_lc.evaluation import (
    EvalSettings,
    MethodRow,
    RewardGuidedScorer,
    calibrate_beta,
    evaluate,
    hypervolume,
    summary_markdown,
    weight_grid,
    write_report,
)
from mavis_lc.objectives import Objective
from mavis_lc.training import format_prompts
from mavis_lc.value_models import new_shared_head
from tests.tiny import save_random_heads

PROMPTS = ["Hello there", "Tell me about cats", "The quick brown fox"]


def letters(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return [sum(ch.isalpha() for ch in r) / 10 for r in responses]


def spaces(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return [r.count(" ") / 5 for r in responses]


REWARDS = {"alpha": Objective("alpha", letters), "space": Objective("space", spaces)}


@pytest.fixture(scope="module")
def head_paths(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return save_random_heads(tiny_model_dir, ["alpha", "space"], tmp_path_factory.mktemp("eval-heads"), seed=7)


def test_weight_grid_is_zero_then_the_simplex() -> None:
    grid = weight_grid(["a", "b"], 3)
    assert grid == [{"a": 0, "b": 0}, {"a": 1, "b": 0}, {"a": 0.5, "b": 0.5}, {"a": 0, "b": 1}]
    three = weight_grid(["a", "b", "c"], 3)
    assert len(three) == 1 + 6 and all(abs(sum(w.values()) - 1) < 1e-12 for w in three[1:])


def test_hypervolume_by_hand() -> None:
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (0, 0)) == pytest.approx(6.0)
    assert hypervolume([(1, 3), (2, 2), (1, 1)], (0, 0)) == pytest.approx(5.0)  # (1, 1) is dominated
    assert hypervolume([(1, 3), (-1, 5)], (0, 0)) == pytest.approx(3.0)  # below the reference: ignored
    assert hypervolume([(1, 2, 3)], (0, 0, 0)) == pytest.approx(6.0)
    assert hypervolume([(2, 1, 1), (1, 2, 1), (1, 1, 2)], (0, 0, 0)) == pytest.approx(4.0)
    assert hypervolume([], (0, 0)) == 0.0


def test_sweep_and_best_of_n(tiny_model_dir: Path, head_paths: list[str], tmp_path: Path) -> None:
    engine = get_engine(str(tiny_model_dir), head_paths)
    settings = EvalSettings(grid_steps=3, seeds=2, best_of=(2, 4), beta=3.0, max_tokens=8, batch_size=4)
    report = evaluate(engine, PROMPTS, settings, rewards=REWARDS)

    methods = [r.method for r in report.rows]
    assert methods == ["base", "mavis", "mavis", "mavis"] + ["best-of-2"] * 3 + ["best-of-4"] * 3
    base = report.rows[0]
    assert base.weights == {"alpha": 0.0, "space": 0.0} and base.gain_sd == {"alpha": 0.0, "space": 0.0}
    # The base row is plain sampling with seeds 0, 1 for every prompt, scored by the true rewards.
    chat = format_prompts(engine.base.tokenizer, PROMPTS) * 2
    plain = engine.generate(chat, None, DecodeConfig(max_new_tokens=8, min_new_tokens=1), seeds=[0, 0, 0, 1, 1, 1])
    expected = letters([], [g.text for g in plain])
    assert base.reward["alpha"] == pytest.approx(sum(expected) / len(expected))
    # Its interval is the cluster bootstrap over the 3 prompts (seeds of a prompt resampled together).
    per_row = [expected[i] for i in (0, 3, 1, 4, 2, 5)]  # the decode above ran seed 0, then seed 1
    assert tuple(base.reward_ci["alpha"]) == pytest.approx(bootstrap.mean_ci(per_row, [0, 0, 1, 1, 2, 2])[1:])
    assert base.kl_topk == pytest.approx(0.0, abs=1e-4) and base.kl > 0
    assert base.mean_tokens == pytest.approx(sum(g.completion_tokens for g in plain) / 6)
    assert base.empty_rate == pytest.approx(sum(not g.text.strip() for g in plain) / 6)
    assert base.degenerate_rate == pytest.approx(sum(is_degenerate(g.text) for g in plain) / 6)
    # A steered row 6 points above the base row is flagged in the table; one 4 points above is not.
    report.rows[1].degenerate_rate = base.degenerate_rate + 0.06
    report.rows[2].degenerate_rate = base.degenerate_rate + 0.04
    table = [line for line in summary_markdown(report).splitlines() if line.startswith("| ")]
    assert [" (!) |" in line for line in table[1:4]] == [False, True, False]
    assert not base.oracle and all(r.oracle for r in report.rows if r.method.startswith("best-of"))

    def row(method: str, alpha: float) -> MethodRow:
        return next(r for r in report.rows if r.method == method and r.weights["alpha"] == alpha)

    # Best-of-4 holds best-of-2's candidates: at weight 1 on one objective it cannot do worse.
    for objective, alpha in (("alpha", 1.0), ("space", 0.0)):
        assert row("best-of-4", alpha).reward[objective] >= row("best-of-2", alpha).reward[objective]
    assert row("best-of-4", 1.0).forwards_per_token == 4 and row("mavis", 1.0).forwards_per_token == 1
    assert all(r.tokens > 0 and r.seconds_per_token > 0 and r.n == 6 for r in report.rows)
    assert row("best-of-2", 1.0).kl > 0
    # Best-of-N samples plain top-k: its kl_topk is the bound on what the choice adds.
    assert row("best-of-4", 1.0).kl_topk == pytest.approx(math.log(4) - 3 / 4, abs=1e-4)

    # The reference is fixed by the base row alone: its mean minus one base SD.
    sd = statistics.stdev(expected)
    assert report.reference[0] == pytest.approx(base.reward["alpha"] - sd)
    mavis_points = [[r.reward["alpha"], r.reward["space"]] for r in report.rows if r.method in ("base", "mavis")]
    assert report.hypervolume["mavis"] == pytest.approx(hypervolume(mavis_points, report.reference))
    assert set(report.hypervolume) == set(report.hypervolume_ci) == {"mavis", "best-of-2", "best-of-4"}
    # Paired differences: the point is the difference of the rows' points.
    versus = next(c for c in report.comparisons if c.baseline == "best-of-4")
    assert versus.family == "mavis" and [c.baseline for c in report.comparisons] == ["best-of-2", "best-of-4"]
    assert versus.gain_diff["alpha"] == pytest.approx(
        row("mavis", 1.0).gain_sd["alpha"] - row("best-of-4", 1.0).gain_sd["alpha"]
    )
    assert versus.hypervolume_diff == pytest.approx(report.hypervolume["mavis"] - report.hypervolume["best-of-4"])
    low, high = versus.gain_diff_ci["alpha"]
    assert low <= high
    # Adding a method does not move the reference, so hypervolumes do not depend on what else ran.
    alone = evaluate(engine, PROMPTS, replace(settings, best_of=()), rewards=REWARDS)
    assert alone.reference == report.reference and alone.hypervolume["mavis"] == report.hypervolume["mavis"]

    paths = write_report(report, tmp_path / "out")
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(report.rows) and float(table[0]["alpha"]) == pytest.approx(base.reward["alpha"])
    assert json.loads(paths["json"].read_text())["hypervolume"] == report.hypervolume
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["markdown"].read_text()
    assert "| best-of-4 (oracle reward) |" in markdown and "Hypervolume" in markdown
    assert "mavis − best-of-4: hypervolume" in markdown
    assert paths["frontier_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Soft best-of-N frontier (4 base samples per prompt and seed" in markdown

    # The frontier of each steered setting comes from the best-of-4 candidates; a row's efficiency
    # is its weighted gain over the frontier's at its kl_topk, or NaN past the frontier's reach.
    assert [f.weights for f in report.frontiers] == [r.weights for r in report.rows if r.method == "mavis"]
    assert all(f.n_samples == 4 for f in report.frontiers)
    for r in report.rows[1:]:
        frontier = next(f for f in report.frontiers if f.weights == r.weights)
        at = frontier.gain_at(r.kl_topk)
        if math.isnan(at) or at <= 0:
            assert math.isnan(r.kl_efficiency)
        else:
            gain = sum(w * r.gain_sd[o] for o, w in r.weights.items())
            assert r.kl_efficiency == pytest.approx(gain / at)
    # Best-of-2 spends log 2 - 1/2 = 0.19 nats, within the reach of 4 samples (0.39).
    assert not math.isnan(row("best-of-2", 1.0).kl_efficiency)


def test_best_of_n_keeps_the_candidate_with_the_highest_weighted_score(
    tiny_model_dir: Path, head_paths: list[str]
) -> None:
    engine = get_engine(str(tiny_model_dir), head_paths)
    settings = EvalSettings(grid_steps=2, seeds=1, best_of=(3,), beta=1.0, max_tokens=6, batch_size=8)
    report = evaluate(engine, PROMPTS[:2], settings, rewards=REWARDS)
    # Candidates of (prompt p, seed 0) are seeds 0, 1, 2: the best by letters alone is their max.
    config = DecodeConfig(max_new_tokens=6, min_new_tokens=1, top_k=20)
    best = []
    for prompt in format_prompts(engine.base.tokenizer, PROMPTS[:2]):
        texts = [g.text for g in engine.generate([prompt] * 3, None, config, seeds=[0, 1, 2])]
        best.append(max(letters([], texts)))
    chosen = next(r for r in report.rows if r.method == "best-of-3" and r.weights["alpha"] == 1.0)
    assert chosen.reward["alpha"] == pytest.approx(sum(best) / 2)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (EvalSettings(grid_steps=1), "grid_steps must be >= 2"),
        (EvalSettings(best_of=(1, 4)), "best_of values must be >= 2"),
        (EvalSettings(seeds=0), "seeds must be >= 1"),
    ],
)
def test_bad_settings_are_typed_errors(
    tiny_model_dir: Path, head_paths: list[str], settings: EvalSettings, fragment: str
) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        evaluate(get_engine(str(tiny_model_dir), head_paths), PROMPTS, settings, rewards=REWARDS)


def test_eval_command_writes_the_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base_model(str(tiny_model_dir))
    heads = [str(new_shared_head(base, n).save(tmp_path / f"{n}.safetensors")) for n in ("positivity", "conciseness")]
    # The heads sit in a training work folder whose run trained on PROMPTS[0]: it is left out.
    (tmp_path / "run.json").write_text(json.dumps({"config": {"prompts": [PROMPTS[0]], "max_prompts": None}}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["skipped", *PROMPTS, "skipped", "one more"]))
    args = ["eval", "--base-model", str(tiny_model_dir), "--head", heads[0], "--head", heads[1]]
    args += ["--prompts", str(prompts), "--skip", "1", "--n-prompts", "2", "--seeds", "1", "--grid-steps", "2"]
    args += ["--best-of", "2", "--max-tokens", "4", "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["n_prompts"] == 2 and data["excluded_prompts"] == 1
    assert "left out 1 evaluation prompts that the heads were trained on" in result.output
    assert {r["method"]: r["oracle"] for r in data["rows"]} == {"base": False, "mavis": False, "best-of-2": True}
    assert [r["method"] for r in data["rows"]] == ["base", "mavis", "mavis", "best-of-2", "best-of-2"]
    assert (tmp_path / "out" / "pareto.png").is_file()

    bad = CliRunner().invoke(app, [*args[:7], "--prompts", str(prompts), "--n-prompts", "9"])
    assert bad.exit_code == 1 and "has 5 distinct prompts, fewer than --skip 0 + --n-prompts 9" in bad.output
    kept = CliRunner().invoke(app, [*args, "--no-exclude-training-prompts", "--n-prompts", "3"])
    assert kept.exit_code == 0, kept.output
    assert json.loads((tmp_path / "out" / "results.json").read_text())["excluded_prompts"] == 0


def test_variants_are_swept_under_their_names(tiny_model_dir: Path, head_paths: list[str], tmp_path: Path) -> None:
    engine = get_engine(str(tiny_model_dir), head_paths)
    base = load_base_model(str(tiny_model_dir))
    zero = [str(new_shared_head(base, n).save(tmp_path / f"{n}.safetensors")) for n in ("alpha", "space")]
    settings = EvalSettings(grid_steps=2, seeds=1, best_of=(), max_tokens=6)
    report = evaluate(
        engine, PROMPTS, settings, variants={"zero": get_engine(str(tiny_model_dir), zero)}, rewards=REWARDS
    )
    assert [r.method for r in report.rows] == ["base", "mavis", "mavis", "zero", "zero"]
    # Zero heads steer nothing: every "zero" row is the base row again.
    assert all(r.reward == report.rows[0].reward for r in report.rows if r.method == "zero")
    assert set(report.hypervolume) == {"mavis", "zero"}
    # mavis is compared with each variant, paired: the zero variant's rows are the base row.
    (versus,) = report.comparisons
    assert (versus.family, versus.baseline) == ("mavis", "zero")
    steered = next(r for r in report.rows if r.method == "mavis" and r.weights["alpha"] == 1.0)
    assert versus.tokens_diff["alpha"] == pytest.approx(steered.mean_tokens - report.rows[0].mean_tokens)
    assert versus.kl_topk_diff["alpha"] == pytest.approx(steered.kl_topk - report.rows[0].kl_topk)
    low, high = versus.tokens_diff_ci["alpha"]
    assert low <= versus.tokens_diff["alpha"] <= high or low == high
    with pytest.raises(ConfigurationError, match="variant 'other'"):
        evaluate(engine, PROMPTS, settings, variants={"other": get_engine(str(tiny_model_dir), zero[:1])})


def test_calibrated_beta_keeps_within_the_kl_budget(tiny_model_dir: Path, head_paths: list[str]) -> None:
    engine = get_engine(str(tiny_model_dir), head_paths)
    settings = EvalSettings(seeds=2, max_tokens=8)
    weights = {"alpha": 0.5, "space": 0.5}
    floor = calibrate_beta(engine, PROMPTS, weights, 1e6, settings, max_beta=16.0).trials[0][1]
    top = calibrate_beta(engine, PROMPTS, weights, 1e6, settings, max_beta=16.0)
    assert top.beta == 16.0 and top.kl > floor  # these random heads do tilt the samples
    budget = (floor + top.kl) / 2
    chosen = calibrate_beta(engine, PROMPTS, weights, budget, settings, max_beta=16.0, steps=5)
    assert 0 < chosen.beta < 16.0 and chosen.kl <= budget
    assert (chosen.beta, chosen.kl) in chosen.trials and len(chosen.trials) == 2 + 5
    # Every trial above the chosen beta went over the budget.
    assert all(kl > budget for beta, kl in chosen.trials if beta > chosen.beta)
    with pytest.raises(ConfigurationError, match="below the KL of plain top-20 sampling"):
        calibrate_beta(engine, PROMPTS, weights, floor / 2, settings)


def test_reward_guided_scorer_scores_each_candidate_text(tiny_model_dir: Path) -> None:
    base = load_base_model(str(tiny_model_dir))
    scorer = RewardGuidedScorer(base, REWARDS["alpha"], mean=1.0, std=2.0)
    scorer.prompts = ["a", "b"]
    scorer.begin(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    first = base.tokenizer("cats", add_special_tokens=False)["input_ids"]
    for token in first:
        scorer.advance(torch.tensor([token, token]))
    candidates = torch.tensor([[5, 40, 41], [60, 61, 62]])
    q = scorer.q_values(torch.zeros(2, base.hidden_size), candidates)
    for b in range(2):
        for j in range(3):
            text = base.tokenizer.decode([*first, int(candidates[b, j])], skip_special_tokens=True)
            assert q[b, j].item() == pytest.approx((letters([], [text])[0] - 1.0) / 2.0)
    assert scorer.calls == 6
    # A row that sampled EOS is finished: it is not scored again (and costs no reward call).
    scorer.advance(torch.tensor([base.eos_token_ids[0], 40]))
    q = scorer.q_values(torch.zeros(2, base.hidden_size), candidates)
    assert scorer.calls == 9 and q[0].tolist() == [0.0, 0.0, 0.0]
    text = base.tokenizer.decode([*first, 40, 60], skip_special_tokens=True)
    assert q[1, 0].item() == pytest.approx((letters([], [text])[0] - 1.0) / 2.0)
    with pytest.raises(ConfigurationError, match="set prompts for all 4 rows"):
        scorer.begin(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long))


def test_reward_guided_search_raises_its_reward(tiny_model_dir: Path, head_paths: list[str]) -> None:
    engine = get_engine(str(tiny_model_dir), head_paths)
    settings = EvalSettings(grid_steps=2, seeds=2, best_of=(), beta=4.0, max_tokens=8, reward_guided=True)
    report = evaluate(engine, PROMPTS, settings, rewards=REWARDS)
    guided = {r.weights["alpha"]: r for r in report.rows if r.method == "reward-guided"}
    assert set(guided) == {0.0, 1.0} and "reward-guided" in report.hypervolume
    assert guided[1.0].gain_sd["alpha"] > 1.0  # base SDs: letters are easy to find among 20 candidates
    assert guided[0.0].reward["space"] >= report.rows[0].reward["space"]
    # Every step scores top_k candidates per objective for each unfinished row, none after EOS.
    assert guided[1.0].reward_calls_per_token == pytest.approx(2 * 20)
    assert guided[1.0].oracle


def test_training_prompts_are_read_from_registry_versions(mavis_home: Path, tmp_path: Path) -> None:
    from mavis_lc.evaluation import training_prompts
    from mavis_lc.registry import Registry
    from tests.unit.test_registry_api import register

    source = tmp_path / "train.txt"
    source.write_text("first\nsecond\nfirst\nthird\n")
    with Registry() as registry:
        register(registry, "positivity", b"head", training_params={"prompts": str(source), "max_prompts": 2})
        register(registry, "conciseness", b"other", training_params={"prompts": ["a list", "of prompts"]})
        register(registry, "relevance", b"gone", training_params={"prompts": str(tmp_path / "missing.txt")})
    # The first two distinct prompts, as the training read them; an unreadable source adds nothing.
    assert training_prompts(["positivity@1"]) == {"first", "second"}
    assert training_prompts(["positivity@1", "conciseness", "relevance@1"]) == {
        "first",
        "second",
        "a list",
        "of prompts",
    }
