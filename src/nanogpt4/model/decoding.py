"""Fast paths for decoding one token per row: the weights laid out for eager decoding on CPU, and the
inductor settings for compiled decoding. ``Transformer.decode_step`` runs the model's math; this module decides
how its matmuls run, from timings on 2-core x86 VMs (the numbers in the comments).
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DecodeWeights:
    """The linear layers' weights laid out once for eager decoding on CPU (``Transformer.packed_decode_weights``).

    ``layout`` "onednn": reordered into oneDNN's blocked layout for a fixed number of rows; "blocked" (one fp32
    row, ``blocked_weight``): (blocks, in, DECODE_BLOCK), one row's product a batch of small GEMMs that each
    stream one contiguous block (a GEMV through oneDNN or BLAS read weights that no longer fit in cache at about
    half the rate); "mkl" (fp32 rows on Intel CPUs): packed for MKL's GEMM of ``rows`` rows (``torch.ops.mkl``, as
    inductor's frozen weights); "transposed" (one bf16 row of a small model on Intel CPUs): contiguous fp32 (in,
    out) copies, an untransposed GEMM for MKL."""

    layout: str
    weights: dict[nn.Linear, torch.Tensor]
    # "blocked": padded to whole blocks; "transposed" for bf16 weights: widened to fp32 (else the layer's own)
    biases: dict[nn.Linear, torch.Tensor] = field(default_factory=dict)
    rows: int = 0  # "mkl": the rows per call the weights were packed for


DECODE_BLOCK = 32  # output columns per block of the "blocked" layout


def _block_padding(n: int) -> int:
    """Zeros that take ``n`` output columns to whole blocks."""
    return -n % DECODE_BLOCK


def blocked_weight(weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) weight as (blocks, in, DECODE_BLOCK), out zero-padded to whole blocks: one row's product is
    then a batch of small GEMMs, each streaming one contiguous block."""
    padded = F.pad(weight, (0, 0, 0, _block_padding(weight.size(0))))
    return padded.t().reshape(weight.size(1), -1, DECODE_BLOCK).transpose(0, 1).contiguous()


def blocked_bias(bias: torch.Tensor) -> torch.Tensor:
    return F.pad(bias, (0, _block_padding(bias.numel()))).view(-1, 1, DECODE_BLOCK)


def decode_linear(layer: nn.Linear, x: torch.Tensor, packed: DecodeWeights | None, gelu: str | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)`` while decoding, then GELU (``gelu``: its ``approximate``, "none" or "tanh") or ``residual +``,
    through the weight's decoding
    layout when ``packed`` holds one. oneDNN's layout applies either inside the GEMM, on its fp32 accumulator
    (one rounding, not two, in bf16), which decoded 2-6% faster than separate ops in paired runs on 2 Zen 4 cores
    (bf16 batch 8: 1.02x at 6x384, 1.03x at 4x192; batch 1 at 6x384 1.06x; fp32 batch 8 at 4x192 1.05x)."""
    if packed is not None and packed.layout == "onednn":
        weight = packed.weights[layer]
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, layer.bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, layer.bias, "gelu" if gelu else "none", [],
                                                  gelu or "none")
    dtype = x.dtype
    if packed is None:
        y = layer.forward(x)
    elif packed.layout == "mkl":
        y = torch.ops.mkl._mkl_linear(x, packed.weights[layer], layer.weight, layer.bias, packed.rows)
    elif packed.layout == "transposed":  # bf16 rows against fp32 copies: fp32 math, rounded once at the end
        weight = packed.weights[layer]
        bias = packed.biases.get(layer, layer.bias)
        x = x.to(weight.dtype)
        y = torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    else:  # "blocked": one row (1, in), the same row against every block, no copies
        weight = packed.weights[layer]
        rows = x.expand(weight.size(0), 1, x.size(-1))
        bias = packed.biases.get(layer)
        y = torch.bmm(rows, weight) if bias is None else torch.baddbmm(bias, rows, weight)
        y = y.view(1, -1)[:, :layer.out_features]
    if gelu:
        y = decode_gelu(y, gelu)
    if residual is not None:
        y = residual + y
    return y if y.dtype == dtype else y.to(dtype)


# at most this many fp32 elements take PyTorch's own GELU kernel while decoding (decode_gelu); past it oneDNN's
# threads win (2 cores of an Intel Xeon, alone: 64 x 1536 oneDNN 26 vs 36 µs, 8 x 768 10 vs 8)
NATIVE_GELU_MAX_ELEMENTS = 32768


def decode_gelu(y: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu`` of a decoding step's (rows, hidden), on CPU in fp32 through PyTorch's own kernel. ``F.gelu`` hands
    a contiguous fp32 tensor to oneDNN, whose call costs more than the math at a few rows; oneDNN takes contiguous
    tensors only, so a transposed view goes to PyTorch's kernel, and its result transposed back is contiguous
    again (one row is viewed as two first: a (1, n) tensor's transpose is contiguous). The two kernels agree to
    ~1e-6. 2 cores of an Intel Xeon (AMX), eager fp32 decoding, tok/s oneDNN's / PyTorch's, same tokens: 4x192
    batch 1 1,384 / 1,535, 8 6,587 / 7,057, 32 11,580 / 11,812; 6x384 batch 1 450 / 490. Compiled decoding gets
    plain ``F.gelu``: inductor writes its own kernel, and the transposes only cost it (4x192 batch 8: 7,421 vs
    8,094 tok/s)."""
    if (y.device.type != "cpu" or y.dtype != torch.float32 or y.dim() != 2 or y.numel() > NATIVE_GELU_MAX_ELEMENTS
            or not y.is_contiguous() or y.size(0) == 1 and y.numel() % 2 or torch.compiler.is_compiling()):
        return F.gelu(y, approximate=approximate)
    rows = y.view(2, -1) if y.size(0) == 1 else y
    return F.gelu(rows.t(), approximate=approximate).t().view(y.shape)


