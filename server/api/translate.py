"""Protobuf messages <-> `server.engine.types`: the only code that knows both.

Validation that needs the model (token id ranges, chat template) happens in the
protocol-neutral `server.api.generation` (shared with the HTTP API); the engine re-checks
lengths and sampling ranges against its context in `submit`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from server.api import prompts
from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.generation import GenerateInput
from server.engine.types import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Delta, SamplingParams, TokenLogprob
from server.core.errors import InvalidRequestError

MAX_MESSAGES = prompts.MAX_MESSAGES
MAX_PROMPT_CHARS = prompts.MAX_PROMPT_CHARS
# Our field names as gRPC clients know them.
FIELD_NAMES = {"stop_token_ids": "params.stop_token_ids", "logprobs": "params.top_logprobs"}

_FINISH = {FINISH_STOP: pb.FINISH_REASON_STOP, FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
           FINISH_ABORT: pb.FINISH_REASON_ABORT}


def sampling_params(p: pb.SamplingParams, default_max_new_tokens: int) -> SamplingParams:
    """Proto params to the domain type; unset optional fields take the server's defaults."""
    if p.top_logprobs and not p.logprobs:
        raise InvalidRequestError("params.top_logprobs", "needs params.logprobs set")
    return SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else default_max_new_tokens,
        temperature=float(p.temperature),
        top_p=float(p.top_p) if p.HasField("top_p") else 1.0,
        top_k=int(p.top_k),
        seed=int(p.seed) if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(int(t) for t in p.stop_token_ids),
        ignore_eos=bool(p.ignore_eos),
        logprobs=int(p.top_logprobs) if p.logprobs else None,
    )


def _messages(m: pb.ChatMessages) -> list[dict[str, str]]:
    return prompts.check_messages([{"role": msg.role, "content": msg.content} for msg in m.messages])


def generate_input(req: pb.GenerateRequest, default_max_new_tokens: int) -> GenerateInput:
    """A GenerateRequest as the protocol-neutral input of `GenerationService.start`."""
    inp = GenerateInput(params=sampling_params(req.params, default_max_new_tokens), adapter_id=req.adapter_id,
                        request_id=req.request_id, field_names=FIELD_NAMES)
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("input", "set one of prompt, messages or prompt_token_ids")
    if which == "prompt":
        inp.prompt = req.prompt
    elif which == "messages":
        inp.messages = _messages(req.messages)
    else:
        inp.prompt_token_ids = list(req.prompt_token_ids.ids)
    return inp


def prompt_token_ids(req: Any, tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids for the `input` oneof of a GenerateRequest or TokenizeRequest (see server.api.prompts)."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("input", "set one of prompt, messages or prompt_token_ids")
    if which == "prompt":
        return prompts.encode_prompt(req.prompt, tokenizer)
    if which == "messages":
        return prompts.encode_messages(_messages(req.messages), tokenizer)
    ids = list(req.prompt_token_ids.ids)
    if not ids:
        raise InvalidRequestError("prompt_token_ids", "must contain at least one token")
    return prompts.check_token_ids(ids, vocab_size, "prompt_token_ids")


def finish_reason(reason: Optional[str]) -> int:
    return _FINISH.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)


def served_by(d: Delta) -> dict[str, Any]:
    """The response fields naming the version that served a request: the bare name and its number
    (both empty/0 for the base model)."""
    a = d.adapter
    return {"adapter_id": a.name, "adapter_version": a.version} if a is not None else {}


def token_logprobs(lps: Optional[Sequence[TokenLogprob]]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
            for lp in lps or ()]


def stream_chunk(request_id: str, d: Delta) -> pb.GenerateStreamResponse:
    chunk = pb.GenerateStreamResponse(request_id=request_id, text=d.text, token_ids=d.token_ids,
                                      logprobs=token_logprobs(d.logprobs), **served_by(d))
    if d.finished:
        chunk.finish_reason = finish_reason(d.finish_reason)
        chunk.usage.prompt_tokens = d.prompt_tokens
        chunk.usage.completion_tokens = d.completion_tokens
    return chunk


def response(request_id: str, token_ids: list[int], text: str, last: Delta,
             logprobs: Optional[Sequence[TokenLogprob]] = None) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id, text=text, token_ids=token_ids, finish_reason=finish_reason(last.finish_reason),
        usage=pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
        logprobs=token_logprobs(logprobs), **served_by(last))
