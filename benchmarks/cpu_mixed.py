"""CPU mixed-adapter throughput: loraserve against transformers and PEFT in one run (`make bench`).

The workload is issue 3's: R concurrent requests (8) on R distinct rank-16 LoRA
adapters over all seven Llama targets, every prompt P tokens (64), every request
N new tokens (32), greedy with EOS ignored so each system does the same work.
Systems:

  loraserve            our engine with EngineConfig defaults (quantize int8, dtype auto)
  loraserve-base       the same engine, the same requests without adapters
  loraserve-none       our engine with quantize none (dtype auto)
  loraserve-none-base  the same engine without adapters
  hf-base              transformers' generate, one batch of R, left padding, no adapters
  peft-mixed           PEFT generate with `adapter_names=` (R adapters in one PeftModel)
  peft-single          PEFT generate, the batch of R on one adapter

Each system gets one warm-up run (adapter loads, allocator and kernel warm-up
happen there) and then `repeats` timed runs; we report the median. Throughput is
generated tokens / wall time of a run; the LoRA overhead compares an engine's
adapter run with its own no-adapter run at the same settings (the two are timed
back to back, in alternating order, in every round). Both ratios, x PEFT mixed and
LoRA overhead, are medians of per-round ratios (`paired`), printed with their range. Adapters are random PEFT
LoRA weights with fixed seeds, made with PEFT itself in a temporary directory.

Each group of systems (an engine with and without adapters at one quantization, or
the transformers/PEFT systems) is measured in a child process of its own:
libgomp slows every small op once more than one long-lived thread owns an OpenMP
pool (see `server/engine/threads.py`), so an engine thread and PEFT on the main
thread of one process would slow each other down. The children stay up for the
whole run and the timed rounds are interleaved across them (round r of every group,
one group at a time, before round r+1), so drift in the machine's speed hits every
group alike instead of landing in the cross-group ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from benchmarks.common import cpu_machine_info, machine_line, median, print_table, write_json  # noqa: E402

log = logging.getLogger("benchmarks.cpu_mixed")

PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENGINE_SYSTEMS = ("loraserve", "loraserve-base", "loraserve-none", "loraserve-none-base")
HF_SYSTEMS = ("hf-base", "peft-mixed", "peft-single")
ALL_SYSTEMS = ENGINE_SYSTEMS + HF_SYSTEMS
REFERENCE = "peft-mixed"
GOAL_SPEEDUP = 3.0        # loraserve tok/s at least 3x PEFT mixed
GOAL_LORA_OVERHEAD = 0.15  # LoRA at most 15% slower than our own no-adapter engine
DEFAULT_OUT = "benchmarks/results/cpu_mixed.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig:
    model: str = "default"          # "default" (SmolLM2-135M-Instruct), a .gguf or an HF directory
    requests: int = 8               # concurrent requests
    adapters: int = 8               # distinct adapters; request i uses adapter i % adapters
    rank: int = 16
    prompt_len: int = 64
    new_tokens: int = 32
    repeats: int = 5                # timed runs per system (after one warm-up)
    seed: int = 0
    quantize: str = "int8"          # loraserve's default (EngineConfig.quantize)
    systems: tuple[str, ...] = ALL_SYSTEMS
    out: str = DEFAULT_OUT
    workdir: str = ""               # where adapters are written; a temporary directory when empty
    home: str = ""                  # loraserve's model cache ($LORASERVE_HOME when empty)
    worker_timeout_s: float = 1800.0  # a child's set-up, round or finish taking longer kills it (and the run)

    def validate(self) -> None:
        unknown = [s for s in self.systems if s not in ALL_SYSTEMS]
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
        for name in ("requests", "adapters", "rank", "prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; need at least 1")
        if self.adapters > self.requests:
            raise ValueError(f"{self.adapters} adapters for {self.requests} requests: some would go unused")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s is {self.worker_timeout_s}; need more than 0")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BenchConfig":
        """The inverse of `asdict` after a JSON round trip (systems come back as a list)."""
        return cls(**{**d, "systems": tuple(d["systems"])})


@dataclass
class RunTiming:
    wall_s: float
    tokens: int
    latency_s: list[float]          # per request, submit to last token
    ttft_s: list[float] = field(default_factory=list)  # per request, submit to first token (engine only)


@dataclass
class SystemResult:
    system: str
    description: str
    adapters: str                   # "8 distinct", "1 shared", "none"
    dtype: str
    quantize: str
    runs: list[RunTiming]
    outputs: list[list[int]]        # generated ids of the last timed run, per request
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return median([r.wall_s for r in self.runs])

    @property
    def tokens(self) -> int:
        return self.runs[0].tokens

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def latency_s(self) -> float:
        """Median over runs of the mean per-request latency."""
        return median([sum(r.latency_s) / len(r.latency_s) for r in self.runs])

    @property
    def ttft_s(self) -> Optional[float]:
        if not all(r.ttft_s for r in self.runs):
            return None
        return median([sum(r.ttft_s) / len(r.ttft_s) for r in self.runs])

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SystemResult":
        """The inverse of `asdict` after a JSON round trip (a child process hands results back so)."""
        return cls(**{**d, "runs": [RunTiming(**r) for r in d["runs"]]})


# ----------------------------------------------------------------------------------------- workload

def make_prompts(cfg: BenchConfig, vocab_size: int, special_ids: Sequence[int]) -> list[list[int]]:
    """Reproducible random prompts of exactly prompt_len ids, avoiding special tokens."""
    g = torch.Generator().manual_seed(cfg.seed)
    banned = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    prompts = []
    for _ in range(cfg.requests):
        ids = torch.randint(0, vocab_size, (cfg.prompt_len * 2,), generator=g)
        if banned.numel():
            ids = ids[~torch.isin(ids, banned)]
        prompts.append(ids[:cfg.prompt_len].tolist())
    assert all(len(p) == cfg.prompt_len for p in prompts)
    return prompts


def make_adapters(model_dir: Path, root: Path, n: int, rank: int, seed: int) -> list[Path]:
    """n PEFT LoRA adapters (rank `rank`, all 7 targets, alpha 2r) with seeded random A and B.

    A ~ N(0, 1/in) and B ~ N(0, 0.02^2): B non-zero, so every adapter changes the
    output (PEFT's default init zeroes B, which would make LoRA a no-op).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = [root / f"adapter{i}" for i in range(n)]
    if all((d / "adapter_model.safetensors").is_file() for d in dirs):
        return dirs
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PEFT_TARGETS), lora_dropout=0.0,
                      bias="none", init_lora_weights=False)
    model = get_peft_model(base, lcfg)
    params = sorted((name, p) for name, p in model.named_parameters() if "lora_" in name)
    for i, d in enumerate(dirs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        with torch.no_grad():
            for name, p in params:
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(d, safe_serialization=True)
    del model, base
    gc.collect()
    return dirs


def adapter_of(cfg: BenchConfig, i: int) -> int:
    return i % cfg.adapters


# ------------------------------------------------------------------------------------------ engine

def _engine_run(engine, requests_fn: Callable[[], list]) -> tuple[RunTiming, list[list[int]]]:
    """Submit every request at once and stream them all to completion on an asyncio loop."""

    async def drive() -> tuple[RunTiming, list[list[int]]]:
        loop = asyncio.get_running_loop()
        reqs = requests_fn()
        t0 = time.perf_counter()
        streams = [engine.submit(r, loop) for r in reqs]

        async def consume(stream) -> tuple[float, float, list[int], str]:
            first: Optional[float] = None
            ids: list[int] = []
            reason = ""
            async for d in stream:
                if d.token_ids and first is None:
                    first = time.perf_counter()
                ids.extend(d.token_ids)
                if d.finished:
                    reason = d.finish_reason or ""
            end = time.perf_counter()
            return (first or end) - t0, end - t0, ids, reason

        done = await asyncio.gather(*(consume(s) for s in streams))
        wall = max(e for _, e, _, _ in done)
        outs = [ids for _, _, ids, _ in done]
        bad = [(len(ids), reason) for _, _, ids, reason in done if reason != "length"]
        if bad:
            raise RuntimeError(f"requests ended early (tokens, reason): {bad}")
        return RunTiming(wall, sum(len(o) for o in outs), [e for _, e, _, _ in done],
                         [f for f, _, _, _ in done]), outs

    return asyncio.run(drive())


def _model_facts(engine) -> dict[str, Any]:
    """What the engine really runs: base linear classes and kernels of layer 0, memory."""
    m = engine.model
    linears = {name: f"{type(mod).__name__}({getattr(mod, 'kernel', '?')})"
               for name, mod in m.layers[0].named_children()}
    nbytes = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return {"base_linears": linears, "model_bytes": nbytes, "lora_pool_bytes": engine.pool.nbytes,
            "lora_backend": _lora_backend(engine)}


def _lora_backend(engine) -> str:
    return engine.lora_backend.name


@dataclass
class System:
    """One contender: a name for the table and a callable that does one full run of the workload."""

    name: str
    description: str
    adapters: str                   # "8 distinct", "1 shared", "none"
    dtype: str
    quantize: str
    run: Callable[[], tuple[RunTiming, list[list[int]]]]
    facts: Callable[[], dict[str, Any]] = dict


def engine_systems(cfg: BenchConfig, quantize: str, prompts: list[list[int]], adapter_dirs: list[Path],
                   names: Sequence[str], closers: list[Callable[[], None]]) -> tuple[list[System], dict[str, Any]]:
    """One engine at `quantize`, serving the adapter system and/or its no-adapter twin."""
    from server.core.engine_config import EngineConfig
    from server.engine.engine import Engine
    from server.core.identity import AdapterSpec
    from server.engine.types import Request, SamplingParams
    from server.lora.weights import load_peft_adapter

    ecfg = EngineConfig(model=cfg.model, quantize=quantize, home=cfg.home, max_rank=max(cfg.rank, 16),
                        max_adapters_on_device=max(cfg.adapters, 1))
    t0 = time.perf_counter()
    engine = Engine.from_config(ecfg)
    load_s = time.perf_counter() - t0
    engine.start()
    closers.append(engine.shutdown)
    specs = [AdapterSpec(key=f"bench-{d.name}@1", adapter_id=d.name, version=1,
                         load=functools.partial(load_peft_adapter, d, engine.model_config, ecfg.max_rank))
             for d in adapter_dirs]
    params = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=0.0, ignore_eos=True)
    dtype = str(engine.dtype).replace("torch.", "")
    static = {**_model_facts(engine), "engine_load_s": load_s, "engine_config": asdict(ecfg)}
    loads_after_warmup: list[int] = []

    def facts() -> dict[str, Any]:
        st = engine.stats()
        out = {**static, "adapter_loads_total": st.adapter_loads, "adapter_evictions": st.adapter_evictions,
               "engine_steps_total": st.steps, "preemptions": st.preemptions}
        if loads_after_warmup:
            out["adapter_loads_during_timing"] = st.adapter_loads - loads_after_warmup[0]
        return out

    def runner(lora: bool) -> Callable[[], tuple[RunTiming, list[list[int]]]]:
        def go() -> tuple[RunTiming, list[list[int]]]:
            result = _engine_run(engine, lambda: [Request(list(p), params, specs[adapter_of(cfg, i)] if lora else None)
                                                  for i, p in enumerate(prompts)])
            if lora and not loads_after_warmup:  # the first adapter run is the warm-up that loads them
                loads_after_warmup.append(engine.stats().adapter_loads)
            return result
        return go

    systems = []
    for name in names:
        lora = not name.endswith("-base")
        desc = f"loraserve engine, quantize={quantize}, dtype={dtype}" + ("" if lora else ", no adapters")
        systems.append(System(name, desc, f"{cfg.adapters} distinct" if lora else "none", dtype, quantize,
                              runner(lora), facts))
    return systems, {"path": str(engine.model_dir), **_shape(engine.model_config)}


