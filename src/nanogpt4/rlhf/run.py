"""``nanogpt4 rlhf``: SFT -> judge-labelled preferences -> reward model -> PPO (and DPO, best-of-n) -> evaluation.

Offline default: the pretrained model's own corpus supplies the tasks (complete the next lines of a function
from the standard library), ``python-syntax`` plays the labeler, and every policy is judged on held-out
prompts from the validation split.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nanogpt4.data.sources import load_corpus
from nanogpt4.errors import UserError
from nanogpt4.rlhf.data import Example, Preference, code_completion_examples, encode_example, pad_left
from nanogpt4.rlhf.dpo import train_dpo
from nanogpt4.rlhf.judges import label_pairs, load_judge
from nanogpt4.rlhf.models import RewardModel, ValueModel
from nanogpt4.rlhf.ppo import PPOTrainer, check_response_room
from nanogpt4.rlhf.stages import (
    encode_pair,
    generate_responses,
    reward_accuracy,
    train_reward,
    train_sft,
)
from nanogpt4.train.checkpoint import load_model, load_weights, resume_point, save_checkpoint
from nanogpt4.train.distributed import DistInfo, broadcast_flag, broadcast_text, on_rank_zero
from nanogpt4.train.metrics import MetricsLogger
from nanogpt4.train.trainer import StopSignals, stage_checkpoint_interval
from nanogpt4.utils import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    resolve_device,
    resolve_dtype,
)


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
        try:
            return code_completion_examples(docs, n, seed)
        except UserError as e:  # the prompts come from the run's pretraining data: say which
            raise UserError(f"{e} (data.source={cfg.data.source}, the pretraining data)") from None
    return line_examples(docs, n, seed)


def check_tasks(cfg: DictConfig) -> None:
    """Refuse, in a second, the data, judge and context ``run_rlhf`` could not work with (the pipeline's check
    before pretraining): tasks are made from both splits, and the judge scores two held-out ones."""
    judge = load_judge(cfg.rlhf.judge)
    make_tasks(cfg, 2, "train", cfg.seed)
    held_out = make_tasks(cfg, 2, "val", cfg.seed)
    judge([t.prompt for t in held_out], [t.response for t in held_out])  # a module it needs, its scores' form
    check_response_room(cfg.rlhf.max_new_tokens, cfg.model.max_seq_len)


def mean_ci(values, resamples: int = 2000) -> tuple[float, list[float]]:
    """The mean and its 95% percentile-bootstrap interval (fixed seed: the same scores give the same interval).
    Judges score within a range (syntax in [0, 1]) and a policy's scores pile up at its end; the normal
    approximation's mean +- 1.96 s/sqrt(n) then reached past it (16 prompts scoring 0.90: up to 1.016)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), [float(v.mean())] * 2
    means = v[np.random.default_rng(0).integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(v.mean()), [float(lo), float(hi)]


@torch.no_grad()
def rm_scores(rm: RewardModel, tok, prompts: list[str], responses: list[str], device, max_len: int) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), 32):
        seqs = [encode_example(tok, Example(p, r), max_len)[0]
                for p, r in zip(prompts[i:i + 32], responses[i:i + 32], strict=True)]
        ids, mask = pad_left(seqs, tok.pad_id, device)
        out.append(rm(ids, mask))
    return torch.cat(out)


def load_policy(cfg: DictConfig, run: Path, device,
                generates: bool = True) -> tuple[torch.nn.Module, DictConfig, object]:
    """A trained LM (pretrain or SFT run) with its tokenizer; the run's model/data sections override ``cfg``.
    ``generates``: the stage samples responses (``rlhf.max_new_tokens`` must leave room for a prompt); SFT and a
    reward model on your own data, and DPO without its evaluation, sample nothing."""
    policy, run_cfg, tok = load_model(run, device)
    if tok is None:
        raise UserError(f"'{run}' has no tokenizer.json; point at a `nanogpt4 pretrain` or `nanogpt4 sft` run")
    cfg = OmegaConf.merge(cfg, {"model": OmegaConf.to_container(run_cfg.model),
                                "data": OmegaConf.to_container(run_cfg.data)})
    if generates:
        check_response_room(cfg.rlhf.max_new_tokens, cfg.model.max_seq_len)
    return policy, cfg, tok


