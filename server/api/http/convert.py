"""OpenAI request bodies -> `GenerateInput`s, and engine deltas -> OpenAI response objects.

`model` is the base model's id or an adapter id exactly as gRPC takes it (`name`, `name@N`,
`name@latest`); every response names the version that served it (`name@N`). Each of the
`n` choices (for each prompt of a batch) is its own engine request; with a `seed`, choice j
uses `seed + j` so the choices differ and each one is reproducible on its own.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from server.api.generation import GenerateInput, Generation
from server.api.http.schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, _Sampling
from server.core.errors import InvalidRequestError
from server.engine.types import SamplingParams, TokenLogprob

# Our field names as the OpenAI API spells them, for error messages.
FIELD_NAMES = {"max_new_tokens": "max_tokens", "adapter_id": "model", "prompt_token_ids": "prompt", "input": "prompt"}
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def base_model_id(model: str) -> str:
    """The id the base model answers to: `default`, or the last part of the path without `.gguf`."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return name[:-5] if name.endswith(".gguf") else name or model


@dataclass(frozen=True)
class ModelNames:
    """The base model's id (plus the --model value as an alias) and how responses name what served them."""

    base_id: str
    aliases: frozenset[str] = frozenset()

    def adapter_of(self, model: str) -> str:
        """'' for the base model, else the adapter id to resolve inside the caller's tenant."""
        return "" if model == self.base_id or model in self.aliases else model

    def served(self, gen: Generation) -> str:
        a = gen.adapter
        return a.ref if a is not None else self.base_id


def _neutral_only(req: _Sampling, extra: Sequence[tuple[str, bool]] = ()) -> None:
    checks = [("presence_penalty", req.presence_penalty != 0), ("frequency_penalty", req.frequency_penalty != 0),
              ("logit_bias", bool(req.logit_bias)), *extra]
    for name, set_ in checks:
        if set_:
            raise InvalidRequestError(name, "is not supported by this server; leave it unset")


def _params(req: _Sampling, max_tokens: Optional[int], default_max: int, logprobs: Optional[int],
            seed_offset: int) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    seed = req.seed + seed_offset if req.seed is not None else None
    return SamplingParams(
        max_new_tokens=default_max if max_tokens is None else max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0, seed=seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos, logprobs=logprobs)


def completion_inputs(req: CompletionRequest, names: ModelNames, default_max: int) -> list[GenerateInput]:
    """One input per choice, in choice order (prompt i, sample j -> index i * n + j)."""
    _neutral_only(req, [("echo", req.echo), ("suffix", bool(req.suffix)),
                        ("best_of", req.best_of is not None and req.best_of != req.n)])
    p = req.prompt
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
        prompts: list[Any] = [p]
    else:
        prompts = list(p)
    if not prompts or any(len(x) == 0 for x in prompts):
        raise InvalidRequestError("prompt", "must not be empty")
    if len(prompts) * req.n > MAX_CHOICES:
        raise InvalidRequestError("n", f"{len(prompts)} prompts x n={req.n} choices; at most {MAX_CHOICES} in all")
    adapter = names.adapter_of(req.model)
    out = []
    for prompt in prompts:
        for j in range(req.n):
            params = _params(req, req.max_tokens, default_max, req.logprobs, j if req.n > 1 else 0)
            inp = GenerateInput(params=params, adapter_id=adapter, field_names=FIELD_NAMES)
            if isinstance(prompt, str):
                inp.prompt = prompt
            else:
                inp.prompt_token_ids = list(prompt)
            out.append(inp)
    return out


def _content(msg: Any) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    return "".join(part.text for part in msg.content)


def chat_inputs(req: ChatCompletionRequest, names: ModelNames, default_max: int) -> list[GenerateInput]:
    _neutral_only(req, [("tools", bool(req.tools))])
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise InvalidRequestError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    max_tokens, max_field = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, max_field = req.max_completion_tokens, "max_completion_tokens"
    # "developer" is OpenAI's newer name for "system"; chat templates know the latter.
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content(m)}
                for m in req.messages]
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    fields = {**FIELD_NAMES, "max_new_tokens": max_field, "logprobs": "top_logprobs"}
    adapter = names.adapter_of(req.model)
    return [GenerateInput(params=_params(req, max_tokens, default_max, logprobs, j if req.n > 1 else 0),
                          messages=messages, adapter_id=adapter, field_names=fields) for j in range(req.n)]


class TokenTexts:
    """Each token's own text, as OpenAI's logprobs show it (decoded alone; cached per id)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text


def completion_logprobs(lps: Sequence[TokenLogprob], texts: TokenTexts, offset: int) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (with the chosen token), text_offset."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        tok = texts(lp.token_id)
        tokens.append(tok)
        values.append(lp.logprob)
        top = {texts(t): v for t, v in lp.top}
        top.setdefault(tok, lp.logprob)  # OpenAI: the sampled token is always among them
        tops.append(top)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(lps: Sequence[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    def entry(token_id: int, value: float) -> dict[str, Any]:
        tok = texts(token_id)
        return {"token": tok, "logprob": value, "bytes": list(tok.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    return FINISH_REASONS.get(reason, reason) if reason else None
