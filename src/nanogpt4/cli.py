"""The nanogpt4 command: one subcommand per stage.

User mistakes raise :class:`UserError` and end as one ``error: ...`` line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from nanogpt4.errors import DiskFull, SaidByRankZero, TrainingDiverged, TrainingStopped, UserError, say_error


def _common(p: argparse.ArgumentParser, config_default: str | None = "tiny", trains: bool = True) -> None:
    """The config flags; `trains=False` for a command that writes no run (no --out, and no --seed to ignore)."""
    p.add_argument("--config", default=config_default,
                   help="YAML config file or preset name (tiny, base); default: %(default)s")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. training.max_steps=10")
    if trains:
        p.add_argument("--out", type=Path, default=None, help="run directory")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N]")
    if trains:
        p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")


def _load(args) -> object:
    from nanogpt4.config import load_config

    return load_config(args.config, _overrides_with_flags(args))


def _finish(args, summary: dict) -> int:
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


def _progress() -> bool:
    return sys.stderr.isatty()


def _stop_reason(e: BaseException) -> str:
    return "".join(map(str, e.args))


def _with_hint(e: BaseException, hint: str) -> BaseException:
    """The same stop (Ctrl-C, SIGTERM or a full disk), its message extended by how to continue; ``main`` prints
    it."""
    return type(e)(_stop_reason(e) + hint)


def cmd_prepare(args) -> int:
    from nanogpt4.data.prepare import prepare_data

    cfg = _load(args)
    kept_by = "--out" if args.out is not None else "data.dir" if cfg.data.dir else None
    meta = prepare_data(cfg, args.out, progress=_progress(), keep_other=kept_by)
    return _finish(args, meta)


def cmd_config(args) -> int:
    from nanogpt4.config import commented_yaml

    print(commented_yaml(_load(args)), end="")
    return 0


def override_keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].strip() for o in overrides]


def refuse_model_overrides(overrides: list[str], why: str, allowed: tuple[str, ...] = ("model.dropout",)) -> None:
    """Where the weights fix the architecture, a model.* override (``allowed`` aside) would be dropped."""
    fixed = [k for k in override_keys(overrides) if k.startswith("model.") and k not in allowed]
    if fixed:
        raise UserError(f"{why} ({' and '.join(allowed)} aside): drop {', '.join(fixed)}")


def cmd_pretrain(args) -> int:
    from nanogpt4.train.distributed import rank_zero_or_alone
    from nanogpt4.train.pretrain import pretrain, resume_config

    init_context = None
    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR, the run to continue")
        cfg = resume_config(args.out, _overrides_with_flags(args))
    else:
        from nanogpt4.config import load_config, validate

        cfg = load_config(args.config, _overrides_with_flags(args), check=False)
        if cfg.training.init_from:  # before the config's checks, which would judge the model.* it drops
            refuse_model_overrides(args.overrides, "training.init_from takes model.* from its checkpoint",
                                   allowed=("model.dropout", "model.max_seq_len"))
            if "model.max_seq_len" in override_keys(args.overrides):
                init_context = cfg.model.max_seq_len
        validate(cfg)
    out = args.out or Path("runs") / time.strftime("pretrain-%Y%m%d-%H%M%S")
    try:
        summary = pretrain(cfg, out, resume=args.resume, progress=_progress(), init_context=init_context)
    except (KeyboardInterrupt, TrainingStopped, DiskFull, OSError) as e:
        from nanogpt4.train.checkpoint import latest_checkpoint
        from nanogpt4.utils import disk_full

        if isinstance(e, OSError) and not disk_full(e, out):
            raise
        last = latest_checkpoint(Path(out))
        hint = (f"; {last} is kept, continue with: {_launcher()} pretrain --out {out} --resume" if last
                else "; no checkpoint was written yet")
        if isinstance(e, OSError):
            e = DiskFull(f"the disk is full ({e})")
        raise _with_hint(e, hint) from None
    if rank_zero_or_alone():  # under torchrun every rank returns the summary
        print(f"pretrain: val_loss {summary['val_loss']:.4f}, val_bpb {summary['val_bpb']:.4f}, "
              f"{summary['tok_per_s']:,.0f} tok/s, run in {out}")
    return _finish(args, summary)


def _stage_setup(args, name: str) -> tuple:
    """A training stage's (config, run directory), refused before any rank joins a group or writes. FSDP shards
    pretraining and SFT (one model, trained through its own forward); the other stages' extra models (a frozen
    reference, a value head, the LM head called outside the forward) train with DDP under torchrun."""
    cfg = _load(args)
    _refuse_fsdp(cfg, name)
    if getattr(args, "resume", False):
        return cfg, _stage_resume_out(args)
    return cfg, _stage_out(args, name)  # every rank reads the same directory: all refuse, before any collective


def _refuse_fsdp(cfg, name: str) -> None:
    """FSDP shards pretraining and SFT only (see ``_stage_setup``)."""
    from nanogpt4.train.distributed import launched_by_torchrun

    if name != "sft" and cfg.training.fsdp and launched_by_torchrun():
        raise UserError(f"training.fsdp=true shards `nanogpt4 pretrain` and `nanogpt4 sft`; `nanogpt4 {name}` "
                        f"trains data-parallel with DDP under torchrun: drop training.fsdp=true")


def _resume_dir(args) -> Path:
    """``--out``, which a ``--resume`` continues: it must exist."""
    if args.out is None:
        raise UserError("--resume needs --out RUN_DIR, the run to continue")
    if not args.out.is_dir():
        raise UserError(f"nothing to resume: '{args.out}' does not exist; drop --resume to start a run there")
    args.stage_dir = args.out  # what a stop (Ctrl-C, SIGTERM) says it kept
    return args.out


def _stage_resume_out(args) -> Path:
    """The run directory an RLHF stage's ``--resume`` continues: one with a checkpoint, not finished. The rest of
    the command is the one the run began with, so everything before training (a judge's labels, the reference's
    log-probs) comes out the same, and the trainer goes on from the checkpoint."""
    from nanogpt4.train.checkpoint import newest_checkpoint_under
    from nanogpt4.train.distributed import rank_zero_or_alone

    out = _resume_dir(args)
    if (out / "summary.json").exists():
        raise UserError(f"'{out}' has finished: nothing to resume (nothing was changed)")
    newest = newest_checkpoint_under(out)
    if newest is None:
        raise UserError(f"nothing to resume: '{out}' was stopped before its first checkpoint; delete it and run the "
                        f"command again without --resume")
    if rank_zero_or_alone():  # the stages train quietly: else nothing would say the run goes on, not over
        print(f"{args.command}: resuming {out} from {newest}")
    return out


def _stage_resume_setup(args, name: str) -> tuple:
    """``_stage_setup`` for ``--resume``: the stopped run's own config (plus overrides that keep its model) and
    its directory. The command it began with plus --resume works too: its --pretrained must be the run's own."""
    from nanogpt4.train.multimodal import STAGES_FILE
    from nanogpt4.train.pretrain import resume_config

    _resume_dir(args)
    if args.pretrained is not None:
        recorded = (json.loads((args.out / STAGES_FILE).read_text()).get("lm_pretrained")
                    if (args.out / STAGES_FILE).is_file() else None)
        if recorded is None or Path(recorded).resolve() != args.pretrained.resolve():
            raise UserError(f"'{args.out}' did not start from --pretrained '{args.pretrained}' (it started from "
                            f"{recorded or 'a new language model'}); --resume continues its own weights: drop "
                            f"--pretrained")
        args.pretrained = None
    cfg = resume_config(args.out, _overrides_with_flags(args))
    _refuse_fsdp(cfg, name)
    return cfg, args.out