# eager decoding through weights laid out for it (Transformer.packed_decode_weights): when each layout pays, measured
# on 2 Zen 3 cores (fp32, several rows: oneDNN's), 2 Zen 4 cores (fp32, one row: blocked; bf16: oneDNN's, on CPUs
# where oneDNN takes bf16) and 2 cores of an Intel Xeon with AMX (fp32: MKL's GEMMs, see lay_out_weights)
PACK_MIN_NEW_TOKENS = 16
PACK_MAX_BYTES = 2 * 2**30
MKL_DECODE_MAX_BYTES = 32 * 2**20  # Intel: MKL's layouts up to this much fp32 weight, oneDNN's beyond


def eager_cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype for eager decoding: the model's, except bf16 on CPUs without AMX, whose keys and values
    are held in fp32. There PyTorch's fused attention kernel takes one bf16 query ~4x as long as an fp32 one
    (batch 8, 6 heads, 100 keys, Zen 4 with AVX512-BF16: 138 vs 34 µs); bf16 widens to fp32 exactly, so the cache
    holds the same values and attention gets fp32 math, for twice the cache's memory. With AMX the bf16 kernel is
    the faster (2 cores of an Intel Xeon, same shape: 22 vs 37 µs with the query's casts; torch 2.4.1 30 vs 41),
    and eager bf16 decoding of batch 8 ran 1.11x / 1.17x faster at 4x192 / 6x384 through a bf16 cache."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_amx():
        return torch.float32
    return dtype


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids); False on torch builds that cannot say."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@functools.cache
def cpu_vendor() -> str:
    """"intel", "amd" or "" (unknown), from /proc/cpuinfo's vendor_id, else the processor's name (Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        name = ""
    name = (name or platform.processor()).lower()
    return "intel" if "intel" in name else "amd" if "amd" in name else ""


def intel_mkl() -> bool:
    """Whether torch's fp32 GEMMs here are MKL's on an Intel CPU, with MKL's packed-weight linear (as inductor's)."""
    return cpu_vendor() == "intel" and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def onednn_takes_bf16() -> bool:
    """Whether torch's oneDNN takes bf16 matmuls on this CPU (AVX-512 x86 CPUs, Arm CPUs with bf16)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


