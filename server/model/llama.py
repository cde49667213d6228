"""A compact Llama-family decoder over a flattened batch of tokens.

The runner hands one flat batch (prefilling and decoding sequences mixed, T tokens
in all) with its attention metadata and LoRA segments; every linear is the shared
(quantized) base plus each token's adapter delta. Numerics follow Hugging Face's
Llama (fp32 RMSNorm statistics, its RoPE tables) so greedy outputs match token for token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from server.attention.sdpa import AttentionMetadata, paged_attention
from server.model import cpu_glue, fused_decode
from server.model.config import ModelConfig, Projection
from server.model.quant import make_linear, make_lm_head


class LoraDeltas(Protocol):
    """One step's LoRA, prepared by a backend of server.lora (server/lora/backend.py): adds each row's
    adapter delta to the outputs y of a base projection (its targets' outputs side by side, as
    `projection` lists them), given the projection's input x; returns y."""

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> torch.Tensor: ...

    def native(self) -> Optional[fused_decode.NativeLora]:
        """The step's LoRA as C calls for the fused step driver, or None if it has none."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype is torch.float32 and weight.dtype is torch.float32:
        # One op instead of seven; torch computes it with the same ops, so the same bits (tested).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Statistics in fp32, as transformers' LlamaRMSNorm does, whatever the activation dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                 glue: Optional[cpu_glue.CpuGlue]) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream h (+ delta, a block's output not yet added) and its RMSNorm: one C call
    where the glue takes it (the same bits), torch's ops otherwise."""
    if glue is not None and glue.norm_accepts(h, delta, weight):
        return glue.add_rms_norm(h, delta, weight, eps)
    if delta is not None:
        h = h + delta
    return h, rms_norm(h, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(config: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] in fp32, computed by transformers' own RoPE code.

    Reusing transformers' rotary module keeps every rope_scaling type it knows
    (linear, llama3, yarn, ...) exact; dynamic scaling depends on the sequence
    length at run time and is refused because one table cannot express it.
    """
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("dynamic", "longrope"):
        raise ValueError(f"rope_scaling type {kind!r} depends on sequence length and is not supported")
    if kind == "default":
        return default_rope_tables(config.rope_theta, config.head_dim, max_len)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = dict(config.raw)
    raw.pop("architectures", None)
    hf_cfg = LlamaConfig(**raw)
    rotary = LlamaRotaryEmbedding(config=hf_cfg)
    pos = torch.arange(max_len, dtype=torch.long)[None]
    dummy = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(dummy, pos)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


def default_rope_tables(theta: float, head_dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original RoPE's cos/sin [max_len, head_dim], in the fp32 operations of transformers'
    LlamaRotaryEmbedding, so with its bits (tests/model/test_start_up_imports.py holds them equal), without importing
    transformers' modeling code: that import was about 4 s of every start-up."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(max_len, dtype=torch.long)[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().contiguous(), emb.sin().contiguous()


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, weights: dict[str, torch.Tensor],
                 quantize: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.index = index
        self.eps = config.rms_norm_eps
        self.nh, self.nkv, self.hd = config.num_heads, config.num_kv_heads, config.head_dim
        p = f"model.layers.{index}."
        self.input_norm = nn.Parameter(weights[p + "input_layernorm.weight"].to(device, dtype), requires_grad=False)
        self.post_norm = nn.Parameter(weights[p + "post_attention_layernorm.weight"].to(device, dtype),
                                      requires_grad=False)
        def w(m: str) -> torch.Tensor:
            return weights[p + m + ".weight"]

        def cat_bias(ms: tuple[str, ...]) -> Optional[torch.Tensor]:
            bs = [weights.get(p + m + ".bias") for m in ms]
            return None if all(b is None for b in bs) else torch.cat(
                [b if b is not None else torch.zeros(w(m).shape[0]) for b, m in zip(bs, ms)])

        # q/k/v and gate/up share their input: one (quantized) matmul each, LoRA added per target slice.
        qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        gu = ("mlp.gate_proj", "mlp.up_proj")
        self.qkv = make_linear(torch.cat([w(m) for m in qkv]), cat_bias(qkv), quantize, dtype, device)
        self.gate_up = make_linear(torch.cat([w(m) for m in gu]), cat_bias(gu), quantize, dtype, device)
        self.o = make_linear(w("self_attn.o_proj"), weights.get(p + "self_attn.o_proj.bias"), quantize, dtype, device)
        self.down = make_linear(w("mlp.down_proj"), weights.get(p + "mlp.down_proj.bias"), quantize, dtype, device)
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.inter = config.intermediate_size
        self.qkv_parts, self.o_parts = config.projection(("q", "k", "v")), config.projection(("o",))
        self.gate_up_parts, self.down_parts = config.projection(("gate", "up")), config.projection(("down",))
        # RoPE and RMSNorm as C calls where the base runs the dynamic int8 kernel (server/model/cpu_glue.py).
        self.glue = cpu_glue.load() if self.qkv.kernel == "dynamic" and dtype == torch.float32 else None

    def _lora(self, y: torch.Tensor, x: torch.Tensor, lora: Optional[LoraDeltas], projection: Projection
              ) -> torch.Tensor:
        return y if lora is None else lora.apply(y, x, self.index, projection)

    def forward(self, h: torch.Tensor, delta: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionMetadata, kv: Optional[tuple[torch.Tensor, torch.Tensor]],
                lora: Optional[LoraDeltas]) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, MLP output): the caller adds the second to the first with the next norm,
        one fused call, the same bits as adding it here."""
        T = h.shape[0]
        qs, kvs = self.q_size, self.kv_size
        h, x = add_rms_norm(h, delta, self.input_norm, self.eps, self.glue)
        qkv = self._lora(self.qkv(x, attn.prompt_from), x, lora, self.qkv_parts)
        if self.glue is not None and self.glue.accepts(qkv):
            self.glue.rope_(qkv, self.nh + self.nkv, self.hd, cos, sin)  # q and k in place (qkv is ours)
            q, k = qkv[:, :qs].view(T, self.nh, self.hd), qkv[:, qs:qs + kvs].view(T, self.nkv, self.hd)
        else:
            # RoPE on q and k together (the same per-element formula, half the ops of rotating each).
            qk = qkv[:, :qs + kvs].view(T, self.nh + self.nkv, self.hd)
            c, s = cos[:, None, :], sin[:, None, :]
            qk = qk * c + rotate_half(qk) * s
            q, k = qk[:, :self.nh], qk[:, self.nh:]
        v = qkv[:, qs + kvs:].view(T, self.nkv, self.hd)
        o = paged_attention(q, k, v, attn, kv).reshape(T, self.nh * self.hd)
        h, x = add_rms_norm(h, self._lora(self.o(o, attn.prompt_from), o, lora, self.o_parts), self.post_norm,
                            self.eps, self.glue)
        gu = self._lora(self.gate_up(x, attn.prompt_from), x, lora, self.gate_up_parts)
        if self.glue is not None and self.glue.silu_exact and self.glue.accepts(gu):
            a = self.glue.silu_mul(gu, self.inter)
        else:
            a = F.silu(gu[:, :self.inter]) * gu[:, self.inter:]
        return h, self._lora(self.down(a, attn.prompt_from), a, lora, self.down_parts)


@dataclass
class KVCache:
    """Paged KV storage: per layer, k and v of shape [num_blocks * block_size, n_kv_heads, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> "KVCache":
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
                   block_size)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], *, dtype: torch.dtype,
                 device: torch.device, quantize: str = "none", max_len: Optional[int] = None):
        super().__init__()
        self.config, self.dtype, self.device, self.quantize = config, dtype, device, quantize
        self.max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
        self.embed = nn.Parameter(weights["model.embed_tokens.weight"].to(device, dtype), requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, weights, quantize, dtype, device) for i in range(config.num_layers))
        self.norm = nn.Parameter(weights["model.norm.weight"].to(device, dtype), requires_grad=False)
        head = weights.get("lm_head.weight")
        if head is None or config.tie_word_embeddings:
            head = None
        if quantize == "none" and head is None:
            self.lm_head = None  # tied: reuse the embedding, no copy
        else:
            # The tied lm_head is the largest matmul at small batch: a quantized copy pays for itself.
            self.lm_head = make_lm_head(head if head is not None else weights["model.embed_tokens.weight"],
                                        quantize, dtype, device)
        cos, sin = rope_tables(config, self.max_len)
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)
        # Steps through one C call where every kernel it makes is at hand (fused_decode.py).
        self.fused = fused_decode.for_model(self)

    @classmethod
    def from_pretrained(cls, model_dir: Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", quantize: str = "none",
                        max_len: Optional[int] = None) -> "LlamaForCausalLM":
        from server.model.loader import load_state_dict

        config = ModelConfig.from_file(Path(model_dir) / "config.json")
        weights = load_state_dict(Path(model_dir))
        return cls(config, weights, dtype=dtype, device=torch.device(device), quantize=quantize, max_len=max_len)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv: Optional[KVCache] = None, lora: Optional[LoraDeltas] = None) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], for a flat batch of T tokens."""
        h = F.embedding(input_ids, self.embed)
        cos = self.cos.index_select(0, positions).to(self.dtype)
        sin = self.sin.index_select(0, positions).to(self.dtype)
        if self.fused is not None and kv is not None:
            native = None if lora is None else lora.native()
            if lora is None or native is not None:
                out = self.fused.try_run(h, cos, sin, attn, kv, native)
                if out is not None:
                    return out
        delta = None
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, delta, cos, sin, attn, None if kv is None else (kv.k[i], kv.v[i]), lora)
        glue = self.layers[-1].glue if len(self.layers) else None
        return add_rms_norm(h, delta, self.norm, self.config.rms_norm_eps, glue)[1]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits for the rows that will be sampled only."""
        if self.lm_head is None:
            out = F.linear(hidden, self.embed)
        else:
            out = self.lm_head(hidden)
        return out.float()

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, lora: Optional[LoraDeltas] = None) -> torch.Tensor:
        """Logits [L, vocab] for every position of one sequence (perplexity, tests), computed as a served
        prompt is: its K/V written to a paged cache of its own, which prompt attention reads."""
        L = input_ids.shape[0]
        ids = input_ids.to(self.device)
        kv = KVCache.allocate(self.config, 1, L, self.dtype, self.device)  # one block: rows 0..L-1
        attn = AttentionMetadata.prefill_only([L], self.device, slot_mapping=torch.arange(L, device=self.device))
        hidden = self.forward(ids, torch.arange(L, device=self.device), attn, kv, lora)
        return self.logits(hidden)
