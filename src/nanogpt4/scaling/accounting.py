"""Exact parameter / FLOP accounting and a training-memory model for nanogpt4 transformers.

Parameters and FLOPs come from the model itself, instantiated on the ``meta`` device (no memory, any size),
so they are exact by construction; :func:`analytic_params` is the closed form, checked against it in tests.

Training memory = static state (fp32 weights, AdamW's two fp32 moments) + fp32 grads + the activations autograd
saves for backward + the fused loss's backward buffers (in bf16 that loss backward is the peak, before most grads
exist; in fp32 grads and activations coexist). Activation bytes follow what *this*
implementation saves, per token and per layer (derived from the ops in ``model/transformer.py`` and checked
against ``torch.autograd.graph.saved_tensors_hooks`` in the tests):

- fp32 (flash SDPA): ``64·d + 16 + 4·H`` bytes per token-layer (GPT-2 layout);
- bf16 autocast on CPU (matmul attention): ``36·d + 16 + 2·H·T`` bytes per token-layer, plus the bf16 copies
  autocast makes of each layer's matmul weights (``2 · 12·d²``) and the ``T²`` causal mask per layer;
- bf16 autocast on CUDA (flash SDPA, no T² term): the bf16 CPU figure without the attention matrix.

Variants (RoPE, SwiGLU, RMSNorm, GQA) adjust those terms; measured peaks are taken on CPU by counting the bytes
of every tensor storage alive during a step (a ``TorchDispatchMode``), on CUDA by ``max_memory_allocated``.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from nanogpt4.model.transformer import Transformer, model_section, swiglu_hidden


def meta_model(config) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


def analytic_params(config) -> dict:
    """Closed-form parameter counts (total counts a tied head once)."""
    c = model_section(config)
    d, L, V = c.dim, c.n_layers, c.vocab_size
    kv = (c.n_kv_heads or c.n_heads) * (d // c.n_heads)
    hidden = c.mlp_hidden or (swiglu_hidden(d) if c.mlp == "swiglu" else 4 * d)
    b = 1 if c.bias else 0
    norm = d * (2 if c.norm == "layernorm" and c.bias else 1)
    attn = d * (d + 2 * kv) + b * (d + 2 * kv) + d * d + b * d
    up = 2 * hidden if c.mlp == "swiglu" else hidden
    mlp = d * up + b * up + hidden * d + b * d
    per_layer = attn + mlp + 2 * norm
    embed = V * d + (c.max_seq_len * d if c.pos_embedding == "learned" else 0)
    head = 0 if c.tie_embeddings else V * d
    total = embed + L * per_layer + norm + head
    return {"params": total, "non_embedding_params": total - embed - head, "per_layer_params": per_layer,
            "params_untied": total + (V * d if c.tie_embeddings else 0)}


def kv_cache_bytes_per_token(config, bytes_per_element: int = 2) -> int:
    """Keys and values of every layer for one token (what generation holds per cached position)."""
    c = model_section(config)
    kv_dim = (c.n_kv_heads or c.n_heads) * (c.dim // c.n_heads)
    return 2 * c.n_layers * kv_dim * bytes_per_element


def _activation_parts(config, batch_size: int, seq_len: int | None, dtype: str, device_type: str) -> tuple[int, int]:
    """(bytes one block keeps for backward, bytes the embeddings + final norm + fused head keep)."""
    c = model_section(config)
    T = seq_len or c.max_seq_len
    N = batch_size * T
    d, H, V = c.dim, c.n_heads, c.vocab_size
    kv = (c.n_kv_heads or c.n_heads) * (d // c.n_heads)
    hidden = c.mlp_hidden or (swiglu_hidden(d) if c.mlp == "swiglu" else 4 * d)
    bf16 = dtype == "bfloat16"
    act = 2 if bf16 else 4  # bytes of a matmul activation
    norm = (8 * d + 4) if c.norm == "rmsnorm" else (4 * d + 8)  # norms run in fp32 (autocast keeps them fp32)
    mlp = (2 * hidden + 2 * hidden) * act if c.mlp == "swiglu" else 2 * hidden * act
    qkv_out = (d + 2 * kv) * act
    if bf16:
        per_token = 2 * norm + 3 * d * act + qkv_out + mlp  # norm inputs, three matmul inputs, qkv, MLP
        if device_type == "cpu":
            per_token += 2 * H * T  # the softmax output of matmul attention
            if kv != d:
                per_token += 2 * d * act - qkv_out + (d * act)  # repeated K/V replace the fused qkv output
        else:
            per_token += 4 * H  # flash attention's log-sum-exp
        weights_copy = 2 * (d * (d + 2 * kv) + d * d + (3 if c.mlp == "swiglu" else 2) * d * hidden)
        per_layer = N * per_token + weights_copy + (T * T if device_type == "cpu" else 0)
        head = N * (2 * d + 4 * d + 8 + 21) + 2 * V * d
        if device_type == "cpu":
            head += N * 2 * V  # the loss keeps its bf16 logits on CPU (recomputes them on CUDA)
    else:
        per_token = 2 * norm + 3 * 4 * d + qkv_out + 4 * H + mlp  # norm inputs, matmul inputs, qkv, lse, MLP
        if c.pos_embedding == "rope":
            per_token += 12 * d
        per_layer = N * per_token
        head = N * (4 * V + 8 * d + 23)
    if c.pos_embedding == "rope":
        head += N * (d // H) * 4
    if c.norm == "rmsnorm":
        head += N * (4 * d - 4)
    return per_layer, head


def activation_bytes(config, batch_size: int, seq_len: int | None = None, dtype: str = "float32",
                     device_type: str = "cpu", checkpointing: bool = False) -> int:
    """Bytes autograd keeps for backward during one micro-batch (see the module docstring)."""
    c = model_section(config)
    per_layer, head = _activation_parts(config, batch_size, seq_len, dtype, device_type)
    if checkpointing:  # only each block's (fp32) input survives the forward; one block is recomputed at a time
        return c.n_layers * batch_size * (seq_len or c.max_seq_len) * 4 * c.dim + per_layer + head
    return c.n_layers * per_layer + head


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int  # what autograd keeps for backward (with checkpointing: block inputs + the larger peak's part)
    transient: int  # the fused loss's backward buffers
    peak_dynamic: int  # bytes above weights + optimizer at the step's peak

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.peak_dynamic

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def training_memory(config, batch_size: int, seq_len: int | None = None, dtype: str = "float32",
                    device_type: str = "cpu", checkpointing: bool = False,
                    loss_chunk_elements: int | None = None) -> MemoryEstimate:
    """Peak bytes of one training step (fp32 master weights, AdamW moments, grads, activations, and the fused
    loss's buffers: its kept (N, vocab) logits, which become their own gradient, one chunk of softmax, and the
    head's weight gradient).

    On CPU (foreach AdamW), fp32 grads and activations peak together; in bf16 the loss's backward is the peak,
    before most grads exist. With checkpointing only each block's fp32 input survives the forward, and the
    peak is either the loss's backward or a recomputed block's backward: in fp32 its activations plus their
    gradients (about as large again) and the residual-stream gradient, with the grads alive; in bf16 its
    activations beside the grads. The CUDA branch follows peaks measured on an H200 and an H100. Both are checked
    against measured peaks within 10% in the tests (CPU: live tensor bytes; CUDA: recorded max_memory_allocated)."""
    from nanogpt4.model.losses import chunk_elements

    c = model_section(config)
    n = analytic_params(config)["params"]
    T = seq_len or c.max_seq_len
    N, V = batch_size * T, c.vocab_size
    bf16 = dtype == "bfloat16"
    rows = min(N, max(1, (loss_chunk_elements or chunk_elements(device_type)) // V))  # the loss's chunk
    if bf16:
        # the (N, vocab) gradient (on CPU: the kept logits, counted in the activations), one bf16 chunk of
        # softmax (plus, on CUDA, the chunk's recomputed bf16 logits), and the head's weight gradient (bf16,
        # then fp32)
        transient = rows * V * 2 + V * c.dim * (4 + 2)
        if device_type == "cuda":
            transient += N * V * 2 + rows * V * 2
    else:  # the kept fp32 logits become their gradient: the backward adds grad_h and the head's weight gradient
        transient = N * 4 * c.dim + V * c.dim * 4
    grads = 4 * n
    per_layer, head = _activation_parts(config, batch_size, T, dtype, device_type)
    inputs = c.n_layers * N * 4 * c.dim  # what checkpointing keeps: each block's fp32 input
    acts = activation_bytes(config, batch_size, T, dtype, device_type, checkpointing)
    if device_type == "cuda":
        # Measured with max_memory_allocated (benchmarks/cuda_check.py): the peak is the loss's backward on
        # top of everything saved (grads arrive as activations are freed, and fused AdamW adds no temporaries),
        # or, with checkpointing, a recomputed block beside the grads.
        # The loss's forward adds one chunk's temporaries to everything saved: fp32, logsumexp's exp; bf16 (the
        # logits are recomputed per chunk), the bf16 logits, log_softmax's fp32 copy of them and its fp32 output.
        loss_forward = rows * V * (10 if bf16 else 4)
        if checkpointing:
            # the recomputed block's backward: its saved tensors, plus (bf16, empirical) half as much again in
            # activation gradients and flash attention's fp32 accumulators
            recompute = per_layer * 3 // 2 if bf16 else per_layer
            peak = max(inputs + head + max(transient, loss_forward), inputs + recompute + grads)
        else:
            peak = max(acts + max(transient, loss_forward), grads)
    elif checkpointing:
        if bf16:
            peak = inputs + max(head + transient, grads + per_layer)
        else:
            peak = grads + inputs + 2 * N * 4 * c.dim + max(head + transient, 2 * per_layer)
    else:
        peak = max(acts + transient, grads) if bf16 else grads + acts + transient
    return MemoryEstimate(weights=4 * n, grads=grads, optimizer=8 * n, activations=acts, transient=transient,
                          peak_dynamic=peak)


def plan(config, batch_size: int | None = None, dtype: str = "bfloat16", device_type: str = "cpu") -> dict:
    """What ``nanogpt4 scaling plan`` prints."""
    c = model_section(config)
    m = meta_model(config)
    B = batch_size if batch_size is not None else (config.training.batch_size // config.training.grad_accum_steps
                       if hasattr(config, "training") else 1)
    counts = analytic_params(config)
    mem = training_memory(config, B, c.max_seq_len, dtype, device_type)
    mem_ckpt = training_memory(config, B, c.max_seq_len, dtype, device_type, checkpointing=True)
    return {
        "params": m.num_parameters(),
        "non_embedding_params": m.num_parameters(non_embedding=True),
        "params_untied": counts["params_untied"],
        "train_flops_per_token": m.flops_per_token(c.max_seq_len, training=True),
        "inference_flops_per_token": m.flops_per_token(c.max_seq_len, training=False),
        "micro_batch_size": B,
        "seq_len": c.max_seq_len,
        "dtype": dtype,
        "train_memory_bytes": mem.total,
        "train_memory": mem.as_dict(),
        "train_memory_bytes_checkpointed": mem_ckpt.total,
        "inference_kv_bytes_per_token": kv_cache_bytes_per_token(config, 2 if dtype == "bfloat16" else 4),
    }


class LiveBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storages alive at once among those created inside the mode: the CPU stand-in for
    ``torch.cuda.max_memory_allocated`` that the memory model is checked against.

        with LiveBytes() as m:
            step()
        m.peak
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _track(self, t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            key = st.data_ptr()
            if key and key not in self.live:
                self.live[key] = st.nbytes()
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._free, key)
        return t

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map(self._track, out)
        return out