# compiled decoding on CPU: weights folded in as constants (prepacked), GEMMs from inductor's C++ templates.
# Before torch 2.8 max_autotune's C++ GEMM templates fail to build (g++ errors on 2.4.1, 2.5.1, 2.6.0 and 2.7.1;
# 2.8.0, 2.9.1, 2.11, 2.13 and 2.15 build them): those decode through frozen weights alone.
DECODE_COMPILE_OPTIONS: dict = {"freezing": True, "max_autotune": torch.__version__ >= (2, 8)}
# Autotuning times each candidate alone, its weight hot in cache, where oneDNN's linear and the C++ template tie;
# inside a decode step the template is ~3x faster (4x192 fp32 batch 1: ~800 vs ~300 tok/s). A noisy pick of
# oneDNN, which inductor caches for good, left compiled decoding no faster than eager. The template alone (oneDNN
# still where it cannot take a shape) needs no timing: 2-3.5x eager for GPT-2 and Llama-style x fp32/bf16 x batch
# 1/8 and on par at 12x768, first compile 43 s instead of 75 s; a lucky autotune was 20% faster at 4x192 batch 1.
# Checked on 2.13 (a plain matmul the template cannot take has no fallback there), hence not before it.
if torch.__version__ >= (2, 13):
    DECODE_COMPILE_OPTIONS["max_autotune_gemm_backends"] = "CPP"


