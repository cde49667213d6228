"""The training loop on a tiny random Llama: learning, PEFT output, resume, early stopping, CLI errors."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main as cli_main
from trainer.export import CONFIG_NAME, CURVE_NAME, PROVENANCE_KEY, REPORT_NAME, WEIGHTS_NAME, read_provenance
from trainer.train import TrainConfig, TrainingConfigError, train, warmup_cosine

KEYS = [f"k{i}" for i in range(8)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A lookup the tiny model can learn quickly: key -> a fixed three-character value."""
    d = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"{k}=", "completion": f"{chr(97 + i)}{chr(98 + i)}{chr(99 + i)}"}
            for i, k in enumerate(KEYS)]
    return {"train": write_jsonl(d / "train.jsonl", rows * 4), "eval": write_jsonl(d / "eval.jsonl", rows),
            # Same prompts, other answers: learning the training data makes this eval loss worse.
            "anti": write_jsonl(d / "anti.jsonl", [{"prompt": r["prompt"], "completion": "zzz"} for r in rows])}


def cfg(tiny_dir: Path, data: dict[str, Path], out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data["train"]), output=str(out), model=str(tiny_dir), rank=4, alpha=8, lr=5e-3,
                batch_size=4, max_steps=12, warmup_ratio=0.1, seed=3, save_every=0, progress=False,
                home=str(out.parent / "home"), dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / WEIGHTS_NAME))


