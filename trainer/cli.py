"""`loraserve trainer`: train a LoRA adapter from JSONL, optionally register it with a server.

Multi-process: `torchrun --nproc-per-node N -m trainer.cli --data ...` (one rank per
process; rank 0 writes the output and registers).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from server.client.channel import ClientTls, add_tls_flags
from server.core.errors import LoraServeError
from server.model.config import TARGETS
from trainer.train import TrainConfig, train

log = logging.getLogger("trainer")


def _targets(s: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in s.split(",") if t.strip())
    bad = [t for t in items if t not in TARGETS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown target(s) {bad or [s]}; choose from {','.join(TARGETS)}")
    return items


def build_parser(prog: str = "loraserve trainer") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a PEFT LoRA adapter for the served base model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training JSONL: prompt/completion, messages or text records")
    g.add_argument("--eval", default=None, help="eval JSONL in the same format (eval loss, perplexity, early stop)")
    g.add_argument("--max-seq-len", type=int, default=512, help="longer examples are truncated (and reported)")
    g.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop before training when more than this share of lines is malformed")
    g = p.add_argument_group("model and adapter")
    g.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf or an HF dir")
    g.add_argument("--output", required=True, help="directory for the PEFT adapter, report and checkpoints")
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--alpha", type=float, default=32.0)
    g.add_argument("--dropout", type=float, default=0.05)
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) (rsLoRA)")
    g.add_argument("--targets", type=_targets, default=TARGETS, help="comma-separated subset of " + ",".join(TARGETS))
    g = p.add_argument_group("optimization")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--epochs", type=int, default=None, help="passes over the data (default 1)")
    n.add_argument("--max-steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to lr times this")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=0, help="steps between evals; 0 = every epoch")
    g.add_argument("--patience", type=int, default=0, help="stop after this many evals without improvement")
    g.add_argument("--min-delta", type=float, default=0.0, help="smallest eval-loss drop that counts")
    g.add_argument("--no-restore-best", dest="restore_best", action="store_false",
                   help="export the last weights instead of the best-eval ones")
    g = p.add_argument_group("checkpoints and runtime")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (0 = at the end only)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --output (or the one named)")
    g.add_argument("--time-limit", type=float, default=0.0,
                   help="stop cleanly (and export) after this many seconds of training; 0 = no limit")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16")
    g.add_argument("--home", default="", help="loraserve cache dir (default $LORASERVE_HOME or ~/.cache/loraserve)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="log lines instead of a bar")
    g = p.add_argument_group("registration")
    g.add_argument("--register", action="store_true", help="upload the adapter to a running server when done")
    g.add_argument("--target", default=os.environ.get("LORASERVE_TARGET", ""), help="server HOST:PORT")
    g.add_argument("--name", default="", help="adapter name to register under")
    g.add_argument("--api-key", default=os.environ.get("LORASERVE_API_KEY", ""), help="tenant API key")
    add_tls_flags(g)
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=a.data, eval=a.eval, output=a.output, model=a.model, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
        use_rslora=a.rslora, targets=tuple(a.targets), epochs=a.epochs, max_steps=a.max_steps, lr=a.lr,
        min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay, batch_size=a.batch_size, grad_accum=a.grad_accum,
        max_seq_len=a.max_seq_len, warmup_ratio=a.warmup_ratio, max_grad_norm=a.max_grad_norm, seed=a.seed,
        eval_every=a.eval_every, patience=a.patience, min_delta=a.min_delta, restore_best=a.restore_best,
        save_every=a.save_every, keep_checkpoints=a.keep_checkpoints, resume=a.resume, device=a.device,
        dtype=a.dtype, home=a.home, time_limit=a.time_limit, progress=a.progress, max_bad_fraction=a.max_bad_fraction)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.register and not (args.target and args.name):
        parser.error("--register needs --target HOST:PORT and --name NAME")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = train(config_from_args(args))
    except LoraServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    m = result.metrics
    summary = {k: m.get(k) for k in ("steps", "train_loss_first", "train_loss_last10", "eval_loss", "eval_ppl",
                                     "best_eval_loss", "stopped_early", "train_seconds", "tokens_per_s")}
    print(json.dumps({"output": str(result.output), **summary}, indent=2))
    if args.register:
        from trainer.register import register_adapter

        try:
            reg = register_adapter(result.output, args.target, args.name, args.api_key, tls=ClientTls.from_args(args))
        except LoraServeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        print(f"registered {reg.adapter_id} (sha256 {reg.digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
