"""Build engines for tests without the server."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from server.core.engine_config import EngineConfig
from server.engine.engine import Engine
from server.core.identity import AdapterVersion
from server.lora.weights import load_peft_adapter
from server.model.llama import LlamaForCausalLM
from server.model.loader import load_tokenizer


def make_engine(model_dir: Path, **overrides) -> Engine:
    cfg = EngineConfig(**{"quantize": "none", "dtype": "float32", "device": "cpu", "max_rank": 16,
                          "max_adapters_on_device": 4, "kv_cache_tokens": 4096, **overrides})
    device = cfg.resolve_device()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=cfg.resolve_dtype(device), device=device,
                                             quantize=cfg.quantize)
    eng = Engine(model, load_tokenizer(model_dir), cfg, model_dir)
    eng.start()
    return eng


def local_adapter(engine: Engine, name: str, path: Optional[Path], version: int = 1,
                  tenant: str = "default") -> Optional[AdapterVersion]:
    """An AdapterVersion that loads a PEFT directory directly (no registry); its path stands in for
    the content digest, so one directory shares one device slot."""
    if path is None:
        return None
    return AdapterVersion(tenant=tenant, name=name, version=version, digest=f"path:{Path(path).resolve()}",
                          load=lambda: load_peft_adapter(path, engine.model_config, engine.config.max_rank))