def _warn_once(message: str) -> None:
    """A warning every torchrun rank would give alike (about the same input file), said by rank 0 alone."""
    from nanogpt4.train.distributed import rank_zero_or_alone

    if rank_zero_or_alone():
        print(message, file=sys.stderr)


def _warn_cut_pairs(tok, pairs: list, max_len: int) -> None:
    """A preference file's pairs as the reward model and DPO read them: prompt + chosen, prompt + rejected."""
    from nanogpt4.rlhf.data import Example, warn_cut

    warn_cut(tok, [Example(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)], max_len,
             "responses (chosen and rejected, each after its prompt)", _warn_once)


def _overrides_with_flags(args) -> list[str]:
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return overrides


def cmd_sample(args) -> int:
    import torch

    from nanogpt4.data.tokenizer import END
    from nanogpt4.rlhf.data import format_chat
    from nanogpt4.train.checkpoint import load_model
    from nanogpt4.utils import require_compiler, resolve_device

    if args.num_samples < 1 or args.max_new_tokens < 0 or not 0 <= args.temperature < float("inf"):
        raise UserError("--num-samples must be >= 1, --max-new-tokens and --temperature >= 0 (and finite)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 keeps every token), got {args.top_k}")
    device = resolve_device(args.device or "auto")
    if args.compile:
        require_compiler(device, "--compile")
    model, cfg, tok = load_model(args.run, device)  # a vision-language or reward model is refused by name
    if tok is None:
        raise UserError(f"'{args.run}' has no tokenizer.json; sample from a run made by `nanogpt4 pretrain`")
    if args.chat:  # encoded as SFT encodes a messages row's prompt: the template alone, no file-start EOT
        ids = tok.encode(format_chat([{"role": "user", "content": args.prompt},
                                      {"role": "assistant", "content": ""}]).prompt)
    else:
        ids = tok.raw_prompt_ids(args.prompt) if args.raw_prompt else tok.prompt_ids(args.prompt)
    L = cfg.model.max_seq_len
    if len(ids) > L:
        n_prompt = len(ids) - (0 if args.raw_prompt or args.chat else 1)  # not counting the file-start EOT
        print(f"warning: prompt is {n_prompt} tokens, longer than the context ({L}); keeping the last {L}",
              file=sys.stderr)
        ids = ids[-L:]
    g = torch.Generator(device=device).manual_seed(args.seed if args.seed is not None else 0)
    x = torch.tensor([ids] * args.num_samples, device=device)
    # a reply ends at <|end|> (one token in nanogpt4's BPE; text in GPT-2's, whose reply is cut there after)
    end_id = tok.token_id(END) if args.chat else None
    stream = TextStream(tok, ids, reply_only=args.chat) if args.num_samples == 1 else None  # printed as written
    out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, stop_tokens=[tok.eot_id] + ([end_id] if end_id is not None else []),
                         generator=g, pad_token_id=tok.pad_id, compile=args.compile, on_token=stream)
    rows = out.tolist()
    texts = [tok.continuation_text(ids, row) for row in rows]
    if args.chat:  # the reply alone: what follows the template's prompt, up to its <|end|>
        start = len(tok.decode(ids))
        texts = [text[start:] for text in texts]
    samples = [until_end(text) for text in texts] if args.chat else texts
    if stream is not None:
        stream.finish(samples[0])
    else:
        for i, s in enumerate(samples):
            print(f"--- sample {i}")
            print(s)
    # a sample shorter than asked for is the model ending its document, not a limit: say so, off stdout (a
    # chat reply ending at its <|end|> is the reply's end, and needs no note)
    ended = [new.index(tok.eot_id) if tok.eot_id in new else None for new in (row[len(ids):] for row in rows)]
    early = [n for n in ended if n is not None]
    if early and not args.chat:
        which = ("the sample" if len(rows) == 1 else f"all {len(rows)} samples" if len(early) == len(rows)
                 else f"{len(early)} of the {len(rows)} samples")
        after = f"{early[0]}" if len(set(early)) == 1 else f"{min(early)}-{max(early)}"
        print(f"note: {which} ended at the end-of-text token, where the model ends its text, after {after} of the "
              f"{args.max_new_tokens} new tokens asked for", file=sys.stderr)
    if args.chat:  # a model never tuned on chat rows does not end a turn: say why its reply ran on
        unended = [n for n, row, text in zip(ended, rows, texts, strict=True)  # GPT-2's BPE spells <|end|> out
                   if end_id not in row[len(ids):] and END not in text]
        if unended:
            which = "the reply" if len(rows) == 1 else f"{len(unended)} of the {len(rows)} replies"
            at_eot = sum(n is not None for n in unended)
            how = ("ended at the end-of-text token, not at <|end|>" if at_eot == len(unended)
                   else f"did not reach <|end|> in the {args.max_new_tokens} new tokens asked for" if at_eot == 0
                   else "did not end at <|end|> (some at the end-of-text token, some at the token limit)")
            print(f"note: {which} {how}; a model tuned on chat rows (`nanogpt4 sft`) ends its replies at <|end|>, "
                  f"so this one may not know the chat template", file=sys.stderr)
    return _finish(args, {"samples": samples, "ended_at_end_of_text": [n is not None for n in ended]})