# ... except bf16 from this many rows on a CPU with bf16 instructions (AVX512-BF16, AMX): there the C++ template's
# tok/s stops growing past ~6 rows while oneDNN's linears (the frozen weights prepacked for them) keep scaling.
# 2 Zen 4 cores, tok/s template / oneDNN, one process each: 4x192 batch 1 3,309 / 1,391, 4 8,641 / 4,178, 6 7,845
# / 6,455; paired in one process: batch 8 6,348 / 6,698, 16 7,984 / 11,476, 32 7,664 / 13,551, and 6x384 batch 8
# 1,601 / 2,479 (fp32 keeps the template: at 4x192 batch 8 7,844 / 4,428). On Intel CPUs fp32 from this many rows
# also goes without the template, to MKL's GEMMs on weights packed for them: 2 cores of an Intel Xeon (AMX), tok/s
# template / MKL, one process each, 4x192 batch 4 5,747 / 5,278, 8 7,814-8,205 / 8,047-8,300, 32 9,766-9,980 /
# 12,945-13,155; 6x384 batch 4 1,112 / 1,154, 8 1,333-1,650 / 1,544-1,861 (one row: 644 / 563).
COMPILED_BF16_ONEDNN_MIN_BATCH = 8


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), not by widening to fp32."""
    return any(bool(getattr(torch.cpu, name, lambda: False)())
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def decode_compile_options(dtype: torch.dtype | None = None, batch: int | None = None) -> dict:
    """Inductor settings for compiled decoding on CPU of ``batch`` rows in ``dtype``."""
    if batch is not None and batch >= COMPILED_BF16_ONEDNN_MIN_BATCH and (
            dtype == torch.bfloat16 and cpu_has_bf16_instructions()
            or dtype == torch.float32 and intel_mkl()):
        return {**DECODE_COMPILE_OPTIONS, "max_autotune": False}
    return DECODE_COMPILE_OPTIONS


def decode_compile_settings(enabled: bool, device: torch.device, dtype: torch.dtype | None = None,
                            batch: int | None = None):
    """Inductor settings for compiled decoding, patched only while generating: freezing is read from the
    global config (``torch.compile(options=...)`` comes too late for it), and must not leak into the user's
    other compiled graphs, whose weights may be training. Each batch size compiles its own graph, under the
    settings for its dtype and size (``decode_compile_options``)."""
    if not enabled or device.type != "cpu":
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(decode_compile_options(dtype, batch))


def lay_out_weights(linears: list[nn.Linear], batch: int, new_tokens: int) -> DecodeWeights | None:
    """``linears``' weights (the head last) laid out once for decoding ``batch`` rows, or None where no layout
    pays (measured for eager fp32 and bf16 decoding on x86 CPUs only).

    A plain ``F.linear`` lets the GEMM library repack its transposed weight on every call; at decoding's few
    rows that repacking costs as much as the multiply. Medians of paired runs on 2 Zen 3 cores: weights
    reordered for oneDNN decode batch 8 1.19x faster at 4x192 and 1.98x at 12x768, batch 32 1.13x, batch 1
    1.16x at 6x384 and 1.44x at 12x768, but batch 1 of a 4x192 model, whose weights (10 MB) stay in cache,
    10% slower. One fp32 row gets ``blocked_weight``'s layout instead, at every size: on 2 Zen 4 cores one
    decode step at 4x192 / 6x384 / 12x768 took 682 / 2,395 / 14,073 µs against 1,035 / 3,778 / 17,432 through
    oneDNN's layout and 738 / 4,593 / 23,579 through (in, out) copies (the layout before it; bf16 blocks are
    2-3x slower than oneDNN, not used). A layout costs ~1 ms per MB of weights, so short generations are left
    alone, and so are models over 2 GiB of linear weights (the copy lives as long as the ``generate`` call).

    On Intel CPUs torch's fp32 GEMMs are MKL's, whose small-GEMM kernels are Intel's own, while oneDNN's linear
    costs ~15 µs a call there however small: on 2 cores of an Intel Xeon (AMX) the rules above decoded 4x192
    batch 8 at 1.45x transformers' speed, F.linear at 1.76x, (in, out) copies through MKL's untransposed GEMM at
    1.83x; one row 1.90x blocked, 1.89x copies, 2.10x F.linear (fp32 medians of 9, tok/s 5,481 / 6,637 / 6,904
    and 1,348 / 1,337 / 1,490). Once the weights outgrow the caches oneDNN's layout is ahead again (batch 8
    tok/s oneDNN / copies / F.linear: 6x384 1,928 / 1,845 / 1,797, 12x768 227 / 185 / 131), and blocks never pay
    there (one row: 420 / 470 F.linear at 6x384, 37 / 46 at 12x768). Weights packed for MKL's GEMM (what inductor
    freezes them into) then beat the copies by ~3%, the same sums bit for bit (batch 8, medians of 9, tok/s copies /
    packed: 4x192 6,679-6,968 / 6,946-7,159, 6x288 2,986-3,197 / 3,162-3,338; batch 32 11,999-12,629 /
    12,235-12,820). So on Intel one fp32 row gets nothing, several rows MKL's packed weights up to
    ``MKL_DECODE_MAX_BYTES`` of weights and oneDNN's layout beyond.

    bf16 weights get oneDNN's layout at every batch size on CPUs where oneDNN takes bf16 (AVX-512; not
    AVX2-only CPUs, where torch computes bf16 without it, and get nothing): on 2 Zen 4 cores (AVX512-BF16), same
    tokens, batch 1 / 8 decode 1.22x / 1.14x faster at 4x192, 1.62x / 1.33x at 6x384 and 12x768. On Intel, one
    bf16 row of a model whose weights fit ``MKL_DECODE_MAX_BYTES`` as fp32 goes through fp32 (in, out) copies
    instead: oneDNN's ~20 µs a call is most of a small layer's time there (192 -> 576, one row: 21 µs, MKL's fp32
    GEMM with both casts 9 µs), and the product is the same fp32 sum of exact bf16 products, rounded once (4x192
    batch 1: 1,016 -> 1,167 tok/s; at 6x384 the copies read twice the bytes and lose, 485 vs 340)."""
    weight = linears[-1].weight
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
            or new_tokens < PACK_MIN_NEW_TOKENS or platform.machine().lower() not in ("x86_64", "amd64")):
        return None
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if size > PACK_MAX_BYTES:
        return None
    mkl = intel_mkl()
    if weight.dtype == torch.float32 and mkl:
        if batch == 1:
            return None
        if size <= MKL_DECODE_MAX_BYTES:
            return DecodeWeights("mkl", {m: torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), batch)
                                         for m in linears}, rows=batch)
    elif weight.dtype == torch.bfloat16 and mkl and batch == 1 and 2 * size <= MKL_DECODE_MAX_BYTES:
        return DecodeWeights("transposed", {m: m.weight.detach().float().t().contiguous() for m in linears},
                             {m: m.bias.detach().float() for m in linears if m.bias is not None})
    elif weight.dtype == torch.float32 and batch == 1:
        return DecodeWeights("blocked", {m: blocked_weight(m.weight.detach()) for m in linears},
                             {m: blocked_bias(m.bias.detach()) for m in linears if m.bias is not None})
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    if weight.dtype == torch.bfloat16 and not onednn_takes_bf16():
        return None
    return DecodeWeights("onednn", {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch)
                                    for m in linears})
