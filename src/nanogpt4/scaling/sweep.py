"""Sweeps (model sizes x compute budgets) and checked predictions.

A sweep run is a normal ``pretrain`` with: the size's config, ``max_steps`` matched to the budget, the cosine
as long as the run, a short warmup, the learning rate from a stated width rule, and the same data, tokenizer
and evaluation windows for every run. Rows land in ``sweep.jsonl`` as runs finish; a rerun skips them, so an
interrupted sweep continues where it stopped.

Hyperparameter transfer across widths: with ``model.parametrization=mup`` every width trains at the base
config's learning rate and µP scales init, learning rates and logits per layer (base width = the base config's
``model.dim``); with the standard parametrization, ``lr(d) = lr_base * sqrt(d_base / d)``, the square-root form
of the 1/width Adam rule, which keeps the smallest models from diverging.

Two designs share this machinery. An IsoFLOP grid (``--budgets``: every width at every budget) finds the
compute-optimal frontier, and L(C) is fitted to each budget's best run. A recipe-matched family
(``--tokens-per-param R``: every width trained on R tokens per parameter, one run per width) is the GPT-4
report's design: the small models are trained "using the same methodology" as the big one, so the target is the
next member of the very curve that was fitted, and L(C) is fitted to every run.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from nanogpt4.config import changes_text, settings_changes
from nanogpt4.errors import TrainingDiverged, UserError
from nanogpt4.scaling.accounting import meta_model
from nanogpt4.train.trainer import STAGE_RESET
from nanogpt4.utils import atomic_write_json, atomic_write_text, read_jsonl

HEAD_DIM = 16
WIDTH_STEP = 8
MIN_STEPS = 20


@dataclass
class RunSpec:
    name: str
    dim: int
    n_layers: int
    budget: float
    steps: int
    lr: float
    params: int
    non_embedding_params: int
    flops_per_token: float


def size_config(base: DictConfig, dim: int) -> DictConfig:
    """Width ``dim``, heads of about HEAD_DIM (as many as divide the width), depth growing with width (aspect
    ratio ~ the tiny preset's 48)."""
    if dim % WIDTH_STEP or dim <= 0:
        raise UserError(f"sweep widths must be positive multiples of {WIDTH_STEP}, got {dim}")
    if base.training.init_from:  # it would replace every size with the checkpoint's
        raise UserError("a scaling sweep trains each size from scratch: drop training.init_from")
    heads = max(h for h in range(1, max(1, dim // HEAD_DIM) + 1) if dim % h == 0)
    layers = max(2, round(dim / 48))
    return OmegaConf.merge(base, {"model": {"dim": dim, "n_heads": heads, "n_kv_heads": None,
                                            "n_layers": layers, "mup_base_dim": base.model.dim}})  # type: ignore


def lr_for_width(base: DictConfig, dim: int) -> float:
    """µP (``model.parametrization=mup``): the base learning rate at every width (µP rescales per layer inside
    the model); standard parametrization: the square-root width rule."""
    if base.model.parametrization == "mup":
        return float(base.training.learning_rate)
    return float(base.training.learning_rate * math.sqrt(base.model.dim / dim))


def family_budget(base: DictConfig, dim: int, tokens_per_param: float) -> float:
    """The compute of width ``dim`` in a recipe-matched family: R tokens per (total) parameter, rounded down to
    whole steps, times the exact training FLOPs per token."""
    cfg = size_config(base, dim)
    m = meta_model(cfg)
    tokens_per_step = base.training.batch_size * base.model.max_seq_len
    steps = math.floor(tokens_per_param * m.num_parameters() / tokens_per_step)
    return steps * tokens_per_step * m.flops_per_token(cfg.model.max_seq_len)


def _round_sig(x: float, up: bool, digits: int = 3) -> float:
    """``x`` to ``digits`` significant digits, rounded up or down (a range's ends, kept inside it)."""
    if x <= 0:
        return x
    unit = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return (math.ceil if up else math.floor)(x / unit) * unit


def plan_runs(base: DictConfig, dims: list[int], budgets: list[float], train_tokens: int,
              tokens_per_param: float | None = None) -> tuple[list[RunSpec], list[str]]:
    """The runs of an IsoFLOP grid (every width x every budget) or, with ``tokens_per_param``, of a
    recipe-matched family (one run per width, its budget from the recipe); plus the reasons any were skipped."""
    if tokens_per_param is not None and not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise UserError(f"--tokens-per-param must be a positive number, got {tokens_per_param}")
    if len(dims) < 1 or (tokens_per_param is None and len(budgets) < 1):
        raise UserError("a sweep needs at least one width and one budget (or --tokens-per-param)")
    tokens_per_step = base.training.batch_size * base.model.max_seq_len
    runs, skipped, fits = [], [], []
    epoch_steps = train_tokens // tokens_per_step
    for dim in dims:
        cfg = size_config(base, dim)
        m = meta_model(cfg)
        fpt = m.flops_per_token(cfg.model.max_seq_len)
        lo, hi = MIN_STEPS * fpt * tokens_per_step, epoch_steps * fpt * tokens_per_step
        fits.append(f"d{dim} {_round_sig(lo, up=True):.3g}-{_round_sig(hi, up=False):.3g}")
        for budget in budgets if tokens_per_param is None else [family_budget(base, dim, tokens_per_param)]:
            steps = math.floor(budget / (fpt * tokens_per_step) + 1e-9)
            name = f"d{dim}_c{budget:.2e}" if tokens_per_param is None else f"d{dim}_r{tokens_per_param:g}"
            if steps < MIN_STEPS:
                skipped.append(f"{name}: budget buys {steps} steps (< {MIN_STEPS})")
                continue
            if steps > epoch_steps:
                skipped.append(f"{name}: needs {steps * tokens_per_step:,} tokens, more than one epoch "
                               f"({train_tokens:,})")
                continue
            runs.append(RunSpec(name, dim, cfg.model.n_layers, budget, steps, lr_for_width(base, dim),
                                m.num_parameters(), m.num_parameters(non_embedding=True), fpt))
    if not runs:
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        if epoch_steps < MIN_STEPS:
            fix = (f"the data holds {epoch_steps} steps of training.batch_size={base.training.batch_size}: give more "
                   f"data or a smaller batch")
        elif tokens_per_param is None:
            fix = f"budgets that fit, in FLOPs: {', '.join(fits)}"
        else:
            fix = "change --tokens-per-param or --dims"
        raise UserError(f"no run of the sweep fits: each needs {MIN_STEPS} steps or more and one epoch of the "
                        f"{train_tokens:,} training tokens at most: " + "; ".join(skipped[:3]) + f"{more}; {fix}")
    return runs, skipped


def run_config(base: DictConfig, spec: RunSpec, eval_iters: int) -> DictConfig:
    cfg = size_config(base, spec.dim)
    return OmegaConf.merge(cfg, {"training": STAGE_RESET}, {"training": {
        "max_steps": spec.steps, "lr_decay_steps": spec.steps, "learning_rate": spec.lr,
        "warmup_steps": max(1, min(cfg.training.warmup_steps, spec.steps // 10)),
        "eval_interval": spec.steps, "checkpoint_interval": max(spec.steps, 1), "eval_iters": eval_iters,
        "log_interval": max(1, spec.steps // 10), "keep_last": 1}})  # type: ignore[return-value]


def run_one(cfg: DictConfig, run_dir: Path, log, problems=None) -> dict:
    """One pretrain run; with ``problems``, its final model's capability joins the summary."""
    from nanogpt4.scaling.capability import evaluate_capability
    from nanogpt4.train.checkpoint import load_model
    from nanogpt4.train.pretrain import pretrain

    if run_dir.exists() and not (run_dir / "summary.json").exists():
        shutil.rmtree(run_dir)  # a run interrupted mid-way is short: start it again
    summary = pretrain(cfg, run_dir, progress=False, log=lambda _m: None)
    if problems is not None:
        model, _, _ = load_model(run_dir)
        summary["capability"] = evaluate_capability(model, problems)
    return summary


SWEEP_CONFIG = "sweep_config.yaml"  # beside sweep.jsonl: the base config its runs were made from
# what a sweep sets for each run itself (run_config), or what does not change a run's numbers
SET_PER_RUN = tuple(f"training.{k}" for k in (*STAGE_RESET, "max_steps", "eval_interval", "checkpoint_interval",
                                              "eval_iters", "log_interval", "keep_last", "compile", "tensorboard")) \
    + ("model.n_heads", "model.n_kv_heads", "model.n_layers", "model.mup_base_dim")


def check_sweep_config(base: DictConfig, sweep_dir: Path, fix: str) -> None:
    """Refuse to add runs to, or predict from, a sweep whose runs were trained from another base config: a fit
    over rows of two settings (another batch size, source, dtype, ...) or a target trained unlike its runs
    (``scaling predict`` without the sweep's ``training.batch_size=4``) measures nothing."""
    path = sweep_dir / SWEEP_CONFIG
    if not path.exists():
        return
    changes = settings_changes(OmegaConf.load(path), base, ("model", "data", "training", "seed"), SET_PER_RUN)
    if changes:
        overrides = " ".join(shlex.quote(f"{k}={'null' if old is None else old}") for k, old, _ in changes)
        raise UserError(f"the sweep in '{sweep_dir}' was run with other settings ({changes_text(changes)}); {fix}: add "
                        f"{overrides} (its settings: {path})")


def capability_problems(base: DictConfig):
    """The held-out continuation problems every run of a sweep (and its target) is scored on."""
    from nanogpt4.data.prepare import default_data_dir, load_meta
    from nanogpt4.scaling.capability import continuation_problems

    data_dir = default_data_dir(base)
    context = min(48, base.model.max_seq_len - 8)
    return continuation_problems(data_dir / "val.bin", load_meta(data_dir)["dtype"], n=256, context=context,
                                 answer=4, seed=base.seed)


def sweep(base: DictConfig, out: Path, dims: list[int], budgets: list[float], eval_iters: int = 40,
          log=print, tokens_per_param: float | None = None) -> list[dict]:
    from nanogpt4.data.prepare import default_data_dir, prepare_data

    if eval_iters <= 0:
        raise UserError(f"--eval-iters must be positive, got {eval_iters}")
    for flag, values in (("--dims", dims), ("--budgets", budgets)):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # the second run of a width and budget met the first one's directory, after a run had trained
            raise UserError(f"{flag} gives {', '.join(f'{v:g}' for v in twice)} more than once; list each once")
    path = out / "sweep.jsonl"
    previous = read_jsonl(path) if path.exists() else []
    kinds = {r.get("tokens_per_param") for r in previous}
    if previous and kinds != {tokens_per_param}:
        has = "an IsoFLOP grid" if kinds == {None} else f"a family at {sorted(k for k in kinds if k)} tokens/param"
        raise UserError(f"'{path}' already holds {has}; give this sweep its own --out so the fit does not mix "
                        f"two designs")
    check_sweep_config(base, out, "give this sweep its own --out, or continue it with its own settings")
    meta = prepare_data(base, default_data_dir(base), progress=False, log=lambda _m: None,
                        keep_other="data.dir" if base.data.dir else None)
    runs, skipped = plan_runs(base, dims, budgets, meta["train_tokens"], tokens_per_param)
    out.mkdir(parents=True, exist_ok=True)  # after the plan is known to hold at least one run
    if not (out / SWEEP_CONFIG).exists():
        atomic_write_text(out / SWEEP_CONFIG, OmegaConf.to_yaml(base))
    for s in skipped:
        log(f"skip {s}")
    done = {r["name"] for r in previous}
    total = sum(r.budget for r in runs)
    log(f"sweep: {len(runs)} runs ({len(done)} already done), {total:.3g} FLOPs in all, results in {path}")
    problems = capability_problems(base)
    for spec in runs:
        if spec.name in done:
            continue
        t0 = time.time()
        try:
            summary = run_one(run_config(base, spec, eval_iters), out / "runs" / spec.name, log, problems)
        except TrainingDiverged as e:  # a result too (this width diverges at this lr): kept, and the fit refuses it
            summary = {"steps": e.step, "tokens": e.tokens, "flops": e.tokens * spec.flops_per_token,
                       "val_loss": math.nan, "val_bpb": math.nan, "capability": {}, "diverged": str(e)}
        row = {"name": spec.name, "dim": spec.dim, "n_layers": spec.n_layers, "budget": spec.budget,
               "params": spec.params, "non_embedding_params": spec.non_embedding_params, "lr": spec.lr,
               "steps": summary["steps"], "tokens": summary["tokens"], "flops": summary["flops"],
               "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"], **summary["capability"],
               "tokens_per_param": tokens_per_param, "eval_iters": eval_iters, "wall_s": time.time() - t0,
               **({"diverged": summary["diverged"]} if "diverged" in summary else {})}
        if not all(math.isfinite(row[k]) for k in ("val_loss", "flops")):
            log(f"warning: {spec.name} ended with a non-finite loss ({summary.get('diverged', 'at evaluation')});"
                f" it is recorded, and fits refuse the sweep until its row is dropped from {path.name} or the sweep"
                f" reruns in a new --out with a lower learning rate")
        with open(path, "a", encoding="utf-8") as f:
            # a diverged run's NaNs are written as null: strict JSON, which jq and pandas read too
            f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                for k, v in row.items()}) + "\n")
        log(f"{spec.name}: N={spec.params:,} steps={row['steps']} val_loss={row['val_loss']:.4f} "
            f"({row['wall_s']:.0f}s)")
    return read_jsonl(path)


def family_ratio(rows: list[dict]) -> float | None:
    """The tokens-per-parameter recipe when every row belongs to one recipe-matched family, else None."""
    ratios = {r.get("tokens_per_param") for r in rows}
    return ratios.pop() if len(ratios) == 1 and None not in ratios else None


def frontier(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The points L(C) is fitted to: for an IsoFLOP grid, each budget's best run (the IsoFLOP minimum); for a
    recipe-matched family (or pretrain summaries from elsewhere), every run. Every row is checked first: a
    diverged run is an error to resolve, not a point to skip silently."""
    from nanogpt4.scaling.laws import check_points

    check_points(np.array([r["flops"] for r in rows], dtype=np.float64),
                 np.array([np.nan if r["val_loss"] is None else r["val_loss"] for r in rows], dtype=np.float64))
    if family_ratio(rows) is not None or not all("budget" in r for r in rows):  # a family, or plain summaries
        chosen = sorted(rows, key=lambda r: r["flops"])
    else:
        best: dict[float, dict] = {}
        for r in rows:
            if r["budget"] not in best or r["val_loss"] < best[r["budget"]]["val_loss"]:
                best[r["budget"]] = r
        chosen = [best[b] for b in sorted(best)]
        if len(chosen) < 3 <= len(rows):  # said as the sweep's shape: "3 runs, got 2" read wrong beside 6 runs
            raise UserError(f"L(C) is fitted to each budget's best run, and these {len(rows)} runs span "
                            f"{len(chosen)} budget(s); it needs 3 or more: add budgets to the sweep (--budgets)")
    return (np.array([r["flops"] for r in chosen], dtype=np.float64),
            np.array([r["val_loss"] for r in chosen], dtype=np.float64), chosen)


MIN_BOOTSTRAP = 20


# what a sweep writes for each run and predict reads
SWEEP_ROW_KEYS = ("name", "dim", "budget", "flops", "tokens", "non_embedding_params", "val_loss")


def predict_and_check(base: DictConfig, sweep_path: Path, target_budget: float | None, target_dim: int | None,
                      out: Path, bootstrap: int = 500, log=print) -> dict:
    """Fit the sweep's frontier, register the prediction, run the target, compare. For a recipe-matched family
    the target is the family's member at ``target_dim`` (its budget follows from the recipe)."""
    from nanogpt4.data.prepare import default_data_dir, load_meta
    from nanogpt4.scaling.capability import evaluate_capability
    from nanogpt4.scaling.laws import (
        fit_chinchilla,
        fit_pass_rate,
        fit_power_law,
        hindcast,
        hindcast_warning,
        no_interval_reason,
    )
    from nanogpt4.train.checkpoint import latest_checkpoint, load_model
    from nanogpt4.train.pretrain import pretrain, resume_config

    rows = read_jsonl(sweep_path) if sweep_path.exists() else []
    if not rows:
        raise UserError(f"no sweep results in '{sweep_path}'; run `nanogpt4 scaling sweep` first")
    for line, row in enumerate(rows, 1):
        lacks = [k for k in SWEEP_ROW_KEYS if k not in row]
        if lacks:  # a KeyError's traceback, deep in the fit, was all that said so
            raise UserError(f"{sweep_path}:{line} lacks {', '.join(lacks)}: predict reads the sweep.jsonl of "
                            f"`nanogpt4 scaling sweep` (`nanogpt4 scaling fit` reads any pretrain summaries)")
    if target_budget is not None and not target_budget > 0:
        raise UserError(f"--target-flops must be positive, got {target_budget:g}")
    if target_dim is not None and (target_dim <= 0 or target_dim % 8):
        raise UserError(f"--target-dim must be a positive multiple of 8 (as the sweep's widths), got {target_dim}")
    check_sweep_config(base, sweep_path.parent, "the target must be trained as its runs were")
    registered = out / "prediction.json"
    if registered.exists():  # the prediction was made before the target ran: never refit after seeing it
        pred = json.loads(registered.read_text())
        asked = [f"{flag} {mine:g}, registered {pred[key]:g}" for flag, mine, key in
                 (("--target-flops", target_budget, "target_flops"), ("--target-dim", target_dim, "target_dim"))
                 if mine is not None and not math.isclose(mine, pred[key], rel_tol=1e-9)]
        if asked:  # the rerun would check the registered target, not the one asked for
            raise UserError(f"'{out}' holds a prediction registered for another target ({'; '.join(asked)}); "
                            f"give this target its own --out (nothing was changed)")
        log(f"using the registered prediction from {pred['registered_at']}")
    else:
        if bootstrap < MIN_BOOTSTRAP:
            raise UserError(f"--bootstrap must be {MIN_BOOTSTRAP} or more: the prediction is checked against its 95% "
                            f"interval, which fewer resamples cannot place (got {bootstrap})")
        ratio = family_ratio(rows)
        if target_budget is None:
            if ratio is None or target_dim is None:
                raise UserError("give --target-flops (an IsoFLOP sweep), or --target-dim for a sweep run with "
                                "--tokens-per-param (the target is then the family's member of that width)")
            target_budget = family_budget(base, target_dim, ratio)
        compute, loss, chosen = frontier(rows)
        meta = load_meta(default_data_dir(base))
        if target_dim is None:
            law = fit_chinchilla([r["non_embedding_params"] for r in rows], [r["tokens"] for r in rows],
                                 [r["val_loss"] for r in rows]) if len(rows) >= 5 else None
            target_dim = _best_dim(base, law, target_budget, [r["dim"] for r in chosen], meta["train_tokens"])
        fit = fit_power_law(compute, loss, bootstrap=bootstrap)
        if not fit.bootstrap:
            raise UserError(f"cannot register a prediction: {no_interval_reason(len(np.unique(compute)))} "
                            f"(nothing was written)")
        cfg = size_config(base, target_dim)
        target_model = meta_model(cfg)
        tokens_per_step = base.training.batch_size * base.model.max_seq_len
        steps = math.floor(target_budget / (target_model.flops_per_token(cfg.model.max_seq_len) * tokens_per_step)
                           + 1e-9)
        target_tokens = steps * tokens_per_step
        if target_tokens > meta["train_tokens"]:
            fix = ("pick a smaller --target-dim (the family's recipe fixes its tokens)" if ratio is not None
                   else "lower --target-flops or pick a larger --target-dim")
            raise UserError(f"the target needs {target_tokens:,} tokens, more than one epoch of the training data "
                            f"({meta['train_tokens']:,}); {fix}")
        lo, hi = fit.interval(target_budget)
        check = hindcast(compute, loss)
        warnings = [w for w in (hindcast_warning(check),
                                _data_limited_warning(target_tokens / target_model.num_parameters(), chosen,
                                                      meta["train_tokens"], ratio)) if w]
        for w in warnings:
            log(f"warning: {w}")
        pred = {"predicted_loss": float(fit.predict(target_budget)), "ci95": [lo, hi], "fit": fit.as_dict(),
                "hindcast": check, "warnings": warnings,
                "target_flops": target_budget, "target_dim": target_dim, "target_steps": steps,
                "fit_runs": [{"name": r["name"], "flops": r["flops"], "val_loss": r["val_loss"]} for r in chosen],
                "compute_ratio": target_budget / float(compute.max()), "tokens_per_param": ratio,
                "registered_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if all("mean_log_pass_rate" in r for r in chosen):  # capability: -E[log pass] = α·C^(-k)
            cap = fit_pass_rate(compute, [math.exp(r["mean_log_pass_rate"]) for r in chosen], bootstrap=bootstrap)
            lo_c, hi_c = cap.interval(target_budget)
            pred["capability"] = {"predicted_neg_log_pass_rate": float(cap.predict(target_budget)),
                                  "ci95": [lo_c, hi_c], "fit": {"alpha": cap.a, "k": -cap.b},
                                  "fit_runs": [r["mean_log_pass_rate"] for r in chosen]}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(registered, pred)
        log(f"registered: loss {pred['predicted_loss']:.4f} 95% [{lo:.4f}, {hi:.4f}] at {target_budget:.3g} FLOPs "
            f"({pred['compute_ratio']:.1f}x the largest fitted run), d={target_dim}")
    spec = RunSpec("target", pred["target_dim"], 0, pred["target_flops"], pred["target_steps"],
                   lr_for_width(base, pred["target_dim"]), 0, 0, 0.0)
    cfg = run_config(base, spec, eval_iters=rows[0].get("eval_iters", 40))  # the target is measured as the runs were
    cfg = OmegaConf.merge(cfg, {"training": {"checkpoint_interval": max(1, spec.steps // 10), "keep_last": 1}})
    target_dir = out / "target"
    if (target_dir / "summary.json").exists():
        summary = json.loads((target_dir / "summary.json").read_text())
    elif latest_checkpoint(target_dir) is not None:
        summary = pretrain(resume_config(target_dir, []), target_dir, resume=True, progress=False, log=log)
    else:
        if target_dir.exists():  # stopped before its first checkpoint: nothing to resume, and it is in the way
            shutil.rmtree(target_dir)
        summary = pretrain(cfg, target_dir, progress=False, log=log)
    actual = summary["val_loss"]
    lo, hi = pred["ci95"]
    capability = None
    if "capability" in pred:
        measured = evaluate_capability(load_model(target_dir)[0], capability_problems(base))
        cp = pred["capability"]
        truth = -measured["mean_log_pass_rate"]
        capability = {**cp, "actual_neg_log_pass_rate": truth, "greedy_exact_match": measured["greedy_exact_match"],
                      "rel_error": abs(cp["predicted_neg_log_pass_rate"] - truth) / truth,
                      "covered": cp["ci95"][0] <= truth <= cp["ci95"][1]}
    result = {"predicted_loss": pred["predicted_loss"], "ci95": pred["ci95"], "actual_loss": actual,
              "rel_error": abs(pred["predicted_loss"] - actual) / actual, "covered": lo <= actual <= hi,
              "compute_ratio": summary["flops"] / max(r["flops"] for r in pred["fit_runs"]),
              "fit": {k: pred["fit"][k] for k in ("a", "b", "c")}, "target_flops": summary["flops"],
              "target_dim": pred["target_dim"], "fit_runs": pred["fit_runs"], "capability": capability,
              "hindcast": pred.get("hindcast"), "warnings": pred.get("warnings", [])}
    atomic_write_json(out / "result.json", result)
    return result


def _data_limited_warning(target: float, chosen: list[dict], train_tokens: int, ratio: float | None) -> str | None:
    """An IsoFLOP frontier describes compute-optimal runs; a target given far fewer tokens per parameter
    (``target``) than the frontier's largest run (the usual way to fit a big target into one epoch) lies above
    that frontier."""
    last = chosen[-1]
    if ratio is not None or not {"tokens", "params"} <= last.keys():
        return None
    frontier_ratio = last["tokens"] / last["params"]
    if target >= frontier_ratio / 4:
        return None
    return (f"the target trains on {target:.1f} tokens per parameter, the largest frontier run on "
            f"{frontier_ratio:.1f}: L(C) was fitted to compute-optimal runs, and a target this far off the "
            f"frontier may land above the prediction (one epoch holds {train_tokens:,} tokens); pick a "
            f"smaller --target-dim, or more data")


def _best_dim(base: DictConfig, law, budget: float, candidates: list[int], train_tokens: int) -> int:
    """The width minimising the fitted L(N, D) under the exact budget (D = C / FLOPs-per-token of that width)
    among the widths whose D fits in one epoch; without a law, the widest model on the frontier."""
    if law is None:
        return max(candidates)

    sizes = {}  # width -> (non-embedding params, tokens the budget buys)
    for d in range(1024, HEAD_DIM - 1, -HEAD_DIM):
        m = meta_model(size_config(base, d))
        tokens = budget / m.flops_per_token(base.model.max_seq_len)
        if tokens > train_tokens:
            break  # narrower models buy more tokens still: none of them fits
        sizes[d] = (m.num_parameters(non_embedding=True), tokens)
    if not sizes:
        raise UserError(f"no width up to 1024 trains on {budget:.3g} FLOPs within one epoch "
                        f"({train_tokens:,} tokens); lower --target-flops or prepare more data")
    return min(sizes, key=lambda d: float(law.loss(*sizes[d])))