def until_end(text: str) -> str:
    """A reply's text up to the <|end|> that closes it."""
    from nanogpt4.data.tokenizer import END

    return text.split(END, 1)[0]


class TextStream:
    """``generate``'s ``on_token`` for one row: prints the prompt, then each new token's text as soon as it
    decodes to whole characters (a byte-level token can end mid-character), so the sample's stdout is the same
    as printing it whole at the end. Only the tokens not yet shown are decoded, so a token costs the same at
    the 4,000th as at the first (decoding the whole row each time took 33 / 229 µs a token over 500 / 4,000)."""

    def __init__(self, tok, prompt_ids: list[int], reply_only: bool = False):
        self.tok, self.reply_only = tok, reply_only  # a chat reply is shown alone: the template's prompt is not
        # the user's text
        self.text = "" if reply_only else tok.continuation_text(list(prompt_ids), list(prompt_ids))
        self.pending: list[int] = []  # new tokens whose text may still end mid-character
        self.ended = False  # the end-of-text token came: the rest is padding
        self.shown = ""
        self._show()

    def __call__(self, next_tok) -> None:
        token = int(next_tok[0])
        if self.ended or token == self.tok.eot_id:
            self.ended = True
            return
        self.pending.append(token)
        piece = self.tok.decode(self.pending)
        if not piece.endswith("\ufffd"):
            self.text += piece
            self.pending = []
            self._show()

    def _show(self) -> None:
        text = self.text
        if self.reply_only:  # up to <|end|>, and text that could open it held back (GPT-2's BPE spells it out
            # over several tokens)
            from nanogpt4.data.tokenizer import END

            text = until_end(text)
            text = next((text[:-k] for k in range(len(END) - 1, 0, -1) if text.endswith(END[:k])), text)
        if len(text) > len(self.shown) and text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, text: str) -> None:
        """The rest of the sample (``text``, all of it) and the line's end."""
        print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text, flush=True)


