"""The user's own tokens in a chat-formatted prompt, for the prompt-pooled query.

A prompt that went through a chat template is mostly template: SmolLM2's adds a system preamble
of about 30 tokens to a user turn whose median length (HH-RLHF) is 12. A query pooled over every
token averages mostly that preamble, the same for every prompt. `user_token_mask` marks the
tokens of the last user turn's content instead, found from the tokenizer's own template:

- the template is rendered around a marker twice (a single user turn; a user, assistant, user
  exchange), and the text common to both right before the marker is the user turn's header
  (``<|im_end|>\\n<|im_start|>user\\n`` for ChatML), the text common to both right after it the
  footer (``<|im_end|>\\n<|im_start|>assistant\\n``);
- in a prompt, the content is what lies between the last header and the next footer (or the end);
- the tokens whose character offsets overlap that span are the user's tokens.

A prompt with no header (a raw completion prompt, a tokenizer without a template or without
offsets, an empty user turn) keeps every real token: the query is then the whole prompt's mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

_MARK = "\ue000mavis-user-turn\ue001"  # private-use characters: in no real prompt


@dataclass(frozen=True)
class UserTurnMarkers:
    """The text a chat template puts right before and right after a user turn's content."""

    header: str
    footer: str

    def content_span(self, text: str) -> tuple[int, int] | None:
        """The character span [start, end) of the last user turn's content in ``text``, or None
        when ``text`` has no user turn (or an empty one)."""
        start = text.rfind(self.header)
        if start == -1:
            return None
        start += len(self.header)
        end = text.find(self.footer, start)
        end = len(text) if end == -1 else end
        return (start, end) if text[start:end].strip() else None


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def user_turn_markers(tokenizer: PreTrainedTokenizerBase) -> UserTurnMarkers | None:
    """The user turn's header and footer in ``tokenizer``'s chat template, or None when it has no
    template or the template does not render a user turn around its content."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(chat: list[dict[str, str]]) -> str:
        return str(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))

    try:
        one = render([{"role": "user", "content": _MARK}])
        two = render(
            [
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": _MARK},
            ]
        )
    except Exception:  # a template that cannot render these has no usable markers
        return None
    if one.count(_MARK) != 1 or two.count(_MARK) != 1:
        return None
    before_one, after_one = one.split(_MARK)
    before_two, after_two = two.split(_MARK)
    header = _common_suffix(before_one, before_two)
    footer = _common_prefix(after_one, after_two)
    if not header.strip():
        return None  # a template that puts nothing before the content cannot be told from a raw prompt
    return UserTurnMarkers(header=header, footer=footer)


def user_token_mask(
    markers: UserTurnMarkers | None,
    prompts: Sequence[str],
    attention_mask: torch.Tensor,
    offsets: torch.Tensor | None,
) -> torch.Tensor:
    """(B, P) 1 at the tokens of each prompt's last user turn content, else 0; a row without a user
    turn (see the module docstring) keeps its ``attention_mask`` (B, P). ``offsets`` (B, P, 2): the
    tokenizer's character offsets of the same encoding (``return_offsets_mapping=True``), or None."""
    if markers is None or offsets is None:
        return attention_mask
    mask = attention_mask.clone()
    real = attention_mask.bool()
    for b, text in enumerate(prompts):
        span = markers.content_span(text)
        if span is None:
            continue
        start, end = span
        tok_start, tok_end = offsets[b, :, 0], offsets[b, :, 1]  # (P,)
        inside = real[b] & (tok_end > start) & (tok_start < end) & (tok_end > tok_start)  # (P,)
        if bool(inside.any()):
            mask[b] = inside.to(mask.dtype)
    return mask


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, markers: UserTurnMarkers | None, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize ``prompts`` (left padding, as the tokenizer is set up) -> input_ids, attention_mask
    and the user-token mask (`user_token_mask`), each (B, P)."""
    fast = bool(getattr(tokenizer, "is_fast", False)) and markers is not None
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt", return_offsets_mapping=fast)
    offsets = enc.pop("offset_mapping", None)
    attention_mask = enc["attention_mask"]
    return enc["input_ids"], attention_mask, user_token_mask(markers, prompts, attention_mask, offsets)
