"""The contenders: loraserve's engine (with and without adapters) and transformers/PEFT generate.

A `System` is a name for the table and a callable that does one full run of the
workload: every request submitted at once, each generating exactly new_tokens
greedily. `Rounds` times a group's systems a round at a time.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from benchmarks.cpu_mixed.config import BenchConfig
from benchmarks.cpu_mixed.timings import RunTiming, SystemResult

log = logging.getLogger("benchmarks.cpu_mixed")


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


def _engine_run(engine, requests_fn: Callable[[], list]) -> tuple[RunTiming, list[list[int]]]:
    """Submit every request at once and stream them all to completion on an asyncio loop."""

    async def drive() -> tuple[RunTiming, list[list[int]]]:
        loop = asyncio.get_running_loop()
        reqs = requests_fn()
        t0 = time.perf_counter()
        streams = engine.submit_many(reqs, loop)  # one arrival: the first step sees every request

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
    """What the engine really runs: base linear classes and kernels of layer 0, in words, memory."""
    from server.model.quant import kernel_description

    m = engine.model
    linears = {name: f"{type(mod).__name__}({getattr(mod, 'kernel', '?')})"
               for name, mod in m.layers[0].named_children()}
    nbytes = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return {"base_linears": linears, "base_kernel": kernel_description(m), "model_bytes": nbytes, "lora_pool_bytes": engine.pool.nbytes,
            "lora_backend": engine.lora_backend.name, "lora_kernel": engine.lora_backend.description}


def engine_systems(cfg: BenchConfig, quantize: str, prompts: list[list[int]], adapter_dirs: list[Path],
                   names: Sequence[str], closers: list[Callable[[], None]]) -> tuple[list[System], dict[str, Any]]:
    """One engine at `quantize`, serving the adapter system and/or its no-adapter twin."""
    from server.core.engine_config import EngineConfig
    from server.engine.engine import Engine
    from server.core.identity import AdapterVersion
    from server.engine.types import Request, SamplingParams
    from server.lora.weights import load_peft_adapter

    # `none` is the PEFT-exact setting: fp32 like PEFT, also on CPUs where `auto` would pick native bf16.
    ecfg = EngineConfig(model=cfg.model, quantize=quantize, home=cfg.home, max_rank=max(cfg.rank, 16),
                        max_adapters_on_device=max(cfg.adapters, 1),
                        dtype="float32" if quantize == "none" else "auto",
                        # Every round repeats the same prompts: with the prefix cache on, rounds after the
                        # warm-up would time cache hits instead of the engine (PEFT has no such cache).
                        prefix_cache=False)
    t0 = time.perf_counter()
    engine = Engine.from_config(ecfg)
    load_s = time.perf_counter() - t0
    engine.start()
    closers.append(engine.shutdown)
    versions = [AdapterVersion(tenant="default", name=d.name, version=1, digest=f"bench-{d.name}",
                               load=functools.partial(load_peft_adapter, d, engine.model_config, ecfg.max_rank))
                for d in adapter_dirs]
    params = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=0.0, ignore_eos=True)
    dtype = str(engine.dtype).replace("torch.", "")
    static = {**_model_facts(engine), "engine_load_s": load_s, "engine_config": asdict(ecfg)}
    loads_after_warmup: list[int] = []

    def facts() -> dict[str, Any]:
        st = engine.stats()
        out = {**static, "adapter_loads_total": st.pool.loads, "adapter_evictions": st.pool.evictions,
               "engine_steps_total": st.steps, "preemptions": st.preemptions}
        if loads_after_warmup:
            out["adapter_loads_during_timing"] = st.pool.loads - loads_after_warmup[0]
        return out

    def runner(lora: bool) -> Callable[[], tuple[RunTiming, list[list[int]]]]:
        def go() -> tuple[RunTiming, list[list[int]]]:
            result = _engine_run(engine, lambda: [Request(list(p), params,
                                                          versions[cfg.adapter_of(i)] if lora else None)
                                                  for i, p in enumerate(prompts)])
            if lora and not loads_after_warmup:  # the first adapter run is the warm-up that loads them
                loads_after_warmup.append(engine.stats().pool.loads)
            return result
        return go

    systems = []
    for name in names:
        lora = not name.endswith("-base")
        desc = f"loraserve engine, quantize={quantize}, dtype={dtype}" + ("" if lora else ", no adapters")
        systems.append(System(name, desc, f"{cfg.adapters} distinct" if lora else "none", dtype, quantize,
                              runner(lora), facts))
    return systems, {"path": str(engine.model_dir), **model_shape(engine.model_config)}


def model_shape(mc) -> dict[str, Any]:
    """The JSON's description of a ModelConfig's shape."""
    return {"layers": mc.num_layers, "hidden": mc.hidden_size, "intermediate": mc.intermediate_size,
            "heads": mc.num_heads, "kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
            "vocab": mc.vocab_size, "tie_word_embeddings": mc.tie_word_embeddings}


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
        per_req = [tags[cfg.adapter_of(i)] for i in range(cfg.requests)]
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
        order = self.systems if self.done % 2 == 0 else self.systems[::-1]
        # The other groups' processes ran just before this round: the first run after them paid 0.1-0.3 s more
        # (measured 2026-11-30: loraserve vs its base +48..+72% in the rounds loraserve went first, -2..+9% in
        # those it went second), so with an odd number of rounds the median ratio took the side of whichever
        # system went first more often. One untimed run of the round's first system absorbs that.
        t0 = time.perf_counter()
        order[0].run()
        log.info("%s: re-warm %s %.1f s (untimed)", label, order[0].name, time.perf_counter() - t0)
        for s in order:
            timing, self.outs[s.name] = s.run()
            self.runs[s.name].append(timing)
        self.done += 1
        last = {s.name: self.runs[s.name][-1] for s in self.systems}
        log.info("%s: %s", label, ", ".join(f"{n} {t.tokens / t.wall_s:.0f} tok/s" for n, t in last.items()))

    def results(self) -> list[SystemResult]:
        return [SystemResult(s.name, s.description, s.adapters, s.dtype, s.quantize, self.runs[s.name],
                             self.outs[s.name], s.facts()) for s in self.systems]

