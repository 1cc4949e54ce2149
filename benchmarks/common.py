"""Shared helpers for the benchmark scripts: machine facts, timing, result files, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanogpt4.train.metrics import matmul_peak_now
from nanogpt4.utils import keep_freed_memory_for_reuse

keep_freed_memory_for_reuse()  # process-wide, as `nanogpt4` does: the peer models run with it too

RESULTS = Path(__file__).parent / "results"


def add_model_args(ap, layers: int, dim: int, heads: int, vocab: int) -> None:
    """The model-shape flags both benchmarks share (GPT-2 layout, learned positions)."""
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--dim", type=int, default=dim)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_config(args, context: int):
    from nanogpt4.config import load_config

    return load_config("tiny", [f"model.n_layers={args.layers}", f"model.dim={args.dim}",
                                f"model.n_heads={args.heads}", f"model.vocab_size={args.vocab}",
                                f"model.max_seq_len={context}"])


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_it(fn: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds per call over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", sizes=None) -> float:
    """Best FLOP/s of square matmuls over a few sizes: the measured ceiling MFU is quoted against. Measured at
    every call (a benchmark measures before and after its runs and keeps the higher)."""
    sizes = sizes or ((4096, 8192) if device == "cuda" else (1024, 2048))
    return max(matmul_peak_now(device, dtype, n, seconds=1.0) for n in sizes)


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def save_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    if str(payload.get("args", {}).get("device", "cpu")).startswith("cuda"):
        name += "_cuda"  # GPU numbers sit beside the CPU ones instead of replacing them
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