def _shape(mc) -> dict[str, Any]:
    return {"layers": mc.num_layers, "hidden": mc.hidden_size, "intermediate": mc.intermediate_size,
            "heads": mc.num_heads, "kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
            "vocab": mc.vocab_size, "tie_word_embeddings": mc.tie_word_embeddings}


# ----------------------------------------------------------------------------- transformers / PEFT

def _hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int,
                 **kw: Any) -> tuple[RunTiming, list[list[int]]]:
    """One batched greedy generate, left-padded, exactly new_tokens per row (EOS ignored)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=pad_id, **kw)
    wall = time.perf_counter() - t0
    gen = out[:, width:]
    if gen.shape[1] != new_tokens:
        raise RuntimeError(f"generate returned {gen.shape[1]} new tokens per row, expected {new_tokens}")
    return RunTiming(wall, gen.numel(), [wall] * len(prompts)), gen.tolist()


def hf_systems(cfg: BenchConfig, model_dir: Path, dtype: torch.dtype, prompts: list[list[int]],
               adapter_dirs: list[Path], names: Sequence[str]) -> list[System]:
    """transformers' base model and one PeftModel holding every adapter (a separate copy of the base)."""
    from transformers import AutoModelForCausalLM

    dname = str(dtype).replace("torch.", "")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    gen = functools.partial(_hf_generate, prompts=prompts, new_tokens=cfg.new_tokens, pad_id=int(pad))
    systems = []
    if "hf-base" in names:
        systems.append(System("hf-base", f"transformers generate, batch {cfg.requests}, left padding", "none",
                              dname, "none", lambda: gen(model)))
    if "peft-mixed" in names or "peft-single" in names:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        tags = [f"a{i}" for i in range(len(adapter_dirs))]
        pm = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=tags[0]).eval()
        for tag, d in zip(tags[1:], adapter_dirs[1:]):
            pm.load_adapter(d, adapter_name=tag)
        pm.set_adapter(tags[0])
        per_req = [tags[adapter_of(cfg, i)] for i in range(cfg.requests)]
        if "peft-mixed" in names:
            systems.append(System("peft-mixed", f"PEFT generate(adapter_names=...), {cfg.adapters} adapters in "
                                  "one PeftModel", f"{cfg.adapters} distinct", dname, "none",
                                  lambda: gen(pm, adapter_names=per_req)))
        if "peft-single" in names:
            systems.append(System("peft-single", "PEFT generate, every request on one adapter", "1 shared",
                                  dname, "none", lambda: gen(pm)))
    return systems


