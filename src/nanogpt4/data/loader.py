"""Batches of (B, T) windows sampled from a token memmap.

Sampling is a pure function of (seed, step): no iterator state to save, so resume is exact by construction,
and every rank can take its own rows of the same global batch (DDP reproduces the single-process run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nanogpt4.errors import UserError


def _mix(*xs: int) -> int:
    """A 63-bit seed from several integers (splitmix64-style), so nearby steps get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class TokenWindows:
    """Random windows of ``seq_len + 1`` tokens from ``path``; ``batch(step, rows)`` -> (x, y)."""

    def __init__(self, path: str | Path, seq_len: int, dtype: str, seed: int, min_sequences: int = 1,
                 fix: str = "use more text or a smaller model.max_seq_len / training.batch_size"):
        path = Path(path)
        if not path.exists():
            raise UserError(f"token file '{path}' is missing; run `nanogpt4 prepare` first")
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len = seq_len
        self.seed = seed
        need = seq_len + min_sequences
        if len(self.data) < need:
            raise UserError(f"'{path}' has {len(self.data):,} tokens, fewer than one batch needs ({need:,}); {fix}")

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, step: int, batch_size: int, rows: slice | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``batch_size`` windows for ``step``; ``rows`` selects this rank's part."""
        g = torch.Generator().manual_seed(_mix(self.seed, step))
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (batch_size,), generator=g).numpy()
        if rows is not None:
            starts = starts[rows]
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        chunk = torch.from_numpy(self.data[idx].astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:]
        device = torch.device(device)
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
