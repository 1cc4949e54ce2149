"""``nanogpt4 pretrain``: next-token prediction on prepared token shards, through the shared Trainer."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nanogpt4.config import config_from_yaml_text, to_yaml, with_weights_model
from nanogpt4.data.loader import TokenWindows
from nanogpt4.data.prepare import data_identity, default_data_dir, load_meta, prepare_data
from nanogpt4.data.tokenizer import Tokenizer
from nanogpt4.errors import UserError
from nanogpt4.model.transformer import Transformer
from nanogpt4.train.checkpoint import (
    list_checkpoints,
    load_trainer_state,
    load_weights,
    refuse_other_models,
    resolve_stage_checkpoint,
)
from nanogpt4.train.distributed import DistInfo, on_rank_zero, process_group
from nanogpt4.train.trainer import Trainer, budget_spent, rank_rows
from nanogpt4.utils import (
    atomic_write_json,
    atomic_write_text,
    autocast_ctx,
    out_dir_entries,
    resolve_device,
    resolve_dtype,
    some_names,
)


class LMBatches:
    """Global batch of ``batch_size`` random windows per step; each (micro, rank) takes its rows."""

    def __init__(self, windows: TokenWindows, batch_size: int):
        self.windows = windows
        self.batch_size = batch_size
        self.tokens_per_step = batch_size * windows.seq_len

    def get(self, step: int, micro: int, accum: int, info: DistInfo, device: torch.device) -> dict:
        x, y = self.windows.batch(step, self.batch_size, rank_rows(self.batch_size, micro, accum, info), device)
        return {"input_ids": x, "labels": y}


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """A loss in nats per token as bits per UTF-8 byte of text: comparable across tokenizers."""
    return loss / math.log(2) / bytes_per_token


def make_lm_evaluator(val: TokenWindows, iters: int, batch_size: int, bytes_per_token: float,
                      device: torch.device, dtype: torch.dtype):
    """Mean val loss over a fixed set of windows (the same at every eval) and bits per byte."""

    @torch.no_grad()
    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        total = 0.0
        for i in range(iters):
            x, y = val.batch(i, batch_size, device=device)
            with autocast_ctx(device, dtype):
                logits = model(x)
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
        model.train(was_training)
        loss = total / iters
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss, bytes_per_token)}

    return evaluate


@torch.no_grad()
def split_loss(model, tokens: np.ndarray, seq_len: int, batch_size: int, device: torch.device, dtype: torch.dtype,
               max_tokens: int | None = None, progress: bool = False) -> tuple[float, int]:
    """Mean next-token loss (nats) of ``model`` over ``tokens`` read once, in consecutive windows of ``seq_len``
    that do not overlap (each window starts without context, as the usual non-overlapping perplexity does), up
    to ``max_tokens`` scored tokens. Returns (mean loss, tokens scored)."""
    from tqdm import tqdm

    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    if n < 1:
        raise UserError(f"{len(tokens)} token(s) leave nothing to score: give more text")
    full = list(range(0, n - seq_len + 1, seq_len))
    batches = [(full[i:i + batch_size], seq_len) for i in range(0, len(full), batch_size)]
    end = len(full) * seq_len
    if end < n:
        batches.append(([end], n - end))  # the shorter last window, alone
    total, scored = 0.0, 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc="eval", unit="tok", disable=not progress, leave=False)
    for rows, length in batches:
        idx = np.asarray(rows)[:, None] + np.arange(length + 1)[None, :]
        chunk = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
        with autocast_ctx(device, dtype):
            loss = model(chunk[:, :-1], labels=chunk[:, 1:])
        total += float(loss) * chunk[:, 1:].numel()
        scored += chunk[:, 1:].numel()
        bar.update(chunk[:, 1:].numel())
    bar.close()
    model.train(was_training)
    return total / scored, scored


def make_sampler(tokenizer: Tokenizer, prompt: str, n_tokens: int, device: torch.device, seed: int):
    def sample(model) -> str:
        ids = tokenizer.prompt_ids(prompt)[-(model.cfg.max_seq_len - 1):]
        g = torch.Generator(device=device).manual_seed(seed)  # own stream: training RNG is untouched
        out = model.generate(torch.tensor([ids], device=device), n_tokens, temperature=0.8, top_k=50,
                             generator=g, stop_tokens=[tokenizer.eot_id])
        return tokenizer.continuation_text(ids, out[0].tolist())

    return sample


def stopped_before_a_checkpoint(run_dir: Path) -> bool:
    """A run that logged steps but was stopped before its first checkpoint: nothing can resume it."""
    return (run_dir / "metrics.jsonl").exists() and not list_checkpoints(run_dir)


def refuse_existing_run(run_dir: Path, resume: bool) -> None:
    """Refuse to write a new run over a run, or into a directory holding anything else."""
    if resume:
        return
    if stopped_before_a_checkpoint(run_dir):  # neither a new run nor --resume can use it: say so, not "--resume"
        raise UserError(f"'{run_dir}' holds a run stopped before its first checkpoint, so nothing can resume it; "
                        f"delete it to start again, or choose another --out")
    if list_checkpoints(run_dir):
        raise UserError(f"run directory '{run_dir}' already holds a run; pass --resume to continue it "
                        f"or choose another --out")
    held = out_dir_entries(run_dir)
    if held:  # --out . in a project: its own config.yaml would be replaced by the run's
        raise UserError(f"run directory '{run_dir}' holds {some_names(held)}: give a new or empty directory "
                        f"(nothing in it was changed)")


def refuse_finished_resume(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse a ``--resume`` with nothing left to train, before anything is written: past ``max_steps``, or a
    finished run (its summary written) whose step or token budget is spent. A run that stopped between its last
    checkpoint and its summary resumes to write the summary (``Trainer.fit`` reads it back from the log)."""
    found = list_checkpoints(run_dir)
    if not found:
        if stopped_before_a_checkpoint(run_dir):
            raise UserError(f"nothing to resume: '{run_dir}' was stopped before its first checkpoint "
                            f"(training.checkpoint_interval={cfg.training.checkpoint_interval}); delete it and "
                            f"start again without --resume")
        return  # Trainer.resume says so
    step, ckpt = found[-1]
    tc = cfg.training
    if step > tc.max_steps:
        raise UserError(f"'{run_dir}' is at step {step}, past training.max_steps={tc.max_steps}; give "
                        f"training.max_steps above {step} to train on (nothing was changed)")
    if not (run_dir / "summary.json").exists():
        return
    state = load_trainer_state(ckpt) if tc.max_tokens is not None or tc.max_time_s is not None else {}
    if budget_spent(tc, step, state.get("tokens", 0)):
        raise UserError(f"'{run_dir}' has finished at step {step}; give a larger training.max_steps (now "
                        f"{tc.max_steps}) or training.max_tokens to train on (nothing was changed)")
    if tc.max_time_s is not None and state["train_time_s"] >= tc.max_time_s:  # it trained one more step
        raise UserError(f"'{run_dir}' has finished at step {step}: its time budget is spent "
                        f"({state['train_time_s']:.1f} s trained, training.max_time_s={tc.max_time_s:g}); give a "
                        f"larger training.max_time_s, or "
                        f"training.max_time_s=null, to train on (nothing was changed)")


