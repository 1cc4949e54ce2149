import hashlib
import json
import shutil
import socket
import time

import numpy as np
import pytest
import torch

from nanogpt4.config import load_config
from nanogpt4.data import sources
from nanogpt4.data.loader import TokenWindows
from nanogpt4.data.prepare import prepare_data, token_dtype
from nanogpt4.data.sources import load_corpus
from nanogpt4.data.tokenizer import SPECIAL_TOKENS, BPETokenizer, TiktokenTokenizer, Tokenizer
from nanogpt4.errors import UserError

from .conftest import small_overrides, tokenizer_with


def test_stdlib_source_excludes_tests_and_site_packages():
    files = sources.stdlib_files()
    assert len(files) > 300
    parts = {p for f in files for p in f.parts}
    assert "site-packages" not in parts and "test" not in parts and "tests" not in parts
    corpus = load_corpus("stdlib", max_bytes=200_000)
    assert corpus.train and corpus.val
    assert sum(len(d) for d in corpus.train + corpus.val) <= 200_000


def test_stdlib_all_adds_the_test_suite_without_its_broken_fixtures():
    base = sources.stdlib_files()
    every = sources.stdlib_files(with_tests=True)
    if sum(f.name.startswith("test_") for f in every) < 50:
        with pytest.raises(UserError, match="no test suite"):
            load_corpus("stdlib:all", max_bytes=10_000)
        pytest.skip("this interpreter ships without its test suite")
    assert set(base) < set(every) and len(every) > 2 * len(base)
    names = {f.name for f in every}
    assert "test_grammar.py" in names
    assert not any(n.startswith(("badsyntax_", "bad_coding")) for n in names)
    assert not any("lib2to3/tests/data" in f.as_posix() for f in every)
    assert "site-packages" not in {p for f in every for p in f.parts}
    with pytest.raises(UserError, match="stdlib:all"):
        load_corpus("stdlib:tests")


def test_split_is_deterministic_and_disjoint(corpus_dir):
    a = load_corpus(f"text:{corpus_dir}/*.py", val_fraction=0.3)
    b = load_corpus(f"text:{corpus_dir}/*.py", val_fraction=0.3)
    assert a.train == b.train and a.val == b.val and a.fingerprint() == b.fingerprint()
    assert not set(a.train) & set(a.val)


def test_single_file_is_split_at_a_line(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    c = load_corpus(f"text:{f}", val_fraction=0.1)
    assert c.train[0].endswith("\n") and c.train[0] + c.val[0] == f.read_text()


def test_a_byte_order_mark_is_not_text(tmp_path):
    f = tmp_path / "notepad.txt"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(f"line {i}\n" for i in range(100)).encode())
    c = load_corpus(f"text:{f}", val_fraction=0.1)
    assert (c.train[0] + c.val[0]).startswith("line 0\n")


@pytest.mark.parametrize("setup,needle", [
    (lambda p: None, "no file matches"),
    (lambda p: p.write_text(""), "contains no text"),
    (lambda p: p.write_bytes(b"\x00\x01\x02binary" * 10), "looks binary"),
    (lambda p: p.write_bytes("café".encode("latin-1") * 10), "is not UTF-8"),
    (lambda p: p.write_text("café\n" * 10, encoding="utf-16"), "is UTF-16; convert it"),
])
def test_bad_text_sources(tmp_path, setup, needle):
    p = tmp_path / "data.txt"
    setup(p)
    with pytest.raises(UserError, match=needle):
        load_corpus(f"text:{p}")


def test_jsonl_source_reports_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "hello world"}\n{"text": "second doc"}\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: malformed JSON"):
        load_corpus(f"jsonl:{p}")
    p.write_text('{"text": "hello world"}\n{"body": "x"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: expected an object with a string field 'text'"):
        load_corpus(f"jsonl:{p}")
    p.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(200)))
    c = load_corpus(f"jsonl:{p}", text_field="body")
    assert len(c.train) + len(c.val) == 200 and c.val  # split by document, the same on every machine
    assert c.fingerprint() == load_corpus(f"jsonl:{p}", text_field="body").fingerprint()


