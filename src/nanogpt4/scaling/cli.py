"""``nanogpt4 scaling plan`` and ``nanogpt4 scaling fit``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nanogpt4.errors import UserError


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_plan(args, cfg) -> dict:

    from nanogpt4.scaling.accounting import plan
    from nanogpt4.scaling.laws import CHINCHILLA
    from nanogpt4.train.metrics import peak_flops
    from nanogpt4.utils import resolve_device, resolve_dtype

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (the micro-batch to account for), got {args.batch_size}")
    result = plan(cfg, args.batch_size, args.dtype, args.device_type)
    budget = args.budget_flops
    if args.mfu is not None and args.minutes is None:
        raise UserError("--mfu is the utilisation assumed for a --minutes budget; add --minutes, or drop --mfu")
    if args.minutes is not None:
        mfu = 0.4 if args.mfu is None else args.mfu
        if not (args.minutes > 0 and math.isfinite(args.minutes)) or not 0 < mfu <= 1:
            raise UserError(f"--minutes must be positive and --mfu in (0, 1]; got {args.minutes} and {mfu}")
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(args.dtype, device)
        peak = peak_flops(device, dtype)
        budget = args.minutes * 60 * peak * mfu
        result["budget_from_minutes"] = {"minutes": args.minutes, "measured_peak_flops": peak, "assumed_mfu": mfu}
    if budget is not None:
        if budget <= 0 or not math.isfinite(budget):
            raise UserError(f"compute budget must be a positive number of FLOPs, got {budget}")
        result["compute_budget_flops"] = budget
        result["compute_optimal"] = CHINCHILLA.compute_optimal(budget)
    if not args.json:
        print(f"parameters           {result['params']:,} ({result['non_embedding_params']:,} non-embedding)")
        print(f"train FLOPs/token    {result['train_flops_per_token']:,.0f}")
        plain, ckpt = result["train_memory_bytes"], result["train_memory_bytes_checkpointed"]
        # checkpointing frees saved activations only: where the peak is the weight gradients (a large model at a
        # small batch), keeping each block's input beside them costs a little more
        ckpt_note = (f"{_fmt_bytes(ckpt)} with activation checkpointing" if ckpt < plain else
                     f"activation checkpointing saves nothing here ({_fmt_bytes(ckpt)}): the step's peak is not "
                     f"its saved activations")
        print(f"train memory         {_fmt_bytes(plain)} "
              f"(micro-batch {result['micro_batch_size']} x {result['seq_len']}, {result['dtype']}; {ckpt_note})")
        print(f"KV cache / token     {_fmt_bytes(result['inference_kv_bytes_per_token'])}")
        if "compute_optimal" in result:
            o = result["compute_optimal"]
            print(f"compute-optimal for {budget:.3g} FLOPs ({o['law']}): {o['params']:.3g} params, "
                  f"{o['tokens']:.3g} tokens, predicted loss {o['loss']:.3f}")
    return result


def sweep_file(path: Path) -> Path:
    """``--sweep``: a JSONL file, or the directory `scaling sweep --out` wrote (its sweep.jsonl)."""
    if path.is_dir():
        if not (path / "sweep.jsonl").is_file():
            raise UserError(f"--sweep '{path}' is a directory without a sweep.jsonl; give the sweep's directory or "
                            f"its sweep.jsonl (or a JSONL file of pretrain summaries)")
        return path / "sweep.jsonl"
    return path


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"sweep file '{path}' not found; give a JSONL file of pretrain summaries, one run per line")
    from nanogpt4.utils import iter_jsonl_objects

    rows = []
    for lineno, row in iter_jsonl_objects(path):
        if "flops" not in row or "val_loss" not in row:
            raise UserError(f"{path}:{lineno}: each run needs 'flops' and 'val_loss' (a pretrain summary.json)")
        rows.append(row)
    return rows


def cmd_fit(args) -> dict:
    from nanogpt4.scaling.laws import fit_chinchilla, fit_power_law, hindcast, hindcast_warning, no_interval_reason
    from nanogpt4.scaling.sweep import frontier

    if args.bootstrap < 0:
        raise UserError(f"--bootstrap is a number of resamples (0: no intervals), got {args.bootstrap}")
    if args.target_flops is not None and not (args.target_flops > 0 and math.isfinite(args.target_flops)):
        raise UserError(f"--target-flops must be a positive number of FLOPs, got {args.target_flops}")
    rows = load_runs(sweep_file(args.sweep))
    compute, loss, chosen = frontier(rows)  # an IsoFLOP grid's minima, as `scaling predict` fits
    fit = fit_power_law(compute, loss, bootstrap=args.bootstrap)
    check = hindcast(compute, loss)
    warnings = [w for w in [hindcast_warning(check)] if w]
    if args.bootstrap and not fit.bootstrap:
        warnings.append(no_interval_reason(len(np.unique(compute))))
    result = {"fit": fit.as_dict(), "n_runs": len(chosen), "n_rows": len(rows), "hindcast": check,
              "warnings": warnings}
    if args.target_flops:
        result["prediction"] = {"flops": args.target_flops, "loss": float(fit.predict(args.target_flops)),
                                "ci95": list(fit.interval(args.target_flops)) if fit.bootstrap else None,
                                "compute_ratio": args.target_flops / compute.max()}
    if all("mean_log_pass_rate" in r for r in chosen):
        from nanogpt4.scaling.laws import fit_pass_rate

        cap = fit_pass_rate(compute, [math.exp(r["mean_log_pass_rate"]) for r in chosen], bootstrap=args.bootstrap)
        result["capability"] = {"alpha": cap.a, "k": -cap.b, "n_runs": len(chosen)}
        if args.target_flops:
            lo, hi = cap.interval(args.target_flops)
            result["capability"]["prediction"] = {"neg_log_pass_rate": float(cap.predict(args.target_flops)),
                                                  "ci95": [lo, hi]}
        if args.out:
            y = np.array([-r["mean_log_pass_rate"] for r in chosen])
            plot_capability(compute, y, cap, args.out / "capability_fit.png", args.target_flops)
    if all("params" in r and "tokens" in r for r in rows) and len(rows) >= 5:
        law = fit_chinchilla([r["params"] for r in rows], [r["tokens"] for r in rows], [r["val_loss"] for r in rows])
        result["chinchilla"] = {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta}
    if args.out:
        plot_fit(compute, loss, fit, args.out / "scaling_fit.png", args.target_flops)
        result["plot"] = str(args.out / "scaling_fit.png")
    if not args.json:
        on = f"{len(chosen)} IsoFLOP minima of {len(rows)} runs" if len(chosen) < len(rows) else f"{len(rows)} runs"
        print(f"L(C) = {fit.a:.4g} * C^{fit.b:.4f} + {fit.c:.4f}   ({on}, converged={fit.converged})")
        for k, (lo, hi) in fit.param_intervals().items():
            print(f"  {k}: 95% [{lo:.4g}, {hi:.4g}]")
        if "prediction" in result:
            p = result["prediction"]
            print(f"prediction at {p['flops']:.3g} FLOPs ({p['compute_ratio']:.1f}x the largest run): {p['loss']:.4f}"
                  + (f"  95% [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}]" if p["ci95"] else ""))
        if "capability" in result:  # fitted (and plotted) above; said here too, not only in --json
            cap = result["capability"]
            print(f"capability: -E[log pass rate] = {cap['alpha']:.4g} * C^-{cap['k']:.4f}   ({cap['n_runs']} runs)")
            if "prediction" in cap:
                q = cap["prediction"]
                print(f"  at {args.target_flops:.3g} FLOPs: {q['neg_log_pass_rate']:.4f}  95% "
                      f"[{q['ci95'][0]:.4f}, {q['ci95'][1]:.4f}]")
        if check:
            print(f"hindcast (largest run held out, {check['compute_ratio']:.1f}x): predicted "
                  f"{check['predicted_loss']:.4f}, measured {check['actual_loss']:.4f} ({check['rel_error']:+.1%})")
        for w in warnings:
            print(f"warning: {w}")
    return result


def plot_fit(compute, loss, fit, path: Path, target: float | None = None, actual: float | None = None) -> None:
    """The GPT-4 report's Figure 1 layout: final loss against compute, with the fitted L(C) = a·C^b + c."""
    _plot_law(compute, loss, fit, path, target, actual, f"fit: {fit.a:.3g}·C^{fit.b:.3f} + {fit.c:.3f}",
              "validation loss (nats/token)", log_y=False)


