"""``nanogpt4 prepare``: source -> tokenizer -> ``train.bin`` / ``val.bin`` token memmaps + ``meta.json``."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from nanogpt4.data.sources import load_corpus
from nanogpt4.data.tokenizer import BPETokenizer, TiktokenTokenizer, Tokenizer
from nanogpt4.errors import UserError
from nanogpt4.utils import atomic_path, atomic_write_json, out_dir_entries, some_names

ENCODE_BATCH_DOCS = 64
DATA_FILES = ("meta.json", "tokenizer.json", "train.bin", "val.bin")  # all that a prepared directory holds


def tokenizer_file(cfg: DictConfig) -> Path | None:
    """The tokenizer.json that ``data.tokenizer`` names, or None for ``bpe`` / ``gpt2``."""
    return None if cfg.data.tokenizer in ("bpe", "gpt2") else Path(cfg.data.tokenizer)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_data_dir(cfg: DictConfig) -> Path:
    d = cfg.data
    if d.dir:
        return Path(d.dir)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", d.source).strip("_")[:60]
    given = tokenizer_file(cfg)
    if given is not None:  # named by content: every run's tokenizer file is called tokenizer.json
        digest = file_sha256(given) if given.is_file() else hashlib.sha256(str(given).encode()).hexdigest()
        tag = f"tok-{digest[:10]}"
    else:
        tag = f"{d.tokenizer}{cfg.model.vocab_size if d.tokenizer == 'bpe' else d.tokenizer}"
    cap = f"-{d.max_bytes}B" if d.max_bytes else ""
    return Path("runs") / "data" / f"{slug}-{tag}{cap}"


def check_tokenizer_settings(cfg: DictConfig) -> Tokenizer | None:
    """Refuse what ``data.tokenizer`` and ``model.vocab_size`` can be refused for without reading the corpus;
    returns the tokenizer a ``data.tokenizer`` path names, loaded (None for ``bpe`` / ``gpt2``)."""
    given = tokenizer_file(cfg)
    if given is not None:
        return load_given_tokenizer(given)
    if cfg.data.tokenizer == "bpe":
        BPETokenizer.check_vocab_size(cfg.model.vocab_size)
    return None


def load_given_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise UserError(f"data.tokenizer file '{path}' not found; give a run's tokenizer.json "
                        f"(runs/NAME/tokenizer.json), or data.tokenizer=bpe to train one")
    try:
        return Tokenizer.from_file(path)
    except UserError:
        raise
    except Exception:  # not JSON, or JSON that `tokenizers` cannot read
        raise UserError(f"data.tokenizer file '{path}' is not a tokenizer.json; give a "
                        f"run's tokenizer.json (runs/NAME/tokenizer.json)") from None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _encode_split(tok: Tokenizer, docs: list[str], path: Path, dtype: np.dtype, desc: str, progress: bool) -> int:
    """Encode documents in batches (``tokenizers`` parallelises each batch), EOT after each document (and a
    tokenizer's own start token, if it has one, before it)."""
    n_tokens = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress, leave=False) as bar:
        for i in range(0, len(docs), ENCODE_BATCH_DOCS):
            batch = docs[i:i + ENCODE_BATCH_DOCS]
            flat: list[int] = []
            for ids in tok.encode_batch(batch):
                if tok.bos_id is not None:
                    flat.append(tok.bos_id)
                flat.extend(ids)
                flat.append(tok.eot_id)
            np.asarray(flat, dtype=dtype).tofile(f)
            n_tokens += len(flat)
            bar.update(len(batch))
        f.flush()
    return n_tokens


def prepared_with(meta: dict) -> dict[str, object]:
    """The settings a prepared directory was made with, as the config keys that choose them."""
    return {"data.source": meta.get("source"), "data.tokenizer": meta.get("tokenizer"),
            "model.vocab_size": meta.get("requested_vocab_size")}


def _refuse_other_data(out: Path, meta: dict, cfg: DictConfig, named_by: str) -> None:
    """A training stage given ``data.dir``, or ``nanogpt4 prepare --out``, must not overwrite data prepared there
    from another source (or for another tokenizer): it would train on something else than the user prepared,
    and lose that data (a run trained on it could no longer resume)."""
    theirs = prepared_with(meta)
    ours = {k: OmegaConf.select(cfg, k) for k in theirs}
    differ = [k for k in theirs if theirs[k] != ours[k] and theirs[k] is not None]
    if differ:
        fix = ("give another --out, or delete it to prepare it again" if named_by == "--out" else
               f"add {' '.join(shlex.quote(f'{k}={theirs[k]}') for k in differ)} to train on it, or give another "
               f"data.dir")
        raise UserError(f"{named_by} '{out}' holds data prepared with "
                        f"{', '.join(f'{k}={theirs[k]}' for k in differ)}, not "
                        f"{', '.join(f'{k}={ours[k]}' for k in differ)}: {fix} (it is left as it is)")