def check_same_trunk(theirs: torch.nn.Module, ours: torch.nn.Module, their_name: str, our_name: str,
                     fix: str) -> None:
    """Refuse a model whose transformer differs in shape from ``ours`` (PPO's critic starts as the reward
    model, and both read the policy's tokens), naming the first tensor that differs."""
    a = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    for k in sorted(a.keys() | b.keys()):
        if a.get(k) != b.get(k):
            raise UserError(f"{their_name} was trained on another model than {our_name} (tensor '{k}': "
                            f"{a.get(k, 'absent')} vs {b.get(k, 'absent')}); {fix}")


def sft_stage(cfg: DictConfig, policy, tok, out: Path, device, examples: list[Example] | None = None,
              log=print, info: DistInfo | None = None, resume: bool = False) -> dict:
    """Supervised fine-tuning on ``examples`` (default: the offline tasks); the policy is trained in place (under
    torchrun, ``info``, data-parallel: each rank its share of every batch, rank 0 writes)."""
    info = info or DistInfo()
    examples = examples or make_tasks(cfg, cfg.rlhf.sft_examples, "train", cfg.seed)
    if info.is_main:
        log(f"sft: {len(examples)} examples for {cfg.rlhf.sft_steps} steps")
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out / "tokenizer.json")
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    return train_sft(cfg, policy, tok, examples, out, device, log=lambda _m: None,
                     tokenizer_path=out / "tokenizer.json", info=info, resume=resume)


def label_stage(cfg: DictConfig, sft, tok, judge, out: Path, log=print) -> tuple[list[Preference], list[str],
                                                                                 list[str]]:
    """K SFT samples per prompt, ranked by the judge; as in InstructGPT every pair of the K the judge separates
    becomes a comparison (near-ties dropped, as a labeler skips pairs they cannot tell apart; with
    ``rlhf.label_all_pairs=false`` only the best and the worst). Returns (pairs grouped by prompt, prompts, the
    first sample of each prompt)."""
    r = cfg.rlhf
    label_prompts = [e.prompt for e in make_tasks(cfg, r.label_prompts, "train", cfg.seed + 1)]
    k_samples = [generate_responses(sft, tok, label_prompts, r.max_new_tokens, 1.0, seed=1 + k)
                 for k in range(max(2, r.samples_per_prompt))]
    k_scores = np.array([judge(label_prompts, s) for s in k_samples])  # (K, prompts)
    P, K = len(label_prompts), len(k_samples)
    if r.label_all_pairs:  # (prompt, sample, sample), grouped by prompt for the held-out split
        index = [(i, a, b) for i in range(P) for a, b in itertools.combinations(range(K), 2)]
    else:
        index = [(i, int(k_scores[:, i].argmax()), int(k_scores[:, i].argmin())) for i in range(P)]
    labelled = label_pairs(None, [label_prompts[i] for i, _, _ in index], [k_samples[a][i] for i, a, _ in index],
                           [k_samples[b][i] for i, _, b in index], r.label_min_gap,
                           scores=([k_scores[a, i] for i, a, _ in index], [k_scores[b, i] for i, _, b in index]))
    pairs = list(dict.fromkeys(Preference(p, c, j, float(g)) for p, c, j, g in labelled))  # drop duplicate samples
    if len(pairs) < 20:
        raise UserError(f"the judge separated only {len(pairs)} sample pairs; raise rlhf.label_prompts")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "preferences.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                "judge_gap": p.gap}) + "\n")
    log(f"label: {len(pairs)} preference pairs labelled by {r.judge} ({len(label_prompts)} prompts x "
        f"{len(k_samples)} samples)")
    return pairs, label_prompts, k_samples[0]


def label_on_rank_zero(cfg: DictConfig, sft, tok, judge, out: Path, device, info: DistInfo,
                       log=print) -> tuple[list[Preference], tuple[list[str], list[str]] | None]:
    """``label_stage`` once, on rank 0, its pairs sent to every rank (as JSON: nothing is pickled); with them the
    (prompts, first samples) the reward model is centred on, on rank 0 (which sends the others the offset)."""
    labelled: list = []
    on_rank_zero(info, device, lambda: labelled.extend(label_stage(cfg, sft, tok, judge, out, log=log)))
    if not info.enabled:
        return labelled[0], (labelled[1], labelled[2])
    sent = broadcast_text(json.dumps([dataclasses.astuple(p) for p in labelled[0]] if labelled else []), info, device)
    return [Preference(*row) for row in json.loads(sent)], (labelled[1], labelled[2]) if labelled else None