def test_unknown_source():
    with pytest.raises(UserError, match="unknown data.source"):
        load_corpus("ftp://x")


def test_shakespeare_download_checked_and_cached(tmp_path, monkeypatch):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    src = tmp_path / "input.txt"
    src.write_text(text)
    monkeypatch.setenv("NANOGPT4_SHAKESPEARE_URL", src.as_uri())
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(text.encode()).hexdigest())
    c = load_corpus("shakespeare", cache_dir=tmp_path / "cache")
    assert "".join(c.train + c.val) == text
    src.unlink()  # second call uses the verified cache, no network
    assert load_corpus("shakespeare", cache_dir=tmp_path / "cache").fingerprint() == c.fingerprint()
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", "0" * 64)
    (tmp_path / "cache2").mkdir()
    src.write_text(text)
    with pytest.raises(UserError, match="checksum mismatch"):
        load_corpus("shakespeare", cache_dir=tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "tinyshakespeare.txt").exists()


def test_downloads_fail_fast_and_clearly_offline(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: refuse())
    t0 = time.time()
    with pytest.raises(UserError, match="offline"):
        load_corpus("shakespeare", cache_dir=tmp_path)
    with pytest.raises(UserError, match="offline|datasets package"):
        load_corpus("hf:some/dataset")
    assert time.time() - t0 < 5


def test_shared_tinyshakespeare_matches_published_checksum():
    from .conftest import SHARED_DATA

    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip("../shared/data not present")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sources.SHAKESPEARE_SHA256
    c = load_corpus(f"text:{path}")
    assert sum(map(len, c.train)) > 900_000


def test_hf_source_reads_a_local_dataset(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"text": f"story number {i}."}) + "\n" for i in range(200)))
    c = load_corpus(f"hf:{d}")
    assert len(c.train) + len(c.val) == 200 and c.val


