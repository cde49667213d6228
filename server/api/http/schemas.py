"""Request bodies of the OpenAI-compatible API, validated by pydantic (strict types, no unknown fields).

Field names, types and defaults are OpenAI's (`temperature` defaults to 1 as there; gRPC's 0 is
its own API's default). Our extras: `top_k`, `ignore_eos`, `stop_token_ids` and `return_token_ids`.
OpenAI fields we cannot honour exactly (penalties, logit_bias, echo, suffix, best_of != n, tools)
are accepted only at their neutral values, so a client that sets them learns it at once.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from server.engine.types import MAX_LOGPROBS

MAX_CHOICES = 64  # n x prompts per request


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted for vLLM clients; usage comes with the final chunk


class _Sampling(_Body):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: Optional[str] = Field(default=None, max_length=256)
    # Extras, as vLLM names them.
    top_k: Optional[int] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    return_token_ids: bool = False  # each choice also carries `token_ids` (stream chunks: the chunk's own)
    # OpenAI fields accepted at their neutral values only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str = Field(min_length=1, max_length=64)
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Literal["none"]] = None
    parallel_tool_calls: Optional[bool] = None
