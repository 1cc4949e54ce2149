"""``nanogpt4 pipeline``: every stage on the offline default, one report.

Stages: prepare (stdlib) -> pretrain (tiny) -> sample -> RLHF (SFT, reward model, PPO, DPO) -> multimodal
(the pretrained LM given eyes: scenes + digits VQA) -> report (with the pretrained model's scaling accounting).
Each stage writes its own run directory under ``OUT/``; a stage that already finished with the same settings
is reused, an interrupted pretraining is resumed. ``--scale``/``--minutes`` shorten every stage's training
(:mod:`nanogpt4.plan`).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nanogpt4.config import changes_text, load_config, settings_changes
from nanogpt4.data.prepare import check_tokenizer_settings
from nanogpt4.errors import UserError
from nanogpt4.plan import (
    DEFAULT_MINUTES,
    Plan,
    evaluation_reserve_s,
    multimodal_scale,
    pipeline_plan,
    retime,
    save_plan,
    scaled,
    shortened_pretraining,
    stage_scale,
)
from nanogpt4.report import summary_table, write_pipeline_report
from nanogpt4.rlhf.judges import valid_python_lines
from nanogpt4.rlhf.run import check_tasks
from nanogpt4.train.checkpoint import latest_checkpoint, load_model, newest_checkpoint_under
from nanogpt4.train.multimodal import VQASource, per_type_table
from nanogpt4.utils import out_dir_entries, some_names

SAMPLE_PROMPTS = ["def", "class", "import os\n", "    for i in range("]  # a Python corpus's openings


def is_python_source(source: str) -> bool:
    """Whether ``data.source`` is Python code: the report then samples from Python openings and asks CPython's
    parser about them; any other text is sampled from the start of a document and shown as it is."""
    return source == "stdlib" or source.startswith("stdlib:") or (source.startswith("text:")
                                                                   and source.endswith(".py"))


def _check_same_settings(run_dir: Path, cfg, sections: tuple[str, ...], ignore: tuple[str, ...] = ()) -> None:
    """A stage is reused or resumed only with the settings it was trained with: reusing a 1000-step run for a
    command that now asks for 300 steps (or another scale) would report numbers that command did not produce."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    changed = settings_changes(OmegaConf.load(path), cfg, sections, ignore)
    if changed:
        raise UserError(f"{run_dir} was trained with other settings ({changes_text(changed)}); give the "
                        f"--scale/--minutes it ran with (no flag is --minutes {DEFAULT_MINUTES:g}, the full recipe "
                        f"--scale 1), pass a new --out, or delete {run_dir} to train that stage again")


def _pretrain_stage(cfg, run_dir: Path, progress: bool, log) -> dict:
    from nanogpt4.train.pretrain import pretrain, resume_config

    summary_path = run_dir / "summary.json"
    _check_same_settings(run_dir, cfg, ("model", "data", "training", "seed"))
    if summary_path.exists():
        log(f"pretrain: reusing finished run {run_dir}")
        return json.loads(summary_path.read_text())
    if latest_checkpoint(run_dir) is not None:
        log(f"pretrain: resuming interrupted run {run_dir}")
        return pretrain(resume_config(run_dir, []), run_dir, resume=True, progress=progress, log=log)
    if run_dir.exists():  # stopped before its first checkpoint: nothing to resume, and it is in the way
        log(f"pretrain: starting {run_dir} again (it was stopped before its first checkpoint)")
        shutil.rmtree(run_dir)
    return pretrain(cfg, run_dir, progress=progress, log=log)


def _samples(run_dir: Path, python: bool, n_tokens: int = 120) -> list[tuple[str, str]]:
    model, _, tok = load_model(run_dir)
    out = []
    for i, prompt in enumerate(SAMPLE_PROMPTS if python else [""] * len(SAMPLE_PROMPTS)):
        ids = tok.prompt_ids(prompt)
        g = torch.Generator().manual_seed(i)
        row = model.generate(torch.tensor([ids]), n_tokens, temperature=0.8, top_k=50, generator=g,
                             stop_tokens=[tok.eot_id])[0].tolist()
        out.append((prompt, tok.continuation_text(ids, row)))
    return out


