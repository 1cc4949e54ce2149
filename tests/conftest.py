import shutil
import signal
import sysconfig
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["textwrap.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py", "colorsys.py", "glob.py",
                "fnmatch.py", "keyword.py", "string.py", "numbers.py", "this.py", "types.py", "copy.py"]


def step_losses(run_dir, key: str = "step_loss") -> dict[int, float]:
    """Each training step's own loss (or another per-step value, e.g. grad_norm) from a run's metrics.jsonl."""
    from nanogpt4.utils import read_jsonl

    return {r["step"]: r[key] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "step_loss" in r}


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C as in a terminal: a shell without job control (a CI job, `nohup`) starts its background jobs with
    SIGINT ignored, and Python then never turns it into KeyboardInterrupt (nor does the trainer take it over)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small real-Python corpus (a few stdlib modules), built offline on any machine."""
    d = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        if (STDLIB / name).exists():
            shutil.copyfile(STDLIB / name, d / name)
    return d


def tokenizer_with(specials: list[str]):
    """A byte-level BPE of 300 tokens whose only special tokens are ``specials`` (an imported model's, say)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nanogpt4.data.tokenizer import BPETokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return BPETokenizer(tok)


def small_overrides(corpus_dir: Path, data_dir: Path, **extra) -> list[str]:
    base = {
        "data.source": f"text:{corpus_dir}/*.py",
        "data.dir": str(data_dir),
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.vocab_size": 384,
        "model.max_seq_len": 32,
        "training.batch_size": 8, "training.max_steps": 12, "training.warmup_steps": 2,
        "training.learning_rate": 3e-3, "training.eval_interval": 6, "training.eval_iters": 2,
        "training.log_interval": 1, "training.checkpoint_interval": 6, "training.dtype": "float32",
        "training.sample_tokens": 8, "device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def prepared(corpus_dir, tmp_path_factory):
    """(overrides, data_dir) with shards already prepared once for the session."""
    from nanogpt4.config import load_config
    from nanogpt4.data.prepare import prepare_data

    data_dir = tmp_path_factory.mktemp("data")
    ov = small_overrides(corpus_dir, data_dir)
    prepare_data(load_config("tiny", ov), data_dir, progress=False, log=lambda _m: None)
    return ov, data_dir
