"""Process-group setup and parallelism wrappers, applied as separate functions over a plain model."""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from nanogpt4.errors import SaidByRankZero, UserError, say_error


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks that torchrun started."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_zero_or_alone() -> bool:
    """Whether this process says what every rank would say alike: rank 0 under torchrun, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


_joined = False  # whether this process has joined torchrun's process group (it stays True after leaving it)


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    global _joined
    if not launched_by_torchrun():
        return DistInfo(), device
    _joined = True
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torch._dynamo, imported for the first time while a process group exists, keeps references to it (the
        # model module imports it through torch.compiler): destroy_process_group then cannot free the group,
        # its gloo threads outlive the interpreter, and a rank could abort at exit ("terminate called without
        # an active exception") after its work was done
        importlib.import_module("torch._dynamo")

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def said_by_every_rank() -> bool:
    """Whether an error now would be every torchrun rank's alike: one raised before the ranks joined a group
    comes from the same command line and files on each (a refused --out, a bad data file), so rank 0 says it."""
    return launched_by_torchrun() and not _joined


def shutdown_distributed(wait_for: DistInfo | None = None) -> None:
    """Leave the process group. With ``wait_for`` (a clean exit) the ranks first meet at a barrier, so no rank
    tears its connections down while another is still working (rank 0 evaluating and writing alone, say).
    Without it (an error) leave at once, rather than wait for ranks that may never arrive. The group is freed
    here, threads included, as long as ``init_distributed`` made it (see the import there)."""
    if wait_for is not None:
        barrier(wait_for)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device, wait_on_error: bool = True) -> Iterator[tuple[DistInfo, torch.device]]:
    """``init_distributed`` for the block, left as it ends. The ranks meet before leaving when it ends normally
    (rank 0 may still be evaluating and writing alone) and, with ``wait_on_error``, when it raises too: the
    training stages' errors after training are rank 0's alone (its evaluation, its judge), and the others wait
    for it at that barrier already. Pretraining leaves at once on an error, whose rank may be mid-collective."""
    info, device = init_distributed(device)
    ended = False
    try:
        yield info, device
        ended = True
    finally:
        shutdown_distributed(info if ended or wait_on_error else None)


def comm_threads() -> list[str]:
    """Names of this process's communication threads (gloo's, c10d's) still alive; Linux's /proc, [] elsewhere."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        if task.name == str(os.getpid()):  # the main thread (which torch 2.4 names pt_main_thread)
            continue
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return [n for n in names if "gloo" in n or n.startswith("pt_")]


def leave_rank(code: int) -> None:
    """End a torchrun rank (the CLI, once its command returned ``code``) without finalizing the interpreter when
    its process group outlived ``shutdown_distributed``. FSDP2's DTensors leave the group referenced from torch's
    caches, so destroy_process_group cannot free it (the DDP group is freed), and its gloo threads met the
    interpreter's finalization: a rank aborted after its work was done ("terminate called without an active
    exception", 1 of 33 FSDP test runs). Output is flushed first; the run's files were closed (and atomically
    renamed) before. Returns, to exit normally, in a single process or when no such thread is left."""
    if not launched_by_torchrun() or not comm_threads():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def on_rank_zero(info: DistInfo, device: torch.device, work: Callable[[], None]) -> None:
    """``work`` (checks and preparation only rank 0 does) on rank 0, the others waiting for it. Its UserError is
    said by rank 0 and raised on every rank as ``SaidByRankZero`` (the CLI exits 2 without repeating it): at a
    plain barrier the others were left waiting for a rank that had exited, and died with a traceback each.
    Rank 0 says it before the ranks part, since torchrun ends every rank as soon as one exits with an error."""
    error = None
    if info.is_main:
        try:
            work()
        except UserError as e:
            if not info.enabled:
                raise
            error = str(e)
    if info.enabled:
        error = broadcast_text(error or "", info, device)
        if error:
            if info.is_main:
                say_error(error)
            barrier(info)
            raise SaidByRankZero(error)


# how long a rank that leaves on an error only rank 0 says (one every rank met before joining the group) waits
# first: torchrun ends the other ranks as soon as one exits with an error, and rank 0 could go before saying it
RANK_ZERO_GRACE_S = 5.0


def leave_after_rank_zero() -> None:
    time.sleep(RANK_ZERO_GRACE_S)


def broadcast_text(text: str, info: DistInfo, device: torch.device) -> str:
    """Rank 0's ``text`` on every rank (the others pass anything): UTF-8 bytes in a tensor, its length first, so
    nothing is pickled."""
    if not info.enabled:
        return text
    data = text.encode() if info.is_main else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if not size.item():
        return ""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if info.is_main else \
        torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy()).decode()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def broadcast_number(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's value for every rank (e.g. where a time budget ends, read from its own clock)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's decision for every rank (e.g. a wall-time stop), so no rank waits in a collective alone."""
    return bool(broadcast_number(1.0 if flag else 0.0, info, device))


def apply_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def apply_fsdp(model: nn.Module, info: DistInfo, mp_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard each transformer block, then the root (embeddings, head)."""
    if next(model.parameters()).device.type == "cpu" and torch.__version__ < (2, 9):
        # on the CPU (gloo), FSDP2 before 2.7 creates CUDA streams and fails on the first gather; 2.7.1 and 2.8.0
        # train, but their gradients are the ranks' sum instead of their mean (2x at two ranks): measured
        raise UserError(f"training.fsdp=true on the CPU needs torch>=2.9 (this is {torch.__version__}: its FSDP2 "
                        f"fails or sums the ranks' gradients over gloo); train with DDP (training.fsdp=false), on "
                        f"GPUs, or with a newer torch")
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under its pre-release name
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in getattr(model, "blocks", []):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that is right for FSDP2's sharded gradients on every torch: the full gradient's norm
    from each rank's local shards (squares summed over ranks), then the same scaling on every rank. torch's own
    ``clip_grad_norm_`` on FSDP2's DTensor gradients returned a wrong norm on 2.9.1 (8.41 for a true 10.96 in a
    two-layer check; pytorch#170862), so it clipped by the wrong factor and the run left the single-process one;
    2.11 and later get it right. Unsharded gradients (single process, DDP) go to torch's."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(hasattr(g, "to_local") for g in grads):  # no DTensor (whose module moved across versions)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    local = [g.to_local() for g in grads]  # apply_fsdp shards every parameter: the root takes what blocks left
    square = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in local]).square().sum()
    dist.all_reduce(square)  # each rank holds different shards of every gradient
    total = square.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for t in local:
        t.mul_(coef.to(t.dtype))
    return total


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each transformer block in backward instead of keeping its activations: training memory drops
    from L blocks' activations to one block's plus each block's input, for about one extra forward's FLOPs."""
    for module in model.modules():
        if hasattr(module, "checkpoint_blocks"):
            module.checkpoint_blocks = True
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
