"""Training-step throughput: nanogpt4 vs Hugging Face GPT2LMHeadModel of identical size, same process.

One step = forward + loss + backward + AdamW update on a (batch, seq) batch. Prints tok/s and MFU for each
model and dtype; MFU is quoted against this machine's measured matmul peak for that dtype (printed too).

    python benchmarks/train_throughput.py                  # 6 layers, 384 wide, T=256 (the issue's target shape)
    python benchmarks/train_throughput.py --compile        # adds torch.compile'd nanogpt4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_args, matmul_peak, model_config, print_table, save_result, time_it  # noqa: E402

from nanogpt4.model.hf_export import to_hf  # noqa: E402
from nanogpt4.model.transformer import Transformer  # noqa: E402
from nanogpt4.train.trainer import lm_loss  # noqa: E402
from nanogpt4.utils import autocast_ctx  # noqa: E402


def make_step(model, opt, batch, dtype, hf: bool):
    device = batch["input_ids"].device

    def step():
        with autocast_ctx(device, dtype):
            ids = batch["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss if hf else lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, layers=6, dim=384, heads=6, vocab=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(nanogpt4)")
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = model_config(args, args.seq)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 on a GPU means TF32 matmuls, for both models
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    batch = {"input_ids": x[:, :-1].to(device), "labels": x[:, 1:].to(device)}
    tokens = args.batch * args.seq
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        peak = matmul_peak(dtype, device.type)
        torch.manual_seed(0)
        ours = Transformer(cfg).to(device)
        fpt = ours.flops_per_token(args.seq)
        hf = to_hf(ours).to(device).train()
        candidates = [("nanogpt4", ours, False), ("transformers GPT2", hf, True)]
        if args.compile:
            candidates.insert(1, ("nanogpt4 compiled", torch.compile(ours), False))
        steps = {}
        for name, model, is_hf in candidates:
            model.train()
            base = model._orig_mod if hasattr(model, "_orig_mod") else model
            # each model with the optimizer its library configures by default
            opt = (base.configure_optimizers(0.1, 1e-4, device_type=device.type) if not is_hf
                   else torch.optim.AdamW(model.parameters(), lr=1e-4))
            steps[name] = make_step(model, opt, batch, dtype, is_hf)
            t0 = time.perf_counter()
            for _ in range(args.warmup + (3 if "compiled" in name else 0)):
                steps[name]()
            sync()
            print(f"{name} {dtype_name}: warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        # rounds interleave the models so machine noise (shared VMs drift) hits all of them alike
        secs = {name: [] for name in steps}
        for _ in range(args.iters):
            for name, step in steps.items():
                secs[name].append(time_it(step, 0, 1, sync))
        # the peak again after the runs, keeping the higher: one measured while the machine was briefly busy
        # (another process exiting) read 0.10 TFLOP/s against 0.14 a minute later, and put MFU above 1
        peak = max(peak, matmul_peak(dtype, device.type))
        results = {name: tokens / statistics.median(v) for name, v in secs.items()}
        hf_tok_s = results["transformers GPT2"]
        for name, tok_s in results.items():
            rows.append({"model": name, "dtype": dtype_name, "tok/s": tok_s, "vs HF": tok_s / hf_tok_s,
                         "MFU": fpt * tok_s / peak, "peak TFLOP/s": peak / 1e12})
    print(f"train step, {args.layers} layers x {args.dim} wide, {args.heads} heads, vocab {args.vocab}, "
          f"batch {args.batch} x T={args.seq}, {device}, {torch.get_num_threads()} threads, "
          f"{Transformer(cfg).num_parameters() / 1e6:.1f}M params")
    print_table(rows, ["model", "dtype", "tok/s", "vs HF", "MFU", "peak TFLOP/s"])
    path = save_result("train_throughput", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