def warm_up(systems: Sequence[System]) -> None:
    """One untimed run of every system: adapter loads, allocator and kernel warm-up happen there."""
    for s in systems:
        t0 = time.perf_counter()
        s.run()
        log.info("warm-up %-20s %.1f s", s.name, time.perf_counter() - t0)


class Rounds:
    """The timed runs of one group's systems, a round at a time; a round runs each system once, in turn.

    Round-robin rather than system after system: on a shared machine, load that
    comes and goes then lands on every system alike and the ratios stay fair.
    """

    def __init__(self, systems: Sequence[System]):
        self.systems = list(systems)
        self.runs: dict[str, list[RunTiming]] = {s.name: [] for s in self.systems}
        self.outs: dict[str, list[list[int]]] = {}
        self.done = 0

    def run_round(self, label: str) -> None:
        # Every other round in reverse order: a system that always ran right after another
        # (warm caches, or a neighbour's burst) would carry that into its paired ratio.
        for s in (self.systems if self.done % 2 == 0 else self.systems[::-1]):
            timing, self.outs[s.name] = s.run()
            self.runs[s.name].append(timing)
        self.done += 1
        last = {s.name: self.runs[s.name][-1] for s in self.systems}
        log.info("%s: %s", label, ", ".join(f"{n} {t.tokens / t.wall_s:.0f} tok/s" for n, t in last.items()))

    def results(self) -> list[SystemResult]:
        return [SystemResult(s.name, s.description, s.adapters, s.dtype, s.quantize, self.runs[s.name],
                             self.outs[s.name], s.facts()) for s in self.systems]


