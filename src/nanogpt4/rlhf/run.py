"""``nanogpt4 rlhf``: SFT -> judge-labelled preferences -> reward model -> PPO (and DPO, best-of-n) -> evaluation.

Offline default: the pretrained model's own corpus supplies the tasks (complete the next lines of a function
from the standard library), ``python-syntax`` plays the labeler, and every policy is judged on held-out
prompts from the validation split.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nanogpt4.data.sources import load_corpus
from nanogpt4.errors import UserError
from nanogpt4.rlhf.data import Example, Preference, code_completion_examples, encode_example, pad_left
from nanogpt4.rlhf.dpo import train_dpo
from nanogpt4.rlhf.judges import label_pairs, load_judge
from nanogpt4.rlhf.models import RewardModel, ValueModel
from nanogpt4.rlhf.ppo import PPOTrainer
from nanogpt4.rlhf.stages import (
    encode_pair,
    generate_responses,
    reward_accuracy,
    train_reward,
    train_sft,
)
from nanogpt4.train.checkpoint import load_model, save_checkpoint
from nanogpt4.utils import atomic_write_json, atomic_write_text, resolve_device


def line_examples(docs: list[str], n: int, seed: int) -> list[Example]:
    """Plain-text tasks: a few lines as the prompt, the next line as the response."""
    rng = random.Random(seed)
    lines = [ln for d in docs for ln in d.splitlines(keepends=True) if ln.strip()]
    if len(lines) < 8:
        raise UserError("the corpus is too small to build RLHF prompts")
    out = []
    for _ in range(n):
        i = rng.randrange(0, len(lines) - 4)
        out.append(Example("".join(lines[i:i + 3]), lines[i + 3]))
    return out


def make_tasks(cfg: DictConfig, n: int, split: str, seed: int) -> list[Example]:
    corpus = load_corpus(cfg.data.source, cfg.data.val_fraction, cfg.data.max_bytes, cfg.data.text_field,
                         cfg.data.cache_dir)
    docs = corpus.train if split == "train" else corpus.val
    if cfg.rlhf.judge == "python-syntax":
        return code_completion_examples(docs, n, seed)
    return line_examples(docs, n, seed)


def mean_ci(values) -> tuple[float, list[float]]:
    v = np.asarray(values, dtype=np.float64)
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), [float(v.mean() - half), float(v.mean() + half)]


@torch.no_grad()
def rm_scores(rm: RewardModel, tok, prompts: list[str], responses: list[str], device, max_len: int) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), 32):
        seqs = [encode_example(tok, Example(p, r), max_len)[0]
                for p, r in zip(prompts[i:i + 32], responses[i:i + 32], strict=True)]
        ids, mask = pad_left(seqs, tok.pad_id, device)
        out.append(rm(ids, mask))
    return torch.cat(out)


def run_rlhf(cfg: DictConfig, pretrained: Path, out: Path, log=print) -> dict:
    t_start = time.time()
    device = resolve_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    policy, pre_cfg, tok = load_model(pretrained, device)
    if tok is None:
        raise UserError(f"'{pretrained}' has no tokenizer.json; point --pretrained at a `nanogpt4 pretrain` run")
    cfg = OmegaConf.merge(cfg, {"model": OmegaConf.to_container(pre_cfg.model), "data": OmegaConf.to_container(
        pre_cfg.data)})
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    r, L = cfg.rlhf, cfg.model.max_seq_len
    if r.max_new_tokens > L - 8:
        raise UserError(f"rlhf.max_new_tokens={r.max_new_tokens} leaves no room for prompts in model.max_seq_len={L}; "
                        f"set rlhf.max_new_tokens <= {L - 8}")
    judge = load_judge(r.judge)
    quiet = lambda _m: None  # noqa: E731
    summary: dict = {"judge": r.judge, "device": str(device)}

    # 1. SFT on real tasks from the training split
    sft_examples = make_tasks(cfg, r.sft_examples, "train", cfg.seed)
    log(f"rlhf: SFT on {len(sft_examples)} examples for {r.sft_steps} steps")
    train_sft(cfg, policy, tok, sft_examples, out / "sft", device, log=quiet)
    sft = copy.deepcopy(policy).eval()

    # 2. preferences: K SFT samples per prompt; the judge's best and worst form a pair (ties dropped)
    label_prompts = [e.prompt for e in make_tasks(cfg, r.label_prompts, "train", cfg.seed + 1)]
    k_samples = [generate_responses(sft, tok, label_prompts, r.max_new_tokens, 1.0, seed=1 + k)
                 for k in range(max(2, r.samples_per_prompt))]
    k_scores = np.array([judge(label_prompts, s) for s in k_samples])  # (K, prompts)
    best, worst = k_scores.argmax(0), k_scores.argmin(0)
    a = [k_samples[k][i] for i, k in enumerate(best)]
    b = [k_samples[k][i] for i, k in enumerate(worst)]
    # near-ties are skipped, as a human labeler skips pairs they cannot tell apart
    pairs = [Preference(p, c, j) for p, c, j, _ in label_pairs(judge, label_prompts, a, b, r.label_min_gap)]
    if len(pairs) < 20:
        raise UserError(f"the judge separated only {len(pairs)} sample pairs; raise rlhf.label_prompts")
    n_val = max(10, len(pairs) // 10)
    train_pairs, val_pairs = pairs[n_val:], pairs[:n_val]
    with open(out / "preferences.jsonl", "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    log(f"rlhf: {len(pairs)} preference pairs labelled by {r.judge} ({len(label_prompts)} prompts x "
        f"{len(k_samples)} samples)")

    # 3. reward model (fine-tuned base by default), centred on SFT samples
    rm = RewardModel(copy.deepcopy(sft), freeze_base=r.freeze_base).to(device)
    train_reward(cfg, rm, tok, train_pairs, val_pairs, out / "reward", device, log=quiet)
    val_enc = [encode_pair(tok, p, L) for p in val_pairs]
    summary["rm_val_accuracy"] = reward_accuracy(rm, val_enc, tok.pad_id, device)
    rm.reward_offset.fill_(float(rm_scores(rm, tok, label_prompts, k_samples[0], device, L).mean()))
    rm.eval().requires_grad_(False)
    save_checkpoint(out / "reward", r.reward_steps, rm, cfg, None, {}, keep_last=1)
    log(f"rlhf: reward model held-out accuracy {summary['rm_val_accuracy']:.3f} on {len(val_pairs)} pairs")

    # 4. PPO against the learned reward; the judge only watches
    def score_fn(ids, mask):
        return rm(ids, mask)

    value = ValueModel(copy.deepcopy(rm.transformer)).requires_grad_(True)  # the critic starts as the RM
    value.reward_head.load_state_dict(rm.reward_head.state_dict())
    ppo = PPOTrainer(policy, score_fn, tok, r, value_model=value.to(device), ref_policy=sft,
                     learning_rate=r.ppo_learning_rate, no_eos_penalty=r.no_eos_penalty, seed=cfg.seed)
    ppo_prompts = [e.prompt for e in make_tasks(cfg, r.ppo_steps * r.rollout_batch_size, "train", cfg.seed + 2)]
    history = []
    for step in range(r.ppo_steps):
        batch = ppo_prompts[step * r.rollout_batch_size:(step + 1) * r.rollout_batch_size]
        stats, ro = ppo.step(batch)
        responses = [tok.decode([t for t, m in zip(row, mrow, strict=True) if m and t != tok.eot_id])
                     for row, mrow in zip(ro.input_ids[:, ro.prompt_len:].tolist(), ro.response_mask.tolist(),
                                          strict=True)]
        stats["judge"] = float(np.mean(judge(batch, responses)))
        history.append(stats)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in stats.items() if isinstance(v, (int, float))}) + "\n")
        if (step + 1) % max(1, r.ppo_steps // 10) == 0:
            log(f"ppo step {step + 1}/{r.ppo_steps}: reward {stats['reward']:.3f} judge {stats['judge']:.3f} "
                f"kl {stats['kl']:.2f} clipfrac {stats['clipfrac']:.3f}")

    # 5. DPO from the SFT model on the same pairs
    dpo_policy = copy.deepcopy(sft).train().requires_grad_(True)
    train_dpo(cfg, dpo_policy, tok, train_pairs, out / "dpo", device, r.dpo_steps, log=quiet)

    # 6. held-out evaluation: judge scores with 95% intervals
    eval_tasks = make_tasks(cfg, r.eval_prompts, "val", cfg.seed + 3)
    prompts = [e.prompt for e in eval_tasks]
    results = {}
    samples = {}
    for name, model in (("sft", sft), ("ppo", policy), ("dpo", dpo_policy)):
        responses = generate_responses(model.eval(), tok, prompts, r.max_new_tokens, 1.0, seed=7)
        samples[name] = responses
        results[name] = judge(prompts, responses)
    candidates = [generate_responses(sft, tok, prompts, r.max_new_tokens, 1.0, seed=100 + k)
                  for k in range(r.best_of_n)]
    scores = torch.stack([rm_scores(rm, tok, prompts, c, device, L) for c in candidates])
    best = scores.argmax(0).tolist()
    samples["best_of_n"] = [candidates[k][i] for i, k in enumerate(best)]
    results["best_of_n"] = judge(prompts, samples["best_of_n"])
    for name, vals in results.items():
        summary[f"judge_{name}"], summary[f"judge_{name}_ci95"] = mean_ci(vals)
    ro = ppo.rollout(prompts[:64])
    summary["kl_ppo"] = float(((ro.logprobs - ro.ref_logprobs) * ro.response_mask).sum(1).mean())
    summary["prompts_eval"] = len(prompts)
    summary["preference_pairs"] = len(pairs)
    summary["wall_s"] = time.time() - t_start
    atomic_write_json(out / "summary.json", summary)
    write_rlhf_report(out, summary, history, prompts, samples)
    log(f"rlhf: judge sft {summary['judge_sft']:.3f} -> ppo {summary['judge_ppo']:.3f} "
        f"(dpo {summary['judge_dpo']:.3f}, best-of-{r.best_of_n} {summary['judge_best_of_n']:.3f}), "
        f"KL {summary['kl_ppo']:.2f} nats")
    return summary


def write_rlhf_report(out: Path, summary: dict, history: list[dict], prompts, samples) -> None:
    from nanogpt4.report import _pyplot, summary_table
    from nanogpt4.utils import atomic_path

    plt = _pyplot()
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    sq = [math.sqrt(max(h["kl"], 0.0)) for h in history]
    for ax, x, xlabel in ((axes[0], steps, "PPO step"), (axes[1], sq, "sqrt(KL) to the SFT reference")):
        judge_ax = ax.twinx()  # the judge has its own scale: the RM's is arbitrary
        ax.plot(x, [h["reward"] for h in history], "o" if ax is axes[1] else "-", ms=3, color="tab:blue",
                label="RM score (optimised)")
        judge_ax.plot(x, [h["judge"] for h in history], "o" if ax is axes[1] else "-", ms=3, color="tab:orange",
                      label="judge score (true)")
        if ax is axes[0]:
            ax.plot(x, [h["kl"] for h in history], color="tab:green", label="KL to reference (nats)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("RM score / KL")
        judge_ax.set_ylabel("judge score", color="tab:orange")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + judge_ax.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper left", fontsize=8)
    axes[1].set_title("over-optimisation (Gao et al.): RM vs judge against sqrt(KL)")
    fig.tight_layout()
    with atomic_path(plots / "rlhf.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    keys = ["rm_val_accuracy", "judge_sft", "judge_ppo", "judge_dpo", "judge_best_of_n", "kl_ppo", "prompts_eval",
            "preference_pairs", "wall_s"]
    body = [summary_table(summary, keys), "", "![RLHF curves](plots/rlhf.png)", "", "### Samples (held-out prompts)"]
    for i in range(3):
        body += ["", f"Prompt:\n```python\n{prompts[i]}```"]
        for name in ("sft", "ppo", "dpo"):
            body += [f"{name}:\n```python\n{samples[name][i]}\n```"]
    atomic_write_text(out / "report.md", "# nanogpt4 RLHF report\n\n" + "\n".join(body) + "\n")
