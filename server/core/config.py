"""Every server knob in one place: defaults < `--config FILE.toml` < `LORASERVE_*` env < flags.

The engine's knobs live in `server.core.engine_config.EngineConfig`; this module owns the
server's and is the only place that reads the environment or the TOML file, so a
value has exactly one way in per source and one precedence rule.

TOML layout: a `[server]` table and an `[engine]` table whose keys are the field
names below (`port = 50051`, `quantize = "int8"`). Environment variables are
`LORASERVE_` + the field name in upper case (`LORASERVE_PORT`, `LORASERVE_QUANTIZE`);
list fields take comma-separated values.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from server.core.engine_config import EngineConfig
from server.core.errors import InvalidRequestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "LORASERVE_"


@dataclass
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC server to"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = pick a free one and log it)"})
    metrics_port: int = field(default=9090, metadata={
        "help": "Prometheus /metrics port (0 = pick a free one, -1 = off)"})
    metrics_host: str = field(default="", metadata={"help": "address for /metrics (default: same as --host)"})
    grace_period: float = field(default=30.0, metadata={
        "help": "seconds in-flight calls get to finish after SIGTERM/SIGINT"})
    drain_delay: float = field(default=0.0, metadata={
        "help": "seconds a replica keeps accepting new calls after SIGTERM while health says NOT_SERVING, so a "
                "load balancer stops sending before it refuses (set it above the balancer's check interval)"})
    max_request_bytes: int = field(default=4 << 20, metadata={
        "help": "largest inference request message accepted, in bytes"})
    max_response_bytes: int = field(default=16 << 20, metadata={"help": "largest response message, in bytes"})
    max_upload_bytes: int = field(default=512 << 20, metadata={
        "help": "largest adapter upload (sum of RegisterAdapter chunks), in bytes"})
    max_concurrent_rpcs: int = field(default=2048, metadata={
        "help": "RPCs in progress at once; beyond it gRPC answers RESOURCE_EXHAUSTED"})
    default_max_new_tokens: int = field(default=128, metadata={
        "help": "max_new_tokens for requests that leave it unset"})
    tenants: str = field(default="", metadata={
        "help": "tenants TOML file (API key hashes, quotas); empty = single-tenant, no auth"})
    registry: str = field(default="", metadata={
        "help": "adapter registry: a directory (SQLite index, default $LORASERVE_HOME/registry) or a "
                "postgresql:// URL shared by a fleet of replicas (then --objects is required)"})
    objects: str = field(default="", metadata={
        "help": "folder of adapter files (content-addressed, immutable); with a postgresql:// registry, one "
                "every replica mounts (NFS, a ReadWriteMany volume) [default: inside the registry directory]"})
    object_grace_period: float = field(default=600.0, metadata={
        "help": "seconds an unused adapter file or unfinished upload is kept in a shared --objects folder "
                "before removal (longer than any request waits to start)"})
    import_dirs: list[str] = field(default_factory=list, metadata={
        "help": "server-side directories RegisterAdapter(server_path=...) may read from", "flag": "--import-dir"})
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "NAME=PATH: register a PEFT adapter directory at start-up (repeatable)", "flag": "--adapter"})
    host_cache_bytes: int = field(default=2 << 30, metadata={
        "help": "byte budget of the host-memory adapter cache"})
    metrics_adapter_labels: int = field(default=32, metadata={
        "help": "distinct adapter label values in metrics before the rest count as 'other'"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# Help for the engine's fields (EngineConfig is plain so the engine does not depend on us).
_ENGINE_HELP = {
    "model": "'default' (SmolLM2-135M-Instruct, bundled) or a path to an HF directory or .gguf file",
    "device": "auto | cpu | cuda",
    "dtype": "auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA and on CPUs with native bf16)",
    "quantize": "base weights: none | int8 | int4",
    "max_adapters_on_device": "LoRA slots on the device",
    "max_rank": "largest LoRA rank served (smaller ranks are zero-padded)",
    "kv_block_size": "tokens per paged KV block",
    "kv_cache_tokens": "KV cache capacity in tokens (0 = sized automatically)",
    "max_model_len": "context length served (0 = the model's, capped)",
    "max_batch_size": "sequences decoded per step",
    "max_batch_tokens": "prompt tokens per step (prefill budget)",
    "max_waiting": "queued requests before RESOURCE_EXHAUSTED",
    "home": "cache directory (default $LORASERVE_HOME or ~/.cache/loraserve)",
    "seed": "seed for sampled requests that give none",
    "cpu_threads": "intra-op threads of the engine loop on CPU (0 = torch's default, the physical cores)",
    "lora_decode_dtype": "auto | float32 | bfloat16: LoRA weights the CPU kernels read, decode and prompt rows (auto: "
                         "bf16 copies when the base is quantized, fp32 with --quantize none)",
}
_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "quantize": ("none", "int8", "int4"),
    "lora_decode_dtype": ("auto", "float32", "bfloat16"),
    "log_level": ("debug", "info", "warning", "error"),
}


def _sections() -> dict[str, type]:
    return {"server": ServerConfig, "engine": EngineConfig}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def _coerce(section: str, name: str, tp: Any, value: Any, source: str) -> Any:
    """Turn a TOML or environment value into the field's type, or say exactly what is wrong."""
    where = f"{source}: {section}.{name}"
    try:
        if _is_list(tp):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError("expected a list of strings")
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError("expected true or false")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("expected a string")
            return str(value)
    except ValueError as e:
        raise InvalidRequestError(where, f"{value!r}: {e}") from None
    raise InvalidRequestError(where, f"unsupported type {tp}")