def _finished_or_fresh(name: str, run_dir: Path, cfg, log) -> dict | None:
    """A finished stage's summary (reused), else None after clearing an interrupted run (one stopped before its
    first checkpoint: nothing in it to resume)."""
    if (run_dir / "summary.json").exists():
        _check_same_settings(run_dir, cfg, (name, "seed"), ignore=("multimodal.image_token_id",))
        log(f"{name}: reusing finished run {run_dir}")
        return json.loads((run_dir / "summary.json").read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return None


def _rlhf_stage(cfg, pretrained: Path, run_dir: Path, log) -> dict:
    """Reused when finished, resumed when stopped after a checkpoint (SFT's, the reward model's or DPO's; PPO
    trains again), else trained."""
    from nanogpt4.rlhf.run import run_rlhf

    if not (run_dir / "summary.json").exists() and newest_checkpoint_under(run_dir):
        _check_same_settings(run_dir, cfg, ("rlhf", "seed"))
        log(f"rlhf: resuming interrupted run {run_dir}")
        return run_rlhf(cfg, pretrained, run_dir, log=log, resume=True)
    return _finished_or_fresh("rlhf", run_dir, cfg, log) or run_rlhf(cfg, pretrained, run_dir, log=log)


def _multimodal_stage(cfg, pretrained: Path, run_dir: Path, progress: bool, log, deadline: float | None,
                      evaluation_s: float) -> dict:
    """Reused when finished, resumed from its latest checkpoint when stopped (the longest stage), else trained."""
    from nanogpt4.train.multimodal import run_multimodal
    from nanogpt4.train.pretrain import resume_config

    if not (run_dir / "summary.json").exists() and newest_checkpoint_under(run_dir):
        _check_same_settings(run_dir, cfg, ("multimodal", "seed"), ignore=("multimodal.image_token_id",))
        log(f"multimodal: resuming interrupted run {run_dir}")
        return run_multimodal(resume_config(run_dir, []), None, run_dir, log=log, progress=progress,
                              deadline=deadline, evaluation_s=evaluation_s, resume=True)
    return (_finished_or_fresh("multimodal", run_dir, cfg, log)
            or run_multimodal(cfg, pretrained, run_dir, log=log, progress=progress, deadline=deadline,
                              evaluation_s=evaluation_s))


def _ci_line(rl: dict) -> str:
    parts = [f"{name}: {rl[f'judge_{name}']:.3f} [{rl[f'judge_{name}_ci95'][0]:.3f}, {rl[f'judge_{name}_ci95'][1]:.3f}]"
             for name in ("sft", "ppo", "dpo", "best_of_n")]
    return "Held-out judge score, 95% interval: " + "; ".join(parts)


def _next_steps(out_dir: Path, python: bool = True) -> str:
    """The commands that read this run's outputs (a policy dir is listed only where its checkpoint exists)."""
    prompt, policy_prompt = (' --prompt "def parse("', ' --raw-prompt --prompt "def area(r):"') if python else ("", "")
    lines = [f'nanogpt4 sample --run {out_dir / "pretrain"}{prompt}      # the pretrained model']
    for name in ("ppo", "dpo"):
        if (out_dir / "rlhf" / name / "checkpoints").exists():
            lines.append(f'nanogpt4 sample --run {out_dir / "rlhf" / name}{policy_prompt}  # the {name.upper()} '
                         f'policy')
    lines += [f'nanogpt4 ask --run {out_dir / "multimodal"} --image photo.png --question "how many objects are there?"',
              f"nanogpt4 export-hf --run {out_dir / 'pretrain'} --out {out_dir / 'hf'}  # a transformers model"]
    return "```bash\n" + "\n".join(lines) + "\n```"


def samples_section(samples: list[tuple[str, str]], python: bool) -> tuple[str, dict]:
    """The report's samples, and for Python how much of them CPython's parser accepts (the summary's scores)."""
    if not python:
        return ("From the start of a document (the corpus is not Python, so no parser is asked about them):\n\n"
                + "\n\n".join(f"```text\n{s}\n```" for _, s in samples)), {}
    parsed = [valid_python_lines(s) for _, s in samples]
    so_far = [valid_python_lines(s, unfinished_ok=True)[0] for _, s in samples]
    lines_parsed, lines_total = sum(n for n, _ in parsed), sum(t for _, t in parsed)
    md = (f"CPython's parser accepts the first {lines_parsed} of {lines_total} lines "
          "of these samples (each sample's longest parseable start; one cut at its token limit ends "
          f"mid-statement), and the first {sum(so_far)} as Python so far (a valid start that it would take "
          "more input after: a function with no body yet, an unclosed docstring or bracket).\n\n"
          + "\n\n".join(f"Prompt `{p!r}` (first {n} of {t} lines parse, {m} are Python so far):"
                          f"\n\n```python\n{s}\n```"
                          for (p, s), (n, t), m in zip(samples, parsed, so_far, strict=True)))
    return md, {"sample_python_lines": lines_parsed / max(1, lines_total),
                "sample_python_lines_so_far": sum(so_far) / max(1, lines_total)}


def _scaling_section(cfg, pre: dict) -> str:
    """Part 4 on this run's model: its exact size, FLOPs and memory (``nanogpt4 scaling plan``, instant). The
    checked 30x prediction needs a sweep of its own (about 10 CPU-minutes), so the report gives its commands."""
    from nanogpt4.scaling.accounting import plan as account
    from nanogpt4.scaling.cli import _fmt_bytes
    from nanogpt4.utils import resolve_device

    a = account(cfg, None, pre.get("dtype") or "float32", resolve_device(cfg.device).type)
    rows = {**{k: a[k] for k in ("params", "non_embedding_params", "train_flops_per_token",
                                 "inference_flops_per_token")},
            "train_memory": _fmt_bytes(a["train_memory_bytes"]),
            "train_memory_checkpointed": _fmt_bytes(a["train_memory_bytes_checkpointed"]),
            "inference_kv_per_token": _fmt_bytes(a["inference_kv_bytes_per_token"]),
            "pretraining_flops": f"{pre['flops']:.3g}" if pre.get("flops") else None}
    sweep = ("nanogpt4 scaling sweep --config tiny --out runs/sweep training.batch_size=4 \\\n"
             "    --dims 8,16,32,48,64,96,128 --budgets 4.3e9,1.36e10,4.3e10,1.36e11,4.3e11\n"
             "nanogpt4 scaling predict --config tiny training.batch_size=4 --sweep runs/sweep/sweep.jsonl \\\n"
             "    --target-flops 1.3e13 --target-dim 128")
    return (summary_table(rows, list(rows)) + f"\n\nTraining memory is predicted for micro-batch "
            f"{a['micro_batch_size']} x {a['seq_len']} in {a['dtype']} (weights, grads, AdamW moments, the "
            f"activations autograd saves). A loss predicted from runs with 30x less compute, then checked against "
            f"the real run (about 10 minutes on 2 CPU cores; README, Predictable scaling):\n\n```bash\n{sweep}\n```")


def shortened_note(plan: Plan, pretraining: DictConfig) -> str:
    """The report's opening for a shortened run; ``pretraining`` is its pretraining's settings."""
    budget = f"the largest that fits the {plan.minutes:g}-minute budget here" if plan.minutes else "as asked"
    mm = plan.vlm_scale
    stages = (f"RLHF for {plan.scale:g} of theirs and the multimodal stage for {mm:g} (fitted to the time left "
              f"after RLHF)" if mm != plan.scale else f"RLHF and the multimodal stage for {plan.scale:g} of theirs")
    t = pretraining.training
    return (f"Scale {plan.scale:g} ({budget}): pretraining trained on {stage_scale(plan.scale, 'pretrain'):.3g} of "
            f"the full recipe's tokens ({t.max_steps} steps of batch {t.batch_size} on the full run's learning-rate "
            f"curve, the last {t.cooldown_steps} falling linearly to its floor), {stages}. The evaluations are the "
            f"full run's, so the numbers below measure the same things for models that trained less. `--scale 1` "
            f"runs the full recipe; its results are in the README.")


def refuse_foreign_out(out_dir: Path) -> None:
    """``--out`` must be new, empty, or a pipeline's own (``pretrain/`` or ``plan.json`` in it), which it
    continues: given another run's directory, the pipeline wrote its summary.json over that run's and cleared
    folders it took for its own unfinished stages."""
    held = out_dir_entries(out_dir)
    if held and not ((out_dir / "pretrain").is_dir() or (out_dir / "plan.json").is_file()):
        raise UserError(f"--out '{out_dir}' holds {some_names(held)} but no "
                        f"pipeline (no pretrain/ or plan.json in it): give a new or empty directory, or an earlier "
                        f"pipeline's to continue it (nothing in it was changed)")


def check_later_stages(cfg: DictConfig) -> None:
    """What the RLHF and multimodal stages read and judge with, checked in seconds before pretraining: a prose
    corpus under the python-syntax judge, an unknown judge or a missing multimodal data file stopped the pipeline
    at that stage, after pretraining (and RLHF) had run their minutes."""
    if cfg.training.init_from:  # its plan times the config's model, and its report is about one trained here
        raise UserError("the pipeline pretrains from scratch: drop training.init_from (to go on from a checkpoint, "
                        "run `nanogpt4 pretrain training.init_from=...`, then `nanogpt4 rlhf --pretrained`)")
    check_tokenizer_settings(cfg)  # the first stage's, refused here before the planning's timed steps
    check_tasks(cfg)
    mm = cfg.multimodal
    VQASource(mm, mm.image_size, mm.channels, cfg.seed)  # loads its data


def run_pipeline(config: str, overrides: list[str], out_dir: Path, progress: bool = True, log=print,
                 scale: float | None = None, minutes: float | None = None) -> dict:
    t0 = time.time()
    out_dir = Path(out_dir)
    base = load_config(config, overrides)  # a bad config fails before anything is created
    refuse_foreign_out(out_dir)
    check_later_stages(base)
    plan = pipeline_plan(base, out_dir, scale, minutes, log)
    cfg = scaled(base, plan.scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan.minutes is not None:
        save_plan(plan, out_dir)
    log(f"pipeline: config {config}, data {cfg.data.source}, output {out_dir}"
        + (f", scale {plan.scale:g}" if plan.scale != 1 else ""))

    pre_cfg = shortened_pretraining(base, plan.scale)
    pre = _pretrain_stage(pre_cfg, out_dir / "pretrain", progress, log)
    python = is_python_source(cfg.data.source)
    samples = _samples(out_dir / "pretrain", python)
    rl = _rlhf_stage(cfg, out_dir / "pretrain", out_dir / "rlhf", log)
    deadline, evaluation_s = None, 0.0
    if plan.minutes is not None:
        fitted = plan.multimodal_scale is not None  # a rerun keeps the scale a stopped multimodal stage began with
        if not fitted:
            retime(base, plan, log)
        # this command's time so far, or the stages' own times where an earlier command trained them
        spent = max(time.time() - t0, pre.get("wall_s", 0.0) + rl.get("wall_s", 0.0))
        if not fitted:
            plan.multimodal_scale = multimodal_scale(base, plan, spent, log)
            save_plan(plan, out_dir)
        cfg = OmegaConf.merge(cfg, {"multimodal": scaled(base, plan.multimodal_scale).multimodal})
        deadline = time.time() + plan.minutes * 60 - spent  # the stage ends there, its evaluation included
        evaluation_s = evaluation_reserve_s(plan)
    mm = _multimodal_stage(cfg, out_dir / "pretrain", out_dir / "multimodal", progress, log, deadline, evaluation_s)
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    if (out_dir / "pretrain" / "plots" / "loss.png").exists():
        shutil.copyfile(out_dir / "pretrain" / "plots" / "loss.png", plots / "pretrain_loss.png")
    if (out_dir / "rlhf" / "plots" / "rlhf.png").exists():
        shutil.copyfile(out_dir / "rlhf" / "plots" / "rlhf.png", plots / "rlhf.png")
    if (out_dir / "multimodal" / "plots" / "examples.png").exists():
        shutil.copyfile(out_dir / "multimodal" / "plots" / "examples.png", plots / "multimodal_examples.png")

    sample_md, sample_scores = samples_section(samples, python)
    sections = [
        ("Pretraining", summary_table(pre, ["params", "non_embedding_params", "steps", "tokens", "final_train_loss",
                                            "val_loss", "val_bpb", "tok_per_s", "mfu", "dtype", "wall_s"])
         + "\n\n![pretraining loss](plots/pretrain_loss.png)"),
        ("Samples (temperature 0.8, top-k 50)", sample_md),
        ("RLHF (judge: " + rl["judge"] + ")", summary_table(rl, [
            "rm_val_accuracy", "judge_sft", "judge_ppo", "judge_dpo", "judge_best_of_n", "kl_ppo", "prompts_eval",
            "preference_pairs", "wall_s"]) + "\n\n" + _ci_line(rl) + "\n\n![RLHF](plots/rlhf.png)\n\n"
         "Details and samples: [rlhf/report.md](rlhf/report.md)"),
        ("Multimodal (scenes + digits, LM from the pretraining run)", summary_table(mm, [
            "scenes_accuracy", "digits_accuracy", "text_only_accuracy", "prior_accuracy", "caption_exact_match",
            "caption_bleu", "examples_eval", "image_tokens", "train_s"]) + "\n\n" + per_type_table(mm)
         + "\n\n![held-out examples](plots/multimodal_examples.png)\n\nDetails: "
         "[multimodal/report.md](multimodal/report.md)"),
        ("Scaling accounting (the pretrained model)", _scaling_section(pre_cfg, pre)),
        ("Use the results", _next_steps(out_dir, python)),
    ]
    if plan.shortened:
        sections.insert(0, ("Shortened run", shortened_note(plan, pre_cfg)))
    summary = {
        "pretrain_val_loss": pre.get("val_loss"),
        "pretrain_val_bpb": pre.get("val_bpb"),
        "pretrain_tok_per_s": pre.get("tok_per_s"),
        "pretrain_params": pre.get("params"),
        **sample_scores,
        **{f"rlhf_{k}": rl[k] for k in ("rm_val_accuracy", "judge_sft", "judge_ppo", "judge_dpo", "judge_best_of_n",
                                        "kl_ppo")},
        **{f"multimodal_{k}": mm[k] for k in ("scenes_accuracy", "digits_accuracy", "text_only_accuracy",
                                              "caption_exact_match")},
        # each stage's own time; a stage reused from an earlier invocation keeps the time it took then
        **{f"{name}_wall_s": part.get("wall_s") for name, part in (("pretrain", pre), ("rlhf", rl),
                                                                   ("multimodal", mm))},
        "wall_s": time.time() - t0,
        "device": pre.get("device"),
        "scale": plan.scale,
        "multimodal_scale": plan.vlm_scale,
        "budget_minutes": plan.minutes,
        "estimate_s": plan.estimate_s,
    }
    header = {"config": config, "data": cfg.data.source, "python": platform.python_version(),
              "torch": torch.__version__, "machine": platform.machine(),
              **{k: v for k, v in summary.items() if v is not None}}
    report = write_pipeline_report(out_dir, sections, header)
    from nanogpt4.utils import atomic_write_json

    atomic_write_json(out_dir / "summary.json", summary)
    log(f"pipeline: done in {summary['wall_s']:.0f}s; report at {report}")
    return summary
