"""The engine: one loop thread that schedules, runs the model, samples and streams.

Callers on any thread `submit` a Request and read its RequestStream; `abort` frees
a request's KV blocks and adapter slot at the loop's next turn (milliseconds, or
the end of the step in flight). An exception inside one step fails only the
requests in that step; the loop itself keeps running.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from server.core import native
from server.core.engine_config import EngineConfig
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import BlockAllocator
from server.engine.prefix_cache import PrefixCache
from server.engine.runner import ModelRunner
from server.engine.sampler import make_generator, sample, token_logprobs
from server.engine.scheduler import FINISHED, Scheduler, Sequence
from server.core.stats import EngineStats, PrefixCacheStats
from server.core.threads import run_in_fresh_thread, use_compute_threads
from server.core.identity import AdapterVersion
from server.engine.types import (FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Delta, DeltaBatch, LoraActivity,
                                 Request, RequestStream, SamplingParams, TokenLogprob)
from server.core.errors import CapacityError, InvalidRequestError, LoraServeError, UnavailableError
from server.core.limits import check_request_id
from server.core.sizes import check_fits, free_memory
from server.lora.factory import build_lora_backend
from server.model.config import ModelConfig
from server.model.llama import KVCache, LlamaForCausalLM

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_TOKENS = 16384
MAX_DEFAULT_CONTEXT = 8192


class Engine:
    def __init__(self, model: LlamaForCausalLM, tokenizer: Any, config: EngineConfig,
                 model_dir: Optional[Path] = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_config: ModelConfig = model.config
        self.model_dir = model_dir
        self.device, self.dtype = model.device, model.dtype
        bs = config.kv_block_size
        kv_tokens = config.kv_cache_tokens or self._auto_kv_tokens()
        self.max_model_len = self._context_length(kv_tokens)
        num_blocks = -(-kv_tokens // bs)
        # One spare block past the allocator's range: padded decode rows write there (cuda_graphs.py).
        cache_blocks = num_blocks + 1
        self._check_kv_fits(kv_tokens, cache_blocks)
        self.blocks = BlockAllocator(num_blocks, bs)
        self.kv = KVCache.allocate(self.model_config, cache_blocks, bs, self.dtype, self.device)
        self.lora_backend = build_lora_backend(config, self.model_config, self.device, self.dtype)
        self.pool = self.lora_backend.pool
        self.prefix_cache = PrefixCache(self.blocks, self._base_identity()) if config.prefix_cache else None
        self.scheduler = Scheduler(self.blocks, self.pool, config.max_batch_size, config.max_batch_tokens,
                                   self.prefix_cache)
        self.runner = ModelRunner(model, self.kv, self.blocks, self.lora_backend)
        self.runner.decode_graphs = self._decode_graphs()
        self.eos_ids = self._eos_ids()
        if self.device.type == "cuda":
            from server.attention.sdpa import set_prefill_backend
            from server.attention.xformers_probe import prefill_fn

            set_prefill_backend(prefill_fn(self.device, config.attention))
        self._inbox: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self._accepting = False
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._last_batch = 0
        self._steps = 0
        self._deltas: Optional[DeltaBatch] = None  # set while a step hands out its tokens
        log.info("engine: device=%s dtype=%s quantize=%s kv=%d tokens (%d blocks of %d) context=%d "
                 "adapter rows=%d slots=%d max_rank=%d", self.device, str(self.dtype).replace("torch.", ""),
                 model.quantize, self.blocks.num_blocks * bs, self.blocks.num_blocks, bs, self.max_model_len,
                 self.pool.num_rows, self.pool.num_slots, config.max_rank)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "Engine":
        from server.model.loader import load_tokenizer, resolve_model

        device = cfg.resolve_device()
        dtype = cfg.resolve_dtype(device)
        native.set_cache_dir(cfg.resolve_kernel_cache())  # before any kernel is built, by the model or the LoRA
        model_dir = resolve_model(cfg.model, cfg.resolve_home())
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(model_dir)

        def build() -> "Engine":
            model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, device=device, quantize=cfg.quantize,
                                                     max_len=cfg.max_model_len or None)
            log.info("model %s loaded in %.2fs", model_dir, time.perf_counter() - t0)
            return cls(model, tokenizer, cfg, model_dir)

        # Built (weights, KV cache, slot stacks) in a thread that then exits: no OpenMP pool may
        # outlive it beside the engine loop's (server.core.threads).
        return run_in_fresh_thread(build, threads=cfg.cpu_threads, name="loraserve-model-load")

    def _decode_graphs(self) -> Optional[DecodeGraphs]:
        """CUDA graphs for decode steps where asked for and possible (ignored on CPU)."""
        if not self.config.cuda_graphs or self.device.type != "cuda":
            return None
        if self.lora_backend.name != "triton":
            log.warning("CUDA graphs off: they need the triton LoRA backend, not %s", self.lora_backend.name)
            return None
        graphs = DecodeGraphs(self.model, self.kv, self.blocks, self.lora_backend, self.config.max_batch_size,
                              self.max_model_len, scratch_kv_row=self.blocks.num_blocks * self.blocks.block_size,
                              capture=True)
        graphs.capture_all()  # before the loop and any adapter load: nothing else may use CUDA meanwhile
        return graphs

    def _base_identity(self) -> str:
        """What the KV of a prompt depends on besides the adapter: the base weights as loaded and computed.
        The cache lives only as long as this process, so the model's path stands in for its weights."""
        return f"{self.model_dir}|{self.model.quantize}|{self.dtype}|{self.device.type}"

    def _context_length(self, kv_tokens: int) -> int:
        """The longest sequence (prompt + generated) served. An explicit --max-model-len the model or the KV
        cache cannot hold is refused at start-up (a request near it could never run); the default (the
        model's, capped at MAX_DEFAULT_CONTEXT) shrinks to what the KV cache holds, with a warning."""
        model_max, asked = self.model_config.max_position_embeddings, self.config.max_model_len
        kv_source = ("--kv-cache-tokens" if self.config.kv_cache_tokens else
                     "sized from free GPU memory; set --kv-cache-tokens" if self.device.type == "cuda" else
                     "the CPU default; set --kv-cache-tokens")
        if asked > model_max:
            raise InvalidRequestError("engine.max_model_len", f"--max-model-len {asked} is more than the model's "
                                      f"{model_max} positions (max_position_embeddings); use {model_max} or less")
        if asked > kv_tokens:
            raise InvalidRequestError("engine.max_model_len", f"--max-model-len {asked} is more than the KV cache "
                                      f"holds ({kv_tokens} tokens, {kv_source}): raise the KV cache to at least "
                                      f"{asked} tokens or lower --max-model-len")
        context = min(asked or min(model_max, MAX_DEFAULT_CONTEXT), self.model.max_len)
        if context > kv_tokens:
            log.warning("context limited to %d tokens, what the KV cache holds (%s); the model supports %d: "
                        "longer requests are refused", kv_tokens, kv_source, context)
            context = kv_tokens
        return context

    def _check_kv_fits(self, kv_tokens: int, blocks: int) -> None:
        """Refuse a KV cache of `blocks` blocks larger than the free memory by name (on CPU the allocation would
        succeed, and the OOM killer end the process later without a word)."""
        per_token = KVCache.bytes_per_token(self.model_config, self.dtype)
        nbytes = blocks * self.config.kv_block_size * per_token
        problem = check_fits(f"a KV cache of {kv_tokens} tokens ({per_token} bytes a token)", nbytes,
                             free_memory(self.device), self.device.type)
        if problem is not None:
            raise InvalidRequestError("engine.kv_cache_tokens", f"{problem}: lower --kv-cache-tokens")

    def _auto_kv_tokens(self) -> int:
        if self.device.type != "cuda":
            return DEFAULT_CPU_KV_TOKENS
        free, _ = torch.cuda.mem_get_info(self.device)
        per_token = KVCache.bytes_per_token(self.model_config, self.dtype)
        return max(self.config.kv_block_size, int(free * 0.6) // per_token)

    def _eos_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(int(tok_eos))
        return frozenset(ids)

    # ---- public API --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, abort what is left, join the loop."""
        self._accepting = False
        with self._lock:
            live = list(self._live)
        for rid in live:
            self.abort(rid)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.pool.shutdown()

    def validate(self, request: Request) -> None:
        """Every check that needs no loop state; raises typed errors naming the field."""
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in request.prompt_token_ids):
            raise InvalidRequestError("prompt_token_ids", f"every id must be in the allowed range [0, {vocab})")
        request.params.validate(len(request.prompt_token_ids), self.max_model_len)
        check_request_id(request.request_id)

    def submit(self, request: Request, loop: Optional[asyncio.AbstractEventLoop] = None,
               stream_interval: int = 1) -> RequestStream:
        """Queue `request`; its deltas come through the returned stream (on `loop` for async consumers),
        grouped `stream_interval` tokens at a time after the first (RequestStream)."""
        return self.submit_many([request], loop, stream_interval)[0]

    def submit_many(self, requests: list[Request], loop: Optional[asyncio.AbstractEventLoop] = None,
                    stream_interval: int = 1) -> list[RequestStream]:
        """Queue several requests as one arrival: all or none (a refusal queues nothing), and the loop
        sees them together, so the next step schedules them side by side (a prompt's several choices,
        a burst that shares a prefix) instead of whichever the loop happened to find first."""
        if not self._accepting:
            raise UnavailableError("the engine is not accepting requests (starting or shutting down)")
        for request in requests:
            if not request.request_id:
                request.request_id = uuid.uuid4().hex
            self.validate(request)
        ids = [r.request_id for r in requests]
        with self._lock:
            seen: set[str] = set()
            for rid in ids:
                if rid in self._live:
                    raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
                if rid in seen:
                    raise InvalidRequestError("request_id", f"{rid!r} is given to two requests")
                seen.add(rid)
            if len(self._live) - len(self.scheduler.running) + len(ids) > self.config.max_waiting:
                raise CapacityError(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
            self._live.update(ids)
        seqs = [self._sequence(r, loop, stream_interval) for r in requests]
        self._inbox.put(("add", seqs))
        self._wake.set()
        return [s.stream for s in seqs]

    def _sequence(self, request: Request, loop: Optional[asyncio.AbstractEventLoop],
                  stream_interval: int) -> Sequence:
        stream = RequestStream(request.request_id, loop, stream_interval=stream_interval)
        p = request.params
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return Sequence(
            request=request, stream=stream, detok=IncrementalDetokenizer(self.tokenizer, p.stop),
            generator=make_generator(seed) if p.temperature > 0 else None,
            token_ids=list(request.prompt_token_ids), num_prompt=len(request.prompt_token_ids))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def generate(self, prompt_token_ids: list[int], params: Optional[SamplingParams] = None,
                 adapter: Optional[AdapterVersion] = None, tenant: str = "default") -> Delta:
        """Blocking convenience: submit and collect one request."""
        return self.submit(Request(list(prompt_token_ids), params or SamplingParams(), adapter,
                                   tenant=tenant)).collect()

    def stats(self) -> EngineStats:
        """A snapshot of the engine and its adapter pool (metrics read it at scrape time, from another thread)."""
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.blocks.num_used, kv_blocks_total=self.blocks.num_blocks,
            last_batch_size=self._last_batch, steps=self._steps,
            preemptions=self.scheduler.preemptions, pool=self.pool.stats(), prefix=self._prefix_stats())

    def _prefix_stats(self) -> PrefixCacheStats:
        pc = self.prefix_cache
        if pc is None:
            return PrefixCacheStats()
        return PrefixCacheStats(enabled=True, cached_blocks=pc.num_cached_blocks, hits=pc.hits, misses=pc.misses,
                                tokens_saved=pc.tokens_saved)

    def lora_activity(self) -> LoraActivity:
        """Adapters of running and waiting requests, read from another thread (scrape time).

        The lists belong to the loop thread; copying them is atomic under the GIL, and a queue
        that changed shape mid-copy is simply read again.
        """
        def pairs(seqs: Any) -> tuple[tuple[str, str], ...]:
            seen: dict[tuple[str, str], None] = {}
            for s in seqs:
                a = s.request.adapter
                if a is not None:
                    seen.setdefault((s.request.tenant, a.name), None)
            return tuple(seen)

        running: tuple[tuple[str, str], ...] = ()
        waiting: tuple[tuple[str, str], ...] = ()
        for _ in range(5):
            try:
                running = pairs(list(self.scheduler.running))
                waiting = pairs(self.scheduler.waiting.in_order())
                break
            except RuntimeError:  # a queue changed size while copied
                continue
        return LoraActivity(running, waiting, self.pool.sure_capacity)

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ---- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        use_compute_threads(self.config.cpu_threads)
        while True:
            self._drain_inbox()
            if self._stop:
                break
            if self.scheduler.num_unfinished == 0:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception:  # noqa: BLE001 (a bug in one step must not kill the loop)
                log.exception("engine step failed")

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                for seq in item:
                    self.scheduler.add(seq)
            else:
                seq = self.scheduler.find(item)
                if seq is not None:
                    self._finish(seq, FINISH_ABORT, "")

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        for seq, err in plan.failed:
            self._fail(seq, err)
            if seq.request.adapter is not None:
                self.pool.clear_failure(seq.request.adapter.digest)
        if plan.empty:
            # Everything waits on adapter loads or memory: let workers progress.
            self._wake.wait(0.002)
            self._wake.clear()
            return
        batch = plan.prefill + plan.decode
        try:
            result = self.runner.execute(plan.prefill, plan.decode)
            self.scheduler.prefilled(plan.prefill)
            params = [s.request.params for s in result.seqs]
            tokens = sample(result.logits, params, [s.generator for s in result.seqs])
            logprobs = token_logprobs(result.logits, params, tokens)
        except Exception as e:  # noqa: BLE001
            log.exception("model step failed for %d sequences", len(batch))
            for seq in batch:
                self._fail(seq, e)
            return
        self._last_batch = len(batch)
        self._steps += 1
        now = time.monotonic()
        # One wake-up per consumer loop for the whole step's tokens, not one per sequence.
        self._deltas = DeltaBatch()
        try:
            for seq, tok, lp in zip(result.seqs, tokens, logprobs):
                if seq.status != FINISHED:
                    self._append(seq, tok, now, lp)
        finally:
            self._deltas.flush()
            self._deltas = None

    def _append(self, seq: Sequence, tok: int, now: float, logprob: Optional[TokenLogprob] = None) -> None:
        seq.token_ids.append(tok)
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.request.params
        text, stop_hit = seq.detok.add(tok)
        reason: Optional[str] = None
        if stop_hit or tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            reason = FINISH_STOP
        elif seq.num_generated >= p.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = FINISH_LENGTH
        lps = [logprob] if logprob is not None else None
        if reason is None:
            seq.stream.put(self._delta(seq, [tok], text, None, logprobs=lps), self._deltas)
        else:
            if not stop_hit:
                text += seq.detok.finish()
            self._finish(seq, reason, text, [tok], logprobs=lps)

    def _delta(self, seq: Sequence, ids: list[int], text: str, reason: Optional[str],
               error: Optional[BaseException] = None, logprobs: Optional[list[TokenLogprob]] = None) -> Delta:
        if logprobs is None and seq.request.params.logprobs is not None:
            logprobs = []  # asked for: every delta carries a list (empty when it has no tokens)
        return Delta(seq.request_id, ids, text, reason, seq.num_prompt, seq.num_generated,
                     seq.request.adapter, error, logprobs)

    def _finish(self, seq: Sequence, reason: str, text: str, ids: Optional[list[int]] = None,
                error: Optional[BaseException] = None, logprobs: Optional[list[TokenLogprob]] = None) -> None:
        self.scheduler.finish(seq)
        with self._lock:
            self._live.discard(seq.request_id)
        seq.stream.put(self._delta(seq, ids or [], text, reason, error, logprobs), self._deltas)

    def _fail(self, seq: Sequence, err: BaseException) -> None:
        if not isinstance(err, LoraServeError):
            log.error("request %s failed: %r", seq.request_id, err)
        self._finish(seq, "error", "", error=err)
