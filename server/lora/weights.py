"""Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into host tensors.

Everything that PEFT would compute differently from `y = base(x) + scale * B(A(x))`
is refused by name here, so an adapter is either served exactly or not at all.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from server.core.errors import AdapterRejectedError
from server.model.config import MODULE_TARGETS, TARGET_MODULES, TARGETS, ModelConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")

# Config keys whose non-default value changes the forward pass in a way we do not reproduce.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "a bias on lora_B (lora_bias=true)",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D layers)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
}
_UNSUPPORTED_NONEMPTY = {
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


@dataclass
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LoraWeights:
    """One adapter on the host: modules keyed by (layer index, short target name)."""

    modules: dict[tuple[int, str], LoraModule]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def targets(self) -> tuple[str, ...]:
        present = {t for _, t in self.modules}
        return tuple(t for t in TARGETS if t in present)

    @property
    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
                   for m in self.modules.values())


def check_config(cfg: Mapping[str, Any]) -> None:
    """Refuse, by name, every adapter_config feature that cannot be served exactly."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterRejectedError(f"peft_type {peft_type!r} is not supported; only LORA adapters are served")
    for key, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(key):
            raise AdapterRejectedError(f"{what} is not supported; retrain or merge without it")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterRejectedError(f"bias={bias!r} is not supported; only bias='none' adapters are served exactly")
    for key, what in _UNSUPPORTED_NONEMPTY.items():
        if cfg.get(key):
            raise AdapterRejectedError(f"{what} is not supported; only LoRA on the attention and MLP linears is served")
    for key in ("r", "lora_alpha"):
        if key in cfg and not isinstance(cfg[key], (int, float)):
            raise AdapterRejectedError(f"adapter_config.json: {key} must be a number")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise AdapterRejectedError(f"adapter_config.json: {key} must be an object")


def _module_name(layer: int, module: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first pattern that matches a dotted suffix of the module name."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise AdapterRejectedError(f"adapter_config.json: bad pattern {key!r}: {e}") from e
    return default


def module_scale(cfg: Mapping[str, Any], layer: int, module: str, rank: int) -> float:
    name = _module_name(layer, module)
    r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r", rank))
    if int(r) != rank:
        raise AdapterRejectedError(
            f"{name}: tensor rank {rank} disagrees with adapter_config.json (r/rank_pattern say {r})")
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def weights_from_tensors(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                         model: ModelConfig, max_rank: int) -> LoraWeights:
    """Validate tensors against the base model and pair them into modules."""
    check_config(cfg)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            if "lora_embedding" in key or "embed_tokens" in key:
                raise AdapterRejectedError(f"{key}: LoRA on the embedding is not supported")
            if "lm_head" in key:
                raise AdapterRejectedError(f"{key}: LoRA on lm_head is not supported")
            if "magnitude" in key:
                raise AdapterRejectedError(f"{key}: DoRA magnitude vectors are not supported")
            raise AdapterRejectedError(f"{key}: not a LoRA weight of a Llama attention or MLP linear")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= model.num_layers:
            raise AdapterRejectedError(f"{key}: layer {layer} but the base model has {model.num_layers} layers")
        if t.dtype not in _FLOAT_DTYPES:
            raise AdapterRejectedError(f"{key}: dtype {t.dtype} is not a float type")
        if t.dim() != 2:
            raise AdapterRejectedError(f"{key}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        pairs.setdefault((layer, MODULE_TARGETS[module]), {})[ab] = t
    if not pairs:
        raise AdapterRejectedError("adapter_model.safetensors holds no LoRA weights")
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, target), ab in sorted(pairs.items()):
        target_module = TARGET_MODULES[target]
        module = _module_name(layer, target_module)
        if set(ab) != {"A", "B"}:
            raise AdapterRejectedError(f"{module}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        out_f, in_f = model.target_shape(target)
        r = a.shape[0]
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise AdapterRejectedError(
                f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"linear ({out_f} x {in_f}); was this adapter trained for another base model?")
        if r > max_rank:
            raise AdapterRejectedError(
                f"{module}: rank {r} exceeds the server's max rank {max_rank} (raise --max-rank)")
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            raise AdapterRejectedError(f"{module}: weights contain NaN or Inf")
        modules[(layer, target)] = LoraModule(a32.contiguous(), b32.contiguous(),
                                              module_scale(cfg, layer, target_module, r))
    return LoraWeights(modules, dict(cfg))


def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json as plain data: no auto_map, no remote code is ever followed."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterRejectedError(f"{CONFIG_NAME}: cannot be read as JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterRejectedError(f"{CONFIG_NAME}: must be a JSON object")
    return cfg


def load_peft_adapter(adapter_dir: Path, model: ModelConfig, max_rank: int) -> LoraWeights:
    """Load and validate a PEFT adapter directory. Pickle (.bin) weights are refused."""
    adapter_dir = Path(adapter_dir)
    st = adapter_dir / WEIGHTS_NAME
    if not st.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise AdapterRejectedError(
                "adapter_model.bin is a pickle file and is never loaded; convert it with "
                "`python -c \"import torch, safetensors.torch as s; "
                "s.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"`")
        raise AdapterRejectedError(f"{WEIGHTS_NAME} not found in the adapter directory")
    cfg = read_config(adapter_dir / CONFIG_NAME)
    check_config(cfg)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(st), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except AdapterRejectedError:
        raise
    except Exception as e:  # truncated file, lying header, ...
        raise AdapterRejectedError(f"{WEIGHTS_NAME}: not a valid safetensors file ({e})") from e
    return weights_from_tensors(cfg, tensors, model, max_rank)