def cmd_export_hf(args) -> int:
    from nanogpt4.model.hf_export import export_hf
    from nanogpt4.train.checkpoint import load_model

    model, _, tok = load_model(args.run)
    if tok is None:
        print(f"warning: '{args.run}' has no tokenizer.json: exporting the model alone (AutoTokenizer will not "
              f"load from it; put the tokenizer.json it was trained with beside its model.safetensors and export "
              f"again)", file=sys.stderr)
    out = export_hf(model, tok, args.out)
    print(f"exported to {out} (load with transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    return _finish(args, {"out": str(out)})


def cmd_eval(args) -> int:
    import math

    import numpy as np

    from nanogpt4.config import load_config
    from nanogpt4.data.prepare import default_data_dir, prepare_data
    from nanogpt4.train.checkpoint import load_model, refuse_other_models, resolve_stage_checkpoint
    from nanogpt4.train.pretrain import bits_per_byte, split_loss
    from nanogpt4.utils import resolve_device, resolve_dtype

    keys = override_keys(args.overrides)
    other = [k for k in keys if not k.startswith("data.") or k in ("data.tokenizer", "data.source")]
    if other:
        raise UserError(f"eval takes the model, its tokenizer and its settings from --run, and the text from --data; "
                        f"overrides may set data.* (data.val_fraction, data.text_field, ...): drop {', '.join(other)}")
    if args.max_tokens is not None and args.max_tokens < 1 or args.batch_size < 1:
        raise UserError("--max-tokens and --batch-size must be >= 1")
    # resolved once: a run still training may write a newer checkpoint while this one loads, and the weights,
    # config and tokenizer must all be the same checkpoint's
    ckpt = resolve_stage_checkpoint(args.run)
    refuse_other_models(args.run, ckpt)  # named as the user gave it
    model, saved, tok = load_model(ckpt)
    if tok is None:
        raise UserError(f"'{args.run}' has no tokenizer.json to encode the text with; put the one its weights were "
                        f"trained with beside its model.safetensors")
    source = args.data or saved.data.source
    # the run's own source: its val split is the text it never trained on; any other text is read whole
    split = args.split or ("val" if source == saved.data.source else "all")
    splits = ("train", "val") if split == "all" else (split,)
    # the run's own settings (its split of the same source is the held-out text it never trained on), its
    # tokenizer, and a data directory of their own (the run's data.dir holds its own shards)
    cfg = load_config(ckpt / "config.yaml", [f"data.source={source}", f"data.tokenizer={ckpt / 'tokenizer.json'}",
                                             "data.dir=null", *_overrides_with_flags(args)])
    data_dir = default_data_dir(cfg)
    meta = prepare_data(cfg, data_dir, progress=_progress(), log=lambda m: print(m, file=sys.stderr))
    device = resolve_device(cfg.device)
    parts = [np.memmap(data_dir / f"{s}.bin", dtype=np.dtype(meta["dtype"]), mode="r") for s in splits]
    read = None if args.max_tokens is None else args.max_tokens + 1  # under --max-tokens, copy no more than that
    tokens = parts[0] if len(parts) == 1 else np.concatenate([p[:read] for p in parts])[:read]  # documents end in EOT
    loss, scored = split_loss(model.to(device), tokens, cfg.model.max_seq_len, args.batch_size, device,
                              resolve_dtype(cfg.training.dtype, device), args.max_tokens, progress=_progress())
    bytes_per_token = sum(meta[f"{s}_bytes"] for s in splits) / sum(meta[f"{s}_tokens"] for s in splits)
    summary = {"loss": loss, "bpb": bits_per_byte(loss, bytes_per_token), "perplexity": math.exp(min(loss, 700.0)),
               "tokens": scored, "split": split, "source": source, "run": str(args.run)}
    of = "" if split == "all" else f"the {split} split of "
    print(f"eval: loss {loss:.4f} nats/token, {summary['bpb']:.4f} bits/byte, perplexity "
          f"{summary['perplexity']:.2f}, over {scored:,} tokens of {of}{source} ({args.run})")
    return _finish(args, summary)


def cmd_import_hf(args) -> int:
    from nanogpt4.config import load_config
    from nanogpt4.model.hf_import import import_hf

    refuse_model_overrides(args.overrides, "import-hf takes model.* from the imported model's config")
    cfg = load_config(args.config, args.overrides)
    summary = import_hf(args.model, cfg, args.out)
    print(f"imported {summary['architecture']} ({summary['params'] / 1e6:.2f}M parameters, "
          f"{summary['layout']}) to {summary['out']}; use it: nanogpt4 sample --run {summary['out']}, "
          f"nanogpt4 sft --pretrained {summary['out']} --data FILE")
    if not summary["tokenizer"]:
        print(f"warning: '{args.model}' has no tokenizer transformers can load: the checkpoint has none; put the "
              f"tokenizer.json it was trained with beside its model.safetensors", file=sys.stderr)
    return _finish(args, summary)


def cmd_pipeline(args) -> int:
    from nanogpt4.pipeline import run_pipeline

    try:
        summary = run_pipeline(args.config, _overrides_with_flags(args), args.out or Path("runs/pipeline"),
                               progress=_progress(), scale=args.scale, minutes=args.minutes)
    except (KeyboardInterrupt, TrainingStopped, DiskFull) as e:
        raise _with_hint(e, "; finished stages are kept and an interrupted one resumes from its last checkpoint: "
                            "run the same command again to continue") from None
    return _finish(args, summary)


def cmd_scaling(args) -> int:
    from nanogpt4.scaling import cli as scaling_cli

    run = {"plan": lambda: scaling_cli.cmd_plan(args, _load(args)), "fit": lambda: scaling_cli.cmd_fit(args),
           "sweep": lambda: scaling_cli.cmd_sweep(args, _load(args)),
           "predict": lambda: scaling_cli.cmd_predict(args, _load(args))}
    try:
        return _finish(args, run[args.scaling_command]())
    except (KeyboardInterrupt, TrainingStopped, DiskFull) as e:
        if args.scaling_command not in ("sweep", "predict"):
            raise
        raise _with_hint(e, "; finished runs are kept: run the same command again to continue") from None


def cmd_rlhf(args) -> int:
    """Also under ``torchrun``: every stage data-parallel, rank 0 labelling, evaluating and writing."""
    from nanogpt4.rlhf.run import run_rlhf
    from nanogpt4.train.distributed import process_group
    from nanogpt4.utils import resolve_device

    cfg, out = _stage_setup(args, "rlhf")
    with process_group(resolve_device(cfg.device)) as (info, device):
        summary = run_rlhf(cfg, args.pretrained, out, info=info, device=device, resume=args.resume)
    return 0 if summary is None else _finish(args, summary)


def _stage_out(args, name: str) -> Path:
    """A training stage's run directory: ``--out`` (or a dated one), which must be new or empty. An SFT run given
    its pretrained run's directory used to overwrite that run's summary and config and mix its checkpoints in."""
    from nanogpt4.utils import out_dir_entries, some_names

    out = args.out or Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    held = out_dir_entries(out)
    if held:
        raise UserError(f"--out '{out}' already holds {some_names(held)}: give a new or empty directory, or delete "
                        f"it to train this stage again (nothing in it was changed)")
    args.stage_dir = out  # what a stop (Ctrl-C, SIGTERM) says it kept
    return out


def _launcher() -> str:
    """What starts a stopped command again: ``nanogpt4``, or under torchrun a launch of as many processes (PPO's
    ranks each draw their own rollouts, so another number of them would not continue the run exactly)."""
    from nanogpt4.train.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return "nanogpt4"
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nodes = "" if local == world else f"--nnodes={world // local} (and your rendezvous flags) "
    return f"torchrun {nodes}--nproc_per_node={local} -m nanogpt4"


def _stage_stop_hint(args) -> str:
    """What a stopped stage kept, and how to go on (``--resume``) or, for a command without one, train it again."""
    from nanogpt4.train.checkpoint import newest_checkpoint_under

    out = getattr(args, "stage_dir", None)
    if out is None or not Path(out).is_dir():
        return ""
    kept = newest_checkpoint_under(out)
    what = f"{kept} is kept, a partly trained model" if kept else "no checkpoint was written"
    if args.command == "multimodal" and kept:
        return f"; {what}; continue with: {_launcher()} multimodal --out {out} --resume"
    if hasattr(args, "resume") and kept:  # the command it began with, which rebuilds what the training read
        import shlex

        again = args.argv + ([] if "--resume" in args.argv else ["--resume"])
        return f"; {what}; continue with: {_launcher()} {shlex.join(again)}"
    return f"; {what}; this stage does not resume: to train it again, delete {out} or give another --out"


def cmd_sft(args) -> int:
    """Also under ``torchrun``: the ranks split every batch; rank 0 alone evaluates and writes."""
    from nanogpt4.rlhf.data import load_sft, warn_cut
    from nanogpt4.rlhf.judges import load_judge
    from nanogpt4.rlhf.run import evaluate_policies, load_policy, sft_stage
    from nanogpt4.train.distributed import on_rank_zero, process_group
    from nanogpt4.utils import atomic_write_json, resolve_device

    t0 = time.time()
    cfg, out = _stage_setup(args, "sft")
    examples = load_sft(args.data) if args.data else None
    with process_group(resolve_device(cfg.device)) as (info, device):
        policy, cfg, tok = load_policy(cfg, args.pretrained, device, generates=args.data is None)
        if examples:  # SFT sequences hold max_seq_len + 1 tokens: inputs and their next-token targets
            warn_cut(tok, examples, cfg.model.max_seq_len + 1, "examples", _warn_once)
        judge = load_judge(cfg.rlhf.judge) if examples is None else None  # offline tasks: it measures what SFT bought
        before: dict = {}
        if judge is not None:  # on rank 0, its error sent to the others (they would wait for it in DDP's setup)
            on_rank_zero(info, device, lambda: before.update(
                evaluate_policies(cfg, {"pretrained": policy}, tok, judge, device)[0]))
        result = sft_stage(cfg, policy, tok, out, device, examples, info=info, resume=args.resume)
        if not info.is_main:
            return 0
        summary = {"sft_train_loss": result["final_train_loss"], "steps": result["steps"],
                   "examples": len(examples) if examples else cfg.rlhf.sft_examples, "processes": info.world_size,
                   "device": str(device)}
        if judge is not None:
            summary.update(before)
            summary.update(evaluate_policies(cfg, {"sft": policy}, tok, judge, device)[0])
        summary["wall_s"] = time.time() - t0
        atomic_write_json(out / "summary.json", summary)
        print(f"sft: done, checkpoint in {out / 'checkpoints'}")
        return _finish(args, summary)


def cmd_reward(args) -> int:
    """Also under ``torchrun``: rank 0 labels the pairs (and sends them to the others), the ranks split every
    batch, rank 0 alone centres, evaluates and writes."""
    from nanogpt4.rlhf.data import load_preferences
    from nanogpt4.rlhf.judges import load_judge
    from nanogpt4.rlhf.run import label_on_rank_zero, load_policy, reward_stage
    from nanogpt4.train.distributed import process_group
    from nanogpt4.utils import atomic_write_json, resolve_device

    t0 = time.time()
    cfg, out = _stage_setup(args, "reward")
    pairs = load_preferences(args.data, warn=_warn_once) if args.data else None
    with process_group(resolve_device(cfg.device)) as (info, device):
        sft, cfg, tok = load_policy(cfg, args.sft, device, generates=args.data is None)
        if pairs is not None:
            _warn_cut_pairs(tok, pairs, cfg.model.max_seq_len)
        centre = None  # (prompts, the SFT policy's first sample of each), to centre the rewards on
        if pairs is None:  # the judge labels the SFT policy's samples: once, on rank 0, which sends them on
            pairs, centre = label_on_rank_zero(cfg, sft, tok, load_judge(cfg.rlhf.judge), out, device, info)
        _, stats = reward_stage(cfg, sft, tok, pairs, out, device, centre, info=info, resume=args.resume,
                                held_out_seed=cfg.seed if args.data else None)  # your file may be sorted
        if not info.is_main:
            return 0
        summary = {**stats, "processes": info.world_size, "device": str(device), "wall_s": time.time() - t0}
        atomic_write_json(out / "summary.json", summary)
        return _finish(args, summary)


def cmd_ppo(args) -> int:
    """Also under ``torchrun``: ranks share each rollout batch and sum their gradients (see ``PPOTrainer``)."""
    import copy

    from nanogpt4.rlhf import RewardModel
    from nanogpt4.rlhf.data import load_prompts, warn_long_prompts
    from nanogpt4.rlhf.judges import load_judge
    from nanogpt4.rlhf.run import check_same_trunk, evaluate_policies, load_policy, ppo_kl, ppo_stage
    from nanogpt4.train.distributed import DistInfo, process_group
    from nanogpt4.utils import atomic_write_json, resolve_device

    t0 = time.time()
    cfg, out = _stage_setup(args, "ppo")
    train_prompts, eval_prompts = load_prompts(args.prompts) if args.prompts else (None, None)
    with process_group(resolve_device(cfg.device)) as (info, device):
        policy, cfg, tok = load_policy(cfg, args.sft, device)
        if train_prompts:
            warn_long_prompts(tok, train_prompts + eval_prompts, cfg.model.max_seq_len - cfg.rlhf.max_new_tokens,
                              _warn_once)
        rm = RewardModel.load_pretrained(args.reward, device)
        check_same_trunk(rm.transformer, policy, f"the reward model '{args.reward}'",
                         f"the SFT policy '{args.sft}'", f"train one from it with `nanogpt4 reward --sft {args.sft}`")
        judge = load_judge(cfg.rlhf.judge)
        sft = copy.deepcopy(policy).eval()
        log = print if info.is_main else (lambda _m: None)
        ppo, _ = ppo_stage(cfg, policy.train(), sft, rm, tok, judge, out, device, log=log, info=info,
                           prompts=train_prompts, resume=args.resume)
        ppo.info = DistInfo()  # training is over: rank 0 evaluates alone, without collectives
        if not info.is_main:
            return 0
        results, prompts, _ = evaluate_policies(cfg, {"sft": sft, "ppo": policy}, tok, judge, device,
                                                prompts=eval_prompts)
        summary = {**results, "kl_ppo": ppo_kl(ppo, prompts), "processes": info.world_size, "device": str(device),
                   "wall_s": time.time() - t0}
        atomic_write_json(out / "summary.json", summary)
        return _finish(args, summary)


def cmd_dpo(args) -> int:
    import copy

    from nanogpt4.rlhf.data import load_preferences
    from nanogpt4.rlhf.dpo import train_dpo
    from nanogpt4.rlhf.judges import load_judge
    from nanogpt4.rlhf.run import evaluate_policies, held_out_prompts, load_policy, save_policy
    from nanogpt4.train.distributed import process_group
    from nanogpt4.utils import atomic_write_json, resolve_device

    t0 = time.time()
    cfg, out = _stage_setup(args, "dpo")
    pairs = load_preferences(args.data, warn=_warn_once)
    with process_group(resolve_device(cfg.device)) as (info, device):
        policy, cfg, tok = load_policy(cfg, args.sft, device, generates=not args.no_eval)
        _warn_cut_pairs(tok, pairs, cfg.model.max_seq_len)
        judge, prompts = None, None
        if not args.no_eval:  # before training: a judge or corpus the evaluation cannot use is refused now
            try:
                judge, prompts = load_judge(cfg.rlhf.judge), held_out_prompts(cfg)
            except UserError as e:
                raise UserError(f"{e}; or pass --no-eval to skip the held-out judge evaluation") from None
        sft = copy.deepcopy(policy).eval()
        result = train_dpo(cfg, policy.train().requires_grad_(True), tok, pairs, out, device, cfg.rlhf.dpo_steps,
                           info=info, resume=args.resume)
        if not info.is_main:
            return 0
        save_policy(out, cfg.rlhf.dpo_steps, policy, cfg, tok)  # first: whatever the evaluation meets, it is kept
        summary = {"dpo_train_loss": result["final_train_loss"], "preference_pairs": len(pairs),
                   "processes": info.world_size, "device": str(device)}
        if judge is not None:
            summary.update(evaluate_policies(cfg, {"sft": sft, "dpo": policy}, tok, judge, device,
                                             prompts=prompts)[0])
        summary["wall_s"] = time.time() - t0
        atomic_write_json(out / "summary.json", summary)
        return _finish(args, summary)


def cmd_multimodal(args) -> int:
    """Also under ``torchrun``: the ranks split every batch; rank 0 alone evaluates and writes."""
    from nanogpt4.train.distributed import process_group
    from nanogpt4.train.multimodal import run_multimodal
    from nanogpt4.utils import resolve_device

    if args.resume:
        cfg, out = _stage_resume_setup(args, "multimodal")
    else:
        if args.pretrained is not None and not args.pretrained.exists():
            raise UserError(f"--pretrained '{args.pretrained}' does not exist; pass a `nanogpt4 pretrain` run "
                            f"directory or leave it out to train the language model from scratch")
        cfg, out = _stage_setup(args, "multimodal")
    with process_group(resolve_device(cfg.device)) as (info, device):
        summary = run_multimodal(cfg, args.pretrained, out, progress=_progress(), info=info, device=device,
                                 resume=args.resume)
    if not info.is_main:
        return 0
    accuracy = ", ".join(f"{name} {summary[key]:.3f}" for name, key in (
        ("your data", "custom_accuracy"), ("scenes", "scenes_accuracy"), ("digits", "digits_accuracy"),
        ("blank-image control", "text_only_accuracy")) if summary.get(key) is not None)
    print(f"multimodal: accuracy {accuracy}; report: {out / 'report.md'}; ask it: nanogpt4 ask --run {out} "
          f"--image FILE")
    return _finish(args, summary)


def cmd_ask(args) -> int:
    from nanogpt4.data.vision import load_image
    from nanogpt4.train.multimodal import greedy_answers, load_multimodal
    from nanogpt4.utils import resolve_device

    if args.max_new_tokens < 1 or not args.question.strip():
        raise UserError("--question must not be empty and --max-new-tokens must be >= 1")
    model, codec = load_multimodal(args.run, resolve_device(args.device or "auto"))
    n_prompt, L = len(codec.prompt(args.question)), model.cfg.max_seq_len
    if n_prompt + args.max_new_tokens > L:  # past the context the window would slide off the image tokens
        raise UserError(f"the question with its {model.image_tokens} image tokens is {n_prompt} tokens; with "
                        f"--max-new-tokens {args.max_new_tokens} that passes the model's context ({L}): shorten "
                        f"the question or lower --max-new-tokens")
    image = load_image(args.image, model.image_size, model.channels, "--image", fix="check the path")
    answer = greedy_answers(model, codec, [args.question], image[None], args.max_new_tokens)[0]
    print(answer)
    if not answer.strip():  # else a blank line, which reads like a failure to run
        print("ask: the answer is empty (the model ended its turn at once); a model that trained longer answers",
              file=sys.stderr)
    return _finish(args, {"question": args.question, "answer": answer, "image": str(args.image)})


class _PrintVersions(argparse.Action):
    """``--version``: this package's, torch's and Python's versions. torch's own ``__version__`` names its
    build (``+cpu``, ``+cu130``), which its installed metadata does not; it is imported only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print nanogpt4's, torch's and Python's versions")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        import torch

        try:
            ours = version("nanogpt4")
        except PackageNotFoundError:  # run from a source tree that was not installed
            ours = "(not installed)"
        cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
        print(f"nanogpt4 {ours} (torch {torch.__version__}{cuda}, Python {sys.version.split()[0]})")
        parser.exit()


PRETRAIN_EXAMPLES = """examples:
  nanogpt4 pretrain --out runs/tiny training.max_steps=300              # stdlib, the tiny model
  nanogpt4 pretrain --out runs/mine data.source=text:notes.txt          # your own text (also jsonl:, hf:)
  nanogpt4 pretrain --out runs/tiny --resume training.max_steps=600     # go on, to a later step
  nanogpt4 pretrain --out runs/ft training.init_from=runs/gpt2 model.max_seq_len=256   # from a checkpoint
  torchrun --nproc_per_node=2 -m nanogpt4 pretrain --out runs/ddp        # DDP (training.fsdp=true: FSDP2)
"""


class _Parser(argparse.ArgumentParser):
    """argparse's errors as the project's: one line naming the problem and where the flags are listed, exit 2
    (argparse printed its whole usage block above the line). Subcommands' parsers are made of this class too."""

    def error(self, message: str):
        usage_error(self.prog, message)


def usage_error(prog: str, message: str):
    """A command line argparse cannot read: one line, exit 2."""
    print(f"{prog}: error: {message}; see `{prog} --help`", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanogpt4", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_PrintVersions)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print a config (preset or file + overrides) as YAML, each key explained",
                       description="Print the config a command would run with, as a YAML file that --config reads "
                                   "back: every key, its value and what it means. E.g. `nanogpt4 config --config "
                                   "tiny model.pos_embedding=rope > my.yaml`, edit, then `nanogpt4 pretrain --config "
                                   "my.yaml`.")
    p.add_argument("--config", default="tiny",
                   help="YAML config file or preset name (tiny, base); default: %(default)s")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. training.max_steps=10")
    p.set_defaults(func=cmd_config, device=None)

    p = sub.add_parser("prepare", help="read a data source, train the tokenizer, write token shards")
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="next-token pretraining (torchrun-aware)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PRETRAIN_EXAMPLES)
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="generate text from a run or checkpoint")
    p.add_argument("--run", required=True, type=Path, help="run directory or checkpoints/step_N directory")
    p.add_argument("--prompt", default="", help="text to continue, read as the start of a file (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all (default: 50)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the likeliest tokens holding this much probability, in (0, 1] (default: off)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples, decoded as one batch (default: 1)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: auto, a GPU where there is one)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: 0, so the same command gives the same text)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: 20-30 s to compile per shape, then 2-3.5x faster per token")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--raw-prompt", action="store_true",
                      help="do not start the prompt as a new file (<|endoftext|> first): for policies tuned on "
                           "mid-file prompts, as `nanogpt4 rlhf`'s code prompts are")
    form.add_argument("--chat", action="store_true",
                      help="for a model fine-tuned on {\"messages\": [...]} rows: the prompt is a user turn of "
                           "their chat template (<|user|>PROMPT<|end|><|assistant|>), the sample the assistant's "
                           "reply, up to its <|end|>")
    p.add_argument("--json", action="store_true", help="print the samples as JSON on the last stdout line")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face transformers model directory")
    p.add_argument("--run", required=True, type=Path, help="a text model's run directory or checkpoints/step_N")
    p.add_argument("--out", required=True, type=Path,
                   help="directory to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("eval", help="a model's loss and bits per byte on a data source, every token read once")
    p.add_argument("--run", required=True, type=Path, help="a text model's run directory or checkpoints/step_N")
    p.add_argument("--data", default=None,
                   help="a data.source (text:PATH, jsonl:PATH, stdlib, shakespeare, hf:NAME); default: the run's, "
                        "whose val split it never trained on")
    p.add_argument("--split", default=None, choices=["val", "train", "all"],
                   help="which of the source's splits to score (all: both, the whole text); default: val for the "
                        "run's own source, all for another --data")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.* settings, e.g. data.val_fraction=0.5 or data.text_field=body")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("import-hf", help="write a transformers GPT-2 or Llama model as a nanogpt4 checkpoint")
    p.add_argument("--model", required=True,
                   help="a transformers model directory, or a model's name already in the Hugging Face cache "
                        "(nothing is downloaded)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write (new or empty)")
    p.add_argument("--config", default="tiny",
                   help="config for the stages that read the checkpoint (training, rlhf, ...); model.* comes from "
                        "the imported model; default: %(default)s")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.dropout=0.1")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("rlhf", help="SFT -> judge-labelled preferences -> reward model -> PPO, DPO, best-of-n")
    _common(p)
    p.add_argument("--pretrained", type=Path, required=True, help="a `nanogpt4 pretrain` run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out: the command it began with, plus --resume")
    p.set_defaults(func=cmd_rlhf)

    p = sub.add_parser("sft", help="supervised fine-tuning (loss on response tokens only)")
    _common(p)
    p.add_argument("--pretrained", type=Path, required=True, help="a `nanogpt4 pretrain` run directory")
    p.add_argument("--data", type=Path, default=None,
                   help='jsonl of {"prompt","response"} or {"messages":[...]} (default: the offline tasks)')
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out: the command it began with, plus --resume")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("reward", help="Bradley-Terry reward model (judge-labelled pairs unless --data)")
    _common(p)
    p.add_argument("--sft", type=Path, required=True, help="a `nanogpt4 sft` run directory")
    p.add_argument("--data", type=Path, default=None, help='jsonl of {"prompt","chosen","rejected"}')
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out: the command it began with, plus --resume")
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("ppo", help="PPO of an SFT policy against a trained reward model")
    _common(p)
    p.add_argument("--sft", type=Path, required=True, help="a `nanogpt4 sft` run directory")
    p.add_argument("--reward", type=Path, required=True, help="a `nanogpt4 reward` run directory")
    p.add_argument("--prompts", type=Path, default=None,
                   help='jsonl whose rows\' "prompt" (or chat "messages") are rolled out, every 10th held out for '
                        'the evaluation; a preference or SFT file works as it is (default: the tasks of the run\'s '
                        'corpus)')
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out: the command it began with, plus --resume")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("dpo", help="direct preference optimisation against the frozen SFT model")
    _common(p)
    p.add_argument("--sft", type=Path, required=True, help="a `nanogpt4 sft` run directory")
    p.add_argument("--data", type=Path, required=True,
                   help='jsonl of {"prompt","chosen","rejected"} (`nanogpt4 reward` writes OUT/preferences.jsonl)')
    p.add_argument("--no-eval", action="store_true", help="skip the held-out judge evaluation")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out: the command it began with, plus --resume")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("multimodal", help="train and evaluate the vision-language model (LLaVA recipe)")
    _common(p)
    p.add_argument("--pretrained", type=Path, default=None,
                   help="start the language model from a `nanogpt4 pretrain` run (default: from scratch)")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out from its latest checkpoint (its own config and weights)")
    p.set_defaults(func=cmd_multimodal)

    p = sub.add_parser("ask", help="ask a trained vision-language model about an image (greedy answer)")
    p.add_argument("--run", required=True, type=Path, help="a `nanogpt4 multimodal` run or one of its checkpoints")
    p.add_argument("--image", required=True, type=Path, help="any image Pillow reads; resized to the model's input")
    p.add_argument("--question", default="describe the image.",
                   help="default: %(default)r (the captioning prompt the model was trained on). The offline data "
                        "(scenes+digits: 1-3 coloured shapes on black, handwritten digits) asks in these forms, "
                        "which is what such a model understands: 'what colour is the circle?', 'what shape is the "
                        "red object?', 'how many objects are there?', 'is there a blue square?', 'is the red "
                        "circle left of the blue square?' (or above), 'what digit is this?', 'is the digit even?'")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit (default: 24)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON on the last stdout line")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("scaling", help="accounting, law fits and compute-optimal planning")
    ssub = p.add_subparsers(dest="scaling_command", required=True, metavar="SUBCOMMAND")
    sp = ssub.add_parser("plan", help="exact parameters, FLOPs, training memory, KV cache; compute-optimal size")
    _common(sp, trains=False)
    sp.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: from the config)")
    sp.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    sp.add_argument("--device-type", default="cuda", choices=["cpu", "cuda"], help="attention path to account for")
    sp.add_argument("--budget-flops", type=float, default=None, help="plan a compute-optimal model for this budget")
    sp.add_argument("--minutes", type=float, default=None, help="budget as minutes of this device")
    sp.add_argument("--mfu", type=float, default=None, help="utilisation assumed with --minutes (default: 0.4)")
    sp.set_defaults(func=cmd_scaling)
    sp = ssub.add_parser("fit", help="fit L(C) = a*C^b + c (and Chinchilla's L(N, D)) to a sweep")
    sp.add_argument("--sweep", type=Path, required=True,
                    help="a sweep's directory or its sweep.jsonl, or any JSONL of pretrain summaries (one per line)")
    sp.add_argument("--target-flops", type=float, default=None, help="predict the loss at this compute")
    sp.add_argument("--bootstrap", type=int, default=200,
                    help="resamples for the 95%% intervals (default: 200; 0: no intervals)")
    sp.add_argument("--out", type=Path, default=None, help="directory for scaling_fit.png")
    sp.add_argument("--json", action="store_true", help="print the fit as JSON on the last stdout line")
    sp.set_defaults(func=cmd_scaling)

    sp = ssub.add_parser("sweep", help="pretrain a grid of widths x compute budgets into sweep.jsonl (resumable)")
    _common(sp)
    sp.add_argument("--dims", default="32,48,64,96,128", help="model widths (multiples of 8)")
    sp.add_argument("--budgets", default="1e10,3e10,1e11,3e11,1e12", help="training FLOPs per run")
    sp.add_argument("--tokens-per-param", type=float, default=None,
                    help="a recipe-matched family instead of a grid: each width trains on this many tokens per "
                         "parameter (--budgets is then unused)")
    sp.add_argument("--eval-iters", type=int, default=40,
                    help="validation batches for each run's final loss (default: 40)")
    sp.set_defaults(func=cmd_scaling)
    sp = ssub.add_parser("predict", help="register a prediction from a sweep, run the target, check it")
    _common(sp)
    sp.add_argument("--sweep", type=Path, required=True, help="the sweep's directory or its sweep.jsonl")
    sp.add_argument("--target-flops", type=float, default=None,
                    help="the target's compute (for a --tokens-per-param family it follows from --target-dim)")
    sp.add_argument("--target-dim", type=int, default=None, help="default: the width the fitted law prefers")
    sp.add_argument("--bootstrap", type=int, default=500,
                    help="resamples for the prediction's 95%% interval (default: 500, at least 20)")
    sp.add_argument("--record", type=Path, default=None,
                    help="also write the result here, e.g. benchmarks/results/scaling_predict.json")
    sp.set_defaults(func=cmd_scaling)

    p = sub.add_parser("pipeline", help="the main job: every stage on the offline default, one report")
    _common(p)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--scale", type=float, default=None,
                        help="shorten training: RLHF and multimodal train this fraction of their steps, pretraining "
                             "its cube root (0 < scale <= 1; 1 is the full recipe; evaluations keep their size)")
    budget.add_argument("--minutes", type=float, default=None,
                        help="pick the largest scale that fits this many minutes on this machine, timed with one "
                             "training step of each model first (default: 13.5, so that the README's first command, "
                             "install included, ends within 15)")
    p.set_defaults(func=cmd_pipeline)
    return parser


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    """``build_parser().parse_args``, but ``KEY=VALUE`` overrides may also come after the flags (argparse takes
    one run of positionals only: ``pretrain --out r training.max_steps=30`` would be refused). Anything else it
    does not know ends as one line naming it, exit 2; a ``--flag`` spelling of a config key names the override."""
    args, extra = build_parser().parse_known_args(argv)
    if hasattr(args, "overrides"):
        later = [a for a in extra if "=" in a and not a.startswith("-")]
        args.overrides += later
        extra = [a for a in extra if a not in later]
    if extra:
        prog = " ".join(["nanogpt4", *(c for c in (args.command, getattr(args, "scaling_command", None)) if c)])
        usage_error(prog, f"unrecognized arguments: {' '.join(extra)}{_flag_hint(extra, args)}")
    return args


