"""Plots and markdown reports written into run directories."""

from __future__ import annotations

import json
from pathlib import Path

from nanogpt4.utils import atomic_path, atomic_write_text, read_jsonl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(run_dir: str | Path) -> Path | None:
    """``plots/loss.png``: train loss (per logged step) and val loss (per eval) against tokens."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"  # 27,571 tok/s, not 2.757e+04
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def summary_table(summary: dict, keys: list[str]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(summary[k])} |" for k in keys if k in summary and summary[k] is not None]
    return "\n".join(lines)


def write_pipeline_report(out_dir: Path, sections: list[tuple[str, str]], header: dict) -> Path:
    """``report.md``: a header table, then one markdown section per stage."""
    parts = ["# nanogpt4 pipeline report", ""]
    parts += [f"- **{k}**: {_fmt(v)}" for k, v in header.items()]
    for title, body in sections:
        parts += ["", f"## {title}", "", body]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    atomic_write_text(out_dir / "report.json", json.dumps(header, indent=2, default=str) + "\n")
    return path
