"""Relevance against the packaged all-MiniLM-L6-v2 encoder (loads in a few seconds on CPU)."""

from __future__ import annotations

import pytest

from mavis_lc.objectives import get_objective, relevance
from mavis_lc.objectives.relevance import encoder_path

pytestmark = pytest.mark.integration

PROMPT = "How do I bake a loaf of bread at home?"
RELATED = "Mix flour, water, yeast and salt, knead the dough, let it rise, then bake it for 40 minutes."
UNRELATED = "The central bank raised interest rates by a quarter point on Tuesday."


def test_encoder_is_found_inside_the_installed_distribution() -> None:
    path = encoder_path()
    assert (path / "model.safetensors").is_file()
    assert "site-packages" in str(path) or "dist-packages" in str(path)


def test_related_response_scores_higher_than_unrelated() -> None:
    related, unrelated, empty, echo = relevance().score([PROMPT] * 4, [RELATED, UNRELATED, "  ", PROMPT])
    assert related > 0.4
    assert abs(unrelated) < 0.2
    assert related > unrelated + 0.3
    assert empty == 0.0
    assert echo == pytest.approx(1.0, abs=1e-5)


def test_scores_pair_each_response_with_its_own_prompt() -> None:
    other_prompt = "What did the central bank decide about interest rates?"
    objective = get_objective("relevance", batch_size=2)
    bread, bank = objective.score([PROMPT, other_prompt], [RELATED, UNRELATED])
    swapped = objective.score([other_prompt, PROMPT], [RELATED, UNRELATED])
    assert bread > swapped[0] + 0.3
    assert bank > swapped[1] + 0.3
    # Repeated prompts are embedded once; the scores must not depend on that.
    alone = objective.score([PROMPT], [RELATED])
    assert alone[0] == pytest.approx(bread, abs=1e-5)