def split_pairs(pairs: list[Preference], seed: int | None = None) -> tuple[list[Preference], list[Preference]]:
    """(train, held out): the pairs of a tenth of the prompts are held out, so no prompt's comparisons sit on
    both sides. The first tenth, in the order given (the judge's labels come in random prompt order), or with
    ``seed`` a random tenth: a file of your own may be sorted (by topic, by source), and its first tenth would
    measure one kind of prompt only."""
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, len(prompts) // 10)])
    val = [p for p in pairs if p.prompt in held]
    if len(val) < 10:  # few prompts with many pairs each (or one prompt): fall back to splitting pairs
        n_val = max(10, len(pairs) // 10)
        order = random.Random(seed).sample(pairs, len(pairs)) if seed is not None else pairs
        val, train = order[:n_val], order[n_val:]
    else:
        train = [p for p in pairs if p.prompt not in held]
    if len(train) < 10:
        raise UserError(f"{len(pairs)} preference pairs are too few to train and hold out a reward model (need 20+)")
    return train, val


def clearest_pairs(pairs: list[Preference]) -> list[Preference]:
    """Each prompt's widest-gap comparison (the judge's best vs worst sample), where the judge's gaps are known."""
    best: dict[str, Preference] = {}
    for p in pairs:
        if p.gap is None:
            return pairs
        if p.prompt not in best or p.gap > best[p.prompt].gap:
            best[p.prompt] = p
    return list(best.values())


def reward_stage(cfg: DictConfig, sft, tok, pairs: list[Preference], out: Path, device,
                 centre_on: tuple[list[str], list[str]] | None = None, log=print,
                 info: DistInfo | None = None, held_out_seed: int | None = None,
                 resume: bool = False) -> tuple[RewardModel, dict]:
    """Bradley-Terry reward model from the SFT weights (fine-tuned base; with ``rlhf.compare_frozen_base`` a
    frozen-base twin is trained too and reported beside it), centred so SFT responses average 0. Under
    torchrun (``info``) the ranks train it data-parallel; rank 0 alone centres and saves it."""
    info = info or DistInfo()
    r, L = cfg.rlhf, cfg.model.max_seq_len
    train_pairs, val_all = split_pairs(pairs, held_out_seed)
    # the headline accuracy is on each held-out prompt's clearest comparison (best vs worst of K); all of the
    # held-out prompts' comparisons, close calls included, are reported beside it
    val_pairs = clearest_pairs(val_all)
    val_enc = [encode_pair(tok, p, L) for p in val_pairs]
    all_enc = [encode_pair(tok, p, L) for p in val_all] if len(val_all) > len(val_pairs) else None
    quiet = lambda _m: None  # noqa: E731
    stats: dict = {"preference_pairs": len(pairs), "rm_val_pairs": len(val_pairs), "rm_val_pairs_all": len(val_all)}
    variants = [("", r.freeze_base)]
    if r.compare_frozen_base:
        variants.append(("_fine_tuned" if r.freeze_base else "_frozen_base", not r.freeze_base))
    rm = None
    for suffix, freeze in variants:
        model = RewardModel(copy.deepcopy(sft), freeze_base=freeze, seed=cfg.seed).to(device)
        run_dir = out / suffix.lstrip("_") if suffix else out
        train_reward(cfg, model, tok, train_pairs, val_pairs, run_dir, device, log=quiet, info=info, resume=resume)
        stats[f"rm_val_accuracy{suffix}"] = reward_accuracy(model, val_enc, tok.pad_id, device)
        if all_enc is not None:
            stats[f"rm_val_accuracy_all_pairs{suffix}"] = reward_accuracy(model, all_enc, tok.pad_id, device)
        if rm is None:
            rm = model
    stats["rm_freeze_base"] = r.freeze_base
    if centre_on is not None and info.is_main:
        # from the uncentred scores: a model resumed after it was centred and saved (stopped before its summary)
        # gets the very same centre (its own offset in the scores would leave it ~0, or off by rounding)
        rm.reward_offset.zero_()
        rm.reward_offset.fill_(float(rm_scores(rm, tok, centre_on[0], centre_on[1], device, L).mean()))
    if info.enabled:  # rank 0's centre on every rank: PPO's ranks must read the same rewards
        dist.broadcast(rm.reward_offset, src=0)
    rm.eval().requires_grad_(False)
    if not info.is_main:
        return rm, stats
    save_checkpoint(out, r.reward_steps, rm, cfg, None, {}, keep_last=1)
    others = ", ".join(f"{k[len('rm_val_accuracy_'):]} {v:.3f}" for k, v in stats.items()
                       if k.startswith("rm_val_accuracy_"))
    log(f"reward: held-out accuracy {stats['rm_val_accuracy']:.3f} on {len(val_pairs)} pairs"
        + (f" ({others})" if others else ""))
    return rm, stats


def rollout_order(prompts: list[str], n: int, seed: int) -> list[str]:
    """At least ``n`` prompts: passes over ``prompts``, each in a new order (the same on every rank)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        out += rng.sample(prompts, len(prompts))
    return out


def ppo_stage(cfg: DictConfig, policy, sft, rm: RewardModel, tok, judge, out: Path, device,
              log=print, info: DistInfo | None = None, prompts: list[str] | None = None,
              policy_dir: Path | None = None, resume: bool = False) -> tuple[PPOTrainer, list[dict]]:
    """PPO against the learned reward; the judge only watches. ``policy`` is trained in place. Under torchrun
    (``info``) each rank rolls out its share of every rollout batch; rank 0 logs. ``prompts``: your own (each
    pass over them in a new order), else the run corpus' tasks. The trained policy is saved in ``policy_dir``
    (default ``out``), and so are checkpoints on the way (``stage_checkpoint_interval``) and a stopped run's
    (SIGTERM or a first Ctrl-C: the step finishes first), which ``resume`` goes on from to the uninterrupted
    run's rollouts and updates."""
    r = cfg.rlhf
    info = info or DistInfo()
    if r.rollout_batch_size % info.world_size or r.mini_batch_size % info.world_size:
        raise UserError(f"rlhf.rollout_batch_size={r.rollout_batch_size} and mini_batch_size={r.mini_batch_size} "
                        f"must be divisible by the number of processes ({info.world_size})")

    def score_fn(ids, mask):
        return rm(ids, mask)

    value = ValueModel(copy.deepcopy(rm.transformer)).requires_grad_(True)  # the critic starts as the RM
    value.reward_head.load_state_dict(rm.reward_head.state_dict())
    ppo = PPOTrainer(policy, score_fn, tok, r, value_model=value.to(device), ref_policy=sft,
                     learning_rate=r.ppo_learning_rate, no_eos_penalty=r.no_eos_penalty, seed=cfg.seed, info=info,
                     dtype=resolve_dtype(cfg.training.dtype, device))
    need = r.ppo_steps * r.rollout_batch_size
    ppo_prompts = ([e.prompt for e in make_tasks(cfg, need, "train", cfg.seed + 2)] if prompts is None
                   else rollout_order(prompts, need, cfg.seed + 2))
    out.mkdir(parents=True, exist_ok=True)
    policy_dir = policy_dir or out
    metrics = MetricsLogger(out, enabled=info.is_main)
    prompts_id = hashlib.sha256(json.dumps(ppo_prompts).encode()).hexdigest()[:16]  # what a resume compares
    history = resumed_ppo(ppo, policy_dir, metrics, r.ppo_steps, prompts_id, log) if resume else []
    if info.is_main and not history:  # a fresh start (or one stopped before its first checkpoint)
        metrics.path.unlink(missing_ok=True)
    checkpoint_interval = stage_checkpoint_interval(cfg.training, r.ppo_steps)
    with StopSignals(info.is_main) as stops:
        for step in range(ppo.step_count, r.ppo_steps):
            batch = ppo_prompts[step * r.rollout_batch_size:(step + 1) * r.rollout_batch_size][
                info.rank::info.world_size]
            stats, ro = ppo.step(batch)
            responses = [tok.decode([t for t, m in zip(row, mrow, strict=True) if m and t != tok.eot_id])
                         for row, mrow in zip(ro.input_ids[:, ro.prompt_len:].tolist(), ro.response_mask.tolist(),
                                              strict=True)]
            stats["judge"] = float(np.mean(judge(batch, responses)))  # this rank's share
            history.append(stats)
            metrics.log({k: v for k, v in stats.items() if isinstance(v, (int, float))})
            if info.is_main and (step + 1) % max(1, r.ppo_steps // 10) == 0:
                log(f"ppo step {step + 1}/{r.ppo_steps}: reward {stats['reward']:.3f} judge "
                    f"{stats['judge']:.3f} kl {stats['kl']:.2f} clipfrac {stats['clipfrac']:.3f}")
            if step + 1 == r.ppo_steps:
                continue
            stopped = broadcast_flag(stops.received is not None, info, device)
            if info.is_main and (stopped or (step + 1) % checkpoint_interval == 0):
                save_policy(policy_dir, ppo.step_count, policy, cfg, tok,
                            {**ppo.state_dict(), "data_id": prompts_id}, extra={"value": ppo.value})
            if stopped:  # rank 0's decision on every rank, so none waits in a collective alone
                stops.raise_stopped(f"at PPO step {ppo.step_count} of {r.ppo_steps}")
        if info.is_main:  # first: whatever the evaluation meets, the trained policy is kept
            save_policy(policy_dir, r.ppo_steps, policy, cfg, tok)
    if stops.received is not None:  # came during the last step or the save: the policy is kept, but it stops
        stops.raise_stopped(f"at PPO step {ppo.step_count} of {r.ppo_steps}")
    return ppo, history


def resumed_ppo(ppo: PPOTrainer, policy_dir: Path, metrics: MetricsLogger, steps: int, prompts_id: str,
                log) -> list[dict]:
    """Restore ``ppo`` from ``policy_dir``'s checkpoint of a stopped run: the policy, the critic, the optimizer, the
    KL coefficient and where the rollouts' seeds are (the trained policy alone when it was stopped after
    training); a warning when the prompts it rolls out (``prompts_id``) are not the stopped run's. Returns the
    steps logged until then (read by rank 0, which keeps them and drops any later row); none when there is no
    checkpoint: PPO starts again."""
    point = resume_point(policy_dir, steps, "PPO step", " (rlhf.ppo_steps)", "the trained policy (no critic)")
    if point is None:
        return []
    step, ckpt, state = point
    load_weights(ppo.policy, ckpt / "model.safetensors")
    if "optimizer" in state:
        load_weights(ppo.value, ckpt / "value.safetensors")
        ppo.load_state_dict(state)
        if state.get("data_id") != prompts_id:
            log(f"warning: the prompts to roll out are not those PPO step {step} was trained on (--prompts or the "
                f"corpus changed since): training goes on with these, so the run will not match an uninterrupted "
                f"one")
    else:  # the trained policy, saved after its training: nothing is left to train
        ppo.step_count = ppo.rollouts = step
    if not ppo.info.is_main:  # only rank 0 logs, and keeps the steps for the report
        return []
    metrics.truncate_after(step)
    return read_jsonl(metrics.path) if metrics.path.exists() else []


def held_out_prompts(cfg: DictConfig) -> list[str]:
    """The prompts ``evaluate_policies`` scores by default: ``rlhf.eval_prompts`` held-out tasks of the corpus."""
    return [e.prompt for e in make_tasks(cfg, cfg.rlhf.eval_prompts, "val", cfg.seed + 3)]


def evaluate_policies(cfg: DictConfig, policies: dict, tok, judge, device, rm: RewardModel | None = None,
                      best_of_base=None, prompts: list[str] | None = None) -> tuple[dict, list[str], dict]:
    """Mean held-out judge score (with a 95% interval) of each policy, and best-of-n of ``best_of_base``
    ranked by ``rm``, on ``prompts`` (at most ``rlhf.eval_prompts``; default: the run corpus' held-out tasks).
    Returns (summary entries, prompts, samples)."""
    r, L = cfg.rlhf, cfg.model.max_seq_len
    prompts = (prompts if prompts is not None else held_out_prompts(cfg))[:r.eval_prompts]
    results, samples = {}, {}
    for name, model in policies.items():
        samples[name] = generate_responses(model.eval(), tok, prompts, r.max_new_tokens, 1.0, seed=7)
        results[name] = judge(prompts, samples[name])
    if rm is not None and best_of_base is not None:
        candidates = [generate_responses(best_of_base, tok, prompts, r.max_new_tokens, 1.0, seed=100 + k)
                      for k in range(r.best_of_n)]
        scores = torch.stack([rm_scores(rm, tok, prompts, c, device, L) for c in candidates])
        best = scores.argmax(0).tolist()
        samples["best_of_n"] = [candidates[k][i] for i, k in enumerate(best)]
        results["best_of_n"] = judge(prompts, samples["best_of_n"])
    summary = {"prompts_eval": len(prompts)}
    for name, vals in results.items():
        summary[f"judge_{name}"], summary[f"judge_{name}_ci95"] = mean_ci(vals)
    return summary, prompts, samples


def ppo_kl(ppo: PPOTrainer, prompts: list[str]) -> float:
    ro = ppo.rollout(prompts[:64])
    return float(((ro.logprobs - ro.ref_logprobs) * ro.response_mask).sum(1).mean())


def save_policy(out: Path, step: int, policy, cfg, tok, state: dict | None = None,
                extra: dict[str, torch.nn.Module] | None = None) -> None:
    """A policy as a normal checkpoint with its tokenizer, so `sample` and later stages read it; a trained one
    has no trainer ``state``, a stopped PPO run's has its own and its critic (``extra``)."""
    tok.save(out / "tokenizer.json")
    save_checkpoint(out, step, policy, cfg, out / "tokenizer.json", state or {}, keep_last=1, extra=extra)


def run_rlhf(cfg: DictConfig, pretrained: Path, out: Path, log=print, info: DistInfo | None = None,
             device: torch.device | None = None, resume: bool = False) -> dict | None:
    """SFT -> judge labels -> reward model -> PPO, DPO and best-of-n -> held-out judge scores. Under torchrun
    (``info``, ``device``: the rank's) every stage trains data-parallel; rank 0 labels the pairs (and sends them
    to the others), evaluates and writes, and the other ranks return None once DPO is trained. ``resume``: go on
    with the stopped run in ``out``: SFT, the reward model and DPO from their checkpoints (finished ones reused),
    the labels made again from the same seeds, PPO from its checkpoint when it was stopped (else again)."""
    t_start = time.time()
    info = info or DistInfo()
    device = device or resolve_device(cfg.device)
    log = log if info.is_main else (lambda _m: None)
    policy, cfg, tok = load_policy(cfg, pretrained, device)
    if info.is_main:  # after the pretrained run loaded: a bad path leaves nothing
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    r = cfg.rlhf
    judge = load_judge(r.judge)
    summary: dict = {"judge": r.judge, "processes": info.world_size, "device": str(device)}

    sft_stage(cfg, policy, tok, out / "sft", device, log=log, info=info, resume=resume)
    sft = copy.deepcopy(policy).eval()
    pairs, centre = label_on_rank_zero(cfg, sft, tok, judge, out, device, info, log)
    rm, rm_stats = reward_stage(cfg, sft, tok, pairs, out / "reward", device, centre, log, info=info, resume=resume)
    summary.update(rm_stats)
    ppo, history = ppo_stage(cfg, policy, sft, rm, tok, judge, out, device, log, info=info, policy_dir=out / "ppo",
                             resume=resume)
    ppo.info = DistInfo()  # training is over: rank 0 evaluates alone, without collectives

    # DPO from the SFT model on the same pairs
    dpo_policy = copy.deepcopy(sft).train().requires_grad_(True)
    train_dpo(cfg, dpo_policy, tok, split_pairs(pairs)[0], out / "dpo", device, r.dpo_steps, log=lambda _m: None,
              info=info, resume=resume)
    if not info.is_main:
        return None

    results, prompts, samples = evaluate_policies(cfg, {"sft": sft, "ppo": policy, "dpo": dpo_policy}, tok, judge,
                                                  device, rm=rm, best_of_base=sft)
    summary.update(results)
    summary["kl_ppo"] = ppo_kl(ppo, prompts)
    # the aligned policies (PPO's saved after its training), readable by `nanogpt4 sample --raw-prompt`; before
    # the summary: a finished summary is what marks this stage done
    save_policy(out / "dpo", r.dpo_steps, dpo_policy, cfg, tok)
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
    keys = ["rm_val_accuracy", "rm_val_accuracy_frozen_base", "rm_val_accuracy_fine_tuned",
            "rm_val_accuracy_all_pairs", "rm_val_pairs", "rm_val_pairs_all",
            "judge_sft", "judge_ppo", "judge_dpo", "judge_best_of_n", "kl_ppo", "prompts_eval",
            "preference_pairs", "wall_s"]
    body = [summary_table(summary, keys), "", "![RLHF curves](plots/rlhf.png)", "", "### Samples (held-out prompts)"]
    for i in range(3):
        body += ["", f"Prompt:\n```python\n{prompts[i]}```"]
        for name in ("sft", "ppo", "dpo"):
            body += [f"{name}:\n```python\n{samples[name][i]}\n```"]
    atomic_write_text(out / "report.md", "# nanogpt4 RLHF report\n\n" + "\n".join(body) + "\n")
