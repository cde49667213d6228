"""Config precedence: defaults < TOML < LORASERVE_* env < flags, and clear errors for bad values."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from server.core import config
from server.core.engine_config import cpu_has_native_bf16
from server.core.errors import InvalidRequestError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_flags(p)
    return p.parse_args(list(argv))


def test_defaults() -> None:
    cfg = config.load(parse(), env={})
    assert (cfg.server.host, cfg.server.port, cfg.server.metrics_port) == ("127.0.0.1", 50051, 50091)
    assert cfg.server.http_port == 50080  # neither Prometheus's 9090 nor the 8000/8080 of common tools
    assert cfg.engine.quantize == "int8" and cfg.engine.model == "default" and cfg.server.adapters == []


def test_precedence_flags_over_env_over_toml(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[server]\nport = 6000\nmetrics_port = 6001\ngrace_period = 5.5\nimport_dirs = ["/a"]\n'
                    '[engine]\nquantize = "int4"\nmax_rank = 16\nmax_adapters_on_device = 3\n')
    env = {"LORASERVE_PORT": "7000", "LORASERVE_MAX_RANK": "48", "LORASERVE_IMPORT_DIRS": "/b,/c"}
    cfg = config.load(parse("--config", str(toml), "--port", "8000", "--adapter", "x=/p"), env=env)
    assert cfg.server.port == 8000                    # flag beats env and file
    assert cfg.engine.max_rank == 48                  # env beats file
    assert cfg.server.import_dirs == ["/b", "/c"]     # env list, comma-separated
    assert cfg.server.metrics_port == 6001 and cfg.server.grace_period == 5.5  # file beats defaults
    assert cfg.engine.quantize == "int4" and cfg.engine.max_adapters_on_device == 3
    assert cfg.server.adapters == ["x=/p"]
    # LORASERVE_CONFIG names the file when --config is absent.
    assert config.load(parse(), env={"LORASERVE_CONFIG": str(toml)}).server.port == 6000


@pytest.mark.parametrize("text,needle", [
    ("[server]\nprot = 1\n", "unknown key server.prot"),
    ("[nope]\nx = 1\n", "unknown table [nope]"),
    ("[server]\nport = \"abc\"\n", "server.port"),
    ("[engine]\nquantize = \"int3\"\n", "choose one of none, int8, int4"),
    ("[server]\nport = 70000\n", "allowed range is [0, 65535]"),
    ("not toml [", "not valid TOML"),
])
def test_bad_files_say_what_is_wrong(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(InvalidRequestError) as e:
        config.load(parse("--config", str(f)), env={})
    assert needle in str(e.value)


def test_bad_env_and_adapter_flag() -> None:
    with pytest.raises(InvalidRequestError, match="LORASERVE_PORT"):
        config.load(parse(), env={"LORASERVE_PORT": "eighty"})
    with pytest.raises(InvalidRequestError, match="NAME=PATH"):
        config.load(parse("--adapter", "nopath"), env={})
    with pytest.raises(SystemExit):
        parse("--quantize", "fp8")


def test_warns_beyond_loopback_without_tenants() -> None:
    assert config.startup_warnings(config.load(parse(), env={})) == []
    assert config.startup_warnings(config.load(parse("--host", "::1"), env={})) == []
    warn = config.startup_warnings(config.load(parse("--host", "0.0.0.0"), env={}))
    assert len(warn) == 1 and "without --tenants" in warn[0]
    tls = ("--tls-cert", "c.pem", "--tls-key", "k.pem")
    assert config.startup_warnings(config.load(parse("--host", "0.0.0.0", "--tenants", "t.toml", *tls),
                                               env={})) == []


def test_warns_loudly_when_tenants_keys_would_cross_the_network_in_clear() -> None:
    warn = config.startup_warnings(config.load(parse("--host", "0.0.0.0", "--tenants", "t.toml"), env={}))
    assert len(warn) == 1 and warn[0].startswith("INSECURE") and "--tls-cert" in warn[0]
    assert config.startup_warnings(config.load(parse("--tenants", "t.toml"), env={})) == []  # loopback


def test_warns_of_an_import_dir_that_is_not_there(tmp_path) -> None:
    assert config.startup_warnings(config.load(parse("--import-dir", str(tmp_path)), env={})) == []
    warn = config.startup_warnings(config.load(parse("--import-dir", str(tmp_path / "typo")), env={}))
    assert len(warn) == 1 and f"--import-dir {tmp_path / 'typo'} is not a directory" in warn[0]


def test_tls_flags_env_and_toml(tmp_path) -> None:
    cfg = config.load(parse("--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
                            "--metrics-tls"), env={})
    assert (cfg.server.tls_cert, cfg.server.tls_key, cfg.server.tls_client_ca, cfg.server.metrics_tls) == (
        "c.pem", "k.pem", "ca.pem", True)
    env = {"LORASERVE_TLS_CERT": "e.pem", "LORASERVE_TLS_KEY": "ek.pem"}
    assert config.load(parse(), env=env).server.tls_cert == "e.pem"
    toml = tmp_path / "c.toml"
    toml.write_text('[server]\ntls_cert = "t.pem"\ntls_key = "tk.pem"\nmetrics_tls = true\n')
    assert config.load(parse("--config", str(toml)), env={}).server.metrics_tls is True
    for args, match in ((("--tls-cert", "c.pem"), "go together"), (("--tls-key", "k.pem"), "go together"),
                        (("--tls-client-ca", "ca.pem"), "needs --tls-cert"), (("--metrics-tls",), "needs --tls-cert")):
        with pytest.raises(InvalidRequestError, match=match):
            config.load(parse(*args), env={})


def test_every_knob_is_declared_once_with_its_help() -> None:
    """Help, choices and ranges live in the field: the flag offers exactly the field's choices."""
    p = argparse.ArgumentParser()
    config.add_flags(p)
    flags = {a.dest: a for a in p._actions}
    for section, cls in (("server", config.ServerConfig), ("engine", config.EngineConfig)):
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], f"{section}.{f.name} has no help"
            action = flags[f"{section}__{f.name}"]
            assert tuple(action.choices or ()) == f.metadata.get("choices", ())


