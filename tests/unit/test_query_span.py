"""The user turn's tokens in chat-formatted prompts (mavis_lc.query_span)."""

from __future__ import annotations

import torch

from mavis_lc.query_span import UserTurnMarkers, encode_prompts, user_turn_markers
from tests.tiny import build_tokenizer


def _chat(tokenizer, messages: list[dict[str, str]]) -> str:  # type: ignore[no-untyped-def]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_markers_come_from_the_template() -> None:
    markers = user_turn_markers(build_tokenizer())
    assert markers == UserTurnMarkers(header="<|im_start|>user\n", footer="<|im_end|>\n<|im_start|>assistant\n")


def test_a_system_preamble_is_left_out_of_the_user_tokens() -> None:
    tok = build_tokenizer()
    tok.chat_template = "{{'<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'}}" + str(tok.chat_template)
    markers = user_turn_markers(tok)
    assert markers is not None and markers.header.endswith("<|im_start|>user\n")
    prompt = _chat(tok, [{"role": "user", "content": "Tell me about cats."}])
    ids, attention, user = encode_prompts(tok, markers, [prompt, "a raw prompt"])
    assert tok.decode(ids[0][user[0].bool()]) == "Tell me about cats."
    assert int(user[0].sum()) < int(attention[0].sum())  # the preamble and the template are not the user's
    # a raw prompt (no user turn) keeps every real token, left padding excluded
    assert torch.equal(user[1], attention[1]) and int(attention[1].sum()) < attention.shape[1]


def test_the_last_user_turn_of_a_conversation_is_the_query() -> None:
    tok = build_tokenizer()
    markers = user_turn_markers(tok)
    prompt = _chat(
        tok,
        [
            {"role": "user", "content": "I love sunny days"},
            {"role": "assistant", "content": "They are wonderful"},
            {"role": "user", "content": "Tell me about cats."},
        ],
    )
    ids, _, user = encode_prompts(tok, markers, [prompt])
    assert tok.decode(ids[0][user[0].bool()]) == "Tell me about cats."


def test_an_empty_user_turn_or_no_template_keeps_every_token() -> None:
    tok = build_tokenizer()
    markers = user_turn_markers(tok)
    empty = _chat(tok, [{"role": "user", "content": "  "}])
    _, attention, user = encode_prompts(tok, markers, [empty])
    assert torch.equal(user, attention)
    tok.chat_template = None
    assert user_turn_markers(tok) is None
    _, attention, user = encode_prompts(tok, None, ["anything at all"])
    assert torch.equal(user, attention)


def test_a_template_that_puts_nothing_before_the_content_has_no_markers() -> None:
    tok = build_tokenizer()
    tok.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert user_turn_markers(tok) is None
