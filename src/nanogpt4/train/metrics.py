"""metrics.jsonl logging, MFU and the hardware peak it is measured against."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path

import torch

from nanogpt4.errors import UserError
from nanogpt4.utils import atomic_write_text

# dense bf16 tensor-core peaks (no sparsity), FLOP/s
CUDA_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def fastest_s(fn, seconds: float) -> float:
    """The shortest of ``fn``'s run times over ``seconds`` (after 3 warm-up calls): another process that takes the
    cores for part of the window slows some calls, not the fastest, where the window's mean rate would drop."""
    for _ in range(3):
        fn()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 >= t_end:
            return best


def matmul_peak_now(device_type: str, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of this machine's fastest (n x n) @ (n x n) matmul over ``seconds``, measured now."""
    a = torch.randn(n, n, dtype=dtype, device=device_type)
    b = torch.randn(n, n, dtype=dtype, device=device_type)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def matmul():
        a @ b
        sync()

    return 2 * n**3 / fastest_s(matmul, seconds)


@cache
def measured_matmul_peak(device_type: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                         seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on this machine (its fastest run): the practical ceiling MFU is quoted against on
    CPU. Measured once per process; ``peak_flops(..., fresh=True)`` measures again."""
    return matmul_peak_now(device_type, dtype, n, seconds)


def peak_flops(device: torch.device, dtype: torch.dtype, fresh: bool = False) -> float:
    """The FLOP/s MFU is quoted against: a GPU's datasheet peak where known, else a measured matmul; ``fresh``
    measures again instead of reusing this process's first measurement."""
    measure = matmul_peak_now if fresh else measured_matmul_peak
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in CUDA_PEAKS.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 2  # TF32 is half the bf16 rate
        return measure("cuda", dtype, 4096, 0.3)
    return measure("cpu", dtype, 1024, 0.3)


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only), optional TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        self._tb_dir = Path(run_dir) / "tensorboard" if enabled and tensorboard else None
        self._purge_step: int | None = None
        if self._tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise UserError("training.tensorboard=true needs tensorboard: pip install tensorboard") from None

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so the log equals an uninterrupted run's; TensorBoard
        is told the same (its writer opens with ``purge_step``, and TensorBoard drops the old files' later steps)."""
        self._purge_step = step + 1
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb_dir is not None:
            if self.tb is None:  # opened at the first row, once a resume has said where it starts
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self._tb_dir), purge_step=self._purge_step)
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
