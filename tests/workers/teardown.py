"""Under torchrun: join the group, import the model (and with it torch._dynamo), run a collective, leave.
Exits 3 if communication threads outlive shutdown_distributed (they then die with the interpreter, which can
abort a rank at exit)."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanogpt4.train.distributed import init_distributed, shutdown_distributed


def comm_threads() -> list[str]:
    """Names of this process's communication threads (gloo's, c10d's) still alive (Linux's /proc)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        if task.name == str(os.getpid()):  # the main thread (which torch 2.4 names pt_main_thread)
            continue
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return [n for n in names if "gloo" in n or n.startswith("pt_")]


info, _ = init_distributed(torch.device("cpu"))
from nanogpt4.model.transformer import Transformer  # noqa: E402,F401  (after init, as the CLI's lazy imports)

t = torch.ones(3)
dist.all_reduce(t)
shutdown_distributed(wait_for=info)
left = comm_threads()
print(f"rank {info.rank}: threads left {left}", flush=True)
sys.exit(3 if left else 0)
