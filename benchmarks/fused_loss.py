"""LM head + cross-entropy, forward + backward: nanogpt4's fused loss vs the standard path, same process.

The standard path is what `transformers` models run: logits = h @ W^T (in the autocast dtype), then
``F.cross_entropy(logits.float(), labels)``. Rounds interleave the two so machine drift hits both alike. Peak
memory is the most tensor-storage bytes alive at once during one step (``scaling.accounting.LiveBytes``).

    python benchmarks/fused_loss.py                          # N=2048 rows, d=384, vocab 4096/8192/50257
    python benchmarks/fused_loss.py --vocabs 8192 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, save_result  # noqa: E402

from nanogpt4.model.losses import linear_cross_entropy  # noqa: E402
from nanogpt4.scaling.accounting import LiveBytes  # noqa: E402


def ours(h, w, y):
    return linear_cross_entropy(h, w, y)


def standard(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y)


def step(loss_fn, h, w, y, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(h, w, y)
    loss.backward()
    grads = (h.grad, w.grad)
    h.grad = w.grad = None
    return loss.detach(), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--vocabs", default="4096,8192,50257")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args()

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for vocab in map(int, args.vocabs.split(",")):
            g = torch.Generator().manual_seed(0)
            h = torch.randn(args.rows, args.dim, generator=g).requires_grad_()
            w = (torch.randn(vocab, args.dim, generator=g) * 0.02).requires_grad_()
            y = torch.randint(0, vocab, (args.rows,), generator=g)

            (l_ours, g_ours), (l_std, g_std) = (step(fn, h, w, y, dtype) for fn in (ours, standard))
            grad_diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_ours, g_std, strict=True))
            secs = {"nanogpt4 fused": [], "standard": []}
            for _ in range(args.iters):
                for name, fn in (("nanogpt4 fused", ours), ("standard", standard)):
                    t0 = time.perf_counter()
                    step(fn, h, w, y, dtype)
                    secs[name].append(time.perf_counter() - t0)
            ms = {k: 1000 * statistics.median(v) for k, v in secs.items()}
            peak = {}
            for name, fn in (("ours", ours), ("standard", standard)):
                with LiveBytes() as tracker:  # every tensor the step creates, the gradients included
                    step(fn, h, w, y, dtype)
                peak[name] = tracker.peak / 2**20
            rows.append({"dtype": dtype_name, "vocab": vocab, "ours ms": ms["nanogpt4 fused"],
                         "standard ms": ms["standard"], "speedup": ms["standard"] / ms["nanogpt4 fused"],
                         "ours peak MiB": peak["ours"], "standard peak MiB": peak["standard"],
                         "|loss diff|": float((l_ours - l_std).abs()), "max grad diff / max grad": grad_diff})
            print(f"{dtype_name} vocab {vocab}: {ms['nanogpt4 fused']:.1f} vs {ms['standard']:.1f} ms", flush=True)
    print(f"LM head + cross-entropy forward + backward, {args.rows} rows x {args.dim}, cpu, "
          f"{torch.get_num_threads()} threads")
    print_table(rows, ["dtype", "vocab", "ours ms", "standard ms", "speedup", "ours peak MiB", "standard peak MiB",
                       "|loss diff|", "max grad diff / max grad"])
    print(f"wrote {save_result('fused_loss', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