# ---------------------------------------------------------------------------------------- isolation

@dataclass
class Group:
    """Systems measured together in one child process; quantize is the engine's, "" for transformers/PEFT."""

    name: str
    systems: list[str]
    quantize: str


def system_groups(cfg: BenchConfig) -> list[Group]:
    """The groups with at least one selected system: each engine with its no-adapter twin, then HF/PEFT.

    An adapter run and its no-adapter run share a process (and so an engine), so the
    LoRA overhead compares like with like; different groups never share one.
    """
    groups = []
    for quant in dict.fromkeys([cfg.quantize, "none"]):
        name = "loraserve" if quant == cfg.quantize else f"loraserve-{quant}"
        groups.append(Group(name, [n for n in (name, f"{name}-base") if n in cfg.systems], quant))
    groups.append(Group("hf", [s for s in HF_SYSTEMS if s in cfg.systems], ""))
    return [g for g in groups if g.systems]


def isolation_note(groups: Sequence[Group]) -> str:
    return ("one process per group, timed rounds interleaved across the group processes (round r of every "
            "group, one group at a time, before round r+1): "
            + "; ".join(f"{g.name} ({', '.join(g.systems)})" for g in groups))


# A child's stdout carries protocol messages only, each one line: this prefix, then JSON. Anything else
# that reaches it (a stray print) is shown like a log line and otherwise ignored.
PROTOCOL_PREFIX = "@cpu_mixed-worker "


def build_group(cfg: BenchConfig, g: Group, job: dict[str, Any],
                closers: list[Callable[[], None]]) -> tuple[list[System], Optional[dict[str, Any]]]:
    """Child side: one group's systems (and the engine's model facts; None for transformers/PEFT)."""
    prompts, adapter_dirs = job["prompts"], [Path(d) for d in job["adapter_dirs"]]
    if g.quantize:
        return engine_systems(cfg, g.quantize, prompts, adapter_dirs, g.systems, closers)
    return hf_systems(cfg, Path(job["model_dir"]), getattr(torch, job["dtype"]), prompts, adapter_dirs,
                      g.systems), None


def _protocol_stdout():
    """A private copy of our stdout for protocol messages; fd 1 itself (print, C libraries) goes to stderr."""
    sys.stdout.flush()
    chan = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    return chan


