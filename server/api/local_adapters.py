"""A minimal in-memory adapter resolver for `serve --adapter NAME=PATH`.

Stepping stone until `adapter_registry.Registry` is wired in: one version per name,
keyed by the sha256 of its safetensors file so identical weights share a slot. It
offers the `register_path` / `resolve` half of the registry's contract and nothing more.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from server.engine.types import AdapterSpec
from server.errors import AdapterExistsError, AdapterNotFoundError, AdapterRejectedError
from server.lora.weights import CONFIG_NAME, WEIGHTS_NAME, load_peft_adapter
from server.model.config import ModelConfig


@dataclass(frozen=True)
class LocalAdapter:
    name: str
    path: Path
    digest: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LocalAdapters:
    def __init__(self, model_config: ModelConfig, max_rank: int):
        self.model_config = model_config
        self.max_rank = max_rank
        self._by_name: dict[str, LocalAdapter] = {}
        self._lock = threading.Lock()

    def register_path(self, tenant: str, name: str, path: Path, metadata: Optional[dict] = None) -> LocalAdapter:
        path = Path(path).resolve()
        weights = path / WEIGHTS_NAME
        if not (path / CONFIG_NAME).is_file() or not weights.is_file():
            raise AdapterRejectedError(f"{path}: expected a PEFT directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
        # Refuse now what could not be served, rather than at the first request.
        load_peft_adapter(path, self.model_config, self.max_rank)
        entry = LocalAdapter(name, path, _sha256(weights))
        with self._lock:
            if name in self._by_name:
                raise AdapterExistsError(f"adapter {name!r} is already registered")
            self._by_name[name] = entry
        return entry

    def resolve(self, tenant: str, adapter_id: str) -> AdapterSpec:
        name, _, version = adapter_id.partition("@")
        with self._lock:
            entry = self._by_name.get(name)
        if entry is None or version not in ("", "1", "latest"):
            raise AdapterNotFoundError(adapter_id)
        mc, rank, path = self.model_config, self.max_rank, entry.path
        return AdapterSpec(key=entry.digest, adapter_id=name, version=1,
                           load=lambda: load_peft_adapter(path, mc, rank))
