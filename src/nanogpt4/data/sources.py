"""Data sources: turn ``data.source`` into train/val lists of documents (strings).

Every source fails fast with a one-line :class:`UserError` (missing path, empty text, binary file,
malformed jsonl line, no network) rather than a traceback or a hang.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import socket
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nanogpt4.errors import UserError
from nanogpt4.utils import iter_jsonl_objects

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 15.0


@dataclass
class Corpus:
    train: list[str]
    val: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in (self.train, self.val):
            for doc in split:
                h.update(hashlib.sha256(doc.encode("utf-8")).digest())
            h.update(b"|")
        return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOGPT4_CACHE", Path.home() / ".cache" / "nanogpt4"))


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"data file '{path}' does not exist; check data.source") from None
    except IsADirectoryError:
        raise UserError(f"data path '{path}' is a directory; use a glob such as text:{path}/*.txt") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # what Windows calls "Unicode"
        raise UserError(f"data file '{path}' is UTF-16; convert it to UTF-8, e.g. iconv -f utf-16 -t utf-8")
    if b"\x00" in data[:8192]:
        raise UserError(f"data file '{path}' looks binary (NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark says how the file is encoded; it is not text
    except UnicodeDecodeError as e:
        raise UserError(f"data file '{path}' is not UTF-8 (bad byte at offset {e.start}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8") from None


def _stable_unit(key: str) -> float:
    """A deterministic number in [0, 1) for a document key (same split on every machine)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_documents(keyed_docs: list[tuple[str, str]], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split by document (hash of its key); with too few documents, split each text at a line boundary."""
    train = [doc for key, doc in keyed_docs if _stable_unit(key) >= val_fraction]
    val = [doc for key, doc in keyed_docs if _stable_unit(key) < val_fraction]
    if train and val:
        return train, val
    train, val = [], []
    for _, doc in keyed_docs:
        cut = int(len(doc) * (1 - val_fraction))
        nl = doc.rfind("\n", 0, cut)
        cut = nl + 1 if nl > len(doc) // 2 else cut
        train.append(doc[:cut])
        val.append(doc[cut:])
    return [d for d in train if d], [d for d in val if d]


def _cap(keyed_docs: list[tuple[str, str]], max_bytes: int | None) -> list[tuple[str, str]]:
    if max_bytes is None:
        return keyed_docs
    out, total = [], 0
    for key, doc in keyed_docs:
        if total >= max_bytes:
            break
        doc = doc[: max_bytes - total]
        total += len(doc.encode("utf-8"))
        out.append((key, doc))
    return out


# Deliberately broken fixtures of the stdlib's own test suite (bad syntax, Python 2, wrong encodings): not code
# a model should learn from.
BROKEN_FIXTURES = ("lib2to3/tests/data/*", "*/badsyntax_*", "*/bad_coding*")


def stdlib_files(with_tests: bool = False) -> list[Path]:
    """The running interpreter's standard library sources, without site-packages; without its test suite unless
    ``with_tests`` (``data.source=stdlib:all``: about 3x the code, ~8M tokens instead of ~2.7M).

    ``encodings`` (generated codec tables) and ``pydoc_data`` (one 700 kB string of help text) are data,
    not code, and would teach the model to emit character tables.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
    if not with_tests:
        skip |= {"test", "tests", "idle_test"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for path in (Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py")):
            if not any(fnmatch.fnmatch(path.relative_to(root).as_posix(), g) for g in BROKEN_FIXTURES):
                files.append(path)
    return files


def _load_stdlib(max_bytes: int | None, with_tests: bool) -> tuple[list[tuple[str, str]], list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, skipped = [], 0
    for f in stdlib_files(with_tests):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if text.strip():
            docs.append((str(f.relative_to(root)), text))
    if with_tests and sum(Path(k).name.startswith("test_") for k, _ in docs) < 50:  # Debian keeps a few stubs
        raise UserError(f"data.source 'stdlib:all' found no test suite under {root} (some distributions ship it "
                        f"as a separate package, e.g. libpython3-testsuite); use data.source=stdlib")
    notes = [f"stdlib: {len(docs)} files from {root}" + (f", {skipped} not UTF-8 skipped" if skipped else "")]
    return _cap(docs, max_bytes), notes


def _load_text(pattern: str, max_bytes: int | None) -> list[tuple[str, str]]:
    if not pattern:
        raise UserError("data.source 'text:' needs a path or glob, e.g. text:notes/*.md")
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not paths:
        raise UserError(f"no file matches data.source 'text:{pattern}'; check the path")
    files = [Path(p) for p in paths if not Path(p).is_dir()] or [Path(paths[0])]
    # split keys are paths relative to the files' common folder: the same split wherever the data lives
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return _cap([(str(f.relative_to(root)), _read_utf8(f)) for f in files], max_bytes)


def _load_jsonl(path_str: str, field_name: str, max_bytes: int | None) -> list[tuple[str, str]]:
    path = Path(os.path.expanduser(path_str))
    docs = []
    for lineno, row in iter_jsonl_objects(path, _read_utf8(path)):
        if not isinstance(row.get(field_name), str):
            raise UserError(f"{path}:{lineno}: expected an object with a string field '{field_name}' "
                            f"(set data.text_field to use another field)")
        docs.append((f"line {lineno}", row[field_name]))  # stable keys: the same split wherever the file lives
    return _cap(docs, max_bytes)


def download(url: str, dest: Path, sha256: str | None, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``url`` to ``dest`` (atomic, checksum-verified); reuse a verified cached copy."""
    if dest.exists() and (sha256 is None or hashlib.sha256(dest.read_bytes()).hexdigest() == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot download {url} ({reason}); you seem to be offline: download it elsewhere "
                        f"and use data.source=text:PATH, or put it at {dest}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise UserError(f"checksum mismatch for {url}: got sha256 {digest[:16]}..., expected {sha256[:16]}...; "
                        f"the download is corrupt or the file changed upstream")
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def _load_shakespeare(cache_dir: Path, max_bytes: int | None) -> list[tuple[str, str]]:
    url = os.environ.get("NANOGPT4_SHAKESPEARE_URL", SHAKESPEARE_URL)
    path = download(url, cache_dir / "tinyshakespeare.txt", SHAKESPEARE_SHA256)
    return _cap([("tinyshakespeare", _read_utf8(path))], max_bytes)


def _network_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_unreachable(name: str) -> bool:
    """``name`` is a Hugging Face Hub id, not a local path, and huggingface.co cannot be reached: one TCP connect,
    so offline code fails in seconds instead of in a client library's retry loop."""
    return not Path(os.path.expanduser(name)).exists() and not _network_reachable("huggingface.co")


def hf_rows(spec: str, what: str = "data.source"):
    """Rows of a Hugging Face dataset ``NAME[:CONFIG]`` (streamed) or a local dataset directory."""
    name, _, config_name = spec.partition(":")
    if not name:
        raise UserError(f"{what} 'hf:' needs a dataset name, e.g. hf:roneneldan/TinyStories")
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} 'hf:' needs the datasets package: pip install 'nanogpt4[hf]'") from None
    if hub_unreachable(name):
        raise UserError(f"cannot reach huggingface.co to stream '{name}'; you seem to be offline: "
                        f"use a local dataset directory (hf:/path) or a local file")
    try:
        return datasets.load_dataset(name, config_name or None, split="train", streaming=True)
    except Exception as e:
        raise UserError(f"cannot load Hugging Face dataset '{spec}': {str(e).splitlines()[0]}") from None


def _load_hf(spec: str, field_name: str, max_bytes: int | None) -> list[tuple[str, str]]:
    ds = hf_rows(spec)
    cap = max_bytes if max_bytes is not None else 200_000_000
    docs, total = [], 0
    for i, row in enumerate(ds):
        if field_name not in row:
            raise UserError(f"dataset '{spec}' has no field '{field_name}' (fields: {', '.join(row)}); "
                            f"set data.text_field")
        text = row[field_name]
        if isinstance(text, str) and text:
            docs.append((f"row {i}", text))  # stable keys: the same split on every machine
            total += len(text.encode("utf-8"))
        if total >= cap:
            break
    return _cap(docs, cap)


def load_corpus(source: str, val_fraction: float = 0.05, max_bytes: int | None = None,
                text_field: str = "text", cache_dir: str | os.PathLike | None = None) -> Corpus:
    kind, _, arg = source.partition(":")
    notes: list[str] = []
    if kind == "stdlib" and arg in ("", "all"):
        keyed, notes = _load_stdlib(max_bytes, with_tests=arg == "all")
    elif kind == "text":
        keyed = _load_text(arg, max_bytes)
    elif kind == "jsonl":
        keyed = _load_jsonl(arg, text_field, max_bytes)
    elif kind == "shakespeare" and not arg:
        keyed = _load_shakespeare(Path(cache_dir) if cache_dir else default_cache_dir(), max_bytes)
    elif kind == "hf":
        keyed = _load_hf(arg, text_field, max_bytes)
    else:
        raise UserError(f"unknown data.source '{source}'; use stdlib, stdlib:all, text:PATH_OR_GLOB, jsonl:PATH, "
                        f"shakespeare or hf:NAME[:CONFIG]")
    keyed = [(k, d) for k, d in keyed if d.strip()]
    if not keyed:
        raise UserError(f"data.source '{source}' contains no text (empty files?); give a non-empty source")
    train, val = split_documents(keyed, val_fraction)
    if not train or not val:
        raise UserError(f"data.source '{source}' is too small to split into train and val; add more text")
    return Corpus(train=train, val=val, source=source, notes=notes)