def test_attention_and_home_are_knobs_like_any_other(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[engine]\nattention = "xformers"\nhome = "/from/toml"\n')
    assert config.load(parse(), env={}).engine.attention == "auto"
    assert config.load(parse("--config", str(toml)), env={}).engine.attention == "xformers"
    assert config.load(parse(), env={"LORASERVE_ATTENTION": "sdpa"}).engine.attention == "sdpa"
    assert config.load(parse("--attention", "sdpa"), env={"LORASERVE_ATTENTION": "xformers"}).engine.attention == "sdpa"
    with pytest.raises(InvalidRequestError, match="LORASERVE_ATTENTION: engine.attention: 'flash': choose one of "
                                                  "auto, sdpa, xformers"):
        config.load(parse(), env={"LORASERVE_ATTENTION": "flash"})
    with pytest.raises(SystemExit):
        parse("--attention", "flash")
    # --home > LORASERVE_HOME > TOML > default, all through the loader.
    both = {"LORASERVE_HOME": str(tmp_path / "env"), "LORASERVE_CONFIG": str(toml)}
    assert config.load(parse("--home", str(tmp_path / "flag")), env=both).engine.resolve_home() == tmp_path / "flag"
    assert config.load(parse(), env=both).engine.resolve_home() == tmp_path / "env"
    assert config.load(parse("--config", str(toml)), env={}).engine.resolve_home() == Path("/from/toml")


def test_values_are_checked_once_when_a_section_is_built() -> None:
    """Constructing a section validates it; a bad value is named with the source that gave it."""
    assert config.EngineConfig() == config.load(parse(), env={}).engine
    with pytest.raises(InvalidRequestError, match="engine.lora_decode_dtype: 'fp8': choose one of"):
        config.EngineConfig(lora_decode_dtype="fp8")
    with pytest.raises(InvalidRequestError, match="engine.max_rank: is 0; must be >= 1"):
        config.EngineConfig(max_rank=0)
    with pytest.raises(InvalidRequestError, match="engine.adapter_memory: 'lots': expected a size"):
        config.EngineConfig(adapter_memory="lots")
    with pytest.raises(InvalidRequestError, match=r"^LORASERVE_ADAPTER_MEMORY: engine.adapter_memory: '150%'"):
        config.load(parse(), env={"LORASERVE_ADAPTER_MEMORY": "150%"})
    assert config.load(parse("--adapter-memory", "256MiB"), env={}).engine.adapter_memory == "256MiB"
    with pytest.raises(InvalidRequestError, match=r"server.metrics_port: is -2; allowed range is \[-1, 65535\]"):
        config.ServerConfig(metrics_port=-2)
    with pytest.raises(InvalidRequestError, match=r"^--max-batch-size: engine.max_batch_size: is 0"):
        config.load(parse("--max-batch-size", "0"), env={"LORASERVE_MAX_BATCH_SIZE": "4"})
    with pytest.raises(InvalidRequestError, match=r"^LORASERVE_MAX_WAITING: engine.max_waiting: is 0"):
        config.load(parse(), env={"LORASERVE_MAX_WAITING": "0"})


def test_resolve_only_derives() -> None:
    cpu = torch.device("cpu")
    assert config.EngineConfig(dtype="bfloat16").resolve_dtype(cpu) == torch.bfloat16
    # The CPU int8 path computes between fp32 activations whatever the CPU; `none` keeps bf16 where it is native.
    assert config.EngineConfig(quantize="int8").resolve_dtype(cpu) == torch.float32
    assert config.EngineConfig(quantize="none").resolve_dtype(cpu) == (
        torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert config.EngineConfig(dtype="float16").resolve_dtype(torch.device("cuda")) == torch.float16
    assert config.EngineConfig(device="cpu").resolve_device() == cpu


def test_warns_of_more_threads_than_cores() -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    assert config.startup_warnings(config.load(parse("--cpu-threads", str(cores)), env={})) == []
    warn = config.startup_warnings(config.load(parse("--cpu-threads", str(cores + 1)), env={}))
    assert len(warn) == 1 and f"more than the {cores} cores" in warn[0]