def worker_main(group: str, input_path: str) -> int:
    """Entry point of a child process (`--worker`), driven by the parent's `run_workers`.

    Sets up the group's systems, warms each one up and answers "ready"; then runs one
    timed round per {"cmd": "round"} line on stdin (answering "round" with its wall-clock
    start and end), and answers {"cmd": "finish"} with the results and exits. Between
    commands it sits idle (an engine's loop thread blocks on an event). Commands and
    answers are JSON lines; answers go to stdout behind PROTOCOL_PREFIX, logs to stderr.
    An error ends the process with a traceback, which the parent reports; so does
    stdin closing before "finish" (the parent is gone).
    """
    chan = _protocol_stdout()

    def answer(msg: dict[str, Any]) -> None:
        chan.write(PROTOCOL_PREFIX + json.dumps(msg, default=str) + "\n")
        chan.flush()

    job = json.loads(Path(input_path).read_text())
    if job["group"]["name"] != group:
        raise ValueError(f"--worker {group} was given the job of group {job['group']['name']}")
    cfg = BenchConfig.from_json(job["config"])
    g = Group(**job["group"])
    closers: list[Callable[[], None]] = []
    try:
        systems, model_info = build_group(cfg, g, job, closers)
        warm_up(systems)
        rounds = Rounds(systems)
        answer({"event": "ready", "group": g.name, "pid": os.getpid()})
        while True:
            line = sys.stdin.readline()
            if not line:
                raise RuntimeError("stdin closed before 'finish': the parent process is gone")
            cmd = json.loads(line)
            if cmd.get("cmd") == "round" and cmd.get("round") == rounds.done + 1:
                start = time.time()
                rounds.run_round(f"group {g.name} round {cmd['round']}/{cfg.repeats}")
                answer({"event": "round", "group": g.name, "round": cmd["round"], "start": start, "end": time.time()})
            elif cmd.get("cmd") == "finish" and rounds.done >= 1:
                answer({"event": "results", "group": g.name, "model": model_info,
                        "results": [asdict(r) for r in rounds.results()]})
                return 0
            else:
                raise ValueError(f"unexpected command {line.strip()!r} after {rounds.done} rounds")
    finally:
        for close in closers:
            close()


def _pump(stream, tail: deque) -> None:
    """Echo a child's output to our stderr as it comes (progress of a long run), keeping its tail."""
    for line in stream:
        tail.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()


