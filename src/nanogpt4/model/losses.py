"""Fused LM head + cross-entropy: the loss without materialising fp32 logits for the whole batch.

The standard path (logits -> ``.float()`` -> ``log_softmax`` -> ``nll_loss``) writes several (N, vocab) fp32
tensors. Here the forward keeps only the per-row log-sum-exp, and the backward rebuilds ``softmax - onehot``
chunk by chunk (chunks small enough to stay off glibc's page-faulting mmap path): on CPU the same speed as the
standard path (0.96-1.06x) with 2-3.7x less peak memory (``benchmarks/fused_loss.py``).
Same value and gradients as ``F.cross_entropy`` (fp32 math on the logits; matmuls in the autocast dtype).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 20  # rows per chunk = this / vocab: a 4 MiB fp32 buffer, below glibc's 32 MiB mmap threshold
CUDA_CHUNK_ELEMENTS = 1 << 25  # on a GPU few large chunks (128 MiB fp32) beat hundreds of small kernel launches


def chunk_elements(device_type: str) -> int:
    return CUDA_CHUNK_ELEMENTS if device_type == "cuda" else CHUNK_ELEMENTS


def keeps_logits(dtype: torch.dtype, device_type: str) -> bool:
    """Whether the forward keeps its (N, vocab) logits for the backward (else the backward recomputes them)."""
    return dtype == torch.float32 or device_type != "cuda"


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
        hc, wc = h.to(dtype), weight.to(dtype)
        n_rows, vocab = hc.size(0), wc.size(0)
        chunk = max(1, chunk_elements(h.device.type) // vocab)
        valid = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)
        lse = torch.empty(n_rows, dtype=torch.float32, device=h.device)
        nll = torch.empty(n_rows, dtype=torch.float32, device=h.device)
        # The logits are kept (in the matmul dtype) and overwritten in place by their gradient in backward, which
        # needs an (N, vocab) buffer anyway: the step's peak is the same, and recomputing them would cost a third
        # more head matmuls. On a GPU in bf16 they are recomputed instead: there memory, not matmul time, is the
        # scarce resource, and the buffer would sit through the whole backward of the blocks' activations.
        keep = torch.empty(n_rows, vocab, dtype=dtype, device=h.device) if keeps_logits(dtype, h.device.type) else None
        with torch.autocast(h.device.type, enabled=False):
            if keep is not None:  # one GEMM (CPU, 2048 x 384 x 8192 bf16: 19 ms, where 128-row chunks took 22)
                torch.mm(hc, wc.t(), out=keep)
            # on CPU, log_softmax with a dtype holds an fp32 copy of its input besides its fp32 output: quarter
            # chunks keep the forward within the backward's one bf16 chunk that the memory model counts
            span = chunk if dtype == torch.float32 or keep is None else max(1, chunk // 4)
            for s in range(0, n_rows, span):
                e = min(s + span, n_rows)
                logits = keep[s:e] if keep is not None else hc[s:e] @ wc.t()
                at_label = logits.gather(1, safe[s:e, None]).squeeze(1).float()
                if logits.dtype == torch.float32:
                    lse[s:e] = torch.logsumexp(logits, dim=-1)
                    nll[s:e] = lse[s:e] - at_label
                else:  # fp32 math from one fused kernel: half the time of logsumexp over an fp32 copy of the
                    # logits (CPU, 2048 x 8192 bf16: 4.3 vs 8.2 ms)
                    logp = torch.log_softmax(logits, -1, dtype=torch.float32)
                    nll[s:e] = -logp.gather(1, safe[s:e, None]).squeeze(1)
                    lse[s:e] = at_label + nll[s:e]
                    del logp  # one chunk's temporaries at a time: the next chunk's are made before rebinding
                del logits
        n_valid = valid.sum().clamp(min=1)
        loss = (nll * valid).sum() / n_valid
        ctx.save_for_backward(hc, wc, safe, valid, lse, n_valid, keep)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hc, wc, safe, valid, lse, n_valid, keep = ctx.saved_tensors
        n_rows, vocab = hc.size(0), wc.size(0)
        chunk = max(1, chunk_elements(hc.device.type) // vocab)
        all_valid = bool(valid.all())
        grad_logits = keep if keep is not None else torch.empty(n_rows, vocab, dtype=hc.dtype, device=hc.device)
        rows = torch.arange(min(chunk, n_rows), device=hc.device)
        with torch.autocast(hc.device.type, enabled=False):
            for s in range(0, n_rows, chunk):
                e = min(s + chunk, n_rows)
                logits = keep[s:e] if keep is not None else hc[s:e] @ wc.t()
                # d loss / d logits = (softmax - onehot) x grad_out / n_valid. The softmax comes from one fused
                # kernel in the logits' dtype (fp32 inside, rounded once); at the label, where softmax and onehot
                # nearly cancel, p - 1 is computed in fp32 and rounded once. The common scale multiplies the two
                # small matmul outputs below instead of this (N, vocab) buffer.
                at_label = (logits.gather(1, safe[s:e, None]).squeeze(1).float() - lse[s:e]).exp_().sub_(1.0)
                if keep is not None and keep.dtype == torch.float32:  # in place in the kept logits: no buffer
                    logits.sub_(lse[s:e, None]).exp_()
                else:
                    grad_logits[s:e] = torch.softmax(logits, -1)
                grad_logits[s:e][rows[: e - s], safe[s:e]] = at_label.to(grad_logits.dtype)
                if not all_valid:  # ignored rows carry no gradient (linear_cross_entropy drops them unless all are)
                    grad_logits[s:e].mul_(valid[s:e, None])
                del logits
            scale = (grad_out / n_valid).float()
            grad_h = (grad_logits @ wc).float().mul_(scale).to(ctx.h_dtype)
            grad_w = (grad_logits.t() @ hc).float().mul_(scale).to(ctx.w_dtype)
        return grad_h, grad_w, None, None


@torch.compiler.disable  # a graph break here keeps torch.compile from unrolling the chunk loops
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``labels`` (-100 ignored); h (..., d), labels (...)."""
    dtype = _compute_dtype(h)
    h, labels = h.reshape(-1, h.size(-1)), labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    n_valid = int(valid.sum())
    if 0 < n_valid < labels.numel():
        # SFT and multimodal rows supervise a few answer tokens: the head's matmuls (a third of a small model's
        # step) run on those rows only, not on every prompt and image position
        h, labels = h[valid], labels[valid]
    return _LinearCrossEntropy.apply(h, weight, labels, dtype)