def _flag_hint(extra: list[str], args: argparse.Namespace) -> str:
    """``--max-steps`` or ``--source`` for a config key: name its ``KEY=VALUE`` override."""
    if not hasattr(args, "overrides"):
        return ""
    from omegaconf import OmegaConf

    from nanogpt4.config import Config, _all_keys

    keys = _all_keys(OmegaConf.structured(Config))
    for flag in (f for f in extra if f.startswith("--")):
        leaf = flag[2:].split("=", 1)[0].replace("-", "_")
        matches = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
        if matches:
            return f" (config keys are set as KEY=VALUE, e.g. {matches[0]}=...)"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_cli(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a stopped stage's --resume line repeats
    code = _run(args)
    if "RANK" in os.environ:  # launched by torchrun: a rank whose process group could not be freed ends here
        from nanogpt4.train.distributed import leave_rank

        leave_rank(code)
    return code


# the commands that train data-parallel under torchrun; any other would run whole on every rank, into the same files
TORCHRUN_COMMANDS = ("pretrain", "sft", "reward", "ppo", "dpo", "rlhf", "multimodal")


def torchrun_refusal(command: str) -> str | None:
    """Why ``command`` must not run under torchrun's several ranks, or None where it may."""
    from nanogpt4.train.distributed import launched_by_torchrun

    if not launched_by_torchrun() or command in TORCHRUN_COMMANDS:
        return None
    return (f"`nanogpt4 {command}` runs in one process: under torchrun each of the {os.environ['WORLD_SIZE']} ranks "
            f"would run all of it, into the same files; run it without torchrun (" +
            ", ".join(TORCHRUN_COMMANDS[:-1]) + f" and {TORCHRUN_COMMANDS[-1]} train data-parallel under it)")


def _say_once(error: str) -> int:
    """An error every torchrun rank met alike, before joining a group: rank 0 says it, the others leave quietly."""
    from nanogpt4.train.distributed import leave_after_rank_zero, rank_zero_or_alone

    if rank_zero_or_alone():
        say_error(error)
    else:
        leave_after_rank_zero()
    return 2


def _run(args: argparse.Namespace) -> int:
    from nanogpt4.utils import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()
    refusal = torchrun_refusal(args.command)
    if refusal is not None:
        return _say_once(refusal)
    try:
        return args.func(args)
    except SaidByRankZero:  # rank 0 said it, and the ranks met after that
        return 2
    except UserError as e:
        from nanogpt4.train.distributed import said_by_every_rank

        if said_by_every_rank() or isinstance(e, TrainingDiverged):  # the latter from all-reduced numbers
            return _say_once(str(e))
        say_error(str(e))
        return 2
    except OSError as e:
        from nanogpt4.utils import disk_full

        if not disk_full(e, getattr(args, "out", None) or Path.cwd()):
            raise
        # every write goes through a temp file, so what a full disk stopped was never half-written
        say_error(f"the disk is full ({e}); free space, or write elsewhere with --out")
        return 2
    except (KeyboardInterrupt, TrainingStopped) as e:  # Ctrl-C, or SIGTERM (a scheduler's preemption)
        from nanogpt4.train.distributed import rank_zero_or_alone

        ctrl_c = isinstance(e, KeyboardInterrupt)
        if rank_zero_or_alone():  # under torchrun every rank stops alike; rank 0 wrote the checkpoint
            said = "interrupted" + _stop_reason(e) if ctrl_c else f"stopped: {e}"
            print(said + _stage_stop_hint(args), file=sys.stderr)
        return 130 if ctrl_c else 143  # 128 + the signal's number, as if it had ended us


if __name__ == "__main__":
    sys.exit(main())
