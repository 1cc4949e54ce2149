"""Under torchrun: join the group, import the model (and with it torch._dynamo), run a collective, leave.
Exits 3 if communication threads outlive shutdown_distributed (they then die with the interpreter, which can
abort a rank at exit)."""

import sys

import torch
import torch.distributed as dist

from nanogpt4.train.distributed import comm_threads, init_distributed, shutdown_distributed

info, _ = init_distributed(torch.device("cpu"))
from nanogpt4.model.transformer import Transformer  # noqa: E402,F401  (after init, as the CLI's lazy imports)

t = torch.ones(3)
dist.all_reduce(t)
shutdown_distributed(wait_for=info)
left = comm_threads()
print(f"rank {info.rank}: threads left {left}", flush=True)
sys.exit(3 if left else 0)