def refuse_other_tokenizer(run_dir: Path, data_dir: Path, cfg: DictConfig) -> None:
    """A resumed run must read its data with the tokenizer its weights were trained with: data prepared with
    another (another source's BPE, or this source's rebuilt after its files changed) would train every
    embedding on other token meanings, and overwrite the run's tokenizer.json."""
    ours = run_dir / "tokenizer.json"
    if ours.is_file() and ours.read_bytes() != (data_dir / "tokenizer.json").read_bytes():
        fix = f"data.tokenizer={ours}" + (" and a new data.dir" if cfg.data.dir else "")
        raise UserError(f"the data in '{data_dir}' is tokenized with another tokenizer than '{run_dir}' was trained "
                        f"with; to train on it, encode it with the run's tokenizer: add {fix} (nothing in the run "
                        f"was changed)")


def init_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Write the resolved config (after ``refuse_existing_run``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))


def resume_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """A run's own config plus overrides that keep the architecture (e.g. more steps)."""
    from nanogpt4.config import load_config

    path = run_dir / "config.yaml"
    if not path.exists():
        raise UserError(f"cannot resume: '{run_dir}' has no config.yaml; is it a nanogpt4 run directory?")
    base = load_config(path)
    cfg = load_config(path, overrides)
    if cfg.model != base.model:
        raise UserError("cannot change model.* when resuming; the checkpoint has the old architecture")
    return cfg


