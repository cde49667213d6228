"""Every server knob in one place: defaults < `--config FILE.toml` < `LORASERVE_*` env < flags.

The knobs are the fields of two dataclasses, `ServerConfig` below (`[server]`) and
`server.core.engine_config.EngineConfig` (`[engine]`); each field carries its help,
choices and range (`server.core.knobs`), and constructing a section checks them: that
is the one validation. This module is the only place that reads the environment or the
TOML file, so a value has exactly one way in per source and one precedence rule.

TOML layout: a `[server]` table and an `[engine]` table whose keys are the field
names (`port = 50051`, `quantize = "int8"`). Environment variables are
`LORASERVE_` + the field name in upper case (`LORASERVE_PORT`, `LORASERVE_QUANTIZE`,
`LORASERVE_HOME`, `LORASERVE_ATTENTION`); list fields take comma-separated values.
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
from typing import Any, Callable, Mapping, Optional

from server.core import knobs
from server.core.engine_config import EngineConfig
from server.core.errors import InvalidRequestError
from server.core.knobs import knob

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "LORASERVE_"


@dataclass
class ServerConfig:
    host: str = knob("127.0.0.1", help="address to bind the gRPC and HTTP servers to")
    port: int = knob(50051, help="gRPC port (0 = pick a free one and log it)", lo=0, hi=65535)
    http_port: int = knob(50080, help="OpenAI-compatible HTTP API port on --host, also serving /health and /metrics "
                                      "(0 = pick a free one and log it, -1 = off)", lo=-1, hi=65535)
    metrics_port: int = knob(50091, help="Prometheus /metrics port (0 = pick a free one, -1 = off); not 9090, "
                                         "Prometheus's own port", lo=-1, hi=65535)
    metrics_host: str = knob("", help="address for /metrics (default: same as --host)")
    grace_period: float = knob(30.0, help="seconds in-flight calls get to finish after SIGTERM/SIGINT", lo=0)
    drain_delay: float = knob(0.0, lo=0, help="seconds a replica keeps accepting new calls after SIGTERM while health "
                                              "says NOT_SERVING, so a load balancer stops sending before it refuses "
                                              "(set it above the balancer's check interval)")
    max_request_bytes: int = knob(4 << 20, help="largest inference request message accepted, in bytes", lo=1)
    max_response_bytes: int = knob(16 << 20, help="largest response message, in bytes", lo=1)
    max_upload_bytes: int = knob(512 << 20, help="largest adapter upload (sum of RegisterAdapter chunks), in bytes",
                                 lo=1)
    max_concurrent_rpcs: int = knob(2048, help="API RPCs in progress at once; beyond it a call gets RESOURCE_EXHAUSTED "
                                               "naming this flag (health checks are exempt)", lo=1)
    default_max_new_tokens: int = knob(128, help="max_new_tokens for requests that leave it unset", lo=1)
    tenants: str = knob("", help="tenants TOML file (API key hashes, quotas); empty = single-tenant, no auth")
    registry: str = knob("", help="adapter registry: a directory (SQLite index, default: the home's registry/, see "
                                  "--home) or a postgresql:// URL shared by a fleet of replicas (then --objects is "
                                  "required)")
    objects: str = knob("", help="folder of adapter files (content-addressed, immutable); with a postgresql:// "
                                 "registry, one every replica mounts (NFS, a ReadWriteMany volume) [default: inside "
                                 "the registry directory]")
    object_grace_period: float = knob(600.0, lo=0, help="seconds an unused adapter file or unfinished upload is kept "
                                                        "in a shared --objects folder before removal (longer than any "
                                                        "request waits to start)")
    import_dirs: list[str] = knob(default_factory=list, flag="--import-dir",
                                  help="server-side directories RegisterAdapter(server_path=...) may read from")
    adapters: list[str] = knob(default_factory=list, flag="--adapter",
                               help="NAME=PATH: register a PEFT adapter directory at start-up (repeatable)")
    host_cache_bytes: int = knob(2 << 30, help="byte budget of the host-memory adapter cache", lo=0)
    metrics_adapter_labels: int = knob(32, help="distinct adapter label values in metrics before the rest count as "
                                                "'other'", lo=0)
    log_level: str = knob("info", help="debug | info | warning | error", choices=("debug", "info", "warning", "error"))
    event_loop: str = knob("auto", choices=("auto", "uvloop", "asyncio"),
                           help="the servers' event loop: uvloop (auto: where it imports) spends less CPU a streamed "
                                "message than asyncio's own loop, CPU the engine shares on small machines")
    stream_interval: int = knob(1, lo=1, hi=256, help="tokens a streamed message carries: a stream's first token goes "
                                                      "out at once, then a message every this many tokens, and the "
                                                      "last at once (1 = every token; more = fewer messages, less "
                                                      "CPU a streamed token, coarser arrival)")
    stalled_stream_timeout: float = knob(30.0, lo=0, help="seconds a streamed response may wait on a client that reads "
                                         "nothing before its request is aborted (KV blocks and adapter slot freed); "
                                         "0 = wait forever")
    tls_cert: str = knob("", help="PEM certificate chain: serve gRPC and the HTTP API over TLS; re-read on SIGHUP")
    tls_key: str = knob("", help="PEM private key of --tls-cert")
    tls_client_ca: str = knob("", help="PEM CA bundle for mutual TLS: clients must present a certificate it signed")
    metrics_tls: bool = knob(False, help="serve /metrics over TLS too (same certificate; client certificates with "
                                         "--tls-client-ca)")

    def __post_init__(self) -> None:
        knobs.check(self, "server")
        for spec in self.adapters:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise InvalidRequestError("server.adapters", f"{spec!r}: expected NAME=PATH")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidRequestError("server.tls_cert", "--tls-cert and --tls-key go together; set both or neither")
        for name in ("tls_client_ca", "metrics_tls"):
            if getattr(self, name) and not self.tls_cert:
                raise InvalidRequestError(f"server.{name}", "needs --tls-cert and --tls-key (TLS itself)")
        if self.registry.startswith(("postgresql://", "postgres://")) and not self.objects:
            raise InvalidRequestError("server.objects", "a postgresql:// registry needs --objects DIR: the folder of "
                                      "adapter files every replica mounts")


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def _sections() -> dict[str, type]:
    return {"server": ServerConfig, "engine": EngineConfig}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


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
            flag = _flag(f)
            help_ = f.metadata["help"]
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
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
            group.add_argument(flag, **kw)


def from_args(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "__" in key and value is not None:
            section, name = key.split("__", 1)
            out.setdefault(section, {})[name] = value
    return out


def load(args: Optional[argparse.Namespace] = None, env: Optional[Mapping[str, str]] = None) -> Config:
    """Merge the four sources, defaults < TOML < environment < flags, and validate the result once.

    A value refused by the validation is reported with the source that gave it (file, variable or flag).
    """
    env = os.environ if env is None else env
    path = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG") or None
    flags = {f"{s}.{f.name}": _flag(f) for s, cls in _sections().items() for f in dataclasses.fields(cls)}
    layers: list[tuple[dict[str, dict[str, Any]], Callable[[str], str]]] = [  # (values, the source of a key)
        (from_toml(Path(path)) if path else {}, lambda key: str(path)),
        (from_env(env), lambda key: ENV_PREFIX + key.partition(".")[2].upper()),
        (from_args(args) if args is not None else {}, flags.__getitem__),
    ]
    merged: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}  # "section.field" -> the file, variable or flag its value came from
    for layer, source in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
            origin.update({key: source(key) for key in (f"{section}.{name}" for name in values)})
    try:
        return Config(server=ServerConfig(**merged.get("server", {})),
                      engine=EngineConfig(**merged.get("engine", {})))
    except InvalidRequestError as e:
        if e.field not in origin:  # a default or a check across fields
            raise
        message = str(e)[len(e.field) + 2:]  # InvalidRequestError reads "field: message"
        raise InvalidRequestError(f"{origin[e.field]}: {e.field}", message) from None


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
    s = cfg.server
    if not s.tenants and not is_loopback(s.host):
        out.append(f"listening on {s.host} without --tenants: anyone who can reach this port "
                   "can generate and manage adapters (no authentication)")
    if s.tenants and not s.tls_cert and not is_loopback(s.host):
        out.append(f"INSECURE: --tenants on {s.host} without --tls-cert/--tls-key: API keys cross the network "
                   "in clear text and anyone on the path can read and replay them; serve with TLS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cfg.engine.cpu_threads > cores:
        out.append(f"--cpu-threads {cfg.engine.cpu_threads} is more than the {cores} cores this process may use: "
                   "the engine's threads will take turns on them and every step waits for the slowest")
    for d in s.import_dirs:
        if not Path(d).expanduser().is_dir():
            out.append(f"--import-dir {d} is not a directory (yet): registering adapters from it fails until it is")
    return out
