"""CUDA-path checks for a GPU machine: correctness of the kernels we rely on, and the memory model.

Run on a machine with a CUDA GPU (CI never does; there is none there):

    python benchmarks/cuda_check.py

1. Flash attention: a bf16 training forward + backward runs with SDPA restricted to the flash kernel
   (so the unmasked causal path really takes it), and its output equals the math kernel's.
2. Causality and the KV cache on the GPU: a future token leaves past logits unchanged (bf16), and cached
   greedy generation equals uncached greedy generation (fp32, TF32 off), with left padding too.
3. The training-memory model (``nanogpt4.scaling.accounting.training_memory``) against
   ``torch.cuda.max_memory_allocated`` for several shapes, fp32 / bf16, with and without activation
   checkpointing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, save_result  # noqa: E402

from nanogpt4.config import load_config  # noqa: E402
from nanogpt4.model.transformer import Transformer  # noqa: E402
from nanogpt4.scaling.accounting import training_memory  # noqa: E402
from nanogpt4.train.distributed import apply_activation_checkpointing  # noqa: E402
from nanogpt4.utils import autocast_ctx  # noqa: E402


def config(d, L, H, V, T, *extra):
    return load_config("tiny", [f"model.dim={d}", f"model.n_layers={L}", f"model.n_heads={H}",
                                f"model.vocab_size={V}", f"model.max_seq_len={T}", *extra])


def check_flash(dev) -> dict:
    torch.manual_seed(0)
    m = Transformer(config(256, 2, 4, 1024, 256)).to(dev)
    x = torch.randint(0, 1024, (4, 256), device=dev)
    out = {}
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)]:
        m.zero_grad(set_to_none=True)
        with sdpa_kernel([backend]), autocast_ctx(dev, torch.bfloat16):
            loss = m(x, labels=x)
        loss.backward()
        out[name] = (loss.item(), m.token_embed.weight.grad.float().clone())
    grad_err = (out["flash"][1] - out["math"][1]).abs().max().item() / out["math"][1].abs().max().item()
    ok = abs(out["flash"][0] - out["math"][0]) < 2e-2 and grad_err < 5e-2
    return {"check": "flash SDPA bf16 train step", "ok": ok,
            "detail": f"loss flash {out['flash'][0]:.4f} vs math {out['math'][0]:.4f}, grad rel err {grad_err:.2e}"}


def check_causal_and_cache(dev) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for variant in ([], ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_kv_heads=2"]):
        torch.manual_seed(0)
        m = Transformer(config(128, 3, 4, 512, 128, *variant)).to(dev).eval()
        x = torch.randint(0, 512, (2, 64), device=dev)
        y = x.clone()
        y[:, 40:] = torch.randint(0, 512, (2, 24), device=dev)
        with torch.no_grad(), autocast_ctx(dev, torch.bfloat16):
            diff = (m(x)[:, :40] - m(y)[:, :40]).abs().max().item()
        name = "rope/rmsnorm/swiglu/gqa" if variant else "gpt2"
        rows.append({"check": f"causal ({name}, bf16)", "ok": diff == 0.0, "detail": f"max past-logit change {diff}"})
        with torch.no_grad():
            prompt = x[:, :16]
            cached = m.generate(prompt, 48, temperature=0)
            uncached = m.generate(prompt, 48, temperature=0, use_cache=False)
            mask = torch.ones_like(prompt)
            mask[1, :5] = 0
            padded = prompt.clone()
            padded[1, :5] = 0
            left = m.generate(padded, 32, temperature=0, attention_mask=mask)
            alone = m.generate(prompt[1:, 5:], 32, temperature=0)
        rows.append({"check": f"cache == no cache ({name}, fp32)", "ok": torch.equal(cached, uncached),
                     "detail": f"{(cached != uncached).sum().item()} tokens differ"})
        rows.append({"check": f"left padding ({name}, fp32)", "ok": torch.equal(left[1, 16:], alone[0, 11:]),
                     "detail": "padded row's new tokens == the row alone"})
    torch.backends.cuda.matmul.allow_tf32 = True
    return rows


def check_memory(dev) -> list[dict]:
    rows = []
    shapes = [(768, 12, 12, 50304, 1024, 8), (512, 8, 8, 32768, 512, 16), (256, 4, 4, 8192, 256, 32),
              (384, 6, 6, 8192, 256, 8), (1024, 8, 16, 16384, 512, 8), (256, 8, 4, 4096, 1024, 16)]
    for d, L, H, V, T, B in shapes:
        for dtype in ("float32", "bfloat16"):
            for ckpt in (False, True):
                c = config(d, L, H, V, T)
                torch.manual_seed(0)
                m = Transformer(c).to(dev)
                if ckpt:
                    apply_activation_checkpointing(m)
                opt = m.configure_optimizers(0.1, 1e-4, device_type="cuda")
                x = torch.randint(0, V, (B, T), device=dev)

                marks = {}

                def step(m=m, opt=opt, x=x, dtype=dtype, marks=marks):
                    marks["before"] = torch.cuda.memory_allocated()
                    with autocast_ctx(dev, getattr(torch, dtype)):
                        loss = m(x, labels=x)
                    marks["saved"] = torch.cuda.memory_allocated() - marks["before"]
                    marks["forward_peak"] = torch.cuda.max_memory_allocated() - marks["before"]
                    loss.backward()
                    marks["backward_peak"] = torch.cuda.max_memory_allocated() - marks["before"]
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                step()  # AdamW's moments exist from here on
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                measured = torch.cuda.max_memory_allocated() - x.numel() * 8
                est = training_memory(c, B, T, dtype, "cuda", checkpointing=ckpt)
                # compare above the static part: what was allocated before the step may hold garbage from the
                # models checked earlier in this process, which no model of this one's memory can know
                dynamic = measured - (marks["before"] - x.numel() * 8)
                predicted, expected = est.total, est.weights + est.optimizer + dynamic
                err = (predicted - expected) / expected
                rows.append({"shape": [d, L, H, V, T, B], "dtype": dtype, "ckpt": ckpt, "measured": measured,
                             "static": marks["before"] - x.numel() * 8, **{k: marks[k] for k in marks if k != "before"},
                             "predicted": est.as_dict(), "activations_predicted": est.activations})
                rows[-1].update({"check": f"memory {d}x{L} V={V} B={B} T={T} {dtype}{' ckpt' if ckpt else ''}",
                                 "ok": abs(err) < 0.10,
                                 "detail": f"predicted {predicted / 2**20:.0f} MiB, measured {expected / 2**20:.0f} "
                                           f"MiB, error {err:+.1%}"})
                del m, opt, x
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["memory"], help="run one group of checks")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_check.py needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    dev = torch.device("cuda")
    rows = check_memory(dev) if args.only == "memory" else [check_flash(dev), *check_causal_and_cache(dev),
                                                              *check_memory(dev)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print_table(rows, ["check", "ok", "detail"])
    path = save_result("cuda_check" + (f"_{args.only}" if args.only else ""), {"rows": rows})
    print(f"wrote {path}")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
