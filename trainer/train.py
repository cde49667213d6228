"""The LoRA training loop: PEFT on the very base the server loads, resumable to the bit.

One optimizer step = `grad_accum` micro-batches of `batch_size` examples per process.
The data order is a pure function of (seed, epoch), and every random state the loop
consumes (dropout) is saved in checkpoints, so `--resume` continues exactly where an
uninterrupted run would be. Loss is the mean over trainable tokens of a whole step
(all micro-batches and all processes together), not a mean of per-batch means, so
accumulation and data parallelism do not change what is optimized.

Several processes run under `torchrun` (DDP: gloo on CPU, NCCL on CUDA); the
environment variables torchrun sets are all it takes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from server.core.errors import LoraServeError
from server.core.paths import unwritable_reason
from server.model.config import TARGET_MODULES, TARGETS
from trainer import export
from trainer.data import IGNORE_INDEX, DataConfig, Dataset, collate, load_dataset

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"


class TrainingConfigError(LoraServeError):
    """A hyperparameter or option that cannot work; the message names it."""


@dataclass
class TrainConfig:
    data: str
    output: str
    eval: Optional[str] = None
    model: str = "default"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    use_rslora: bool = False
    targets: tuple[str, ...] = TARGETS
    epochs: Optional[int] = None       # default 1 when max_steps is not given either
    max_steps: Optional[int] = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 8                # micro-batch per process
    grad_accum: int = 1
    max_seq_len: int = 512
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0          # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0         # 0 = no clipping
    seed: int = 0
    eval_every: int = 0                # steps; 0 = at the end of every epoch
    patience: int = 0                  # evals without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0
    restore_best: bool = True          # export the best-eval weights when eval data is given
    save_every: int = 100              # checkpoint interval in steps; 0 = only the final checkpoint
    keep_checkpoints: int = 2
    resume: Optional[str] = None       # "latest" or a checkpoint directory
    device: str = "auto"
    dtype: str = "auto"
    max_bad_fraction: float = 0.01
    time_limit: float = 0.0            # seconds of training after which the run stops cleanly; 0 = none
    home: str = ""
    progress: bool = True
    log_every: int = 1

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise TrainingConfigError(f"--{name.replace('_', '-')}: {why}")

        if self.epochs is not None and self.max_steps is not None:
            bad("epochs", "give --epochs or --max-steps, not both")
        if self.epochs is not None and self.epochs < 1:
            bad("epochs", f"must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be at least 1, got {self.max_steps}")
        if self.rank < 1:
            bad("rank", f"must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            bad("alpha", f"must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            bad("targets", f"unknown {unknown}; choose from {','.join(TARGETS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be a positive number, got {self.lr}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_seq_len < 2:
            bad("max_seq_len", f"must be at least 2, got {self.max_seq_len}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("eval_every", "patience", "save_every", "max_grad_norm", "weight_decay", "min_delta",
                     "time_limit"):
            if getattr(self, name) < 0:
                bad(name, f"must not be negative, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", f"must be at least 1, got {self.keep_checkpoints}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            bad("max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        if self.patience and not self.eval:
            bad("patience", "early stopping needs --eval data")

    def run_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it."""
        skip = {"output", "resume", "progress", "log_every", "save_every", "keep_checkpoints", "home",
                "device", "data", "eval", "time_limit"}
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class TrainResult:
    output: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------ distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sum numbers over processes (float64, so token counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_pref: str) -> Dist:
    """Read torchrun's environment; start the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref == "cuda":
        if not torch.cuda.is_available():
            raise TrainingConfigError("--device: cuda was asked for but torch sees no CUDA device")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device_pref == "cpu":
        device = torch.device("cpu")
    else:
        raise TrainingConfigError(f"--device: {device_pref!r}; choose auto, cpu or cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


# ------------------------------------------------------------------ model

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in names:
        raise TrainingConfigError(f"--dtype: {name!r}; choose auto, float32, bfloat16 or float16")
    return names[name]


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                      target_modules=[TARGET_MODULES[t] for t in cfg.targets], bias="none",
                      task_type="CAUSAL_LM")


class CausalLMLoss(nn.Module):
    """Summed next-token loss over trainable positions only.

    Logits are computed only where a label exists: the vocabulary projection is the
    largest matmul of a small model, and prompts are often most of the tokens.
    DDP wraps this module, so the forward goes through DDP's hooks.
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model
        base = peft_model.get_base_model()
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.head(hidden[:, :-1][keep]).float()
        loss = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        return loss, keep.sum()


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear from 1/(warmup+1) to 1 over `warmup` steps, then cosine to min_ratio."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


