"""Validation of an uploaded adapter before anything of it becomes visible.

The safetensors header is parsed here, with bounds, before the bytes are handed to the
safetensors library: a hostile file (huge header, lying offsets, overlapping tensors,
truncation) is refused with a message instead of reaching native code with bad sizes.
What the tensors mean for the base model (targets, shapes, layer count, rank, NaN/Inf,
unsupported PEFT features) is checked by `server.lora.weights`, the same code the engine
trusts, so the registry and the server can never disagree about an adapter.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load

from server.core.errors import AdapterRejectedError
from server.lora.weights import CONFIG_NAME, WEIGHTS_NAME, LoraWeights, check_config, weights_from_tensors
from server.model.config import TARGET_MODULES, ModelConfig

# Float dtypes a LoRA adapter may be stored in, with their item sizes.
FLOAT_DTYPES: dict[str, int] = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# Every dtype string safetensors defines, so a non-float one is named as such, not as garbage.
_KNOWN_DTYPES = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2",
                 "I16", "U16", "I32", "U32", "I64", "U64", "C64", *FLOAT_DTYPES}
_ALL_LINEAR = {"all-linear", "all_linear"}


@dataclass(frozen=True)
class RegistryLimits:
    """Bounds on what an upload may cost us before it is refused."""

    max_weights_bytes: int = 1 << 30        # adapter_model.safetensors
    max_config_bytes: int = 64 << 10        # adapter_config.json
    max_header_bytes: int = 4 << 20         # the safetensors JSON header
    max_tensors: int = 4096
    max_metadata_entries: int = 64
    max_metadata_bytes: int = 16 << 10      # keys + values together


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed every check: what the index records and the host cache holds."""

    config: dict[str, Any]
    weights: LoraWeights
    rank: int
    targets: tuple[str, ...]
    file_metadata: dict[str, str]


def _reject(msg: str) -> AdapterRejectedError:
    return AdapterRejectedError(f"{WEIGHTS_NAME}: {msg}")


def parse_config(config_json: bytes, limits: RegistryLimits) -> dict[str, Any]:
    """adapter_config.json as plain data: bounded, UTF-8, one JSON object; nothing in it is executed.

    Keys such as `auto_map` or `base_model_name_or_path` are kept as data and never followed.
    """
    if len(config_json) > limits.max_config_bytes:
        raise AdapterRejectedError(
            f"{CONFIG_NAME}: {len(config_json)} bytes exceeds the limit of {limits.max_config_bytes}")
    if not config_json.strip():
        raise AdapterRejectedError(f"{CONFIG_NAME}: is empty; send the adapter's adapter_config.json")
    try:
        cfg = json.loads(config_json.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterRejectedError(f"{CONFIG_NAME}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterRejectedError(f"{CONFIG_NAME}: must be a JSON object")
    check_config(cfg)
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        known = set(TARGET_MODULES.values())
        for t in targets:
            if not isinstance(t, str):
                raise AdapterRejectedError(f"{CONFIG_NAME}: target_modules must be strings")
            if t not in known and t not in _ALL_LINEAR:
                raise AdapterRejectedError(
                    f"{CONFIG_NAME}: target module {t!r} is not one of the base model's adaptable "
                    f"linears ({', '.join(sorted(known))})")
    elif targets is not None and not isinstance(targets, str):
        raise AdapterRejectedError(f"{CONFIG_NAME}: target_modules must be a list or a string")
    return cfg


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_header(data: bytes, limits: RegistryLimits) -> tuple[list[TensorEntry], dict[str, str]]:
    """Parse and bound-check a safetensors header without trusting a single number in it."""
    if len(data) > limits.max_weights_bytes:
        raise _reject(f"{len(data)} bytes exceeds the limit of {limits.max_weights_bytes}")
    if len(data) < 8:
        raise _reject(f"truncated: {len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    _refuse_pickle(data, n, limits)
    if n > limits.max_header_bytes:
        raise _reject(f"header of {n} bytes exceeds the limit of {limits.max_header_bytes}")
    if 8 + n > len(data):
        raise _reject(f"truncated: the header claims {n} bytes but the file has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _reject(f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _reject("header must be a JSON object")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta  # null is what safetensors itself accepts; [] or "" it refuses
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _reject("__metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise _reject(f"{len(header)} tensors exceeds the limit of {limits.max_tensors}")
    buf_len = len(data) - 8 - n
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _reject(f"{name}: entry must be an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _KNOWN_DTYPES:
            raise _reject(f"{name}: unknown dtype {dtype!r}")
        if dtype not in FLOAT_DTYPES:
            raise _reject(f"{name}: dtype {dtype} is not a float type (LoRA weights must be F16, BF16, F32 or F64)")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
            raise _reject(f"{name}: bad shape {str(shape)[:80]}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _reject(f"{name}: data_offsets must be two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= buf_len:
            raise _reject(f"{name}: data_offsets [{begin}, {end}] lie outside the {buf_len}-byte data section "
                          "(truncated file or lying offsets)")
        nbytes = math.prod(shape) * FLOAT_DTYPES[dtype]
        if end - begin != nbytes:
            raise _reject(f"{name}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} "
                          f"needs {nbytes}")
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:  # tensors must tile the data section: no overlap, no hole, no trailing bytes
        if e.begin != pos:
            what = "overlaps another tensor" if e.begin < pos else "leaves a gap before it"
            raise _reject(f"{e.name}: data_offsets [{e.begin}, {e.end}] {what} (lying offsets)")
        pos = e.end
    if pos != buf_len:
        raise _reject(f"{buf_len - pos} bytes after the last tensor (lying offsets or a corrupt file)")
    return entries, dict(meta)


BIN_HINT = ("pickle files are never loaded; convert it with `python -c \"import torch, safetensors.torch as s; "
            "s.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"`")


def _refuse_pickle(data: bytes, n: int, limits: RegistryLimits) -> None:
    """A PyTorch .bin (zip or raw pickle) sent as safetensors: say how to convert it.

    Only when the first 8 bytes are not a plausible header length, so a real safetensors
    file whose length happens to start with these bytes is never misread.
    """
    zip_or_pickle = data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03",
                                                                                       b"\x04", b"\x05"))
    if zip_or_pickle and (n > limits.max_header_bytes or 8 + n > len(data)):
        raise _reject("this is a pickle/zip file (a PyTorch .bin), not safetensors; " + BIN_HINT)


def validate_adapter(config_json: bytes, weights: bytes, model: ModelConfig, max_rank: int,
                     limits: RegistryLimits) -> ValidatedAdapter:
    """Every check an adapter must pass before it is stored; raises AdapterRejectedError."""
    cfg = parse_config(config_json, limits)
    _, file_meta = parse_header(weights, limits)
    try:
        tensors: Mapping[str, torch.Tensor] = st_load(weights)
    except Exception as e:  # our header checks passed, so this is rare: refuse, never crash
        raise _reject(f"could not be read ({e})") from None
    lw = weights_from_tensors(cfg, tensors, model, max_rank)
    return ValidatedAdapter(cfg, lw, lw.rank, lw.targets, file_meta)


def load_validated(config_json: bytes, weights: bytes, model: ModelConfig, max_rank: int,
                   limits: RegistryLimits) -> LoraWeights:
    """Host weights of a stored version (checked again: the disk is not trusted blindly)."""
    return validate_adapter(config_json, weights, model, max_rank, limits).weights