def data_passes_note(train_tokens: int, tc: DictConfig, seq_len: int) -> str:
    """How many times the run reads its training split: a small corpus trained for many steps repeats, and
    the user should know before the val loss turns (a few passes cost little; far more, the model memorises)."""
    planned = tc.max_steps * tc.batch_size * seq_len
    if tc.max_tokens is not None:
        planned = min(planned, tc.max_tokens)
    passes = planned / train_tokens
    note = (f"training: {planned:,} tokens (training.max_steps {tc.max_steps} x batch {tc.batch_size} x {seq_len}"
            f"{', capped by training.max_tokens' if planned == tc.max_tokens else ''}), {passes:.3g} passes over the "
            f"{train_tokens:,} training tokens")
    if passes > 4:
        note += ("; past a few the model starts to memorise them: watch val_loss, and train on more text or for "
                 "fewer steps if it turns up")
    return note


def init_from_config(cfg: DictConfig, context: int | None = None) -> tuple[DictConfig, Path, str | None]:
    """``cfg`` for a run that starts from ``training.init_from``'s weights: that checkpoint's ``model`` section
    (``model.dropout`` kept: weights do not fix it) and, where ``data.tokenizer`` is the default ``bpe``, its
    tokenizer.json (the embeddings' meanings); the checkpoint directory; a line on a changed context, if any.

    ``context``: train at another ``model.max_seq_len`` than the checkpoint's (nanoGPT's ``crop_block_size``):
    a learned position table keeps its first ``context`` rows, so it can only shorten; RoPE holds any length."""
    ckpt = resolve_stage_checkpoint(cfg.training.init_from)
    refuse_other_models(cfg.training.init_from, ckpt)
    saved = config_from_yaml_text((ckpt / "config.yaml").read_text(encoding="utf-8"))
    if cfg.data.tokenizer == "bpe":
        if not (ckpt / "tokenizer.json").is_file():
            raise UserError(f"training.init_from '{cfg.training.init_from}' has no tokenizer.json to encode the data "
                            f"with; give data.tokenizer=PATH of the tokenizer its weights were trained with")
        cfg = OmegaConf.merge(cfg, {"data": {"tokenizer": str(ckpt / "tokenizer.json")}})
    model = OmegaConf.to_container(saved.model)
    note = None
    if context is not None and context != model["max_seq_len"]:
        if model["pos_embedding"] == "learned" and context > model["max_seq_len"]:
            raise UserError(f"model.max_seq_len={context} is longer than training.init_from's learned position "
                            f"table ({model['max_seq_len']} positions); give at most {model['max_seq_len']}")
        note = (f"training.init_from: context {model['max_seq_len']} -> {context} tokens (model.max_seq_len)"
                + (", its position table cropped" if model["pos_embedding"] == "learned" else ""))
        model["max_seq_len"] = context
    return with_weights_model(cfg, model), ckpt, note