# ------------------------------------------------------------------ data order

def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches for one epoch: a seeded permutation, dealt round-robin.

    Every process gets the same number of examples (the permutation wraps around),
    so no process waits on a collective another one never reaches.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = -(-n // world)
    perm = (perm * (1 + (per_rank * world) // n))[: per_rank * world]
    mine = perm[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


# ------------------------------------------------------------------ RNG state

def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_list(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _py_state_to_list(s: tuple) -> list:
    return [s[0], list(s[1]), s[2]]


def _py_state_from_list(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


# ------------------------------------------------------------------ trainer

@dataclass
class _Job:
    """What a run sets up once: data, model, optimizer, and the step counts they imply."""

    model_dir: Path
    fingerprint: str
    pad_id: int
    train: Dataset
    eval: Optional[Dataset]
    steps_per_epoch: int
    total_steps: int
    warmup: int
    model: Any                      # the PeftModel
    loss_module: nn.Module          # CausalLMLoss, DDP-wrapped under torchrun
    params: list[torch.Tensor]      # the trainable (LoRA) tensors
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler


@dataclass
class _Progress:
    """Everything the loop advances; a checkpoint saves it and `--resume` restores it."""

    step: int = 0
    tokens_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_before: float = 0.0     # training seconds of the runs this one resumes
    best_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    best_state: Optional[dict[str, torch.Tensor]] = None
    stopped_early: bool = False
    out_of_time: bool = False
    loop_started: float = 0.0       # perf_counter when this process's loop began

    def train_seconds(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.loop_started)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        if cfg.epochs is None and cfg.max_steps is None:
            cfg.epochs = 1
        self.cfg = cfg
        self.out = Path(cfg.output)
        problem = unwritable_reason(self.out)
        if problem is not None:  # found now, not when the first checkpoint or the adapter is written
            raise TrainingConfigError(f"--output: {problem}; give a directory this user can write")
        self.dist = setup_distributed(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.dist.device)

    # -- setup -------------------------------------------------------------

    def _load_data(self, tokenizer) -> tuple[Dataset, Optional[Dataset]]:
        dcfg = DataConfig(max_seq_len=self.cfg.max_seq_len, max_bad_fraction=self.cfg.max_bad_fraction)
        train = load_dataset(Path(self.cfg.data), tokenizer, dcfg)
        ev = load_dataset(Path(self.cfg.eval), tokenizer, dcfg, expect_format=train.format) if self.cfg.eval else None
        if self.dist.main:
            for ds in (train, ev):
                if ds is not None:
                    for w in ds.warnings():
                        log.warning("%s", w)
        return train, ev

    def _load_model(self, model_dir: Path):
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype, local_files_only=True)
        base.config.use_cache = False
        base.to(self.dist.device)
        torch.manual_seed(self.cfg.seed)  # LoRA A init draws from the global generator
        model = get_peft_model(base, lora_config(self.cfg))
        return model

    def _trainable(self, model) -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _set_up(self) -> _Job:
        """Resolve the base, load data and model, wrap for DDP, build optimizer and LR schedule."""
        from server.core.paths import resolve_home
        from server.model.loader import load_tokenizer, model_fingerprint, resolve_model

        cfg, d = self.cfg, self.dist
        home = resolve_home(cfg.home)
        model_dir = resolve_model(cfg.model, home)
        tokenizer = load_tokenizer(model_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train, ev = self._load_data(tokenizer)
        fingerprint = model_fingerprint(model_dir, home)

        micro_per_epoch = len(epoch_batches(len(train), cfg.batch_size, cfg.seed, 0, d.rank, d.world))
        steps_per_epoch = -(-micro_per_epoch // cfg.grad_accum)
        total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
        warmup = int(round(cfg.warmup_ratio * total_steps))

        model = self._load_model(model_dir)
        model.train()
        loss_module: nn.Module = CausalLMLoss(model)
        if d.world > 1:
            # Buffers (RoPE tables) are constants: broadcasting them would add a collective per forward.
            loss_module = nn.parallel.DistributedDataParallel(
                loss_module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                broadcast_buffers=False)
        params = list(self._trainable(model).values())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps, cfg.min_lr_ratio))
        return _Job(model_dir, fingerprint, pad_id, train, ev, steps_per_epoch, total_steps, warmup,
                    model, loss_module, params, opt, sched)

    # -- checkpoints ---------------------------------------------------------

    def _ckpt_root(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def _find_checkpoint(self) -> Optional[Path]:
        spec = self.cfg.resume
        if not spec:
            return None
        if spec != "latest":
            p = Path(spec)
            if not (p / STATE_NAME).is_file():
                raise TrainingConfigError(f"--resume: {p} is not a checkpoint directory (no {STATE_NAME})")
            return p
        found = sorted(self._ckpt_root().glob("step-*"), key=lambda p: p.name)
        found = [p for p in found if (p / STATE_NAME).is_file()]
        if not found:
            raise TrainingConfigError(f"--resume: no checkpoint under {self._ckpt_root()} to resume from")
        return found[-1]

    def _checkpoint_state(self, job: _Job, p: _Progress) -> dict[str, Any]:
        """The JSON side of a checkpoint: loop progress plus what a resuming run must match."""
        return {"step": p.step, "tokens_seen": p.tokens_seen, "history": p.history,
                "train_seconds": p.train_seconds(),
                "best_eval_loss": p.best_loss if math.isfinite(p.best_loss) else None,
                "best_step": p.best_step, "evals_without_improvement": p.bad_evals,
                "stopped_early": p.stopped_early, "out_of_time": p.out_of_time,
                "run_key": self.cfg.run_key(), "world_size": self.dist.world,
                "train_sha256": job.train.sha256, "eval_sha256": job.eval.sha256 if job.eval else None}

    def _save_checkpoint(self, job: _Job, p: _Progress) -> None:
        from safetensors.torch import save_file

        root = self._ckpt_root()
        final = root / f"step-{p.step:08d}"
        tmp = root / f".step-{p.step:08d}.tmp"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        torch.save(_rng_state(self.dist.device), tmp / f"rng-rank{self.dist.rank}.pt")
        if self.dist.main:
            save_file({n: t.detach().cpu().contiguous() for n, t in self._trainable(job.model).items()},
                      str(tmp / "trainable.safetensors"))
            if p.best_state is not None:
                save_file({n: t.contiguous() for n, t in p.best_state.items()}, str(tmp / "best.safetensors"))
            torch.save(job.opt.state_dict(), tmp / "optimizer.pt")
            torch.save(job.sched.state_dict(), tmp / "scheduler.pt")
            # Written last: its presence marks a whole checkpoint.
            export.write_json(tmp / STATE_NAME, self._checkpoint_state(job, p))
        self.dist.barrier()
        if self.dist.main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            old = sorted(c for c in root.glob("step-*") if c.is_dir())
            for c in old[: max(0, len(old) - self.cfg.keep_checkpoints)]:
                shutil.rmtree(c, ignore_errors=True)
        self.dist.barrier()

    def _load_checkpoint(self, ckpt: Path, job: _Job) -> tuple[dict[str, Any], Optional[dict]]:
        from safetensors.torch import load_file

        state = json.loads((ckpt / STATE_NAME).read_text())
        want, have = self.cfg.run_key(), state.get("run_key", {})
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            pairs = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs now {want.get(k)!r}" for k in diff)
            raise TrainingConfigError(f"--resume: {ckpt} was made with different settings ({pairs})")
        for key, ds_sha in (("train_sha256", job.train.sha256),
                            ("eval_sha256", job.eval.sha256 if job.eval else None)):
            if state.get(key) != ds_sha:
                raise TrainingConfigError(f"--resume: {ckpt} was trained on different data ({key} differs)")
        if state.get("world_size") != self.dist.world:
            raise TrainingConfigError(f"--resume: {ckpt} was made by {state.get('world_size')} processes, "
                                      f"this run has {self.dist.world}; the data order would differ")
        params = self._trainable(job.model)
        saved = load_file(str(ckpt / "trainable.safetensors"))
        if set(saved) != set(params):
            raise TrainingConfigError(f"--resume: {ckpt} holds different trainable tensors than this model")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n].to(p.device, p.dtype))
        job.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.dist.device, weights_only=True))
        job.sched.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        rng = ckpt / f"rng-rank{self.dist.rank}.pt"
        _set_rng_state(torch.load(rng, weights_only=True), self.dist.device)
        best = load_file(str(ckpt / "best.safetensors")) if (ckpt / "best.safetensors").is_file() else None
        return state, best

    def _resume(self, job: _Job) -> _Progress:
        """Fresh progress, or that of the checkpoint `--resume` names (weights, optimizer, RNG restored)."""
        p = _Progress()
        ckpt = self._find_checkpoint()
        if ckpt is None:
            return p
        state, p.best_state = self._load_checkpoint(ckpt, job)
        p.step, p.tokens_seen = state["step"], state["tokens_seen"]
        p.history = state["history"]
        p.elapsed_before = state["train_seconds"]
        p.best_loss = state["best_eval_loss"] if state["best_eval_loss"] is not None else math.inf
        p.best_step, p.bad_evals = state["best_step"], state["evals_without_improvement"]
        # A run cut by --time-limit continues on resume; one stopped by early stopping stays stopped.
        p.stopped_early = state.get("stopped_early", False) and not state.get("out_of_time", False)
        if self.dist.main:
            log.info("resumed from %s at step %d of %d", ckpt, p.step, job.total_steps)
        return p

    # -- eval ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, loss_module: nn.Module, ds: Dataset, pad_id: int) -> tuple[float, float]:
        """Mean loss per trainable token over the whole eval set (all processes), and its perplexity."""
        # Ranks may hold different numbers of eval batches: run the bare module, which has no collectives.
        loss_module = getattr(loss_module, "module", loss_module)
        was_training = loss_module.training
        loss_module.eval()
        mine = ds.examples[self.dist.rank::self.dist.world]
        total, count = 0.0, 0.0
        bs = max(1, self.cfg.batch_size * 2)
        for i in range(0, len(mine), bs):
            b = {k: v.to(self.dist.device) for k, v in collate(mine[i:i + bs], pad_id).items()}
            loss, n = loss_module(b["input_ids"], b["attention_mask"], b["labels"])
            total += float(loss)
            count += float(n)
        loss_module.train(was_training)
        total, count = self.dist.sum(total, count)
        mean = total / max(count, 1.0)
        return mean, math.exp(min(mean, 700.0))

    def _evaluate_if_due(self, job: _Job, p: _Progress, bar) -> None:
        """Evaluate at the configured interval and at the last step; track the best; stop early on patience."""
        cfg = self.cfg
        epoch_end = (p.step % job.steps_per_epoch) == 0
        due = (cfg.eval_every and p.step % cfg.eval_every == 0) or (not cfg.eval_every and epoch_end)
        if job.eval is None or not (due or p.step == job.total_steps):
            return
        eval_loss, ppl = self.evaluate(job.loss_module, job.eval, job.pad_id)
        p.history.append({"kind": "eval", "step": p.step, "eval_loss": eval_loss, "eval_ppl": ppl})
        self._say(bar, f"eval at step {p.step}: loss {eval_loss:.4f}, perplexity {ppl:.3f}")
        if eval_loss < p.best_loss - cfg.min_delta:
            p.best_loss, p.best_step, p.bad_evals = eval_loss, p.step, 0
            p.best_state = {n: t.detach().cpu().clone() for n, t in self._trainable(job.model).items()}
            return
        p.bad_evals += 1
        if cfg.patience and p.bad_evals >= cfg.patience:
            p.stopped_early = True
            self._say(bar, f"early stop at step {p.step}: no eval improvement in {p.bad_evals} evals "
                           f"(best {p.best_loss:.4f} at step {p.best_step})")

    # -- the loop ------------------------------------------------------------

    def _optimizer_step(self, job: _Job, p: _Progress, epoch: int, micro: list[list[int]]) -> dict[str, Any]:
        """One optimizer step over `micro` (up to grad_accum micro-batches); returns its history record.

        The loss is summed per micro-batch and divided by the trainable tokens of the
        whole step on every process, so the gradient is that of the step's mean loss.
        """
        cfg, d = self.cfg, self.dist
        t0, c0 = time.perf_counter(), time.process_time()
        batches = [collate([job.train.examples[i] for i in idx], job.pad_id) for idx in micro]
        local_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        local_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        glob_labels, glob_tokens = d.sum(local_labels, local_tokens)
        step_loss = 0.0
        for j, b in enumerate(batches):
            b = {key: v.to(d.device) for key, v in b.items()}
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync_now = j == len(batches) - 1
            with job.loss_module.no_sync() if (d.world > 1 and not sync_now) else contextlib.nullcontext():
                loss_sum, _ = job.loss_module(b["input_ids"], b["attention_mask"], b["labels"])
                # DDP averages gradients over processes, hence the factor `world`.
                (loss_sum * (d.world / max(glob_labels, 1.0))).backward()
            step_loss += float(loss_sum.detach())
        grad_norm = (float(torch.nn.utils.clip_grad_norm_(job.params, cfg.max_grad_norm))
                     if cfg.max_grad_norm > 0 else _grad_norm(job.params))
        lr_now = job.opt.param_groups[0]["lr"]
        job.opt.step()
        job.sched.step()
        job.opt.zero_grad(set_to_none=True)
        (step_loss,) = d.sum(step_loss)
        p.step += 1
        p.tokens_seen += int(glob_tokens)
        dt = time.perf_counter() - t0
        mean_loss = step_loss / max(glob_labels, 1.0)
        if not math.isfinite(mean_loss):
            raise LoraServeError(f"training diverged at step {p.step}: loss is {mean_loss}; "
                                 "lower --lr or check the data")
        rec = {"kind": "train", "step": p.step, "epoch": epoch, "loss": mean_loss, "lr": lr_now,
               "grad_norm": grad_norm, "tokens": int(glob_tokens), "seconds": dt,
               # CPU time of this process (all its threads): comparable across loaded machines.
               "cpu_seconds": time.process_time() - c0,
               "tokens_per_s": glob_tokens / dt if dt > 0 else None}
        p.history.append(rec)
        return rec

    def _show_step(self, rec: dict[str, Any], total_steps: int, bar) -> None:
        dt = rec["seconds"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                            tok_s=f"{rec['tokens'] / dt:.0f}" if dt > 0 else "-")
        elif self.dist.main and self.cfg.log_every and rec["step"] % self.cfg.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", rec["step"], total_steps, rec["loss"], rec["lr"],
                     rec["tokens"] / dt if dt > 0 else 0.0)

    def _say(self, bar, msg: str, level: int = logging.INFO) -> None:
        """A notice from rank 0: through the progress bar when there is one, else the log."""
        if not self.dist.main:
            return
        if bar is not None:
            bar.write(msg)
        else:
            log.log(level, "%s", msg)

    def _check_time_limit(self, job: _Job, p: _Progress, bar) -> None:
        if not self.cfg.time_limit or p.stopped_early or p.step >= job.total_steps:
            return
        # Every process must agree to stop at the same step, so rank 0's clock decides.
        (over,) = self.dist.sum(float(self.dist.main and time.perf_counter() - p.loop_started > self.cfg.time_limit))
        if over:
            p.out_of_time = p.stopped_early = True
            self._say(bar, f"time limit of {self.cfg.time_limit:.0f} s reached: stopping at step {p.step}",
                      logging.WARNING)

    def _train_loop(self, job: _Job, p: _Progress, bar) -> None:
        """Optimizer steps until the last one, an early stop or the time limit; eval and checkpoints between."""
        cfg, d = self.cfg, self.dist
        order_epoch, order = -1, []
        while p.step < job.total_steps and not p.stopped_early:
            epoch, k = divmod(p.step, job.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_batches(len(job.train), cfg.batch_size, cfg.seed, epoch,
                                                          d.rank, d.world)
            rec = self._optimizer_step(job, p, epoch, order[k * cfg.grad_accum:(k + 1) * cfg.grad_accum])
            self._show_step(rec, job.total_steps, bar)
            self._evaluate_if_due(job, p, bar)
            self._check_time_limit(job, p, bar)
            if (cfg.save_every and p.step % cfg.save_every == 0) or p.step == job.total_steps or p.stopped_early:
                self._save_checkpoint(job, p)

    # -- results -------------------------------------------------------------

    def _restore_best(self, job: _Job, p: _Progress) -> int:
        """Put the best-eval weights back when asked to; returns the step whose weights get exported."""
        if p.best_state is None or not self.cfg.restore_best:
            return p.step
        if p.best_step != p.step:
            with torch.no_grad():
                for n, t in self._trainable(job.model).items():
                    t.copy_(p.best_state[n].to(t.device, t.dtype))
        return p.best_step

    def _metrics(self, job: _Job, p: _Progress, exported_step: int, train_seconds: float) -> dict[str, Any]:
        train_recs = [h for h in p.history if h["kind"] == "train"]
        tail = train_recs[-10:]
        evals = [h for h in p.history if h["kind"] == "eval"]
        best = math.isfinite(p.best_loss)
        # Throughput of the optimizer steps themselves (eval and checkpoint time excluded).
        step_seconds = sum(h["seconds"] for h in train_recs)
        return {
            "steps": p.step, "total_steps": job.total_steps, "exported_step": exported_step,
            "epochs": p.step / job.steps_per_epoch, "stopped_early": p.stopped_early, "out_of_time": p.out_of_time,
            "train_loss_first": train_recs[0]["loss"] if train_recs else None,
            "train_loss_last": train_recs[-1]["loss"] if train_recs else None,
            "train_loss_last10": sum(h["loss"] for h in tail) / len(tail) if tail else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "eval_ppl": evals[-1]["eval_ppl"] if evals else None,
            "best_eval_loss": p.best_loss if best else None,
            "best_eval_ppl": math.exp(p.best_loss) if best else None,
            "best_step": p.best_step if best else None,
            "tokens_seen": p.tokens_seen, "train_seconds": train_seconds,
            "tokens_per_s": (p.tokens_seen / step_seconds) if step_seconds > 0 else None,
            "world_size": self.dist.world,
        }

    def _export(self, job: _Job, p: _Progress, metrics: dict[str, Any], t_start: float) -> None:
        """Rank 0: the PEFT adapter with its provenance, the JSON report and the loss curve."""
        from peft import get_peft_model_state_dict

        cfg, d, train, ev = self.cfg, self.dist, job.train, job.eval
        hyper = dict(cfg.run_key())
        hyper.update({"batch_size_global": cfg.batch_size * cfg.grad_accum * d.world, "warmup_steps": job.warmup,
                      "device": str(d.device), "dtype": str(self.dtype).replace("torch.", "")})
        provenance = {
            "base_model": cfg.model, "base_model_dir": str(job.model_dir),
            "base_model_fingerprint": job.fingerprint,
            "train_data": train.summary(), "train_data_sha256": train.sha256,
            "eval_data": ev.summary() if ev else None, "eval_data_sha256": ev.sha256 if ev else None,
            "hyperparameters": hyper, "metrics": metrics,
            "loraserve_version": export.loraserve_version(),
            "created_unix": int(time.time()),
        }
        tensors = get_peft_model_state_dict(job.model)
        peft_cfg = job.model.peft_config["default"]
        # Name the base as the user did ("default" or their path), not this machine's cache dir.
        peft_cfg.base_model_name_or_path = cfg.model
        export.save_adapter(self.out, peft_cfg, tensors, provenance)
        report = dict(provenance)
        report["warnings"] = train.warnings() + (ev.warnings() if ev else [])
        report["history"] = p.history
        report["wall_seconds"] = time.perf_counter() - t_start
        export.write_json(self.out / export.REPORT_NAME, report)
        export.plot_loss_curve(p.history, self.out / export.CURVE_NAME,
                               title=f"{self.out.name} ({Path(cfg.data).name}): rank {cfg.rank}, {p.step} steps")

    # -- main ------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Set up, resume if asked, train, then export the adapter (rank 0) and return the metrics."""
        t_start = time.perf_counter()
        job = self._set_up()
        p = self._resume(job)
        bar = None
        if self.dist.main and self.cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=job.total_steps, initial=p.step, unit="step", dynamic_ncols=True, desc="training")
        p.loop_started = time.perf_counter()
        try:
            self._train_loop(job, p, bar)
        finally:
            if bar is not None:
                bar.close()
        train_seconds = p.train_seconds()
        metrics = self._metrics(job, p, self._restore_best(job, p), train_seconds)
        if self.dist.main:
            self._export(job, p, metrics, t_start)
        self.dist.barrier()
        return TrainResult(self.out, metrics, p.history)


def _grad_norm(params: list[torch.Tensor]) -> float:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training job (in this process, or as one rank under torchrun)."""
    return Trainer(cfg).run()
