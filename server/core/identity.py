"""The adapter identity every layer shares, from the registry's resolver to the scheduler.

An adapter travels as one `AdapterVersion` from `Registry.resolve` through the API
service (`Request.adapter`), the scheduler and the device pool (slots keyed by its
`digest`) back out on each `Delta`; only the gRPC translation splits it into proto
fields. Two other shapes exist on purpose, each for a different concept:

  - `adapter_registry.ids.AdapterSelector`: what a request *asks for* (`name`,
    `name@N`, `name@latest`), before it is resolved to a version;
  - `adapter_registry.index.VersionRow`: the index's row (provenance, rank, size);
    the registry turns it into an AdapterVersion in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def version_ref(name: str, version: int) -> str:
    """The one spelling of a concrete version: `name@N`."""
    return f"{name}@{version}"


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable, resolved adapter version of one tenant, ready for the engine.

    `digest` identifies the weights (a content digest) and is the device slot key:
    two versions with one digest share a slot, different digests never do. `load`
    returns host tensors and may be slow (disk); the engine calls it off its own
    loop thread. While an AdapterVersion from the registry is alive, its files stay
    on disk even if the version is deleted. Equality ignores `load`.
    """

    tenant: str
    name: str
    version: int
    digest: str
    load: Callable[[], Any] = field(compare=False, repr=False)  # -> server.lora.weights.LoraWeights

    @property
    def ref(self) -> str:
        """`name@N`, the id a client can send to address exactly this version."""
        return version_ref(self.name, self.version)