class Worker:
    """The parent's handle on one group's child process (see `worker_main` for the protocol).

    Commands go to the child's stdin; a thread reads its answers from stdout, another
    echoes its stderr to ours and keeps the tail. Every wait has a limit: a child that
    dies, errors or hangs past it (it is killed then) raises RuntimeError with that tail.
    """

    def __init__(self, label: str, cmd: Sequence[str], env: Optional[dict[str, str]] = None, tail_lines: int = 40):
        self.label = label
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._answers: queue.Queue[Optional[str]] = queue.Queue()
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, errors="replace")
        self._threads = [threading.Thread(target=_pump, args=(self.proc.stderr, self.tail),
                                          name=f"cpu_mixed-stderr-{label}", daemon=True),
                         threading.Thread(target=self._read, name=f"cpu_mixed-stdout-{label}", daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                if line.startswith(PROTOCOL_PREFIX):
                    self._answers.put(line[len(PROTOCOL_PREFIX):])
                else:
                    self.tail.append(line)
                    sys.stderr.write(line)
                    sys.stderr.flush()
        finally:
            self._answers.put(None)  # end of its stdout: the child has exited (or is exiting)

    def _failure(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.label} {what}; its last output:\n" + "".join(self.tail))

    def send(self, cmd: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it has died: the next expect() reports how

    def expect(self, event: str, timeout_s: float, waiting_for: str) -> dict[str, Any]:
        """The child's next answer, which must be `event`."""
        try:
            raw = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            self.kill()
            raise self._failure(f"ran past {timeout_s:g} s and was killed (waiting for {waiting_for})") from None
        if raw is None:
            rc = self._reap(timeout_s)
            raise self._failure(f"failed with exit status {rc} (waiting for {waiting_for})")
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or msg.get("event") != event:
            self.kill()
            raise self._failure(f"answered {raw.strip()[:200]!r} while we waited for {waiting_for}")
        return msg

    def ask(self, cmd: dict[str, Any], event: str, timeout_s: float, waiting_for: str) -> dict[str, Any]:
        self.send(cmd)
        return self.expect(event, timeout_s, waiting_for)

    def _reap(self, timeout_s: float) -> int:
        """Exit status of a child that closed its stdout (killed if it does not exit in time)."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._close_pipes()
        return rc

    def finish(self, timeout_s: float) -> None:
        """Wait for a child that has handed back its results to exit; it must exit with status 0."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._failure(f"ran past {timeout_s:g} s and was killed (waiting for it to exit)") from None
        self._close_pipes()
        if rc != 0:
            raise self._failure(f"failed with exit status {rc} (after handing back its results)")

    def kill(self) -> None:
        """End the child now if it still runs (no orphans when the run fails); harmless once it has exited."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for t in self._threads:
            t.join(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def run_workers(commands: dict[str, Sequence[str]], repeats: int, timeout_s: float,
                env: Optional[dict[str, str]] = None) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Drive one persistent child per group (`worker_main`), interleaving the timed rounds across them.

    The children start and set up one after another, each waited for until it is ready
    (so load times and warm-ups are as undisturbed as before). Then round r goes to each
    child in turn, each waited for before the next is told: only one child measures at
    any moment, the others sit idle, and round r of every group comes before round r+1 of
    any, so drift in the machine's speed hits every group alike. Last, each child hands
    back its results and exits. timeout_s bounds each step (a set-up, a round, a finish).

    Returns each group's results message and the timeline of rounds in the order run
    (group, round, and the wall-clock start and end the child measured). On any failure
    every child still running is killed.
    """
    workers: dict[str, Worker] = {}
    timeline: list[dict[str, Any]] = []
    try:
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            w = workers[name] = Worker(f"cpu_mixed worker {name}", cmd, env)
            w.expect("ready", timeout_s, "its set-up")
            log.info("group %s set up in child process %d in %.0f s", name, w.proc.pid, time.perf_counter() - t0)
        for r in range(1, repeats + 1):
            for name, w in workers.items():
                msg = w.ask({"cmd": "round", "round": r}, "round", timeout_s, f"round {r}")
                if msg.get("round") != r:
                    raise w._failure(f"answered round {msg.get('round')} to round {r}")
                timeline.append({"group": name, "round": r, "start": msg["start"], "end": msg["end"]})
            log.info("round %d/%d: %s", r, repeats,
                     ", ".join(f"{t['group']} {t['end'] - t['start']:.1f} s" for t in timeline[-len(workers):]))
        outs: dict[str, dict[str, Any]] = {}
        for name, w in workers.items():
            outs[name] = w.ask({"cmd": "finish"}, "results", timeout_s, "its results")
            w.finish(timeout_s)
        return outs, timeline
    finally:
        for w in workers.values():
            w.kill()


def _child_env() -> dict[str, str]:
    """Our environment, with the repository on PYTHONPATH so `-m benchmarks.cpu_mixed` imports from any cwd."""
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def measure_in_children(cfg: BenchConfig, groups: Sequence[Group], shared: dict[str, Any], jobdir: Path
                        ) -> tuple[list[SystemResult], Optional[dict[str, Any]], list[dict[str, Any]]]:
    """Measure each group in a persistent child process of its own, rounds interleaved (`run_workers`);
    this process only waits.

    Returns every system's results, the model facts of the last engine group (None without
    one) and the timeline of rounds.
    """
    commands: dict[str, list[str]] = {}
    for g in groups:
        src = jobdir / f"{g.name}.in.json"
        src.write_text(json.dumps({**shared, "config": asdict(cfg), "group": asdict(g)}, default=str))
        commands[g.name] = [sys.executable, "-m", "benchmarks.cpu_mixed", "--worker", g.name,
                            "--worker-input", str(src)]
    t0 = time.perf_counter()
    outs, timeline = run_workers(commands, cfg.repeats, cfg.worker_timeout_s, _child_env())
    log.info("%d groups measured in child processes in %.0f s", len(groups), time.perf_counter() - t0)
    results: list[SystemResult] = []
    model_info: Optional[dict[str, Any]] = None
    for g in groups:
        out = outs[g.name]
        results += [SystemResult.from_json(r) for r in out["results"]]
        model_info = out["model"] or model_info
    return results, model_info, timeline


# ------------------------------------------------------------------------------------------- report

def _agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How many requests produced identical tokens, and the mean length of the common prefix."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n)
    return {"identical_requests": same, "requests": len(a), "mean_common_prefix": sum(prefix) / max(len(a), 1)}


def paired(slow: SystemResult, fast: SystemResult) -> list[float]:
    """Round by round, slow's wall time over fast's. Round r of both ran close together (the same
    child back to back for an engine with and without adapters; consecutive children otherwise),
    so a ratio per round cancels the drift that a ratio of two medians, each from different
    rounds, keeps: on the shared 2-core machine whole rounds run up to 30% slower than others."""
    return [a.wall_s / b.wall_s for a, b in zip(slow.runs, fast.runs)]


def summarize(cfg: BenchConfig, results: list[SystemResult]) -> list[dict[str, Any]]:
    """Rows for the table and JSON. The ratios are medians of per-round ratios (`paired`); the
    ratios of the medians are kept beside them ("_of_medians") for comparison with older runs."""
    by = {r.system: r for r in results}
    ref = by.get(REFERENCE)
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "system": r.system, "description": r.description, "adapters": r.adapters, "dtype": r.dtype,
            "quantize": r.quantize, "tokens_per_run": r.tokens, "wall_s": r.wall_s, "tok_s": r.tok_s,
            "request_latency_s": r.latency_s, "ttft_s": r.ttft_s,
            "runs_wall_s": [t.wall_s for t in r.runs],
            "x_peft_mixed": None, "x_peft_mixed_rounds": None, "x_peft_mixed_of_medians": None,
            "lora_overhead": None, "lora_overhead_rounds": None, "lora_overhead_of_medians": None,
        }
        if ref is not None:
            row["x_peft_mixed_rounds"] = paired(ref, r)
            row["x_peft_mixed"] = median(row["x_peft_mixed_rounds"])
            row["x_peft_mixed_of_medians"] = r.tok_s / ref.tok_s
        base = by.get(r.system + "-base") if r.system.startswith("loraserve") and not r.system.endswith(
            "-base") else None
        if base is not None:
            row["lora_overhead_rounds"] = [x - 1.0 for x in paired(r, base)]
            row["lora_overhead"] = median(row["lora_overhead_rounds"])
            row["lora_overhead_of_medians"] = base.tok_s / r.tok_s - 1.0
        # Same-work check: our adapter runs against PEFT mixed, our base runs against transformers.
        other = by.get("hf-base") if r.adapters == "none" else (ref if r.adapters.endswith("distinct") else None)
        if other is not None and other is not r:
            row["agreement_with"] = other.system
            row["agreement"] = _agreement(r.outputs, other.outputs)
        row.update(r.extra)
        rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]], cfg: BenchConfig) -> dict[str, Any]:
    by = {r["system"]: r for r in rows}
    out: dict[str, Any] = {}
    for name in ("loraserve", "loraserve-none"):
        r = by.get(name)
        if r is None:
            continue
        rounds = r["lora_overhead_rounds"] or []
        out[name] = {
            "rounds_overhead_met": f"{sum(x <= GOAL_LORA_OVERHEAD for x in rounds)}/{len(rounds)}",
            "rounds_speedup_met": f"{sum(x >= GOAL_SPEEDUP for x in r['x_peft_mixed_rounds'] or [])}"
                                  f"/{len(r['x_peft_mixed_rounds'] or [])}",
            "x_peft_mixed": r["x_peft_mixed"],
            "speedup_goal": GOAL_SPEEDUP,
            "speedup_met": None if r["x_peft_mixed"] is None else r["x_peft_mixed"] >= GOAL_SPEEDUP,
            "lora_overhead": r["lora_overhead"],
            "overhead_goal": GOAL_LORA_OVERHEAD,
            "overhead_met": None if r["lora_overhead"] is None else r["lora_overhead"] <= GOAL_LORA_OVERHEAD,
        }
    return out


