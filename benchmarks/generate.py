"""Cached generation throughput: nanogpt4 ``generate`` vs ``transformers`` ``generate`` on the same weights.

Greedy decoding with the KV cache, batch 1 and batch 8, identical prompts, eager and with
``generate(compile=True)`` (timed after its first, compiling call, which is reported on its own); also checks
all produce the same tokens (they share weights, so greedy outputs must agree).

    python benchmarks/generate.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_model_args, model_config, print_table, save_result, time_it  # noqa: E402

from nanogpt4.model.decoding import decode_compile_settings  # noqa: E402
from nanogpt4.model.hf_export import to_hf  # noqa: E402
from nanogpt4.model.transformer import Transformer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, layers=4, dim=192, heads=6, vocab=4096)  # the tiny config, the pipeline's model
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compile-peer", action="store_true",
                    help="also time transformers with a static cache and torch.compile'd forward, under the same "
                         "inductor settings as ours (~30 s more compiling per row)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = model_config(args, args.ctx)
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    hf_base = to_hf(base).eval()
    rows = []
    for dtype_name, b in [(d, int(b)) for d in args.dtypes.split(",") for b in args.batches.split(",")]:
        dtype = getattr(torch, dtype_name)
        ours, hf = base.to(device, dtype), hf_base.to(device, dtype)  # same weights, same precision
        x = torch.randint(0, args.vocab, (b, args.prompt), generator=torch.Generator().manual_seed(b)).to(device)
        mask = torch.ones_like(x)

        def run_ours(x=x, ours=ours):
            return ours.generate(x, args.new, temperature=0)

        def run_compiled(x=x, ours=ours):
            return ours.generate(x, args.new, temperature=0, compile=True)

        def run_hf(x=x, mask=mask, hf=hf):
            return hf.generate(x, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                               do_sample=False, use_cache=True, pad_token_id=0)

        def run_hf_compiled(x=x, mask=mask, hf=hf, dtype=dtype, b=b):
            with decode_compile_settings(True, device, dtype, b):  # the settings generate(compile=True) uses
                return hf.generate(x, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                                   do_sample=False, cache_implementation="static", pad_token_id=0)

        with torch.inference_mode():
            reference = run_hf()
            same = torch.equal(run_ours(), reference)
            compile_s = time_it(run_compiled, 0, 1, sync)  # the first call compiles this shape
            compiled_out = run_compiled()
            same_compiled = torch.equal(compiled_out, reference)
            # where greedy paths part (bf16 rounding can flip a near-tie, and every later token follows it)
            differs = (compiled_out != reference).any(0).nonzero()
            first_diff = int(differs[0]) - args.prompt if len(differs) else None
            # interleaved rounds so machine noise hits all alike
            t_ours, t_comp, t_hf = [], [], []
            for _ in range(args.iters):
                t_ours.append(time_it(run_ours, 0, 1, sync))
                t_comp.append(time_it(run_compiled, 0, 1, sync))
                t_hf.append(time_it(run_hf, 0, 1, sync))
            t_ours, t_comp, t_hf = (statistics.median(t) for t in (t_ours, t_comp, t_hf))
            peer = {}
            if args.compile_peer:
                # the same module converted to another dtype would still pass dynamo's guards and run the graph
                # with the previous row's frozen weights: start every row from empty compile caches
                torch._dynamo.reset()
                hf.forward = torch.compile(hf.forward, dynamic=False)  # one graph per shape, as ours
                first = time_it(run_hf_compiled, 0, 1, sync)
                same_peer = torch.equal(run_hf_compiled(), reference)
                t_peer = statistics.median(time_it(run_hf_compiled, 0, 1, sync) for _ in range(args.iters))
                del hf.forward  # back to the class's eager forward for the next row
                peer = {"transformers compiled tok/s": b * args.new / t_peer, "compiled vs compiled": t_peer / t_comp,
                        "peer same tokens": same_peer, "peer first call s": first}
        tok = b * args.new
        rows.append({"dtype": dtype_name, "batch": b, "nanogpt4 tok/s": tok / t_ours,
                     "compiled tok/s": tok / t_comp, "transformers tok/s": tok / t_hf, "speedup": t_hf / t_ours,
                     "compiled speedup": t_hf / t_comp, "same tokens": same and same_compiled,
                     "compiled first differing token": "-" if first_diff is None else first_diff,
                     "first compiled call s": compile_s, **peer})
    print(f"greedy cached generation, {args.layers} layers x {args.dim} wide, vocab {args.vocab}, prompt "
          f"{args.prompt} + {args.new} new tokens, {device}, {torch.get_num_threads()} threads")
    print_table(rows, ["dtype", "batch", "nanogpt4 tok/s", "compiled tok/s", "transformers tok/s", "speedup",
                       "compiled speedup", "same tokens", "compiled first differing token", "first compiled call s"])
    if args.compile_peer:
        print_table(rows, ["dtype", "batch", "compiled tok/s", "transformers compiled tok/s", "compiled vs compiled",
                           "peer same tokens", "peer first call s"])
    name = "generate" if (args.layers, args.dim) == (4, 192) else f"generate_{args.layers}x{args.dim}"
    path = save_result(name, {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
