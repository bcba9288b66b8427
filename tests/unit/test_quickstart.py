"""The quickstart job end to end on the tiny model: training, registry, presets, evaluation, plot, reuse."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from mavis_lc import quickstart
from mavis_lc.registry import Registry
from mavis_lc.settings import get_settings
from mavis_lc.training import TrainingConfig


@pytest.fixture
def tiny_plan(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> quickstart.QuickstartPlan:
    monkeypatch.setenv("MAVIS_BASE_MODEL", str(tiny_model_dir))
    get_settings.cache_clear()
    training = TrainingConfig(
        prompts=quickstart.shipped_prompts("train")[:4],
        n_iterations=2,
        k_root=2,
        k_children=2,
        n_layers=2,
        segment_min_tokens=2,
        segment_max_tokens=4,
        leaf_completion_tokens=10,
        rollout_prompts_per_batch=4,
        epochs=2,
    )
    plan = quickstart.QuickstartPlan(
        "quickstart-test", training, 4, eval_prompts=2, beta=2.0, max_tokens=10, eval_seeds=2
    )
    monkeypatch.setattr(quickstart, "make_plan", lambda fast: plan)
    return plan


def test_quickstart_trains_registers_evaluates_and_reuses(
    tiny_plan: quickstart.QuickstartPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    console = Console(record=True, width=120)
    summary = quickstart.run_quickstart(output_dir=tmp_path / "out", console=console)

    registry = Registry()
    for objective in quickstart.OBJECTIVES:
        versions = registry.list_versions(objective)
        assert [(v.version, v.iteration) for v in versions] == [(1, 0), (2, 1)]
        assert versions[1].parents == (versions[0].id,)
        assert registry.list_aliases(objective) == {"quickstart-test": 2}
    for name, weights in quickstart.PRESETS.items():
        preset = registry.get_preset(f"quickstart-test-{name}")
        assert preset.weights == weights
        assert sorted(preset.pinned_specs) == ["conciseness@2", "positivity@2"]

    assert [s["weights"] for s in summary["settings"]] == list(quickstart.SETTINGS)
    for setting in summary["settings"]:
        for objective in quickstart.OBJECTIVES:
            mean, low, high = setting[objective]
            assert -1.0 <= mean <= 1.0 and low <= mean <= high
    for setting in summary["settings"]:
        assert 0.0 <= setting["degenerate_rate"] <= 1.0 and 0.0 <= setting["empty_rate"] <= 1.0
        flag = setting["degenerate_rate"] > summary["settings"][0]["degenerate_rate"] + 0.05
        assert setting["degenerate_flagged"] == flag
    base_kl = summary["settings"][0]["kl"][0]
    assert base_kl > 0.0  # the top-k cut alone
    assert summary["settings"][0]["kl_topk"][0] == pytest.approx(0.0, abs=1e-4)  # plain top-k sampling
    printed = console.export_text()
    for objective, check in summary["checks"].items():
        # The paired gain is the difference of the two rows' means (same prompts and seeds).
        assert check["gain"] == pytest.approx(check["weight_1"] - check["weight_0"])
        assert check["higher"] == (check["gain"] > 0)
        assert check["ci_excludes_zero"] == (check["gain_ci"][0] > 0)
        assert f"{objective}: mean reward at weight 1 = {check['weight_1']:+.3f}" in printed
    plot = Path(summary["plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "quickstart-test-summary.json").is_file()

    # A rerun reuses the registered heads, and its evaluation is the same (fixed seeds).
    def must_not_train(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the rerun trained again")

    monkeypatch.setattr(quickstart, "train_objective", must_not_train)
    rerun = Console(record=True, width=120)
    again = quickstart.run_quickstart(output_dir=tmp_path / "out", console=rerun)
    assert again["settings"] == summary["settings"]
    assert "positivity: reusing version 2" in rerun.export_text()


def test_quickstart_retrains_when_asked_or_when_settings_change(
    tiny_plan: quickstart.QuickstartPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quickstart.run_quickstart(output_dir=tmp_path, console=Console(record=True))
    quickstart.run_quickstart(output_dir=tmp_path, retrain=True, console=Console(record=True))
    changed = replace(tiny_plan, training=replace(tiny_plan.training, epochs=3))
    monkeypatch.setattr(quickstart, "make_plan", lambda fast: changed)
    quickstart.run_quickstart(output_dir=tmp_path, console=Console(record=True))
    registry = Registry()
    for objective in quickstart.OBJECTIVES:
        assert [v.version for v in registry.list_versions(objective)] == [1, 2, 3, 4, 5, 6]
        assert registry.list_aliases(objective) == {"quickstart-test": 6}