def _pct(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{100 * v:+.1f}%"


def _spread(v: Optional[float], rounds: Optional[list[float]], fmt: Callable[[float], str]) -> Optional[str]:
    return None if v is None else f"{fmt(v)} ({fmt(min(rounds))}..{fmt(max(rounds))})" if rounds else fmt(v)


def print_report(payload: dict[str, Any]) -> str:
    w, m = payload["workload"], payload["model"]
    title = (f"cpu_mixed: {w['requests']} concurrent requests, {w['distinct_adapters']} distinct rank-{w['rank']} "
             f"adapters on {'/'.join(w['targets'])}, prompt {w['prompt_len']}, {w['new_tokens']} new tokens, "
             f"greedy, median of {w['repeats']} warm runs; ratios: median of per-round ratios (range)\n"
             f"model: {m.get('name')} ({m.get('layers')} layers, hidden {m.get('hidden')}, "
             f"intermediate {m.get('intermediate')}, {m.get('heads')}/{m.get('kv_heads')} heads, "
             f"vocab {m.get('vocab')})\nmachine: {payload['machine_line']}\n")
    table = []
    for r in payload["results"]:
        ag = r.get("agreement")
        table.append({
            "system": r["system"], "adapters": r["adapters"], "quant": r["quantize"], "dtype": r["dtype"],
            "tok/s": r["tok_s"], "s/run": r["wall_s"], "s/request": r["request_latency_s"],
            "ttft s": r["ttft_s"],
            "x PEFT mixed": _spread(r["x_peft_mixed"], r["x_peft_mixed_rounds"], lambda v: f"{v:.2f}"),
            "LoRA overhead": _spread(r["lora_overhead"], r["lora_overhead_rounds"], lambda v: f"{100 * v:+.1f}%"),
            "same tokens": None if ag is None else f"{ag['identical_requests']}/{ag['requests']} vs {r['agreement_with']}",
        })
    cols = ["system", "adapters", "quant", "dtype", "tok/s", "s/run", "s/request", "ttft s", "x PEFT mixed",
            "LoRA overhead", "same tokens"]
    print(title, end="")
    text = title + print_table(table, cols)
    lines = []
    for name, g in payload["goals"].items():
        def verdict(met: Optional[bool]) -> str:
            return "n/a" if met is None else ("met" if met else "NOT met")

        x = "n/a" if g["x_peft_mixed"] is None else f"{g['x_peft_mixed']:.2f}x"
        lines.append(f"goal {name}: {x} PEFT mixed (goal >= {g['speedup_goal']:g}x: {verdict(g['speedup_met'])}), "
                     f"LoRA overhead {_pct(g['lora_overhead']) or 'n/a'} "
                     f"(goal <= {100 * g['overhead_goal']:.0f}%: {verdict(g['overhead_met'])}); "
                     f"rounds meeting each: {g['rounds_speedup_met']}, {g['rounds_overhead_met']}")
    if lines:
        print("\n".join(lines))
        text += "\n" + "\n".join(lines)
    return text


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Make prompts and adapters here, measure each group of systems in a child process of its own
    (rounds interleaved across them), and return the JSON payload (also written to cfg.out when set)."""
    cfg.validate()
    from server.core.engine_config import EngineConfig
    from server.model.config import ModelConfig
    from server.model.loader import load_tokenizer, resolve_model

    t_start = time.perf_counter()
    load_before = _loadavg()
    probe = EngineConfig(model=cfg.model, quantize=cfg.quantize, home=cfg.home)
    model_dir = resolve_model(cfg.model, probe.resolve_home())
    dtype = probe.resolve_dtype(probe.resolve_device())
    mc = ModelConfig.from_file(model_dir / "config.json")
    tok = load_tokenizer(model_dir)
    specials = set(getattr(tok, "all_special_ids", []) or []) | set(mc.eos_token_ids)
    prompts = make_prompts(cfg, mc.vocab_size, sorted(specials))

    groups = system_groups(cfg)
    with tempfile.TemporaryDirectory(prefix="loraserve-bench-") as tmp:
        root = Path(cfg.workdir) if cfg.workdir else Path(tmp)
        t0 = time.perf_counter()
        adapter_dirs = make_adapters(model_dir, root, cfg.adapters, cfg.rank, cfg.seed)
        adapters_s = time.perf_counter() - t0
        shared = {"prompts": prompts, "adapter_dirs": [str(d.resolve()) for d in adapter_dirs],
                  "model_dir": str(model_dir.resolve()), "dtype": str(dtype).replace("torch.", "")}
        log.info("prompts and adapters ready in %.0f s; measuring %s", time.perf_counter() - t_start,
                 isolation_note(groups))
        results, engine_model, _timeline = measure_in_children(cfg, groups, shared, Path(tmp))
    order = {s: i for i, s in enumerate(ALL_SYSTEMS)}
    results.sort(key=lambda r: order.get(r.system, 99))
    model_info: dict[str, Any] = engine_model or {"path": str(model_dir), **_shape(mc)}

    machine = cpu_machine_info()
    # Other work on a shared machine skews absolute numbers (ratios less so): record how busy it was.
    machine["load_average_1m"] = {"before": load_before, "after": _loadavg()}
    rows = summarize(cfg, results)
    payload: dict[str, Any] = {
        "benchmark": "cpu_mixed",
        "machine": machine,
        "machine_line": machine_line(machine),
        "model": {"name": "SmolLM2-135M-Instruct" if cfg.model == "default" else cfg.model, **model_info},
        "workload": {"requests": cfg.requests, "distinct_adapters": cfg.adapters, "rank": cfg.rank,
                     "lora_alpha": 2 * cfg.rank, "targets": list(PEFT_TARGETS), "prompt_len": cfg.prompt_len,
                     "new_tokens": cfg.new_tokens, "sampling": "greedy, ignore_eos", "repeats": cfg.repeats,
                     "warmup_runs": 1, "seed": cfg.seed, "baseline_dtype": str(dtype).replace("torch.", ""),
                     "statistic": "median wall time over timed runs; tok/s = generated tokens / wall time; "
                                  "x PEFT mixed and LoRA overhead: median over rounds of the per-round ratio",
                     "isolation": isolation_note(groups)},
        "results": rows,
        "goals": {},
        "setup_s": {"adapters": adapters_s},
        "total_s": None,
    }
    payload["goals"] = goals(rows, cfg)
    payload["total_s"] = time.perf_counter() - t_start
    payload["table"] = print_report(payload)
    if cfg.out:
        write_json(cfg.out, payload)
        print(f"wrote {cfg.out} ({payload['total_s']:.0f} s in all)")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_mixed", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=d.model)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--adapters", type=int, default=d.adapters)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quantize", default=d.quantize, help="loraserve's main quantization (int8 is its default)")
    p.add_argument("--systems", default=",".join(d.systems), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--out", default=d.out, help="JSON path ('' to skip writing)")
    p.add_argument("--workdir", default=d.workdir, help="keep adapters here (default: a temporary directory)")
    p.add_argument("--home", default=d.home, help="loraserve cache dir (default $LORASERVE_HOME)")
    p.add_argument("--worker-timeout", type=float, default=d.worker_timeout_s,
                   help="seconds a group's child process may take to set up, for one round or to finish "
                        "before it is killed and the run fails")
    # Internal: the parent starts one child per group of systems with these (protocol: worker_main).
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-input", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("server", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if a.worker:
        return worker_main(a.worker, a.worker_input)
    cfg = BenchConfig(model=a.model, requests=a.requests, adapters=a.adapters, rank=a.rank,
                      prompt_len=a.prompt_len, new_tokens=a.new_tokens, repeats=a.repeats, seed=a.seed,
                      quantize=a.quantize, systems=tuple(s for s in a.systems.split(",") if s), out=a.out,
                      workdir=a.workdir, home=a.home, worker_timeout_s=a.worker_timeout)
    try:
        run(cfg)
    except ValueError as e:
        print(f"cpu_mixed: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
