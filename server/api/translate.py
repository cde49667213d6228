"""Protobuf messages <-> `server.engine.types`: the only code that knows both.

Validation that needs the model (token id ranges, chat template) happens here;
the engine re-checks lengths and sampling ranges against its context in `submit`.
"""
from __future__ import annotations

from typing import Any, Optional

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.engine.types import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Delta, SamplingParams
from server.core.errors import InvalidRequestError

MAX_MESSAGES = 256
MAX_PROMPT_CHARS = 1 << 20

_FINISH = {FINISH_STOP: pb.FINISH_REASON_STOP, FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
           FINISH_ABORT: pb.FINISH_REASON_ABORT}


def sampling_params(p: pb.SamplingParams, default_max_new_tokens: int, vocab_size: int) -> SamplingParams:
    """Proto params to the domain type; unset optional fields take the server's defaults."""
    if any(not 0 <= t < vocab_size for t in p.stop_token_ids):
        bad = next(t for t in p.stop_token_ids if not 0 <= t < vocab_size)
        raise InvalidRequestError("params.stop_token_ids", f"contains {bad}; allowed range is [0, {vocab_size})")
    params = SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else default_max_new_tokens,
        temperature=float(p.temperature),
        top_p=float(p.top_p) if p.HasField("top_p") else 1.0,
        top_k=int(p.top_k),
        seed=int(p.seed) if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(int(t) for t in p.stop_token_ids),
        ignore_eos=bool(p.ignore_eos),
    )
    return params


def _messages(m: pb.ChatMessages) -> list[dict[str, str]]:
    if not m.messages:
        raise InvalidRequestError("messages", "must contain at least one message")
    if len(m.messages) > MAX_MESSAGES:
        raise InvalidRequestError("messages", f"has {len(m.messages)} messages; at most {MAX_MESSAGES} allowed")
    out = []
    for i, msg in enumerate(m.messages):
        if not msg.role:
            raise InvalidRequestError(f"messages[{i}].role", "must not be empty (e.g. system, user, assistant)")
        out.append({"role": msg.role, "content": msg.content})
    return out


def prompt_token_ids(req: Any, tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids for the `input` oneof of a GenerateRequest or TokenizeRequest.

    A prompt is encoded as the tokenizer does by default (as `tokenizer(prompt)` in
    transformers); messages are rendered with the chat template and the generation prompt.
    """
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("input", "set one of prompt, messages or prompt_token_ids")
    if which == "prompt":
        if not req.prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(req.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequestError("prompt", f"has {len(req.prompt)} characters; at most {MAX_PROMPT_CHARS}")
        return list(tokenizer(req.prompt)["input_ids"])
    if which == "messages":
        msgs = _messages(req.messages)
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # template errors (e.g. role order) are the caller's to fix
            raise InvalidRequestError("messages", f"the chat template rejected them: {e}") from None
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequestError("messages", f"render to {len(text)} characters; at most {MAX_PROMPT_CHARS}")
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(req.prompt_token_ids.ids)
    if not ids:
        raise InvalidRequestError("prompt_token_ids", "must contain at least one token")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("prompt_token_ids", f"contains {bad}; allowed range is [0, {vocab_size})")
    return ids


def finish_reason(reason: Optional[str]) -> int:
    return _FINISH.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)


def served_by(d: Delta) -> dict[str, Any]:
    """The response fields naming the version that served a request: the bare name and its number
    (both empty/0 for the base model)."""
    a = d.adapter
    return {"adapter_id": a.name, "adapter_version": a.version} if a is not None else {}


def stream_chunk(request_id: str, d: Delta) -> pb.GenerateStreamResponse:
    chunk = pb.GenerateStreamResponse(request_id=request_id, text=d.text, token_ids=d.token_ids,
                                      **served_by(d))
    if d.finished:
        chunk.finish_reason = finish_reason(d.finish_reason)
        chunk.usage.prompt_tokens = d.prompt_tokens
        chunk.usage.completion_tokens = d.completion_tokens
    return chunk


def response(request_id: str, token_ids: list[int], text: str, last: Delta) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id, text=text, token_ids=token_ids, finish_reason=finish_reason(last.finish_reason),
        usage=pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
        **served_by(last))