def data_identity(meta: dict) -> str:
    """A short id of prepared data: its source text, train/val split and tokenizer (what a resumed run compares)."""
    keys = ("source_fingerprint", "tokenizer_sha256", "train_tokens", "val_tokens")
    return hashlib.sha256(json.dumps([meta.get(k) for k in keys]).encode()).hexdigest()[:16]


def prepare_data(cfg: DictConfig, out_dir: str | Path | None = None, progress: bool = True,
                 log=print, keep_other: str | None = None) -> dict:
    """Build (or reuse) the token shards for ``cfg.data``; returns the meta dict. ``keep_other``: the key or flag
    that named ``out_dir`` (``data.dir``, ``prepare --out``), where data prepared with other settings is kept and
    refused rather than replaced; the same source's data is rebuilt when its files changed."""
    out = Path(out_dir) if out_dir else default_data_dir(cfg)
    d = cfg.data
    t0 = time.time()
    if out.is_file():
        raise UserError(f"'{out}' is a file; prepared data needs a directory of its own, new or empty")
    other = [n for n in out_dir_entries(out) if n not in DATA_FILES and not n.startswith(".")]
    if other:  # a run directory given as the data's: its tokenizer.json would be replaced by the data's
        raise UserError(f"'{out}' holds {some_names(other)}, which prepared data does not: prepared data needs a "
                        f"directory of its own, new or empty (nothing in it was changed)")
    if keep_other is not None and (out / "meta.json").exists():
        _refuse_other_data(out, json.loads((out / "meta.json").read_text()), cfg, keep_other)
    given = tokenizer_file(cfg)
    given_tok = check_tokenizer_settings(cfg)  # before the corpus (seconds to read, minutes to encode): fail fast
    given_sha = file_sha256(given) if given is not None else None
    corpus = load_corpus(d.source, d.val_fraction, d.max_bytes, d.text_field, d.cache_dir)
    for note in corpus.notes:
        log(note)
    fingerprint = corpus.fingerprint()
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta.get("source_fingerprint") == fingerprint and meta.get("tokenizer") == d.tokenizer
                and meta.get("requested_vocab_size") == cfg.model.vocab_size
                and (given is None or meta.get("tokenizer_sha256") == given_sha)
                # a tokenizer's own start token opens each document: data prepared before it did has none
                and meta.get("bos_id") == (given_tok.bos_id if given_tok is not None else None)):
            log(f"data: {out} is up to date ({meta['train_tokens']:,} train tokens)")
            return meta
    if given_tok is not None:
        tok: Tokenizer = given_tok
        log(f"tokenizer: {given} ({tok.vocab_size:,} tokens)")
    elif d.tokenizer == "gpt2":
        tok = TiktokenTokenizer.load("gpt2")
    else:
        log(f"tokenizer: training byte-level BPE, vocab {cfg.model.vocab_size}, "
            f"on {sum(len(t) for t in corpus.train):,} characters")
        tok = BPETokenizer.train(corpus.train, cfg.model.vocab_size)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
                        f"set model.vocab_size >= {tok.vocab_size}")
    dtype = token_dtype(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)  # only once the tokenizer exists: a failure leaves no empty directory
    # a stale meta.json must not vouch for half-rewritten shards if this is interrupted
    meta_path.unlink(missing_ok=True)
    counts = {}
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        counts[split] = _encode_split(tok, docs, out / f"{split}.bin", dtype, f"encode {split}", progress)
    if given is not None:  # its bytes, so a run trained on this data holds the very file it was given
        with atomic_path(out / "tokenizer.json") as tmp:
            shutil.copyfile(given, tmp)
    else:
        tok.save(out / "tokenizer.json")
    meta = {
        "source": d.source,
        "source_fingerprint": fingerprint,
        "tokenizer": d.tokenizer,
        "tokenizer_sha256": file_sha256(out / "tokenizer.json"),
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": cfg.model.vocab_size,
        "eot_id": tok.eot_id,
        "bos_id": tok.bos_id,
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "train_bytes": sum(len(t.encode("utf-8")) for t in corpus.train),
        "val_bytes": sum(len(t.encode("utf-8")) for t in corpus.val),
        "train_docs": len(corpus.train),
        "val_docs": len(corpus.val),
        "prepare_s": round(time.time() - t0, 2),
    }
    atomic_write_json(meta_path, meta)  # written last: its presence means the shards are complete
    log(f"data: {counts['train']:,} train / {counts['val']:,} val tokens "
        f"({meta['train_bytes'] / counts['train']:.2f} bytes/token) in {out}")
    return meta


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"no prepared data in '{data_dir}' (meta.json missing); run `nanogpt4 prepare` first")
    return json.loads(path.read_text())


def copy_tokenizer(data_dir: str | Path, dest: str | Path) -> None:
    shutil.copyfile(Path(data_dir) / "tokenizer.json", dest)