def test_bpe_roundtrip_and_specials(corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))]
    tok = BPETokenizer.train(texts, 400)
    assert tok.vocab_size == 400
    assert [tok.token_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    sample = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 1.5  # it actually merges
    with pytest.raises(UserError, match="too small"):
        BPETokenizer.train(texts, 200)


def test_prompts_start_a_document_and_samples_end_at_its_end(corpus_dir):
    # prepare puts EOT between documents, so EOT + prompt is how a file starts in training; the text shown
    # carries neither that EOT nor anything after the model's own EOT
    tok = BPETokenizer.train([p.read_text() for p in sorted(corpus_dir.glob("*.py"))], 400)
    ids = tok.prompt_ids("def f(x):")
    assert ids == [tok.eot_id] + tok.encode("def f(x):") and tok.prompt_ids("") == [tok.eot_id]
    row = ids + tok.encode("\n    return x") + [tok.eot_id] + tok.encode("import os")
    assert tok.continuation_text(ids, row) == "def f(x):\n    return x"
    assert tok.continuation_text(ids[-3:], ids[-3:] + tok.encode(" pass")) == tok.decode(ids[-3:]) + " pass"


@pytest.mark.parametrize("specials,start,end", [(["<s>", "</s>"], "<s>", "</s>"),  # Llama 2's
                                                 (["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>",
                                                  "<|end_of_text|>"),  # Llama 3's
                                                 (["<|endoftext|>", "<s>"], "<|endoftext|>", "<|endoftext|>")])
def test_a_tokenizer_with_its_own_start_token_starts_prompts_with_it(specials, start, end):
    """An imported model's tokenizer without <|endoftext|>: documents (and so prompts) start with its start
    token, as its model was trained to see, and end with its end token; with <|endoftext|>, EOT does both."""
    tok = tokenizer_with(specials)
    assert tok.doc_start_id == tok.token_id(start) and tok.eot_id == tok.token_id(end)
    ids = tok.prompt_ids("def f(")
    assert ids == [tok.token_id(start)] + tok.encode("def f(")
    assert tok.continuation_text(ids, ids + tok.encode("x):") + [tok.eot_id]) == "def f(x):"
    assert tok.raw_prompt_ids("") == [tok.token_id(start)] and tok.raw_prompt_ids("def") == tok.encode("def")
    from nanogpt4.rlhf.data import Example, example_tokens

    assert example_tokens(tok, Example("", "x"))[0] == [tok.token_id(start)]  # SFT's empty prompt


def test_data_prepared_before_documents_had_a_start_token_is_rebuilt(corpus_dir, tmp_path):
    """With a Llama-like tokenizer file, documents run <s> ... </s>; data prepared before that (a meta.json
    without bos_id, shards without <s>) was reused as up to date."""
    given = tmp_path / "llama.json"
    tokenizer_with(["<s>", "</s>"]).save(given)
    cfg = load_config("tiny", small_overrides(corpus_dir, tmp_path / "d", **{"data.tokenizer": str(given)}))
    meta = prepare_data(cfg, tmp_path / "d", progress=False, log=lambda _m: None)
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert meta["bos_id"] == 0 and train[0] == 0 and (train == 0).sum() == (train == 1).sum() == meta["train_docs"]
    old = {k: v for k, v in meta.items() if k != "bos_id"}  # as written before
    (tmp_path / "d" / "meta.json").write_text(json.dumps(old))
    logs: list[str] = []
    assert prepare_data(cfg, tmp_path / "d", progress=False, log=logs.append)["bos_id"] == 0
    assert not any("up to date" in m for m in logs)
    logs.clear()
    prepare_data(cfg, tmp_path / "d", progress=False, log=logs.append)  # and then it is
    assert "up to date" in logs[-1]


def test_tiktoken_wrapper_on_a_local_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 256
    enc = tiktoken.Encoding("local", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 257})
    tok = TiktokenTokenizer(enc, "local")
    assert tok.encode("abab") == [256, 256] and tok.decode([256, 97]) == "aba"
    assert tok.eot_id == tok.pad_id == 257 and tok.vocab_size == 258


def test_tiktoken_offline_error(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="offline"):
        TiktokenTokenizer.load("gpt2")


def test_prepare_writes_shards_and_reuses_them(corpus_dir, tmp_path):
    cfg = load_config("tiny", small_overrides(corpus_dir, tmp_path))
    logs = []
    meta = prepare_data(cfg, tmp_path, progress=False, log=logs.append)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert (train == tok.eot_id).sum() == meta["train_docs"]  # one EOT per document
    corpus = load_corpus(cfg.data.source)
    first = tok.encode(corpus.train[0])
    assert train[: len(first)].tolist() == first
    assert meta["source_fingerprint"] == corpus.fingerprint() and meta["vocab_size"] <= 384
    mtime = (tmp_path / "train.bin").stat().st_mtime_ns
    prepare_data(cfg, tmp_path, progress=False, log=logs.append)
    assert (tmp_path / "train.bin").stat().st_mtime_ns == mtime and "up to date" in logs[-1]
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_prepare_encodes_with_a_given_tokenizer_file_and_rebuilds_when_it_changes(corpus_dir, tmp_path):
    first = tmp_path / "first"
    prepare_data(load_config("tiny", small_overrides(corpus_dir, first)), first, progress=False, log=lambda _m: None)
    given = tmp_path / "given.json"
    shutil.copyfile(first / "tokenizer.json", given)
    cfg = load_config("tiny", small_overrides(corpus_dir, tmp_path / "d", **{"model.vocab_size": 512,
                                                                           "data.tokenizer": str(given)}))
    logs: list[str] = []
    meta = prepare_data(cfg, tmp_path / "d", progress=False, log=logs.append)
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == given.read_bytes()  # the very file, not a re-save
    assert (tmp_path / "d" / "train.bin").read_bytes() == (first / "train.bin").read_bytes()
    assert meta["tokenizer"] == str(given) and meta["vocab_size"] <= 384  # its own size, not model.vocab_size
    prepare_data(cfg, tmp_path / "d", progress=False, log=logs.append)
    assert "up to date" in logs[-1]
    other = BPETokenizer.train(["completely different words here"] * 50, 300)
    other.save(given)  # the file now holds another tokenizer: the shards are rebuilt with it
    meta = prepare_data(cfg, tmp_path / "d", progress=False, log=logs.append)
    assert "up to date" not in logs[-1] and meta["vocab_size"] == other.vocab_size
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == given.read_bytes()


def test_prepare_never_writes_into_a_directory_of_other_files(corpus_dir, tmp_path):
    """`prepare --out` a run directory replaced that run's tokenizer.json with the new data's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text("the run's own")
    (run / "config.yaml").write_text("model: {}\n")
    cfg = load_config("tiny", small_overrides(corpus_dir, run))
    with pytest.raises(UserError, match=rf"'{run}' holds config.yaml, which prepared data does not: prepared data "
                                        rf"needs a directory of its own"):
        prepare_data(cfg, run, progress=False, log=lambda _m: None)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "tokenizer.json"]
    assert (run / "tokenizer.json").read_text() == "the run's own"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; prepared data needs a directory"):
        prepare_data(cfg, tmp_path / "file", progress=False, log=lambda _m: None)


def test_prepare_out_keeps_data_prepared_there_from_another_source(corpus_dir, tmp_path, capsys):
    """`nanogpt4 prepare --out DIR` with another data.source replaced the data there without a word (a run
    trained on it could then no longer resume); its own source's data is reused, or rebuilt when it changed."""
    from nanogpt4.cli import main

    data = tmp_path / "data"
    ov = [o for o in small_overrides(corpus_dir, data) if not o.startswith("data.dir=")]
    assert main(["prepare", "--out", str(data), *ov]) == 0
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    other = tmp_path / "other"
    other.mkdir()
    for name in sorted(corpus_dir.glob("*.py"))[:3]:
        (other / name.name).write_text(name.read_text())
    capsys.readouterr()
    assert main(["prepare", "--out", str(data), *ov, f"data.source=text:{other}/*.py"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out '{data}' holds data prepared with data.source=text:{corpus_dir}/*.py, not "
                   f"data.source=text:{other}/*.py: give another --out, or delete it to prepare it again (it is "
                   f"left as it is)\n")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert main(["prepare", "--out", str(data), *ov]) == 0 and "is up to date" in capsys.readouterr().out


def test_an_interrupted_re_prepare_leaves_no_meta_vouching_for_its_shards(corpus_dir, tmp_path, monkeypatch):
    from nanogpt4.data import prepare

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    cfg = load_config("tiny", small_overrides(corpus, tmp_path / "data"))
    prepare_data(cfg, tmp_path / "data", progress=False, log=lambda _m: None)
    (corpus / "more.py").write_text("def more():\n    return 1\n" * 50)  # the source changes
    encode = prepare._encode_split

    def stop_at_val(tok, docs, path, *a):
        if path.name == "val.bin":
            raise KeyboardInterrupt
        return encode(tok, docs, path, *a)

    monkeypatch.setattr(prepare, "_encode_split", stop_at_val)
    with pytest.raises(KeyboardInterrupt):  # train.bin is rewritten for the new source, val.bin is not
        prepare_data(cfg, tmp_path / "data", progress=False, log=lambda _m: None)
    assert not (tmp_path / "data" / "meta.json").exists()
    monkeypatch.setattr(prepare, "_encode_split", encode)
    meta = prepare_data(cfg, tmp_path / "data", progress=False, log=lambda _m: None)
    train = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"]


def test_token_dtype_widens_for_large_vocab():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(100_000) == np.uint32


def test_windows_are_deterministic_and_sharded(prepared):
    _, data_dir = prepared
    w = TokenWindows(data_dir / "train.bin", 32, "uint16", seed=3)
    x1, y1 = w.batch(5, 8)
    x2, _ = w.batch(5, 8)
    x3, _ = w.batch(6, 8)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    halves = [w.batch(5, 8, slice(0, 4))[0], w.batch(5, 8, slice(4, 8))[0]]
    assert torch.equal(torch.cat(halves), x1)
    assert x1.dtype == torch.long


def test_too_few_tokens_for_a_batch(tmp_path):
    np.arange(40, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(UserError, match="fewer than one batch"):
        TokenWindows(tmp_path / "t.bin", 32, "uint16", 0, min_sequences=16)
    with pytest.raises(UserError, match="missing"):
        TokenWindows(tmp_path / "nope.bin", 32, "uint16", 0)
