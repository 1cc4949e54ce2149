"""Small shared helpers: atomic writes, devices, seeding, JSON lines."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nanogpt4.errors import DiskFull, UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``.

    A crash at any instant leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except Exception as e:
        if disk_full(e, path.parent):
            raise DiskFull(f"the disk filled up while writing {path} (the partial file is removed); {WRITE_ELSEWHERE}"
                           ) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final_dir: Path, fix: str = "") -> Iterator[Path]:
    """Yield an empty temp directory beside ``final_dir``; when the block completes it replaces ``final_dir``
    (``replace_dir``). A block that fails leaves ``final_dir`` as it was and the temp directory removed, and a
    full disk becomes one ``DiskFull`` error naming ``final_dir`` and ``fix``."""
    tmp = final_dir.with_name(f".{final_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final_dir)
    except BaseException as e:
        full = isinstance(e, Exception) and disk_full(e, tmp.parent)  # before the partial files give space back
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(f"the disk filled up while writing {final_dir} (the partial copy is removed); "
                           f"{fix or WRITE_ELSEWHERE}") from None
        raise


# below this much free space a failed write is taken for a full disk (torch.save reports only a short write)
DISK_FULL_BELOW = 1 << 20
WRITE_ELSEWHERE = "free space, or write elsewhere with --out"


def disk_full(error: BaseException, directory: str | os.PathLike) -> bool:
    """Whether ``error``, raised while writing into ``directory``, means the disk (or quota) is full: an
    ``OSError`` says so by its errno, safetensors in its message; torch.save ("unexpected pos") and numpy's
    ``tofile`` ("N requested and M written") report only a short write, so there the free space left decides:
    call this before the partial file is removed."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if any(s in str(error) for s in ("No space left on device", "Disk quota exceeded", "os error 28")):
        return True
    try:
        return shutil.disk_usage(directory).free < DISK_FULL_BELOW
    except OSError:
        return False


def require_free_space(directory: str | os.PathLike, need_bytes: int, what: str, fix: str) -> None:
    """Refuse to start writing ``what`` (``need_bytes``) into ``directory`` when it cannot fit: a one-line error
    before anything is written, instead of a failed write halfway through."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes + DISK_FULL_BELOW:
        raise DiskFull(f"not enough disk space for {what} in {directory}: it needs {_mib(need_bytes)}, "
                       f"{_mib(free)} free; {fix}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def out_dir_entries(out: Path) -> list[str]:
    """The names ``--out`` already holds (none where it does not exist yet); a file there is refused."""
    if out.is_file():
        raise UserError(f"--out '{out}' is a file; give a new or empty directory")
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def some_names(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` names, ", ..." when there are more: a one-line error's list."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def iter_jsonl_objects(path: str | os.PathLike, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line is a UserError naming file and line."""
    path = Path(path)
    if text is None:
        if path.is_dir():
            raise UserError(f"'{path}' is a directory; give a JSONL file (one JSON object per line)")
        if not path.is_file():
            raise UserError(f"data file '{path}' not found")
        text = path.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, row


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing any old one."""
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash)
    else:
        os.replace(tmp_dir, final_dir)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda[:N]")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training: ``auto`` picks bf16 where the hardware runs it natively."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def require_compiler(device: torch.device, what: str) -> None:
    """``torch.compile`` on CPU generates C++; without a compiler it fails deep inside inductor at the first
    call, so check up front and say what to do."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder

    # the finder's name changed (torch 2.4: _get_cpp_compiler); a torch with neither is left to fail in inductor
    find = getattr(cpp_builder, "get_cpp_compiler", None) or getattr(cpp_builder, "_get_cpp_compiler", None)
    if find is None:
        return
    try:
        find()
    except Exception as e:  # noqa: BLE001 - inductor raises several types for "no compiler"
        raise UserError(f"{what} needs a C++ compiler for torch.compile on CPU ({e}); install g++ or clang++, "
                        f"or run without it") from None


def autocast_ctx(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves every allocation above 128 KiB-32 MiB with a fresh ``mmap`` and trims freed heap
    memory, so each training step's activations, logits chunks and gradients are new pages: zero-filled and
    page-faulted in on first touch, which costs a CPU training step 10-15%. A training process allocates the
    same sizes every step, so keeping the memory is the right trade (what jemalloc/tcmalloc users get).
    Linux/glibc only; elsewhere, or with ``NANOGPT4_DEFAULT_MALLOC=1`` set, it does nothing and returns False.
    """
    if os.environ.get("NANOGPT4_DEFAULT_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 1 << 30))
    except (OSError, AttributeError):  # musl or another libc: leave the allocator as it is
        return False
