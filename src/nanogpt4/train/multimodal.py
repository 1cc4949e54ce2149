"""The multimodal stage: LLaVA's two-stage recipe on the shared Trainer, then a held-out evaluation.

Stage 1 (align) freezes the language model and trains the image encoder + projector, so image tokens learn
to speak the LM's language; stage 2 (tune) trains everything. The evaluation answers held-out questions
greedily, once with the image and once with a blank image (the text-only control), next to the accuracy a
question-only prior (the most common training answer for each exact question) would get.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nanogpt4.data.tokenizer import END, IMAGE, ROLE_TOKENS, BPETokenizer, Tokenizer
from nanogpt4.data.vision import (
    EVAL_SEED_BASE,
    QUESTION_TYPES,
    VQAItem,
    digit_items,
    eval_scene_items,
    load_digits_split,
    load_vqa_jsonl,
    train_scene_conversation,
)
from nanogpt4.errors import UserError
from nanogpt4.model.multimodal import MultimodalTransformer
from nanogpt4.rlhf.data import pad_left, pad_right
from nanogpt4.train.checkpoint import is_multimodal, list_checkpoints, load_model, resolve_stage_checkpoint
from nanogpt4.train.distributed import DistInfo
from nanogpt4.train.trainer import STAGE_RESET, Trainer, quarter_of_stage, rank_rows, stage_checkpoint_interval
from nanogpt4.utils import atomic_write_json, atomic_write_text, read_jsonl, resolve_device

USER, ASSISTANT = ROLE_TOKENS["user"], ROLE_TOKENS["assistant"]


def prompt_text(question: str) -> str:
    return f"{USER}{IMAGE}{question}{END}{ASSISTANT}"


class TextCodec:
    """Tokenises prompts/answers once per distinct string (the question set is small and repeats)."""

    def __init__(self, tok: Tokenizer, model: MultimodalTransformer):
        self.tok, self.model = tok, model
        self.end_id = tok.token_id(END)
        self._cache: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self._cache:
            self._cache[question] = self.model.expand_image_tokens(self.tok.encode(prompt_text(question)))
        return self._cache[question]

    def answer(self, answer: str) -> list[int]:
        key = "\0" + answer
        if key not in self._cache:
            self._cache[key] = self.tok.encode(answer) + [self.end_id]
        return self._cache[key]

    def turn(self, question: str, first: bool) -> list[int]:
        """A user turn; only the first carries the image."""
        if first:
            return self.prompt(question)
        key = "\1" + question
        if key not in self._cache:
            self._cache[key] = self.tok.encode(f"{USER}{question}{END}{ASSISTANT}")
        return self._cache[key]

    def first_turn_length(self, item: VQAItem) -> int:
        """Positions a conversation opening with ``item`` takes: its image, question and answer (the targets are
        the next tokens, so the last token is never input)."""
        return len(self.turn(item.question, True)) + len(self.answer(item.answer)) - 1

    def conversation(self, items: list[VQAItem], max_len: int) -> tuple[list[int], list[int]]:
        """(input_ids, next-token labels) of a multi-turn conversation about one image, the loss on the answers
        (and their end tokens) only; turns that do not fit in ``max_len`` are dropped, the first never is."""
        ids: list[int] = []
        targets: list[int] = []
        for k, item in enumerate(items):
            p, a = self.turn(item.question, k == 0), self.answer(item.answer)
            if len(ids) + len(p) + len(a) > max_len + 1:
                if k == 0:
                    raise UserError(f"a question + answer needs {self.first_turn_length(item)} tokens but "
                                    f"model.max_seq_len={max_len}; raise model.max_seq_len or use fewer image "
                                    f"tokens (larger multimodal.patch_size)")
                break
            ids += p + a
            targets += [-100] * len(p) + a
        return ids[:-1], targets[1:]

# ------------------------------------------------------------------------------------------- data
class VQASource:
    """Training rows as a pure function of (seed, step, row): procedural scenes are unlimited; the digits
    and user rows are drawn with replacement (digits shifted by up to 2 pixels when augmenting)."""

    def __init__(self, mm: DictConfig, size: int, channels: int, seed: int):
        self.mm, self.size, self.channels, self.seed = mm, size, channels, seed
        self.kinds = mm.data.split("+") if not mm.data.startswith("jsonl:") else ["jsonl"]
        bad = [k for k in self.kinds if k not in ("scenes", "digits", "jsonl")]
        if bad or not self.kinds:
            raise UserError(f"multimodal.data={mm.data!r} is not one of scenes, digits, scenes+digits, jsonl:PATH")
        self.digits = load_digits_split() if "digits" in self.kinds else None
        self.custom_train: list[VQAItem] = []
        self.custom_eval: list[VQAItem] = []
        self.evaluates_on_training = False  # a one-row file: its row is both
        mix = [self.kinds, seed, size, channels, mm.digits_fraction if len(self.kinds) > 1 else None,
               mm.augment if "digits" in self.kinds else None]
        if "jsonl" in self.kinds:
            path = mm.data[len("jsonl:"):]
            rows = load_vqa_jsonl(path, size, channels)
            mix.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            # every 10th row is held out (at least one), so the split never depends on the machine
            self.custom_eval = rows[::10]
            self.custom_train = [r for i, r in enumerate(rows) if i % 10]
            if not self.custom_train:
                self.custom_train, self.evaluates_on_training = rows, True
        # what the training rows are a function of (a jsonl file: its text, not the images it names), kept in
        # checkpoints so that a resume on other rows says so
        self.data_id = hashlib.sha256(json.dumps(mix).encode()).hexdigest()[:16]

    def conversation(self, step: int, row: int) -> list[VQAItem]:
        """Training row ``row`` of ``step``: one image and the questions asked about it."""
        rng = random.Random((self.seed * 1_000_003 + step) * 4096 + row)
        kind = self.kinds[0]
        if len(self.kinds) > 1:
            kind = "digits" if rng.random() < self.mm.digits_fraction else "scenes"
        if kind == "scenes":
            return train_scene_conversation(rng.randrange(EVAL_SEED_BASE), self.size, self.channels)
        if kind == "digits":
            d = self.digits
            i = rng.randrange(len(d.train_labels))
            shift = (rng.randint(-2, 2), rng.randint(-2, 2)) if self.mm.augment else (0, 0)
            items = digit_items(d.train_images[i], d.train_labels[i], self.size, self.channels, shift)
            rng.shuffle(items)
            return items
        return [self.custom_train[rng.randrange(len(self.custom_train))]]

    def eval_items(self) -> list[VQAItem]:
        items: list[VQAItem] = []
        if "scenes" in self.kinds:
            items += eval_scene_items(self.mm.eval_scenes, self.size, self.channels)
        if self.digits is not None:
            d = self.digits
            for px, label in zip(d.test_images, d.test_labels, strict=True):
                items += digit_items(px, label, self.size, self.channels)
        return items + self.custom_eval


class VQABatches:
    def __init__(self, source: VQASource, codec: TextCodec, batch_size: int, max_len: int):
        self.source, self.codec, self.batch_size, self.max_len = source, codec, batch_size, max_len
        self.pad = codec.tok.pad_id
        self.tokens_per_step = batch_size * max_len  # replaced by the real (padded) count at every batch

    def get(self, step: int, micro: int, accum: int, info: DistInfo, device) -> dict:
        rows = range(self.batch_size)[rank_rows(self.batch_size, micro, accum, info)]
        convs = [self.source.conversation(step, r) for r in rows]
        encoded = [self.codec.conversation(c, self.max_len) for c in convs]
        ids = pad_right([e[0] for e in encoded], self.pad, device)
        self.tokens_per_step = ids.numel() * accum * info.world_size
        return {"input_ids": ids,
                "labels": pad_right([e[1] for e in encoded], -100, device),
                "loss_tokens": sum(int(t != -100) for e in encoded for t in e[1]),  # what the loss averages over
                "images": torch.from_numpy(np.stack([c[0].image for c in convs])).to(device)}


def vqa_loss(model, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], batch["images"], labels=batch["labels"])


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_questions(model: MultimodalTransformer, codec: TextCodec, items: list[VQAItem], blank: bool = False,
                     batch_size: int = 128, max_new_tokens: int = 24) -> list[str]:
    """Greedy answers; ``blank`` replaces every image by an empty (black) one: the text-only control."""
    # short answers first: a batch decodes until its longest answer ends
    order = sorted(range(len(items)), key=lambda i: items[i].kind == "caption")
    out: dict[int, str] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        images = np.stack([items[i].image for i in idx])
        if blank:
            images = np.full_like(images, -1.0)
        limit = max_new_tokens if any(items[i].kind == "caption" for i in idx) else 6
        out.update(zip(idx, greedy_answers(model, codec, [items[i].question for i in idx], images, limit),
                       strict=True))
    return [out[i] for i in range(len(items))]


@torch.no_grad()
def greedy_answers(model: MultimodalTransformer, codec: TextCodec, questions: list[str], images: np.ndarray,
                   max_new_tokens: int) -> list[str]:
    """One greedy answer per (question, image), each cut at its end token."""
    device = next(model.parameters()).device
    stops = [codec.end_id, codec.tok.eot_id]
    ids, mask = pad_left([codec.prompt(q) for q in questions], codec.tok.pad_id, device)
    gen = model.generate(ids, torch.from_numpy(images).to(device), max_new_tokens, temperature=0,
                         attention_mask=mask, stop_tokens=stops, pad_token_id=codec.tok.pad_id)
    answers = []
    for row in gen[:, ids.size(1):].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        answers.append(codec.tok.decode(row[:cut]).strip())
    return answers


def multimodal_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint a `nanogpt4 multimodal` run (its last stage's latest), one of its stages or a checkpoint
    directory holds; None when ``path`` holds a text-only model."""
    ckpt = resolve_stage_checkpoint(path)
    return ckpt if is_multimodal(ckpt) else None


