"""One fleet per module on loopback: PostgreSQL, N replicas of the tiny random model, HAProxy.

`make test` (and CI) runs it with 2 replicas; `make fleet-test` with 3 (LORASERVE_FLEET_REPLICAS).
The model is the session's tiny random Llama (tests/conftest.py), so a replica starts in seconds;
fp32 without quantization, so every replica computes bit-identical greedy tokens.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.fleet.adapters import write_random_adapter
from server.fleet.local import LocalFleet

from .load import call

REPLICAS = int(os.environ.get("LORASERVE_FLEET_REPLICAS", "2"))
ADAPTERS = [f"ad{i}" for i in range(12)]
SERVE_ARGS = ["--quantize", "none", "--dtype", "float32", "--max-rank", "16", "--cpu-threads", "1",
              "--max-adapters-on-device", "16", "--metrics-adapter-labels", "64", "--grace-period", "20",
              "--object-grace-period", "60"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet-adapters")
    return {name: write_random_adapter(tiny_dir, root / name, rank=4 + i % 3 * 4, seed=i, std=0.2)
            for i, name in enumerate(ADAPTERS + ["fresh", "fresh-v2", "late"])}


@pytest.fixture(scope="module")
def fleet(tiny_dir, tmp_path_factory, adapter_dirs):
    f = LocalFleet(REPLICAS, model=str(tiny_dir), workdir=tmp_path_factory.mktemp("fleet"), serve_args=SERVE_ARGS)
    f.start()
    try:
        for name in ADAPTERS:
            assert f.register(name, adapter_dirs[name]) == f"{name}@1"
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def references(fleet) -> dict[str, tuple[int, ...]]:
    """Each adapter's greedy tokens, from one request through the proxy before anything is broken."""
    import grpc

    from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(fleet.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        out = {}
        for name in ADAPTERS:
            c = call(stub, name)
            assert c.ok and len(c.tokens) > 0, c
            out[name] = c.tokens
    assert len(set(out.values())) > 1  # the adapters really differ
    return out
