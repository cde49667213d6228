"""The Adapters service through the real server: pins, deletes under traffic, imports, bad uploads, restarts."""
from __future__ import annotations

import struct
import threading
from pathlib import Path

import grpc
import pytest

from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.model.config import ModelConfig
from tests.e2e.conftest import start_server
from tests.helpers import make_tiny_model_dir
from tests.registry.adapters import make_adapter
from tests.registry.client import Client, _request

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def status(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_admin_lifecycle_and_restart(tmp_path: Path):
    model = make_tiny_model_dir(tmp_path / "model")
    mc = ModelConfig.from_file(model / "config.json")
    imports = tmp_path / "imports"
    (imports / "good").mkdir(parents=True)
    c, w = make_adapter(model=mc, rank=8, targets=("q", "v", "gate", "down"), seed=11)
    (imports / "good" / "adapter_config.json").write_bytes(c)
    (imports / "good" / "adapter_model.safetensors").write_bytes(w)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_bytes(c)
    (outside / "adapter_model.safetensors").write_bytes(w)
    (imports / "escape").symlink_to(outside)
    boot = tmp_path / "boot"
    boot.mkdir()
    cb, wb = make_adapter(model=mc, seed=12)
    (boot / "adapter_config.json").write_bytes(cb)
    (boot / "adapter_model.safetensors").write_bytes(wb)
    args = ("--model", str(model), "--quantize", "none", "--dtype", "float32", "--import-dir", str(imports), "--adapter", f"boot={boot}",
            "--max-adapters-on-device", "2")
    env = {"LORASERVE_HOME": str(tmp_path / "home")}
    sp = start_server(tmp_path, *args, env=env)
    try:
        c_ = Client(sp.target)
        A = c_.adapters
        # server-side paths: inside the import dir only, symlinks resolved
        hdr = lambda **kw: iter([pb.RegisterAdapterRequest(header=pb.RegisterAdapterHeader(**kw))])  # noqa: E731
        r = A.RegisterAdapter(hdr(name="imp", server_path=str(imports / "good")))
        assert r.adapter_id == "imp@1" and r.version.rank == 8
        for p in (outside, imports / "escape", imports / ".." / "outside", Path("/etc")):
            code, msg = status(A.RegisterAdapter, hdr(name="bad", server_path=str(p)))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (p, code, msg)
        # start-up adapters are registered (and not again on restart: see below)
        assert c_.generate("boot", "hi", 2).adapter_version == 1
        # pin: delete refused; unload unpins; then delete works
        loaded = A.LoadAdapter(pb.LoadAdapterRequest(adapter_id="imp", pin=True))
        assert loaded.pinned and loaded.adapter_id == "imp@1"
        info = A.GetAdapter(pb.GetAdapterRequest(adapter_id="imp"))
        assert info.versions[0].tier == pb.TIER_DEVICE and info.versions[0].pinned
        code, msg = status(A.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id="imp@1"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in msg
        un = A.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="imp"))
        assert un.was_on_device
        assert A.GetAdapter(pb.GetAdapterRequest(adapter_id="imp")).versions[0].tier != pb.TIER_DEVICE
        # delete while a request streams on that version: it finishes on it; new ones get NOT_FOUND
        c2, w2 = make_adapter(model=mc, rank=4, targets=("q", "v"), seed=13)
        c_.register("live", c2, w2)
        alone = list(c_.generate("live@1", [3, 4, 5], 200).token_ids)
        got: list = []
        first = threading.Event()

        def stream():
            ids, version = [], 0
            for chunk in c_.inference.GenerateStream(_request("live", [3, 4, 5], 200), timeout=120):
                ids.extend(chunk.token_ids)
                version = chunk.adapter_version or version
                first.set()
            got.append((ids, version))

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(60)
        assert list(A.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="live")).deleted_versions) == [1]
        assert status(c_.generate, "live", "x", 2) == (grpc.StatusCode.NOT_FOUND, "adapter 'live' not found")
        t.join(120)
        assert got and got[0] == (alone, 1), "the in-flight request did not finish on its version"
        # bad uploads: every one INVALID_ARGUMENT, nothing stored
        before = {a.name for a in A.ListAdapters(pb.ListAdaptersRequest()).adapters}
        bad = {
            "truncated": w[: len(w) // 2],
            "huge header": struct.pack("<Q", 1 << 40) + b"{}",
            "lying offsets": struct.pack("<Q", 60) + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,999]}}'
                             .ljust(60) + b"\0" * 16,
            "pickle": b"PK\x03\x04" + b"\0" * 200,
            "int weights": _int_tensor(),
        }
        for what, weights in bad.items():
            code, msg = status(c_.register, f"bad-{what.replace(' ', '-')}", c, weights)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, msg)
        assert {a.name for a in A.ListAdapters(pb.ListAdaptersRequest()).adapters} == before
        for cfg in (b'{"use_dora": true, "r": 8, "lora_alpha": 8}', b'{"r": 8, "lora_alpha": 8, "bias": "all"}',
                    b'{"r": 8, "lora_alpha": 8, "modules_to_save": ["lm_head"]}', b"[]"):
            code, msg = status(c_.register, "bad-config", cfg, w)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (cfg, code, msg)
        big = make_adapter(model=mc, rank=64, targets=("q",), seed=1)
        code, msg = status(c_.register, "too-big-rank", *big)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max rank" in msg
        other = ModelConfig(**{**mc.__dict__, "hidden_size": mc.hidden_size * 2, "raw": {}})
        code, msg = status(c_.register, "wrong-base", *make_adapter(model=other))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "do not fit the base" in msg
        expect_imp = list(c_.generate("imp", [7, 8, 9], 5).token_ids)
        c_.close()
    finally:
        assert sp.stop() == 0, sp.log_tail()
    # restart on the same registry: everything is still there, outputs unchanged, boot not re-versioned
    sp = start_server(tmp_path, *args, env=env)
    try:
        c_ = Client(sp.target)
        names = {a.name: a.latest_version for a in c_.adapters.ListAdapters(pb.ListAdaptersRequest()).adapters}
        assert names == {"boot": 1, "imp": 1}
        assert list(c_.generate("imp@1", [7, 8, 9], 5).token_ids) == expect_imp
        c_.close()
    finally:
        assert sp.stop() == 0, sp.log_tail()


def _int_tensor() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8, dtype=torch.int32)})