def plot_capability(compute, neg_log_pass, fit, path: Path, target: float | None = None,
                    actual: float | None = None) -> None:
    """The GPT-4 report's Figure 2 layout: −E[log pass rate] against compute, log-log, with the fitted power law."""
    _plot_law(compute, neg_log_pass, fit, path, target, actual, f"fit: {fit.a:.3g}·C^({fit.b:.3f})",
              "−E[log pass rate] (exact 4-token continuation)", log_y=True)


def _plot_law(compute, y, fit, path: Path, target: float | None, actual: float | None, fit_label: str,
              ylabel: str, log_y: bool) -> None:
    """Runs, the fitted law with its bootstrap band, and the held-out target (compute line, measured star)."""
    from nanogpt4.report import _pyplot
    from nanogpt4.utils import atomic_path

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    grid = np.logspace(np.log10(compute.min() / 1.5), np.log10(max(compute.max(), target or 0) * 1.5), 200)
    ax.scatter(compute, y, label="runs", zorder=3)
    ax.plot(grid, fit.predict(grid), label=fit_label)
    if fit.bootstrap:
        bands = np.array([fit.interval(c) for c in grid])
        ax.fill_between(grid, bands[:, 0], bands[:, 1], alpha=0.2, label="95% interval")
    if target:
        ax.axvline(target, ls="--", color="gray", label="target compute")
    if target and actual is not None:
        ax.scatter([target], [actual], marker="*", s=160, color="crimson", zorder=4, label="target run (held out)")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got '{text}'") from None


