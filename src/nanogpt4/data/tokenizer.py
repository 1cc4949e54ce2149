"""Tokenizers: a byte-level BPE trained with Hugging Face ``tokenizers``, or GPT-2's via ``tiktoken``.

Both sit behind one small :class:`Tokenizer` interface and save to ``tokenizer.json``. Special tokens are
reserved up front (chat roles, ``<|image|>``, padding) so later stages (SFT, multimodal) need no retraining.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanogpt4.errors import UserError
from nanogpt4.utils import atomic_path

EOT = "<|endoftext|>"
PAD = "<|pad|>"
IMAGE = "<|image|>"
# the chat template (SFT's {"messages": [...]} rows, the multimodal stage's turns): <|role|>content<|end|> per turn
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, IMAGE, *ROLE_TOKENS.values(), END]
FOREIGN_END_TOKENS = ("</s>", "<|end_of_text|>", "<eos>")  # Llama 2's, Llama 3's, Gemma's end of text
FOREIGN_START_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")  # and their start of text
# the same template for Hugging Face's ``apply_chat_template`` (written by ``export-hf``)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '" + END
                 + "' }}{% endfor %}{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}")


class Tokenizer:
    """Common interface: ``encode``, ``encode_batch``, ``decode``, ``save``, special token ids."""

    kind: str = ""
    vocab_size: int
    eot_id: int
    pad_id: int
    bos_id: int | None = None  # a start-of-text token apart from EOT (an imported Llama's <s>); ours has none

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def doc_start_id(self) -> int:
        """What a document follows: EOT, as `prepare` puts it between documents; a tokenizer with a start token
        of its own (an imported Llama's ``<s>``) starts them with it, as its model was trained to see."""
        return self.eot_id if self.bos_id is None else self.bos_id

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt as the start of a document (``doc_start_id`` first). Without it the model reads the prompt's
        first token as an arbitrary position inside a file (training windows start anywhere): the tiny preset's
        greedy continuation of a bare "def" is "def", after EOT it is " test"."""
        return [self.doc_start_id] + self.encode(prompt)

    def raw_prompt_ids(self, prompt: str) -> list[int]:
        """A prompt's tokens as given, no document start before them (RLHF's prompts, ``sample --raw-prompt``);
        an empty one is the document start alone, as generation needs a token to begin from."""
        return self.encode(prompt) or [self.doc_start_id]

    def continuation_text(self, prompt_ids: list[int], row: list[int]) -> str:
        """The prompt and what the model wrote after it, up to the document's end (the next EOT)."""
        new = list(row[len(prompt_ids):])
        if self.eot_id in new:
            new = new[:new.index(self.eot_id)]
        start = 1 if prompt_ids[:1] == [self.doc_start_id] else 0
        return self.decode(list(prompt_ids[start:]) + new)

    def token_id(self, token: str) -> int | None:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    @staticmethod
    def from_file(path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file '{path}' not found; run `nanogpt4 prepare` first")
        text = path.read_text(encoding="utf-8")
        head = json.loads(text)
        if head.get("nanogpt4_tokenizer") == "tiktoken":
            return TiktokenTokenizer.load(head["encoding"])
        return BPETokenizer.from_str(text)


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # ours has both; one from elsewhere (an imported model's) ends its text with its own token, and pads
        # with it, as GPT-2's does
        self.eot_id = next((i for i in map(tok.token_to_id, (EOT, *FOREIGN_END_TOKENS)) if i is not None), None)
        pad = tok.token_to_id(PAD)
        self.pad_id = pad if pad is not None else self.eot_id
        if tok.token_to_id(EOT) is None:
            self.bos_id = next((i for i in map(tok.token_to_id, FOREIGN_START_TOKENS) if i is not None), None)

    @staticmethod
    def check_vocab_size(vocab_size: int) -> None:
        """A byte-level BPE holds every byte and the special tokens before its first merge."""
        n_base = 256 + len(SPECIAL_TOKENS)
        if vocab_size < n_base + 1:
            raise UserError(f"model.vocab_size={vocab_size} is too small for a byte-level BPE "
                            f"(needs > {n_base}: 256 bytes + {len(SPECIAL_TOKENS)} special tokens)")

    @classmethod
    def train(cls, texts: Iterator[str] | list[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        cls.check_vocab_size(vocab_size)
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(self.tok.to_str(), encoding="utf-8")


class TiktokenTokenizer(Tokenizer):
    """GPT-2's tokenizer via tiktoken. Only ``<|endoftext|>`` exists; it doubles as padding."""

    kind = "gpt2"

    def __init__(self, enc, name: str = "gpt2"):
        self.enc = enc
        self.name = name
        self.vocab_size = enc.n_vocab
        self.eot_id = enc.eot_token
        self.pad_id = enc.eot_token

    @classmethod
    def load(cls, name: str = "gpt2", timeout: float = 15.0) -> TiktokenTokenizer:
        try:
            import tiktoken
        except ImportError:
            raise UserError("data.tokenizer=gpt2 needs tiktoken: pip install tiktoken") from None
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # tiktoken's first use downloads its BPE files without a timeout
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:
            raise UserError(f"cannot load tiktoken '{name}' ({type(e).__name__}); its files are downloaded on "
                            f"first use and this machine seems offline: use data.tokenizer=bpe, or set "
                            f"TIKTOKEN_CACHE_DIR to a directory holding the cached files") from None
        finally:
            socket.setdefaulttimeout(old)
        return cls(enc, name)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def token_id(self, token: str) -> int | None:
        return self.eot_id if token in (EOT, PAD) else None

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"nanogpt4_tokenizer": "tiktoken", "encoding": self.name}), encoding="utf-8")
