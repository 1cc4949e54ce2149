"""The GPT: a decoder-only transformer with causal SDPA attention and a KV cache.

Defaults reproduce the seed / GPT-2 architecture (learned positions, pre-LN blocks, 4x GELU MLP, LayerNorm,
tied LM head). Config flags switch on the Llama-style variants (RoPE, RMSNorm, SwiGLU, grouped-query attention).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanogpt4.config import ModelConfig
from nanogpt4.model.decoding import (
    DecodeWeights,
    cpu_has_amx,
    decode_compile_settings,
    decode_linear,
    eager_cache_dtype,
    lay_out_weights,
)
from nanogpt4.model.losses import linear_cross_entropy


def model_section(config) -> ModelConfig:
    """Accept the full config (seed style: ``config.model.dim``) or just its model section."""
    return config.model if hasattr(config, "model") else config


def swiglu_hidden(dim: int) -> int:
    """Llama's rule: 2/3 of 4*dim (same parameter count as a 4x GELU MLP), rounded up to 64."""
    return 64 * math.ceil(int(8 * dim / 3) / 64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by per-position angles (B, 1, T, D/2); halves layout, as in Llama/HF."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


@dataclass
class KVCache:
    """Pre-allocated keys/values for every layer; ``length`` tokens are filled."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    # static mode (compiled decoding): the slot to write, as a 0-d tensor, and attention reads every slot (the
    # caller's mask hides the unfilled ones), so each step has the same shapes and compiles once
    write_index: torch.Tensor | None = None

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, capacity: int, device, dtype) -> KVCache:
        n_kv = cfg.n_kv_heads or cfg.n_heads
        shape = (batch, n_kv, capacity, cfg.dim // cfg.n_heads)
        # zeros, not empty: static decoding multiplies the unfilled slots by a zero weight, and 0 * NaN from
        # uninitialised memory would be NaN
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)])

    @property
    def capacity(self) -> int:
        return self.k[0].size(2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write_index is not None:
            self.k[layer].index_copy_(2, self.write_index.view(1), k)
            self.v[layer].index_copy_(2, self.write_index.view(1), v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# On CPU in bf16, PyTorch's flash-attention kernel runs at ~1/3 of the bf16 matmul rate for short contexts,
# while plain bf16 matmuls run near peak: up to this key length, attention is two matmuls and a softmax. With AMX
# the fused kernel is the faster past 512 keys: forward and backward at batch x T = 2048, 6 heads of 64, 2 cores
# of an Intel Xeon, fused / matmuls, T=1024 17.1 / 21.1 ms and 24.9-25.6 / 57.7-59.1 (medians, two sessions);
# T=512 15.4 / 9.3 and 20.2-22.8 / 28.6-30.3, a toss-up, left to the matmuls; T=384 11.8 / 9.0.
CPU_MATMUL_ATTENTION_MAX_LEN = 512 if cpu_has_amx() else 1024


def matmul_attention(q, k, v, mask=None, is_causal=False, dropout_p=0.0, scale=None):
    """Same result as ``F.scaled_dot_product_attention`` (boolean mask = keep), as explicit matmuls.

    Scores stay in the input dtype: softmax accumulates in fp32 internally and rounds once on output, which
    is what a cast after an fp32 softmax would give, without two extra passes over (B, H, T, T).
    """
    if k.size(1) != q.size(1):  # grouped-query attention: share each kv head across its query group
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    B, H, T, D = q.shape
    S = k.size(2)
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    # the scale and the mask (as a 0/-inf bias) ride in one baddbmm: a separate q * scale and a masked add
    # cost two more passes forward and one backward (6x384, T=256, bf16 CPU: 8.6 -> 6.8 ms a layer); the bias
    # needs no gradient, so the backward is the two matmuls alone
    if mask is None:
        bias, beta = q.new_zeros(()), 0.0
    else:
        bias, beta = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf")), 1.0
        if bias.dim() > 2:
            bias = bias.expand(B, H, T, S).reshape(B * H, T, S)
    q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
    scale = scale if scale is not None else D ** -0.5
    if torch.compiler.is_compiling():  # inductor fuses the scale and the mask into its own kernels, and the C++
        # GEMM templates of compiled decoding (max-autotune) have no baddbmm with an alpha
        scores = torch.bmm(q3 * scale, k3.transpose(1, 2))
        if beta:
            scores = scores + bias
    else:
        scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=beta, alpha=scale)
    with torch.autocast(q.device.type, enabled=False):
        probs = scores.softmax(-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs.to(v3.dtype), v3).view(B, H, T, D)


# F.scaled_dot_product_attention's enable_gqa arrived in torch 2.5; the project supports 2.4
SDPA_HAS_GQA = torch.__version__ >= (2, 5)


def sdpa(q, k, v, mask=None, is_causal=False, dropout_p=0.0, scale=None):
    """``F.scaled_dot_product_attention`` with grouped-query attention (fewer kv heads than query heads) on
    every supported torch: natively from 2.5, by repeating each kv head across its query group before."""
    gqa = {}
    if k.size(1) != q.size(1):
        if SDPA_HAS_GQA:
            gqa["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          scale=scale, **gqa)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        # µP: 1/d_head, not 1/sqrt(d_head): after training, q and k are correlated and q·k grows like d_head
        self.scale = 1.0 / self.head_dim if cfg.parametrization == "mup" else None
        self.dropout = cfg.dropout
        kv_width = self.n_kv_heads * self.head_dim
        self.qkv_sizes = [self.n_heads * self.head_dim, kv_width, kv_width]  # one matmul, split into q, k, v
        self.qkv = nn.Linear(cfg.dim, sum(self.qkv_sizes), bias=cfg.bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.proj.residual_scale = True

    def forward(self, x, rope=None, mask=None, is_causal=True, cache: KVCache | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
            if k.dtype != q.dtype:  # an fp32 cache of a bf16 model (eager_cache_dtype): back, exactly
                k, v = k.to(q.dtype), v.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.size(2) <= CPU_MATMUL_ATTENTION_MAX_LEN
                and q.size(2) > 1):  # one eager decoded query: the fused kernel beats two tiny bf16 matmuls
            y = matmul_attention(q, k, v, mask, is_causal and mask is None, dropout, self.scale)
        else:
            y = sdpa(q, k, v, mask, is_causal and mask is None, dropout, self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def decode(self, x: torch.Tensor, cache: KVCache, rope, mask, packed: DecodeWeights | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` for one new token per row, x: (B, C) -> (B, C), plus ``residual`` when given. Its key and
        value go into ``cache``; it attends to the cache's filled slots (in static mode to all of them, ``mask``
        hiding the unfilled)."""
        B = x.size(0)
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = decode_linear(self.qkv, x, packed).split(self.qkv_sizes, dim=-1)
        # one query per row: (B, H * D) already is (B, H, 1, D) in memory, no transposes
        q, k, v = q.view(B, H, 1, D), k.view(B, Hkv, 1, D), v.view(B, Hkv, 1, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(self.layer, k, v)
        if cache.write_index is not None:  # compiled: inductor fuses the plain matmuls
            y = matmul_attention(q, k, v, mask, scale=self.scale)
        elif k.dtype != q.dtype:  # an fp32 cache of a bf16 model on CPU (eager_cache_dtype)
            y = sdpa(q.to(k.dtype), k, v, mask, scale=self.scale).to(q.dtype)
        else:
            y = sdpa(q, k, v, mask, scale=self.scale)
        return decode_linear(self.proj, y.reshape(B, H * D), packed, residual=residual)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.gelu = None if self.swiglu else "tanh" if cfg.mlp == "gelu_tanh" else "none"  # F.gelu's approximate
        hidden = cfg.mlp_hidden or (swiglu_hidden(cfg.dim) if self.swiglu else 4 * cfg.dim)
        # SwiGLU's gate and up projections share one matmul
        self.fc = nn.Linear(cfg.dim, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.dim, bias=cfg.bias)
        self.proj.residual_scale = True

    def forward(self, x):
        return self.proj(self.activation(self.fc(x)))

    def decode(self, x: torch.Tensor, packed: DecodeWeights | None, residual: torch.Tensor) -> torch.Tensor:
        """``residual + forward(x)`` for one token per row, x: (B, C); GELU rides in the first matmul."""
        h = decode_linear(self.fc, x, packed, gelu=self.gelu)
        if self.swiglu:
            h = self.activation(h)
        return decode_linear(self.proj, h, packed, residual=residual)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        # exact (erf) GELU by default, as the seed's nn.GELU() (~5x cheaper than tanh on CPU); "tanh" for weights
        # trained with it (GPT-2's, imported)
        return F.gelu(h, approximate=self.gelu)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg, layer)
        self.ln2 = make_norm(cfg)
        self.ff = FeedForward(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, mask=None, is_causal=True, cache=None):
        a = self.attn(self.ln1(x), rope, mask, is_causal, cache)
        if self.training and self.dropout:
            a = F.dropout(a, self.dropout)
        x = x + a
        f = self.ff(self.ln2(x))
        if self.training and self.dropout:
            f = F.dropout(f, self.dropout)
        return x + f

    def decode(self, x: torch.Tensor, cache: KVCache, rope, mask, packed: DecodeWeights | None = None) -> torch.Tensor:
        """``forward`` for one new token per row (eval mode), x: (B, C). The submodules' ``forward`` is called
        directly: at decoding's batch sizes ``nn.Module.__call__``'s bookkeeping costs as much as the matmuls
        (so hooks would not run: ``generate`` decodes a hooked model through ``forward``)."""
        x = self.attn.decode(self.ln1.forward(x), cache, rope, mask, packed, residual=x)
        return self.ff.decode(self.ln2.forward(x), packed, residual=x)


def attention_mask_4d(attention_mask: torch.Tensor, q_len: int, past: int) -> torch.Tensor:
    """Boolean (B, 1, q_len, past+q_len) mask: causal AND key is not padding.

    A query always sees itself, so a padding query (left padding) has a finite, ignored output
    instead of a NaN from an all-masked softmax row.
    """
    total = past + q_len
    keys = attention_mask[:, None, None, :total].bool()
    q_pos = torch.arange(past, total, device=attention_mask.device)[:, None]
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    causal = k_pos <= q_pos
    return (keys & causal) | (k_pos == q_pos)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded rows start counting at their first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        cfg = self.cfg = model_section(config)
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos_embedding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.token_embed.weight
        if cfg.pos_embedding == "rope":
            cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_blocks = False  # set by train.distributed.apply_activation_checkpointing
        # µP (Yang et al., Tensor Programs V): width multiplier m = dim / base; logits are scaled by 1/m, hidden
        # matrices start at std/sqrt(m) and learn at lr/m (configure_optimizers), so the base width's tuned
        # hyperparameters carry over to every width
        self.width_mult = cfg.dim / cfg.mup_base_dim if cfg.parametrization == "mup" else 1.0
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02); projections into the residual stream scaled by 1/sqrt(2 * n_layers)
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "residual_scale", False) else 1.0
            if module is not self.head:
                scale /= math.sqrt(self.width_mult)
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, return_hidden: bool = False, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or final hidden states (B, T, dim) with ``return_hidden``.

        ``attention_mask`` (B, past+T) marks real tokens (1) vs padding (0); ``inputs_embeds`` replaces the
        token embedding lookup (used to splice image tokens in). With ``labels`` (B, T; -100 = ignore) the
        result is the mean cross-entropy, computed by the fused head+loss without materialising logits.
        """
        x = self.token_embed(idx) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        rope = None
        if self.cfg.pos_embedding == "rope":
            rope = (self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None])
        x = self.drop(x)

        mask, is_causal = None, True
        if attention_mask is not None and not bool(attention_mask[:, : past + T].all()):
            mask = attention_mask_4d(attention_mask, T, past)
        elif past > 0:
            # keys = cache + new: a causal mask aligned to the end; one query sees everything
            if T > 1:
                mask = attention_mask_4d(torch.ones(B, past + T, dtype=torch.bool, device=x.device), T, past)
            else:
                is_causal = False
        recompute = self.checkpoint_blocks and kv_cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, rope, mask, is_causal, None, use_reentrant=False)
            else:
                x = block(x, rope, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f(x)
        if self.width_mult != 1.0:
            x = x * (1.0 / self.width_mult)  # µP's output multiplier, applied before the (tied) head
        if return_hidden:
            return x
        if labels is not None:
            return linear_cross_entropy(x, self.head.weight, labels)
        return self.head(x)

    def decode_step(self, tokens: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None,
                    cache: KVCache, packed: DecodeWeights | None = None) -> torch.Tensor:
        """Next-token logits (B, vocab) for one new token per row: ``tokens`` and ``position_ids`` are (B,). The
        token's keys and values go into ``cache`` (the caller advances ``cache.length``); ``key_mask`` (B, slots
        attended), when given, marks the slots each row may see, the new one included. In static mode
        (``cache.write_index`` set: compiled decoding) every slot is attended and the mask is required, so each
        call has the same shapes and ``torch.compile`` captures the whole step once. ``packed``: the linear layers'
        prepacked weights (``packed_decode_weights``), eager only."""
        x = self.token_embed.forward(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed.forward(position_ids)
        else:  # RoPE (read no config here: the compiler cannot trace OmegaConf's attribute access)
            rope = (self.rope_cos[position_ids][:, None, None], self.rope_sin[position_ids][:, None, None])
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        for block in self.blocks:
            x = block.decode(x, cache, rope, mask, packed)
        x = self.ln_f.forward(x)
        if self.width_mult != 1.0:
            x = x * (1.0 / self.width_mult)
        return decode_linear(self.head, x, packed)

    def packed_decode_weights(self, batch: int, new_tokens: int) -> DecodeWeights | None:
        """The linear layers' weights laid out once for eager decoding of ``batch`` rows (``lay_out_weights``),
        or None where no layout pays."""
        linears = [m for m in self.blocks.modules() if isinstance(m, nn.Linear)] + [self.head]
        return lay_out_weights(linears, batch, new_tokens)

    def compiled_decode_step(self):
        """``decode_step`` through ``torch.compile``, specialised per batch size, capacity and dtype (the first
        call of each compiles; ~30 s on 2 CPU cores). On CPU the weights are frozen into the compiled code so
        inductor can prepack them for its own small-batch C++ GEMM kernels (``DECODE_COMPILE_OPTIONS``): 2-3.5x
        faster decoding than eager here. Frozen weights go stale when the model changes, and dynamo's guards do
        not notice, so the step is keyed on every parameter's storage and version: an optimizer step,
        ``load_state_dict`` or ``.to(dtype)`` triggers a fresh compile."""
        weights = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cached = self.__dict__.get("_compiled_decode")
        if cached is None or cached[0] != weights:
            # torch.compile caches per code object: a copy of decode_step's code gets a cache of its own (a
            # bound method, so the weights are the module's attributes, which freezing needs)
            fn = types.FunctionType(Transformer.decode_step.__code__.replace(), globals(), "decode_step",
                                    Transformer.decode_step.__defaults__)
            # on CUDA a decode step is a few hundred small kernels: replaying them as one CUDA graph removes the
            # launch overhead that dominates batch-1 decoding
            mode = "reduce-overhead" if self.head.weight.device.type == "cuda" else None
            compiled = torch.compile(types.MethodType(fn, self), fullgraph=True, dynamic=False, mode=mode)
            cached = self.__dict__["_compiled_decode"] = (weights, compiled)
            self.__dict__.pop("_static_cache", None)
        return cached[1]

    def static_cache(self, batch: int, capacity: int, device, dtype) -> KVCache:
        """The compiled step's KV cache, zeroed and reused while its shape holds: a CUDA graph may only write
        into inputs that keep their address from call to call (marked static, so it neither copies them in nor
        skips the graph)."""
        key = (batch, capacity, torch.device(device), dtype)
        kept = self.__dict__.get("_static_cache")
        if kept is not None and kept[0] == key:
            for t in (*kept[1].k, *kept[1].v):
                t.zero_()
            kept[1].length, kept[1].write_index = 0, None
            return kept[1]
        self.__dict__.pop("_static_cache", None)  # free the old shape's cache before allocating the new one
        cache = KVCache.allocate(self.cfg, batch, capacity, device, dtype)
        if cache.k[0].is_cuda:
            for t in (*cache.k, *cache.v):
                torch._dynamo.mark_static_address(t)
        self.__dict__["_static_cache"] = (key, cache)
        return cache

    # ---------------------------------------------------------------- accounting
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied head counts once); ``non_embedding`` drops token+position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.token_embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight (forward) plus causal attention; x3 for training.

        Counts the LM head (a real matmul even when tied) and not embeddings/norms (no matmul).
        Attention: QK^T and AV each cost 2*T*d per token for full attention; causal halves the average.
        """
        cfg = self.cfg
        T = seq_len or cfg.max_seq_len
        matmul_params = self.num_parameters(non_embedding=True) + cfg.vocab_size * cfg.dim
        matmul_params -= sum(p.numel() for n, p in self.named_parameters() if p.dim() < 2)
        attn = 2 * 2 * cfg.n_layers * cfg.dim * T / 2  # causal: each query attends to (T+1)/2 keys on average
        forward = 2 * matmul_params + attn
        return 3 * forward if training else forward

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), eps: float = 1e-8,
                             device_type: str = "cpu") -> torch.optim.AdamW:
        """AdamW; weight decay only on tensors with >= 2 dims (matmul weights, embeddings), not biases or norms.
        Under µP the hidden matrices (not embeddings, norms or biases) learn at lr / width_mult."""
        embeddings = {id(p) for p in (self.token_embed.weight, self.head.weight,
                                      *(() if self.pos_embed is None else (self.pos_embed.weight,)))}
        params = [p for p in self.parameters() if p.requires_grad]
        hidden = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
        embed = [p for p in params if p.dim() >= 2 and id(p) in embeddings]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": hidden, "weight_decay": weight_decay, "lr_scale": 1.0 / self.width_mult},
                  {"params": embed, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        for g in groups:  # the trainer sets lr * lr_scale every step; the first step must agree
            g["lr"] = learning_rate * g.get("lr_scale", 1.0)
        # the fused kernel exists on CUDA and CPU and is ~3x faster than the foreach path on CPU
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)

    # ---------------------------------------------------------------- generation
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                 attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                 pad_token_id: int = 0, generator: torch.Generator | None = None,
                 inputs_embeds: torch.Tensor | None = None, compile: bool = False,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Append up to ``max_new_tokens`` tokens to each (left-padded) row; returns (B, T + new).

        ``temperature=0`` is greedy. Rows that emitted a stop token are padded with ``pad_token_id``.
        Once the sequence outgrows ``max_seq_len`` the context slides: each step recomputes the last
        ``max_seq_len`` tokens, exactly as the uncached path crops its input, so both give the same tokens.
        ``compile=True`` decodes through ``compiled_decode_step`` (a static cache; the first call per batch
        size and length compiles, ~20-30 s on 2 CPU cores, then each token costs less: worth it for long or
        repeated generation with fixed weights). ``on_token`` is called with each step's (B,) new tokens as they
        are chosen (streaming output; a row past its stop token gets ``pad_token_id``).
        """
        # checked here, not per token: a negative temperature would invert the distribution and top_p=0 would
        # mask every token (NaN probabilities), both without an error
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {top_k}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        was_training = self.training
        self.eval()
        try:
            # inference mode is cheaper than no_grad: no version counters or view tracking
            with torch.inference_mode(), decode_compile_settings(compile, input_ids.device,
                                                                 next(self.parameters()).dtype, input_ids.size(0)):
                out = self._generate(input_ids, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                                     attention_mask, use_cache, pad_token_id, generator, inputs_embeds,
                                     compile, on_token)
        finally:
            self.train(was_training)
        return out.clone()  # a normal tensor again, usable in autograd (e.g. PPO log-probs of a rollout)

    def _generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, stop_tokens, attention_mask,
                  use_cache, pad_token_id, generator, inputs_embeds, compile, on_token) -> torch.Tensor:
        L = self.cfg.max_seq_len
        B, T0 = input_ids.shape
        device = input_ids.device
        total = T0 + max_new_tokens
        out = torch.full((B, total), pad_token_id, dtype=torch.long, device=device)
        out[:, :T0] = input_ids
        # only left padding needs a mask: rows that hit a stop token keep decoding into ignored pad slots
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = None
        if padded:
            mask = torch.ones(B, total, dtype=torch.bool, device=device)
            mask[:, :T0] = attention_mask.bool()
        stop = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        pad = torch.full((B,), pad_token_id, dtype=torch.long, device=device)
        embeds = None
        if inputs_embeds is not None:
            embeds = torch.empty(B, total, inputs_embeds.size(-1), dtype=inputs_embeds.dtype, device=device)
            embeds[:, :T0] = inputs_embeds
        dtype = next(self.parameters()).dtype
        cache: KVCache | None = None
        win_start = 0  # index in ``out`` of the first token held by the cache
        next_pos = None  # (B,) position of the token being decoded
        n = T0
        key_mask = None  # static decoding: which cache slots each row attends to
        # decode_step skips nn.Module.__call__, so a model whose modules carry forward hooks (FSDP's parameter
        # gathers, a user's probes) decodes through forward, as one-token calls of the blocks
        hooked = any(m._forward_pre_hooks or m._forward_hooks for m in self.modules())
        if compile and use_cache and hooked:
            raise ValueError("generate(compile=True) skips module hooks, and this model has forward hooks (FSDP "
                             "or registered ones); call it with compile=False")
        compiled = self.compiled_decode_step() if compile and use_cache else None
        packed = (self.packed_decode_weights(B, max_new_tokens)
                  if use_cache and compiled is None and not hooked else None)
        for step in range(max_new_tokens):
            logits = None
            has_room = cache is not None and cache.length < cache.capacity  # else re-prefill the sliding window
            if compiled is not None and has_room:
                if key_mask is None:
                    key_mask = torch.zeros(B, cache.capacity, dtype=torch.bool, device=device)
                    filled = slice(win_start, win_start + cache.length)
                    key_mask[:, :cache.length] = mask[:, filled] if padded else True
                key_mask[:, cache.length] = True
                cache.write_index = torch.tensor(cache.length, device=device)
                if device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
                logits = compiled(out[:, n - 1], next_pos, key_mask, cache)
                cache.write_index = None
                cache.length += 1
            elif use_cache and has_room and hooked:
                hidden = self(out[:, n - 1:n], return_hidden=True, kv_cache=cache, position_ids=next_pos[:, None],
                              attention_mask=mask[:, win_start:n] if padded else None)
            elif use_cache and has_room:
                # the window's slots so far and the new one (a padded row must not see its padding)
                logits = self.decode_step(out[:, n - 1], next_pos, mask[:, win_start:n] if padded else None, cache,
                                          packed)
                cache.length += 1
            else:
                win_start = max(0, n - L)
                window_mask = mask[:, win_start:n] if padded else torch.ones(B, n - win_start, device=device)
                if use_cache:
                    capacity = min(L, n - win_start + max_new_tokens - step)
                    cache = (self.static_cache(B, capacity, device, dtype) if compiled is not None
                             else KVCache.allocate(self.cfg, B, capacity, device, eager_cache_dtype(dtype, device)))
                    key_mask = None
                hidden = self(out[:, win_start:n], return_hidden=True, kv_cache=cache,
                              attention_mask=window_mask if padded else None,
                              position_ids=position_ids_from_mask(window_mask),
                              inputs_embeds=embeds[:, win_start:n] if embeds is not None else None)
                next_pos = position_ids_from_mask(window_mask)[:, -1]
            if logits is None:
                logits = self.head(hidden[:, -1])
            next_tok = sample_next(logits, temperature, top_k, top_p, generator)
            if stop.numel():
                next_tok = torch.where(finished, pad, next_tok)
            out[:, n] = next_tok
            if on_token is not None:
                on_token(next_tok)
            if embeds is not None:
                embeds[:, n] = self.token_embed(next_tok).to(embeds.dtype)
            n += 1
            next_pos = next_pos + 1
            if stop.numel():
                finished |= torch.isin(next_tok, stop)
                if bool(finished.all()):
                    break
        return out[:, :n]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from (B, V) logits; ``temperature == 0`` is argmax."""
    if temperature == 0:
        # max's indices are argmax's (the first of equal maxima) in the logits' own dtype: no fp32 copy, and on
        # CPU argmax of bf16 runs ~4x slower than max (8 x 8192: 121 vs 32 µs; 45 µs widened first)
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # inverse-CDF sampling: one uniform number per row (torch.multinomial draws one per vocabulary entry, a
    # third of a small model's decoding time on CPU); zero-probability tokens have empty intervals
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1).squeeze(-1)
