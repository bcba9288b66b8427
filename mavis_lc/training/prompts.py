"""Training prompts: read them from a file or a list, and format them for the base model."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from mavis_lc.errors import ConfigurationError

_HUMAN = "\n\nHuman: "
_ASSISTANT = "\n\nAssistant:"


def load_prompts(source: str | Path | Sequence[str], limit: int | None = None, *, unique: bool = True) -> list[str]:
    """The prompts of ``source``, in file order, at most ``limit`` of them.

    With ``unique`` (the default) a prompt whose text came earlier is skipped, so the first N
    prompts of a file and the ones after them never share a text (HH-RLHF repeats some first
    turns), and no prompt weighs twice in a training set or an evaluation.

    ``source`` is a list of strings, or a path to:
        ``*.jsonl`` / ``*.jsonl.gz``: one JSON object per line with a ``prompt`` or ``text``
        field, or an HH-RLHF record (``chosen`` holding a ``\\n\\nHuman: ...`` dialogue), whose
        first human turn is taken (see `first_human_turn`);
        any other file: one prompt per non-empty line.

    Raises:
        ConfigurationError: unreadable file, a record with none of those fields, or no prompts.
    """
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        try:
            prompts = list(_read_jsonl(path) if ".jsonl" in path.name else _read_lines(path))
        except OSError as exc:
            raise ConfigurationError(f"cannot read prompts from {str(path)!r}: {exc}") from exc
    else:
        prompts = list(source)
        if any(not isinstance(p, str) for p in prompts):
            raise ConfigurationError("prompts must be strings")
    if unique:
        prompts = list(dict.fromkeys(prompts))
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise ConfigurationError(f"no prompts in {source!r}")
    return prompts


def first_human_turn(dialogue: str) -> str:
    """The first ``Human:`` turn of an HH-RLHF dialogue (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).

    Raises:
        ConfigurationError: the text has no human turn.
    """
    start = dialogue.find(_HUMAN)
    if start == -1:
        raise ConfigurationError(f"not an HH-RLHF dialogue (no {_HUMAN!r}): {dialogue[:80]!r}")
    turn = dialogue[start + len(_HUMAN) :]
    end = turn.find(_ASSISTANT)
    return (turn if end == -1 else turn[:end]).strip()


def format_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], chat_template: bool = True) -> list[str]:
    """Each prompt as a user turn through the tokenizer's chat template (with the assistant
    generation prompt), or unchanged when ``chat_template`` is False or the tokenizer has none."""
    if not chat_template or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [
        str(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True))
        for p in prompts
    ]


def _read_jsonl(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"{path}:{number} is not JSON: {exc}") from exc
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                yield record["prompt"]
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            elif isinstance(record, dict) and isinstance(record.get("chosen"), str):
                yield first_human_turn(record["chosen"])
            else:
                raise ConfigurationError(f"{path}:{number} has no 'prompt', 'text' or 'chosen' string field")


def _read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip("\n")
