"""The adapter identity every layer shares, from the registry's resolver to the scheduler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class AdapterSpec:
    """What the engine needs to serve one immutable adapter version.

    `key` identifies the weights (a content digest): two specs with one key share
    a device slot, and different keys never do. `load` returns host tensors and
    may be slow (disk); the engine calls it off its own loop thread.
    """

    key: str
    adapter_id: str
    version: int
    load: Callable[[], Any]  # -> server.lora.weights.LoraWeights (host tensors)