def pretrain(cfg: DictConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
             log=print, init_context: int | None = None) -> dict:
    """Train ``cfg``'s model into ``run_dir`` (or go on with it, ``resume``). ``init_context``: the context to
    train ``training.init_from``'s weights at, where it is not theirs (``init_from_config``)."""
    t_wall = time.time()
    run_dir = Path(run_dir)
    init_ckpt = context_note = None
    if cfg.training.init_from and not resume:  # a resumed run has its config already, and its own weights
        cfg, init_ckpt, context_note = init_from_config(cfg, init_context)
    # a rank that fails mid-training leaves at once: waiting for the others at a barrier, it would be met by
    # their next gradient all-reduce instead
    with process_group(resolve_device(cfg.device), wait_on_error=False) as (info, device):
        log = log if info.is_main else (lambda _m: None)
        data_dir = default_data_dir(cfg)
        def check_and_prepare() -> None:
            refuse_existing_run(run_dir, resume)
            if resume:
                refuse_finished_resume(run_dir, cfg)
            prepare_data(cfg, data_dir, progress=progress, log=log, keep_other="data.dir" if cfg.data.dir else None)
            if resume:
                refuse_other_tokenizer(run_dir, data_dir, cfg)

        on_rank_zero(info, device, check_and_prepare)
        meta = load_meta(data_dir)
        if meta["vocab_size"] > cfg.model.vocab_size:
            raise UserError(f"data in '{data_dir}' uses {meta['vocab_size']} tokens but model.vocab_size="
                            f"{cfg.model.vocab_size}; raise model.vocab_size or re-run prepare")
        tokenizer = Tokenizer.from_file(data_dir / "tokenizer.json")
        tc = cfg.training
        T = cfg.model.max_seq_len
        train = TokenWindows(data_dir / "train.bin", T, meta["dtype"], cfg.seed, min_sequences=tc.batch_size)
        val = TokenWindows(data_dir / "val.bin", T, meta["dtype"], cfg.seed + 1,
                           fix=f"use more text, a larger data.val_fraction (now {cfg.data.val_fraction:g}) or a "
                               f"smaller model.max_seq_len")
        torch.manual_seed(cfg.seed)
        model = Transformer(cfg).to(device)
        if init_ckpt is not None:
            load_weights(model, init_ckpt / "model.safetensors", crop_positions=True)
        dtype = resolve_dtype(tc.dtype, device)
        fpt = model.flops_per_token(T)
        n_params = model.num_parameters()
        log(f"model: {n_params / 1e6:.2f}M parameters ({model.num_parameters(True) / 1e6:.2f}M non-embedding), "
            f"{fpt / 1e6:.1f} MFLOP/token, device {device}, {str(dtype).replace('torch.', '')}"
            + (f", {info.world_size} ranks" if info.enabled else ""))
        if context_note:
            log(context_note)
        log(data_passes_note(meta["train_tokens"], tc, T))
        if info.is_main:
            if not resume:  # made once its data has windows for a batch: bad input leaves no run directory behind
                init_run_dir(run_dir, cfg)
            shutil.copyfile(data_dir / "tokenizer.json", run_dir / "tokenizer.json")
        trainer = Trainer(
            cfg, model, LMBatches(train, tc.batch_size), run_dir, info, device,
            evaluate=make_lm_evaluator(val, tc.eval_iters, tc.eval_batch_size or min(tc.batch_size, 32),
                                       meta["val_bytes"] / meta["val_tokens"], device, dtype),
            sample=make_sampler(tokenizer, tc.sample_prompt, tc.sample_tokens, device, cfg.seed)
            if tc.sample_tokens > 0 else None,
            tokenizer_path=run_dir / "tokenizer.json", flops_per_token=fpt, progress=progress, log=log,
            data_id=data_identity(meta))
        if resume:
            trainer.resume()
            if info.is_main:  # a resume's overrides are written once its checkpoint has loaded
                init_run_dir(run_dir, cfg)
        t_train = time.time()
        result = trainer.fit()
        train_s = time.time() - t_train
        tokens_run = result["steps_this_run"] * trainer.batches.tokens_per_step
        tok_per_s = result["steady_tok_per_s"]  # training steps after the first (compiling) one
        summary = {
            "final_train_loss": result["final_train_loss"],
            "val_loss": result.get("val_loss"),
            "val_bpb": result.get("val_bpb"),
            "tokens": result["tokens"],
            "epochs": result["tokens"] / meta["train_tokens"],  # passes over the training split
            "steps": result["steps"],
            "params": n_params,
            "non_embedding_params": model.num_parameters(True),
            "flops_per_token": fpt,
            "flops": fpt * result["tokens"],
            "tok_per_s": tok_per_s,
            "mfu": trainer.mfu(tok_per_s) if trainer.peak else None,
            "tok_per_s_wall": tokens_run / max(train_s, 1e-9),  # with evals, samples, checkpoints and compiling
            "first_step_s": result["first_step_s"],
            "peak_flops": trainer.peak,
            "dtype": str(dtype).replace("torch.", ""),
            "world_size": info.world_size,
            "data_dir": str(data_dir),
            "wall_s": time.time() - t_wall,  # this command's; after --resume the run's tokens and flops are all of it
            "train_time_s": trainer.train_time,  # the run's training loop time, every --resume's included
            "device": str(device),
        }
        if trainer.last_eval.get("sample"):
            summary["sample"] = trainer.last_eval["sample"]
        if info.is_main:
            atomic_write_json(run_dir / "summary.json", summary)
            from nanogpt4.report import plot_training_curves

            plot_training_curves(run_dir)
        return summary  # the other ranks wait for rank 0's summary and plot before leaving the group
