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


@cache
def measured_matmul_peak(device_type: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                         seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on this machine: the practical ceiling MFU is quoted against on CPU."""
    a = torch.randn(n, n, dtype=dtype, device=device_type)
    b = torch.randn(n, n, dtype=dtype, device=device_type)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in CUDA_PEAKS.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 2  # TF32 is half the bf16 rate
        return measured_matmul_peak("cuda", dtype, 4096)
    return measured_matmul_peak("cpu", dtype)


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only), optional TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("training.tensorboard=true needs tensorboard: pip install tensorboard") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so the log equals an uninterrupted run's."""
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
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
