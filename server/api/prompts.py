"""Prompt text, chat messages and token ids to the token ids the engine sees, for both protocols.

A prompt is encoded as the tokenizer does by default (as `tokenizer(prompt)` in transformers);
messages are rendered with the model's chat template plus the generation prompt. Every error
names the field the caller must fix, in the caller's protocol (`field` arguments).
"""
from __future__ import annotations

from typing import Any, Sequence

from server.core.errors import InvalidRequestError

MAX_MESSAGES = 256
MAX_PROMPT_CHARS = 1 << 20


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> list[int]:
    """`ids` as a list when every id is in [0, vocab_size); otherwise an error naming the first bad one."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(field, f"contains {bad}; allowed range is [0, {vocab_size})")
    return list(ids)


def encode_prompt(prompt: str, tokenizer: Any, field: str = "prompt") -> list[int]:
    if not prompt:
        raise InvalidRequestError(field, "must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(field, f"has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return list(tokenizer(prompt)["input_ids"])


def check_messages(messages: Sequence[dict[str, str]], field: str = "messages") -> list[dict[str, str]]:
    if not messages:
        raise InvalidRequestError(field, "must contain at least one message")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(field, f"has {len(messages)} messages; at most {MAX_MESSAGES} allowed")
    for i, msg in enumerate(messages):
        if not msg.get("role"):
            raise InvalidRequestError(f"{field}[{i}].role", "must not be empty (e.g. system, user, assistant)")
    return [{"role": m["role"], "content": m.get("content", "")} for m in messages]


def encode_messages(messages: Sequence[dict[str, str]], tokenizer: Any, field: str = "messages") -> list[int]:
    msgs = check_messages(messages, field)
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # template errors (e.g. role order) are the caller's to fix
        raise InvalidRequestError(field, f"the chat template rejected them: {e}") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(field, f"render to {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