def load_multimodal(path: str | Path, device) -> tuple[MultimodalTransformer, TextCodec]:
    """The trained vision-language model of a `nanogpt4 multimodal` run, stage or checkpoint directory."""
    if not Path(path).exists():
        raise UserError(f"'{path}' does not exist; give the --out directory of a `nanogpt4 multimodal` run")
    ckpt = multimodal_checkpoint(path)
    if ckpt is None:
        raise UserError(f"'{path}' holds a text-only model; give a run of `nanogpt4 multimodal` "
                        f"(`nanogpt4 sample` is for text runs)")
    model, _, tok = load_model(ckpt, device, model_cls=MultimodalTransformer)
    if tok is None:
        raise UserError(f"'{ckpt}' has no tokenizer.json; give the --out directory of a `nanogpt4 multimodal` run")
    return model, TextCodec(tok, model)


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU: clipped n-gram precisions up to the shorter sentence's length (max 4), add-one smoothing
    for n >= 2 (Lin & Och 2004's BLEU+1), brevity penalty."""
    c, r = candidate.split(), reference.split()
    if not c or not r:
        return 0.0
    logs = []
    for n in range(1, min(max_n, len(c), len(r)) + 1):
        cn = Counter(tuple(c[i:i + n]) for i in range(len(c) - n + 1))
        rn = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        hits = sum(min(v, rn[k]) for k, v in cn.items())
        total = len(c) - n + 1
        if n == 1 and hits == 0:
            return 0.0
        logs.append(np.log((hits + (n > 1)) / (total + (n > 1))))
    bp = min(1.0, float(np.exp(1 - len(r) / len(c))))
    return float(bp * np.exp(np.mean(logs)))


def accuracy_by_type(items: list[VQAItem], answers: list[str]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for it, a in zip(items, answers, strict=True):
        hits[it.kind].append(a == it.answer)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def question_only_prior(source: VQASource, items: list[VQAItem], n_train: int = 5000) -> list[str]:
    """The best a blind model can do: the most common training answer to each exact question string."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for k in range(n_train):
        for it in source.conversation(-1 - k // 1024, k % 1024):  # steps training never uses
            answers[it.question][it.answer] += 1
    every = Counter(it.answer for it in items)
    fallback = every.most_common(1)[0][0] if every else ""
    return [answers[it.question].most_common(1)[0][0] if answers[it.question] else fallback for it in items]


def summarise(items: list[VQAItem], answers: list[str]) -> dict:
    per = accuracy_by_type(items, answers)
    qa = [(it, a) for it, a in zip(items, answers, strict=True) if it.kind in QUESTION_TYPES]
    dig = [(it, a) for it, a in zip(items, answers, strict=True) if it.kind in ("digit", "even")]
    cap = [(it, a) for it, a in zip(items, answers, strict=True) if it.kind == "caption"]
    cus = [(it, a) for it, a in zip(items, answers, strict=True)
           if it.kind not in QUESTION_TYPES + ("digit", "even", "caption")]

    def acc(pairs):
        return float(np.mean([a == it.answer for it, a in pairs])) if pairs else None

    return {"scenes_accuracy": acc(qa), "digits_accuracy": acc(dig), "custom_accuracy": acc(cus),
            "caption_exact_match": acc(cap),
            "caption_bleu": float(np.mean([bleu(a, it.answer) for it, a in cap])) if cap else None,
            "per_type": per}


def headline_accuracy(s: dict) -> float | None:
    """``summarise``'s accuracy on the scenes, else on the digits, else on your own rows."""
    return next((s[k] for k in ("scenes_accuracy", "digits_accuracy", "custom_accuracy") if s[k] is not None), None)


# ------------------------------------------------------------------------------------------- the stage
def predicted_evaluation_s(probe_s: list[float], n_probe: int, n_eval: int, fallback_s: float) -> float:
    """Seconds of the stage's held-out evaluation, which answers each of its ``n_eval`` questions twice (with the
    image and with a blank one), at the rate of the last timed probe evaluation (``n_probe`` of the same
    questions; answers are generated, so the rate is the machine's decoding speed, not its training speed);
    ``fallback_s`` before one is timed. On 2 Zen 4 cores a 1.2 s probe of 256 predicts 22 s for 2,350 questions,
    which took 18.4 s with the report; the estimate in training steps (``plan.COSTS``, measured on a Zen 3 that
    trains 2.6x slower) said 11.6, and the pipeline ran 3 s over its budget."""
    if not probe_s or n_probe <= 0:
        return fallback_s
    return probe_s[-1] * 2 * n_eval / n_probe


def stage_cfg(cfg: DictConfig, steps: int, max_time_s: float | None = None, tune: bool = False) -> DictConfig:
    """The trainer settings of one LLaVA stage: four probe evaluations, but none more often than every 25 steps
    (each answers 256 questions, ~2 s on 2 cores: a shortened 9-step align stage spent half its time on them).
    The tune stage (``tune``) takes its warmup and cosine from ``multimodal.lr_decay_steps`` and anneals over
    ``multimodal.cooldown_steps``: a shortened pipeline's follows the full run's curve, as its pretraining does."""
    mm = cfg.multimodal
    schedule = (mm.lr_decay_steps or steps) if tune else steps
    return OmegaConf.merge(cfg.training, STAGE_RESET, {  # type: ignore[return-value]
        "max_steps": steps, "learning_rate": mm.learning_rate, "batch_size": mm.batch_size,
        "warmup_steps": min(100, schedule // 10 + 1), "lr_decay_steps": schedule,
        "cooldown_steps": mm.cooldown_steps if tune else 0,
        "eval_interval": quarter_of_stage(steps),
        "checkpoint_interval": stage_checkpoint_interval(cfg.training, steps), "max_time_s": max_time_s,
        "grad_accum_steps": 1})


def text_tokenizer(cfg: DictConfig, source: VQASource) -> BPETokenizer:
    """A byte-level BPE trained on the stage's own questions and answers (no pretrained LM given)."""
    texts = []
    for k in range(2000):
        texts += [f"{it.question} {it.answer}" for it in source.conversation(-(1 << 20) - k // 256, k % 256)]
    texts += [f"{it.question} {it.answer}" for it in source.custom_train]
    return BPETokenizer.train(texts, min(cfg.model.vocab_size, 1024))


def build_model(cfg: DictConfig, pretrained: Path | None, source: VQASource, device):
    """(model, tokenizer, cfg): the LM from a pretrained run when given, else a fresh one with its own BPE."""
    if pretrained is not None:
        lm, pre_cfg, tok = load_model(pretrained, device)
        if tok is None:
            raise UserError(f"'{pretrained}' has no tokenizer.json; point --pretrained at a `nanogpt4 pretrain` run")
        cfg = OmegaConf.merge(cfg, {"model": OmegaConf.to_container(pre_cfg.model),
                                    "data": OmegaConf.to_container(pre_cfg.data)})
    else:
        lm = None
        tok = text_tokenizer(cfg, source)
        cfg = OmegaConf.merge(cfg, {"model": {"vocab_size": tok.vocab_size}})
    image_id = tok.token_id(IMAGE)
    if image_id is None or tok.token_id(END) is None:
        raise UserError("the tokenizer has no <|image|>/<|end|> tokens (tiktoken gpt2 has none); "
                        "use a run prepared with data.tokenizer=bpe")
    cfg = OmegaConf.merge(cfg, {"multimodal": {"image_token_id": image_id}})
    torch.manual_seed(cfg.seed)
    model = MultimodalTransformer(cfg, lm=lm).to(device)
    return model, tok, cfg


STAGES_FILE = "stages.json"  # what a resumed run cannot read from its config: the LM it started from


def stage_plan(cfg: DictConfig, pretrained: bool) -> list[tuple[str, int, bool, bool]]:
    """(name, steps, the LM trains, the tune stage's schedule applies) of each LLaVA stage to run."""
    mm = cfg.multimodal
    stages = []
    if pretrained and mm.align_steps > 0:
        stages.append(("align", mm.align_steps, False, False))
    if mm.tune_steps > 0:
        stages.append(("tune", mm.tune_steps, True, True))
    if not stages:  # a fresh LM has nothing to align to: its stage 1 would be wasted compute
        stages.append(("tune", mm.align_steps, True, False))
    return stages


def resumed_model(cfg: DictConfig, out: Path, device):
    """(model, tokenizer, the LM it started from, its stages, the stages it is past) of a stopped run in ``out``,
    before anything is written. The weights come from the checkpoint of the last stage that has one, as it resumes;
    the stages before it are done, even if stopped short (by a time budget, or a larger step count given now):
    training one further would be lost when the later stage's checkpoint loads. Refuses a run with nothing to
    resume (no checkpoint, or finished) and settings its checkpoints cannot continue."""
    if not (out / "tokenizer.json").is_file():
        raise UserError(f"cannot resume: '{out}' has no tokenizer.json; is it a `nanogpt4 multimodal` run?")
    saved = json.loads((out / STAGES_FILE).read_text()) if (out / STAGES_FILE).is_file() else {}
    # runs from before stages.json: one with an align stage started from a pretrained LM
    lm_pretrained = saved.get("lm_pretrained", "(not recorded)" if (out / "align").is_dir() else None)
    stages = stage_plan(cfg, lm_pretrained is not None)
    found = {name: list_checkpoints(out / name) for name, *_ in stages}
    if not any(found.values()):
        raise UserError(f"nothing to resume: '{out}' was stopped before its first checkpoint; delete it and "
                        f"train again without --resume")
    current = max(i for i, (name, *_) in enumerate(stages) if found[name])
    setting = {"align": "multimodal.align_steps", "tune": "multimodal.tune_steps"}
    for name, steps, _, _ in stages[current:]:
        if found[name] and found[name][-1][0] > steps:
            raise UserError(f"'{out / name}' is at step {found[name][-1][0]}, past {setting[name]}={steps}; give "
                            f"{setting[name]} above it to train on (nothing was changed)")
    name, steps = stages[current][:2]
    if (out / "summary.json").is_file() and current == len(stages) - 1 and found[name][-1][0] == steps:
        raise UserError(f"'{out}' has finished; give a larger multimodal.tune_steps (now {cfg.multimodal.tune_steps})"
                        f" to train on (nothing was changed)")
    tok = Tokenizer.from_file(out / "tokenizer.json")
    torch.manual_seed(cfg.seed)
    return MultimodalTransformer(cfg).to(device), tok, lm_pretrained, stages, {n for n, *_ in stages[:current]}


def logged_stage_result(run_dir: Path) -> tuple[int, float]:
    """(steps, last training loss) of a finished stage, from its latest checkpoint and its log."""
    step = list_checkpoints(run_dir)[-1][0]
    losses = [r["step_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "step_loss" in r and r["step"] <= step]
    return step, losses[-1] if losses else math.nan


def check_questions_fit(codec: TextCodec, items: list[VQAItem], max_len: int, pretrained: bool) -> None:
    """Refuse, before anything is written or trained, a question that cannot fit with its image and answer: it
    used to stop the first training step that drew it, after the run directory was made. The LM's context is a
    pretrained run's own (positions cannot grow), so the fix there is fewer image tokens."""
    longest = max(items, key=codec.first_turn_length)
    refuse_longer_than_context(f"the question {longest.question!r} with its answer", codec.first_turn_length(longest),
                               codec.model.image_tokens, max_len, pretrained)


# the chat template's tokens around a question (user, end, assistant) and the shortest answer with its end token
SHORTEST_TURN = 5


def refuse_longer_than_context(what: str, need: int, image_tokens: int, max_len: int, pretrained: bool) -> None:
    if need > max_len:
        grow = "" if pretrained else ", or raise model.max_seq_len"
        raise UserError(f"{what} and the {image_tokens} image tokens needs {need} tokens, more than the language "
                        f"model's context ({max_len}): use fewer image tokens (a larger multimodal.patch_size or "
                        f"multimodal.token_merge=2){grow}")


def run_multimodal(cfg: DictConfig, pretrained: Path | None, out: Path, log=print, progress: bool = True,
                   deadline: float | None = None, evaluation_s: float = 0.0, info: DistInfo | None = None,
                   device: torch.device | None = None, resume: bool = False) -> dict:
    """Train (LLaVA's align then tune), evaluate and report. ``deadline`` (a ``time.time()``) is when the stage
    should be done, evaluation included: training stops before it by the evaluation's predicted seconds, even if
    steps are left, so that a time-budgeted pipeline keeps its budget when the machine slows down; the evaluation
    still runs in full. The prediction is ``predicted_evaluation_s`` from this stage's timed probe evaluations,
    ``evaluation_s`` until it has timed one. Under torchrun (``info``, ``device``: the rank's) the ranks train
    data-parallel and rank 0 alone writes and evaluates; the others return after training. ``resume``: go on
    with the stopped run in ``out`` (``cfg`` its config.yaml, ``pretrained`` None): each stage continues from its
    latest checkpoint, a finished stage's is reused, a stage stopped before its first starts again."""
    t_start = time.time()
    info = info or DistInfo()
    device = device or resolve_device(cfg.device)
    log = log if info.is_main else (lambda _m: None)
    mm = cfg.multimodal
    source = VQASource(mm, mm.image_size, mm.channels, cfg.seed)
    if resume:
        model, tok, lm_pretrained, stages, done = resumed_model(cfg, out, device)
    else:
        model, tok, cfg = build_model(cfg, pretrained, source, device)
        lm_pretrained, done = (str(pretrained) if pretrained else None), set()
        stages = stage_plan(cfg, pretrained is not None)
    if (model.image_size, model.channels) != (source.size, source.channels):  # a pretrained encoder's own input
        source = VQASource(cfg.multimodal, model.image_size, model.channels, cfg.seed)
    codec = TextCodec(tok, model)
    if source.evaluates_on_training:
        log(f"multimodal: warning: {mm.data[len('jsonl:'):]} has one row, which trains and is evaluated on: its "
            f"accuracy is not held out (every 10th row is, from 2 rows on)")
    eval_items = source.eval_items()
    first_turns = [source.conversation(step, row)[0] for step in range(8) for row in range(mm.batch_size)]
    check_questions_fit(codec, eval_items + first_turns, cfg.model.max_seq_len, lm_pretrained is not None)
    if info.is_main:  # after the data and the model loaded and the questions fit: bad input leaves nothing
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            tok.save(out / "tokenizer.json")
            atomic_write_json(out / STAGES_FILE, {"lm_pretrained": lm_pretrained})
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    L = cfg.model.max_seq_len
    batches = VQABatches(source, codec, mm.batch_size, L)
    probe = random.Random(0).sample(eval_items, min(256, len(eval_items)))

    probe_s: list[float] = []

    def quick_eval(m) -> dict:
        t = time.perf_counter()
        s = summarise(probe, answer_questions(m, codec, probe, max_new_tokens=mm.max_new_tokens))
        probe_s.append(time.perf_counter() - t)
        return {k: v for k, v in s.items() if isinstance(v, float)}

    summary: dict = {"device": str(device), "processes": info.world_size, "data": mm.data,
                     "image_tokens": model.image_tokens,
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "lm_pretrained": lm_pretrained}
    train_s = 0.0
    for name, steps, lm_trains, tune in stages:
        if name in done:  # resumed past it: its weights are in the later stage's checkpoint
            summary[f"{name}_steps"], summary[f"{name}_train_loss"] = logged_stage_result(out / name)
            continue
        model.lm.requires_grad_(lm_trains)
        t0 = time.time()
        log(f"multimodal: stage {name} ({'all weights' if lm_trains else 'LM frozen'}), {steps} steps")
        # the trainer runs at least one step, even past the deadline
        time_left = None if deadline is None else max(
            0.0, deadline - time.time() - predicted_evaluation_s(probe_s, len(probe), len(eval_items), evaluation_s))
        train_cfg = stage_cfg(cfg, steps, time_left, tune)
        trainer = Trainer(cfg, model, batches, out / name, info, device, loss_fn=vqa_loss,
                          evaluate=quick_eval, train_cfg=train_cfg, tokenizer_path=out / "tokenizer.json",
                          progress=progress, log=log, lr_setting="multimodal.learning_rate", data_id=source.data_id,
                          warmup_fix=f"the stage's warmup is a tenth of its schedule (at most 100 steps), here "
                                     f"multimodal.lr_decay_steps={train_cfg.lr_decay_steps}: give more steps or a "
                                     f"shorter multimodal.lr_decay_steps (a pipeline's --scale keeps the full run's)")
        if resume:
            trainer.resume_or_restart()
            if train_cfg.max_time_s is not None:  # the time left is this command's: the stage's time so far (the
                # checkpoint's train_time_s, which the budget is checked against) comes on top
                train_cfg.max_time_s = trainer.train_time + train_cfg.max_time_s
        result = trainer.fit()
        if result["steps"] < steps:
            log(f"multimodal: stage {name} stopped at step {result['steps']} of {steps}: the time budget is spent")
        summary[f"{name}_steps"] = result["steps"]
        summary[f"{name}_train_loss"] = result["final_train_loss"]
        summary[f"{name}_s"] = time.time() - t0
        train_s += time.time() - t0
    model.lm.requires_grad_(True)
    summary["train_s"] = train_s
    if not info.is_main:
        return summary

    log(f"multimodal: evaluating {len(eval_items)} held-out questions (with image, blank image, prior)")
    with_image = answer_questions(model, codec, eval_items, max_new_tokens=mm.max_new_tokens)
    blank = answer_questions(model, codec, eval_items, blank=True, max_new_tokens=mm.max_new_tokens)
    prior = question_only_prior(source, eval_items)
    summary.update(summarise(eval_items, with_image))
    s_blank, s_prior = summarise(eval_items, blank), summarise(eval_items, prior)
    # the controls of the headline accuracy: the scenes', else the digits' or (multimodal.data=jsonl:) your data's
    summary["text_only_accuracy"] = headline_accuracy(s_blank)
    summary["text_only_digits_accuracy"] = s_blank["digits_accuracy"]
    summary["text_only_per_type"] = s_blank["per_type"]
    summary["prior_accuracy"] = s_prior["scenes_accuracy"] if s_prior["scenes_accuracy"] is not None \
        else s_prior["custom_accuracy"]
    summary["prior_per_type"] = s_prior["per_type"]
    summary["examples_eval"] = len(eval_items)
    summary["eval_counts"] = dict(Counter(it.kind for it in eval_items))
    summary["wall_s"] = time.time() - t_start
    examples = pick_examples(eval_items, with_image, blank)
    with open(out / "answers.jsonl", "w", encoding="utf-8") as f:
        for it, a, b in zip(eval_items, with_image, blank, strict=True):
            f.write(json.dumps({"type": it.kind, "question": it.question, "answer": it.answer, "model": a,
                                "blank_image": b}) + "\n")
    write_multimodal_report(out, summary, examples)
    atomic_write_json(out / "summary.json", summary)
    return summary


def pick_examples(items, answers, blank, n: int = 16) -> list[tuple[VQAItem, str, str]]:
    """A spread of question types for the report's image grid."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_kind[it.kind].append(i)
    rng = random.Random(0)
    chosen: list[int] = []
    while len(chosen) < min(n, len(items)):
        for idx in by_kind.values():
            if idx and len(chosen) < n:
                chosen.append(idx.pop(rng.randrange(len(idx))))
    return [(items[i], answers[i], blank[i]) for i in chosen]


def per_type_table(summary: dict) -> str:
    """Markdown: accuracy per question type with the image, with a blank image, and of the question-only prior."""
    rows = ["| question type | with image | blank image | question-only prior |", "| --- | --- | --- | --- |"]
    for k, v in summary["per_type"].items():
        rows.append(f"| {k} | {v:.3f} | {summary['text_only_per_type'][k]:.3f} | {summary['prior_per_type'][k]:.3f} |")
    return "\n".join(rows)


def write_multimodal_report(out: Path, summary: dict, examples) -> None:
    from nanogpt4.report import _pyplot, plot_training_curves

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plt = _pyplot()
    if plt is not None and examples:
        cols = 4
        rows = (len(examples) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows))
        for ax, (it, a, _b) in zip(np.ravel(axes), examples, strict=False):
            img = (it.image.transpose(1, 2, 0) + 1) / 2
            ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None, interpolation="nearest")
            ok = "ok" if a == it.answer else "WRONG"
            ax.set_title(f"{it.question}\nmodel: {a} ({ok})\ntruth: {it.answer}", fontsize=7)
            ax.axis("off")
        for ax in np.ravel(axes)[len(examples):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(plots / "examples.png", dpi=110)
        plt.close(fig)
    for stage in ("align", "tune"):
        if (out / stage / "metrics.jsonl").exists():
            p = plot_training_curves(out / stage)
            if p is not None:
                p.replace(plots / f"{stage}_curves.png")
    lines = ["# Multimodal", "",
             f"Image tokens per image: {summary['image_tokens']}; parameters: {summary['parameters']:,}; "
             f"LM: {summary['lm_pretrained'] or 'trained from scratch'}; training {summary['train_s']:.0f} s.", "",
             per_type_table(summary)]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    mine = summary.get("custom_accuracy") is not None  # multimodal.data=jsonl: your rows, not the scenes and digits
    lines += ["", *([f"- your data's accuracy (every 10th row, held out): {fmt(summary['custom_accuracy'])}, "
                     f"question-only prior {fmt(summary['prior_accuracy'])}"] if mine else
                    [f"- scenes accuracy (5 question types): {fmt(summary['scenes_accuracy'])}",
                     f"- digits accuracy: {fmt(summary['digits_accuracy'])}"]),
              f"- text-only control (blank image): {fmt(summary['text_only_accuracy'])}",
              *([] if mine else [f"- caption exact match: {fmt(summary['caption_exact_match'])}, "
                                 f"BLEU {fmt(summary['caption_bleu'])}"]),
              "", "![examples](plots/examples.png)", "",
              f"Ask it about your own image: `nanogpt4 ask --run {out} --image FILE --question "
              + ("\"...\"` (a question like your rows').\n" if mine else
                 "\"what colour is the circle?\"` (without `--question` it captions).\n")]
    atomic_write_text(out / "report.md", "\n".join(lines))