@pytest.mark.slow
def test_loss_falls_and_eval_improves(tiny_dir, data, tmp_path):
    res = train(cfg(tiny_dir, data, tmp_path / "run", eval=str(data["eval"]), max_steps=30, eval_every=10,
                    lr=2e-2, rank=8, alpha=16))
    losses = [h["loss"] for h in res.history if h["kind"] == "train"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    evals = [h["eval_loss"] for h in res.history if h["kind"] == "eval"]
    assert len(evals) == 3 and evals[-1] < evals[0]
    m = res.metrics
    assert m["eval_ppl"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["tokens_seen"] > 0 and m["tokens_per_s"] > 0
    # lr follows warmup then cosine.
    lrs = [h["lr"] for h in res.history if h["kind"] == "train"]
    assert lrs[0] < lrs[2] and lrs[3] == pytest.approx(2e-2, rel=0.01) and lrs[-1] < 1e-3


def test_output_is_a_peft_adapter_with_provenance(tiny_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.lora.weights import load_peft_adapter
    from server.model.config import ModelConfig
    from server.model.loader import model_fingerprint

    out = tmp_path / "run"
    res = train(cfg(tiny_dir, data, out, eval=str(data["eval"]), targets=("q", "v", "down"), max_steps=6))
    for name in (CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME, CURVE_NAME):
        assert (out / name).is_file(), name
    assert (out / CURVE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acfg = json.loads((out / CONFIG_NAME).read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 4 and acfg["lora_alpha"] == 8
    assert sorted(acfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert acfg["base_model_name_or_path"] == str(tiny_dir)

    # PEFT loads it and holds exactly the trained tensors.
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, out)
    saved = adapter_tensors(out)
    assert len(saved) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    sd = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    for k, v in saved.items():
        assert torch.equal(sd[k.replace(".weight", ".default.weight")], v), k
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B moved away from its zero init

    # loraserve's own reader accepts it.
    w = load_peft_adapter(out, ModelConfig.from_file(tiny_dir / "config.json"), max_rank=16)
    assert w.rank == 4 and w.targets == ("q", "v", "down")

    prov = read_provenance(out)
    assert prov["base_model_fingerprint"] == model_fingerprint(tiny_dir, tmp_path / "home")
    import hashlib
    assert prov["train_data_sha256"] == hashlib.sha256(data["train"].read_bytes()).hexdigest()
    assert prov["eval_data_sha256"] == hashlib.sha256(data["eval"].read_bytes()).hexdigest()
    assert prov["hyperparameters"]["rank"] == 4 and prov["hyperparameters"]["lr"] == 5e-3
    assert prov["hyperparameters"]["targets"] == ["q", "v", "down"]
    assert prov["metrics"]["steps"] == 6 and prov["metrics"]["eval_loss"] == res.metrics["eval_loss"]
    assert prov["loraserve_version"] not in ("", "unknown")
    from safetensors import safe_open
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and PROVENANCE_KEY in meta
    assert meta["loraserve.base_model_fingerprint"] == prov["base_model_fingerprint"]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["metrics"] == json.loads(json.dumps(res.metrics))
    assert len([h for h in report["history"] if h["kind"] == "train"]) == 6


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tiny_dir, data, tmp_path):
    """Stop after step 4 of 10 (the checkpoint is all that survives), resume in a fresh Trainer."""
    kw = dict(eval=str(data["eval"]), max_steps=10, save_every=4, keep_checkpoints=5, eval_every=3,
              grad_accum=2, batch_size=3, dropout=0.2)
    full = train(cfg(tiny_dir, data, tmp_path / "full", **kw))
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000004"
    assert ckpt.is_dir()
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, part / "checkpoints" / ckpt.name)
    resumed = train(cfg(tiny_dir, data, part, resume="latest", **kw))
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert [round(h.get("loss", h.get("eval_loss")), 6) for h in resumed.history] == \
        [round(h.get("loss", h.get("eval_loss")), 6) for h in full.history]
    assert resumed.metrics["best_step"] == full.metrics["best_step"]


def test_resume_refuses_changed_settings_or_data(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_dir, data, out, max_steps=4, save_every=2))
    with pytest.raises(TrainingConfigError, match=r"different settings \(lr: checkpoint 0.005 vs now 0.001\)"):
        train(cfg(tiny_dir, data, out, max_steps=4, lr=1e-3, resume="latest"))
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x=", "completion": "y"}] * 8)
    with pytest.raises(TrainingConfigError, match="trained on different data"):
        train(cfg(tiny_dir, {**data, "train": other}, out, max_steps=4, resume="latest"))
    with pytest.raises(TrainingConfigError, match="no checkpoint under"):
        train(cfg(tiny_dir, data, tmp_path / "empty", max_steps=4, resume="latest"))


def test_checkpoints_are_pruned_to_keep_count(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_dir, data, out, max_steps=7, save_every=2, keep_checkpoints=2))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000007"]


def test_early_stopping_restores_best_weights(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    res = train(cfg(tiny_dir, data, out, eval=str(data["anti"]), max_steps=40, eval_every=2, patience=2,
                    save_every=0, lr=1e-2))
    m = res.metrics
    assert m["stopped_early"] and m["steps"] < 40
    evals = [h for h in res.history if h["kind"] == "eval"]
    assert m["best_step"] == min(evals, key=lambda h: h["eval_loss"])["step"]
    assert m["exported_step"] == m["best_step"]
    # The exported weights reproduce the best eval loss, not the last one.
    best = min(h["eval_loss"] for h in evals)
    assert best < evals[-1]["eval_loss"]
    assert _eval_loss_of(tiny_dir, out, data["anti"]) == pytest.approx(best, rel=1e-4)


def _eval_loss_of(tiny_dir: Path, adapter: Path, path: Path) -> float:
    """Mean token loss of an exported adapter on a JSONL file, computed with plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.model.loader import load_tokenizer
    from trainer.data import DataConfig, collate, load_dataset

    tok = load_tokenizer(tiny_dir)
    ds = load_dataset(path, tok, DataConfig())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                      adapter).eval()
    b = collate(ds.examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                   ignore_index=-100))


def test_progress_bar_shows_loss_and_throughput(tiny_dir, data, tmp_path, capsys):
    train(cfg(tiny_dir, data, tmp_path / "run", max_steps=3, progress=True))
    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err and "3/3" in err


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup=4, total=14, min_ratio=0.1)
    assert [round(f(s), 4) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1)


@pytest.mark.parametrize("kw,msg", [
    (dict(epochs=1, max_steps=3), "give --epochs or --max-steps, not both"),
    (dict(rank=0), "--rank: must be at least 1"),
    (dict(targets=("q", "lm_head")), "--targets: unknown ['lm_head']"),
    (dict(lr=-1.0), "--lr: must be a positive number"),
    (dict(warmup_ratio=1.0), "--warmup-ratio: must be in [0, 1)"),
    (dict(patience=2), "early stopping needs --eval data"),
    (dict(grad_accum=0), "--grad-accum: must be at least 1"),
])
def test_bad_settings_are_refused(tiny_dir, data, tmp_path, kw, msg):
    c = cfg(tiny_dir, data, tmp_path / "run", **{"max_steps": None, **kw})
    with pytest.raises(TrainingConfigError) as e:
        c.validate()
    assert msg in str(e.value)


def test_cli_data_error_stops_before_training(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"text": "mixed"}\n')
    rc = cli_main(["--data", str(bad), "--output", str(tmp_path / "out"), "--model", str(tiny_dir),
                   "--home", str(tmp_path / "home"), "--max-steps", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mixed record formats" in err
    assert not (tmp_path / "out").exists()


def test_cli_flag_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["--data", "x", "--output", "y", "--epochs", "1", "--max-steps", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--data", "x", "--output", "y", "--register"])
    assert "--register needs --target HOST:PORT and --name NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--data", "x", "--output", "y", "--targets", "q,zz"])
    assert "unknown target(s) ['zz']" in capsys.readouterr().err


def test_cli_trains_with_every_documented_flag(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["--data", str(data["train"]), "--eval", str(data["eval"]), "--output", str(out),
                   "--model", str(tiny_dir), "--rank", "2", "--alpha", "4", "--targets", "q,k,v,o,gate,up,down",
                   "--epochs", "2", "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "2", "--max-seq-len", "16",
                   "--warmup-ratio", "0.1", "--seed", "7", "--home", str(tmp_path / "home"), "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    # 32 examples / (4 x 2) per step = 4 steps per epoch.
    assert summary["steps"] == 8 and summary["output"] == str(out)
    assert json.loads((out / CONFIG_NAME).read_text())["r"] == 2


def test_time_limit_stops_cleanly_and_resume_finishes_the_same_run(tiny_dir, data, tmp_path):
    """A run cut by --time-limit exports what it has; `--resume` then completes it exactly."""
    kw = dict(max_steps=5, save_every=0, dropout=0.2)
    cut = train(cfg(tiny_dir, data, tmp_path / "cut", time_limit=1e-9, **kw))
    assert cut.metrics["out_of_time"] and cut.metrics["steps"] == 1
    assert (tmp_path / "cut" / WEIGHTS_NAME).is_file()
    done = train(cfg(tiny_dir, data, tmp_path / "cut", resume="latest", **kw))
    assert done.metrics["steps"] == 5 and not done.metrics["out_of_time"]
    train(cfg(tiny_dir, data, tmp_path / "whole", **kw))
    a, b = adapter_tensors(tmp_path / "cut"), adapter_tensors(tmp_path / "whole")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_an_output_that_cannot_be_written_stops_before_training(tiny_dir, data, tmp_path, capsys):
    """Found before the first step, not when the first checkpoint is written (it used to end in a traceback)."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    rc = cli_main(["--data", str(data["train"]), "--output", str(blocked / "out"), "--model", str(tiny_dir),
                   "--home", str(tmp_path / "home"), "--max-steps", "2", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--output: {blocked} is not a directory" in err and "Traceback" not in err