def cmd_sweep(args, cfg) -> dict:
    from nanogpt4.scaling.sweep import sweep

    out = args.out or Path("runs/sweep")
    dims = [int(d) for d in _floats(args.dims, "--dims")]
    rows = sweep(cfg, out, dims, _floats(args.budgets, "--budgets"), args.eval_iters,
                 tokens_per_param=args.tokens_per_param)
    return {"runs": len(rows), "sweep": str(out / "sweep.jsonl")}


def prediction_table(result: dict) -> str:
    """The runs the law was fitted to, then the held-out target: what was predicted, what it reached."""
    lines = [f"{'run':<18} {'FLOPs':>9} {'val loss':>9}  {'predicted (95%)':<26} {'error':>6}"]
    lines += [f"{r['name']:<18} {r['flops']:>9.2e} {r['val_loss']:>9.4f}" for r in result["fit_runs"]]
    lo, hi = result["ci95"]
    lines.append(f"{'target d' + str(result['target_dim']):<18} {result['target_flops']:>9.2e} "
                 f"{result['actual_loss']:>9.4f}  {result['predicted_loss']:.4f} [{lo:.4f}, {hi:.4f}]  "
                 f"{result['rel_error']:>6.2%}  ({result['compute_ratio']:.1f}x the largest fitted run; "
                 f"{'covered' if result['covered'] else 'NOT covered'} by the interval)")
    return "\n".join(lines)


def cmd_predict(args, cfg) -> dict:
    from nanogpt4.scaling.laws import fit_power_law
    from nanogpt4.scaling.sweep import predict_and_check
    from nanogpt4.utils import atomic_write_json

    path = sweep_file(args.sweep)
    out = args.out or path.parent / "predict"
    result = predict_and_check(cfg, path, args.target_flops, args.target_dim, out, args.bootstrap)
    print(prediction_table(result))
    flops = np.array([r["flops"] for r in result["fit_runs"]])
    losses = np.array([r["val_loss"] for r in result["fit_runs"]])
    plot_fit(flops, losses, fit_power_law(flops, losses, bootstrap=200), out / "scaling_predict.png",
             result["target_flops"], result["actual_loss"])
    cap = result.get("capability")
    if cap:
        from nanogpt4.scaling.laws import fit_pass_rate

        y = np.array([-v for v in cap["fit_runs"]])
        plot_capability(flops, y, fit_pass_rate(flops, np.exp(-y), bootstrap=200), out / "capability_predict.png",
                        result["target_flops"], cap["actual_neg_log_pass_rate"])
        print(f"capability: predicted -E[log pass] {cap['predicted_neg_log_pass_rate']:.4f} 95% "
              f"[{cap['ci95'][0]:.4f}, {cap['ci95'][1]:.4f}], actual {cap['actual_neg_log_pass_rate']:.4f}: "
              f"relative error {cap['rel_error']:.2%}, {'covered' if cap['covered'] else 'NOT covered'}")
    if args.record:
        atomic_write_json(args.record, result)
    return result