def _check_choice(section: str, name: str, value: Any, source: str) -> None:
    if name in _CHOICES and value not in _CHOICES[name]:
        raise InvalidRequestError(f"{source}: {section}.{name}",
                                  f"{value!r}: choose one of {', '.join(_CHOICES[name])}")


def from_toml(path: Path) -> dict[str, dict[str, Any]]:
    """Read a config file into {section: {field: value}}; unknown keys are errors, not ignored."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise InvalidRequestError("config", f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidRequestError("config", f"{path} is not valid TOML: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    sections = _sections()
    for section, table in data.items():
        if section not in sections or not isinstance(table, dict):
            raise InvalidRequestError("config", f"{path}: unknown table [{section}]; "
                                      f"use {', '.join('[' + s + ']' for s in sections)}")
        types = _field_types(sections[section])
        for key, value in table.items():
            if key not in types:
                raise InvalidRequestError("config", f"{path}: unknown key {section}.{key}; "
                                          f"known: {', '.join(sorted(types))}")
            out.setdefault(section, {})[key] = _coerce(section, key, types[key], value, str(path))
    return out


def from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Collect `LORASERVE_<FIELD>` variables. LORASERVE_CONFIG names the TOML file and is not a field."""
    out: dict[str, dict[str, Any]] = {}
    for section, cls in _sections().items():
        for name, tp in _field_types(cls).items():
            key = ENV_PREFIX + name.upper()
            if key in env and env[key] != "":
                out.setdefault(section, {})[name] = _coerce(section, name, tp, env[key], key)
    return out


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per field (default None, so unset flags never override the other sources)."""
    parser.add_argument("--config", metavar="FILE.toml", default=None,
                        help="TOML file with [server] and [engine] tables (env: LORASERVE_CONFIG)")
    for section, cls in _sections().items():
        group = parser.add_argument_group(f"{section} options")
        types = _field_types(cls)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            help_ = f.metadata.get("help") or _ENGINE_HELP.get(f.name, "")
            default = f.default if f.default is not dataclasses.MISSING else None
            help_ = f"{help_} [default: {default!r}]" if default not in (None, "") else help_
            kw: dict[str, Any] = {"dest": f"{section}__{f.name}", "default": None, "help": help_}
            tp = types[f.name]
            if _is_list(tp):
                kw.update(action="append", metavar=f.name.rstrip("s").upper())
            elif tp is bool:
                kw.update(action=argparse.BooleanOptionalAction)
            else:
                kw.update(type=tp)
                if f.name in _CHOICES:
                    kw["choices"] = _CHOICES[f.name]
            group.add_argument(flag, **kw)


def from_args(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "__" in key and value is not None:
            section, name = key.split("__", 1)
            out.setdefault(section, {})[name] = value
    return out


def load(args: Optional[argparse.Namespace] = None, env: Optional[Mapping[str, str]] = None) -> Config:
    """Merge the four sources: defaults < TOML < environment < flags."""
    env = os.environ if env is None else env
    flags = from_args(args) if args is not None else {}
    path = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG") or None
    layers = [from_toml(Path(path)) if path else {}, from_env(env), flags]
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    for section, values in merged.items():
        for name, value in values.items():
            _check_choice(section, name, value, "config")
    cfg = Config(server=ServerConfig(**merged.get("server", {})), engine=EngineConfig(**merged.get("engine", {})))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    s = cfg.server
    for name in ("port", "metrics_port"):
        lo = -1 if name == "metrics_port" else 0
        v = getattr(s, name)
        if not lo <= v <= 65535:
            raise InvalidRequestError(name, f"is {v}; allowed range is [{lo}, 65535]")
    for name in ("grace_period", "drain_delay", "object_grace_period"):
        if getattr(s, name) < 0:
            raise InvalidRequestError(name, f"is {getattr(s, name)}; must be >= 0 seconds")
    if s.registry.startswith(("postgresql://", "postgres://")) and not s.objects:
        raise InvalidRequestError("objects", "a postgresql:// registry needs --objects DIR: the folder of adapter "
                                  "files every replica mounts")
    for name in ("max_request_bytes", "max_response_bytes", "max_upload_bytes", "max_concurrent_rpcs",
                 "default_max_new_tokens"):
        if getattr(s, name) < 1:
            raise InvalidRequestError(name, f"is {getattr(s, name)}; must be >= 1")
    for spec in s.adapters:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidRequestError("adapter", f"{spec!r}: expected NAME=PATH")


def parse_adapter_flags(specs: list[str]) -> list[tuple[str, Path]]:
    return [(n, Path(p).expanduser()) for n, _, p in (s.partition("=") for s in specs)]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def startup_warnings(cfg: Config) -> list[str]:
    """What an operator should hear about before the first request."""
    out = []
    if not cfg.server.tenants and not is_loopback(cfg.server.host):
        out.append(f"listening on {cfg.server.host} without --tenants: anyone who can reach this port "
                   "can generate and manage adapters (no authentication)")
    return out
