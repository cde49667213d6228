"""Two-process DDP (gloo on CPU) equals one process; the trained adapter served by loraserve equals PEFT;
registration streams exactly the adapter's bytes and provenance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.export import WEIGHTS_NAME
from trainer.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


def _rows(n: int) -> list[dict]:
    # Different lengths, so the two ranks pad their micro-batches differently from one process.
    return [{"prompt": f"item {i} " + "x" * (i % 5) + "=", "completion": f" v{i % 7}{'y' * (i % 3)}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ddp")
    p = d / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _rows(24)))
    # An odd count: the two ranks hold different numbers of eval examples.
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(29)[24:]))
    return p


def _common(tiny_dir: Path, data: Path, home: Path) -> list[str]:
    return ["--data", str(data), "--model", str(tiny_dir), "--rank", "4", "--alpha", "8", "--lr", "1e-2",
            "--max-steps", "4", "--dropout", "0", "--seed", "5", "--warmup-ratio", "0", "--save-every", "2",
            "--home", str(home), "--no-progress", "--eval", str(data.parent / "eval.jsonl"), "--eval-every", "2"]


@pytest.mark.slow
def test_two_process_gloo_ddp_equals_one_process(tiny_dir, ddp_data, tmp_path):
    """Each of 2 ranks takes 3 examples per step; one process taking 6 sees the same examples per step,
    and with the loss normalized by the step's global token count, the same gradients."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainer.cli", *_common(tiny_dir, ddp_data, tmp_path / "home"), "--batch-size", "3",
           "--output", str(ddp_out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((ddp_out / "report.json").read_text())
    assert report["metrics"]["world_size"] == 2
    assert report["hyperparameters"]["batch_size_global"] == 6
    ckpt = ddp_out / "checkpoints" / "step-00000004"
    assert (ckpt / "rng-rank0.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()

    single = train(TrainConfig(data=str(ddp_data), output=str(tmp_path / "one"), model=str(tiny_dir), rank=4,
                               alpha=8, lr=1e-2, max_steps=4, dropout=0.0, seed=5, warmup_ratio=0.0,
                               batch_size=6, save_every=0, progress=False, home=str(tmp_path / "home"),
                               eval=str(ddp_data.parent / "eval.jsonl"), eval_every=2))
    one_losses = [h["loss"] for h in single.history if h["kind"] == "train"]
    ddp_losses = [h["loss"] for h in report["history"] if h["kind"] == "train"]
    assert ddp_losses == pytest.approx(one_losses, rel=1e-5)
    one_evals = [h["eval_loss"] for h in single.history if h["kind"] == "eval"]
    ddp_evals = [h["eval_loss"] for h in report["history"] if h["kind"] == "eval"]
    assert len(ddp_evals) == 2 and ddp_evals == pytest.approx(one_evals, rel=1e-5)
    a, b = load_file(str(ddp_out / WEIGHTS_NAME)), load_file(str(tmp_path / "one" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


@pytest.mark.slow
def test_trained_adapter_served_by_loraserve_equals_peft_greedy(tiny_dir, ddp_data, tmp_path):
    from server.engine.types import Request, SamplingParams
    from tests.engine.engine_utils import local_adapter, make_engine
    from tests.helpers import peft_greedy

    out = tmp_path / "adapter"
    # Big steps so the adapter changes greedy outputs (checked below against the base).
    train(TrainConfig(data=str(ddp_data), output=str(out), model=str(tiny_dir), rank=8, alpha=32, lr=5e-2,
                      max_steps=6, batch_size=8, save_every=0, progress=False, home=str(tmp_path / "home"),
                      targets=("q", "k", "v", "o", "gate", "up", "down")))
    eng = make_engine(tiny_dir)
    try:
        prompts = [list(range(40, 52)), [105, 116, 101, 109, 32, 51, 61], [7, 8, 9]]
        streams = [eng.submit(Request(p, SamplingParams(max_new_tokens=10, ignore_eos=True),
                                      local_adapter(eng, "trained", out))) for p in prompts]
        served = [s.collect().token_ids for s in streams]
    finally:
        eng.shutdown()
    expected = [peft_greedy(tiny_dir, out, p, 10) for p in prompts]
    assert served == expected
    assert expected != [peft_greedy(tiny_dir, None, p, 10) for p in prompts]


def test_register_streams_config_weights_and_provenance(tiny_dir, ddp_data, tmp_path, capsys):
    """`loraserve trainer ... --register` trains, then uploads header + chunks that rebuild the file."""
    import grpc

    from server.api.gen.loraserve.v1 import adapters_pb2 as pb
    from server.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
    from trainer.cli import main as cli_main
    from trainer.register import CHUNK_BYTES, RegistrationError, register_adapter

    got: dict = {}

    class Fake(pb_grpc.AdaptersServicer):
        def RegisterAdapter(self, request_iterator, context):
            reqs = list(request_iterator)
            got["header"] = reqs[0].header
            got["chunks"] = [r.chunk for r in reqs[1:]]
            got["auth"] = dict(context.invocation_metadata()).get("authorization")
            if got["header"].name == "taken":
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "adapter 'taken' exists")
            return pb.RegisterAdapterResponse(name=got["header"].name, adapter_id=f"{got['header'].name}@1",
                                              version=pb.AdapterVersion(version=1, digest="d" * 64))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AdaptersServicer_to_server(Fake(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    out = tmp_path / "adapter"
    try:
        rc = cli_main(["--data", str(ddp_data), "--output", str(out), "--model", str(tiny_dir), "--rank", "2",
                       "--alpha", "4", "--max-steps", "1", "--targets", "q", "--home", str(tmp_path / "home"),
                       "--no-progress", "--register", "--target", f"127.0.0.1:{port}", "--name", "mine",
                       "--api-key", "k1"])
        assert rc == 0
        assert "registered mine@1" in capsys.readouterr().out
        h = got["header"]
        assert h.name == "mine" and json.loads(h.adapter_config_json)["r"] == 2
        weights = (out / WEIGHTS_NAME).read_bytes()
        assert b"".join(got["chunks"]) == weights and h.total_size == len(weights)
        assert all(len(c) <= CHUNK_BYTES for c in got["chunks"])
        assert got["auth"] == "Bearer k1"
        assert len(h.metadata["base_model_fingerprint"]) == 64
        assert json.loads(h.metadata["hyperparameters"])["rank"] == 2
        with pytest.raises(RegistrationError, match="ALREADY_EXISTS: adapter 'taken' exists"):
            register_adapter(out, f"127.0.0.1:{port}", "taken")
    finally:
        server.stop(None)
    with pytest.raises(RegistrationError, match="has no adapter_config.json"):
        register_adapter(tmp_path, "127.0.0.1:1", "x")
