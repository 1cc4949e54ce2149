"""SFT and reward-model stages on the shared Trainer, plus sampling and judge labelling."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nanogpt4.data.tokenizer import Tokenizer
from nanogpt4.rlhf.data import Example, Preference, encode_example, pad_left, pad_right
from nanogpt4.rlhf.models import RewardModel
from nanogpt4.rlhf.ops import bradley_terry_loss
from nanogpt4.train.distributed import DistInfo
from nanogpt4.train.trainer import STAGE_RESET, Trainer, rank_rows, stage_checkpoint_interval


def stage_training_cfg(cfg: DictConfig, **overrides) -> DictConfig:
    """The run's training section with a stage's own steps / learning rate (no sampling, short warmup), and
    checkpoints as ``stage_checkpoint_interval`` spaces them."""
    tc = OmegaConf.merge(cfg.training, STAGE_RESET, overrides)
    tc.checkpoint_interval = stage_checkpoint_interval(cfg.training, tc.max_steps)
    return tc  # type: ignore[return-value]


class SFTBatches:
    """Per step, ``batch_size`` examples drawn by (seed, step); prompt tokens masked out of the loss."""

    def __init__(self, examples: list[Example], tok: Tokenizer, max_len: int, batch_size: int, seed: int):
        # next-token targets: position t predicts token t+1 (labels shift left by one)
        self.encoded = [(ids[:-1], labels[1:]) for ids, labels in
                        (encode_example(tok, ex, max_len + 1) for ex in examples)]
        self.pad = tok.pad_id
        self.batch_size = batch_size
        self.seed = seed
        self.tokens_per_step = batch_size * max(len(ids) for ids, _ in self.encoded)

    def get(self, step: int, micro: int, accum: int, info: DistInfo, device) -> dict:
        rows = step_rows(len(self.encoded), self.batch_size, self.seed, step, micro, accum, info)
        ids = pad_right([self.encoded[i][0] for i in rows], self.pad, device)
        labels = pad_right([self.encoded[i][1] for i in rows], -100, device)
        return {"input_ids": ids, "labels": labels, "loss_tokens": sum(int(t != -100) for i in rows
                                                                       for t in self.encoded[i][1])}


def step_rows(n_items: int, batch_size: int, seed: int, step: int, micro: int, accum: int,
              info: DistInfo) -> list[int]:
    """This rank's share of the ``batch_size`` item indices drawn for ``step`` (a pure function of its args)."""
    rng = random.Random(seed * 1_000_003 + step)
    chosen = [rng.randrange(n_items) for _ in range(batch_size)]
    return chosen[rank_rows(batch_size, micro, accum, info)]


def encode_pair(tok: Tokenizer, pref: Preference, max_len: int) -> tuple[list[int], list[int]]:
    def seq(response: str) -> list[int]:
        ids, _ = encode_example(tok, Example(pref.prompt, response), max_len)
        return ids

    return seq(pref.chosen), seq(pref.rejected)


class PreferenceBatches:
    """Chosen and rejected sequences of ``batch_size`` pairs, left-padded into one (2B, T) batch."""

    def __init__(self, prefs: list[Preference], tok: Tokenizer, max_len: int, batch_size: int, seed: int):
        self.pairs = [self.encode(tok, p, max_len) for p in prefs]
        self.pad = tok.pad_id
        self.batch_size = batch_size
        self.seed = seed
        self.tokens_per_step = 2 * batch_size * max_len

    def encode(self, tok: Tokenizer, pref: Preference, max_len: int):
        return encode_pair(tok, pref, max_len)

    def collate(self, pairs: list, device) -> dict:
        return collate_pairs(pairs, self.pad, device)

    def get(self, step: int, micro: int, accum: int, info: DistInfo, device) -> dict:
        rows = step_rows(len(self.pairs), self.batch_size, self.seed, step, micro, accum, info)
        return self.collate([self.pairs[i] for i in rows], device)


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad: int, device) -> dict:
    ids, mask = pad_left([c for c, _ in pairs] + [r for _, r in pairs], pad, device)
    return {"input_ids": ids, "attention_mask": mask, "n_pairs": len(pairs)}


def reward_loss(model, batch: dict) -> torch.Tensor:
    r = model(batch["input_ids"], batch["attention_mask"])
    n = batch["n_pairs"]
    return bradley_terry_loss(r[:n], r[n:])


@torch.no_grad()
def reward_accuracy(rm: RewardModel, pairs: list[tuple[list[int], list[int]]], pad: int, device,
                    batch_size: int = 32) -> float:
    was = rm.training
    rm.eval()
    correct = 0
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], pad, device)
        r = rm(batch["input_ids"], batch["attention_mask"])
        n = batch["n_pairs"]
        correct += int((r[:n] > r[n:]).sum())
    rm.train(was)
    return correct / max(1, len(pairs))


def train_sft(cfg: DictConfig, model, tok: Tokenizer, examples: list[Example], run_dir: Path, device,
              log=print, tokenizer_path: Path | None = None, info: DistInfo | None = None,
              resume: bool = False) -> dict:
    tc = stage_training_cfg(cfg, max_steps=cfg.rlhf.sft_steps, learning_rate=cfg.rlhf.sft_learning_rate,
                            warmup_steps=min(20, cfg.rlhf.sft_steps // 10 + 1),
                            eval_interval=cfg.rlhf.sft_steps)
    batches = SFTBatches(examples, tok, cfg.model.max_seq_len, tc.batch_size, cfg.seed)
    trainer = Trainer(cfg, model, batches, run_dir, info or DistInfo(), device, train_cfg=tc, progress=False,
                      log=log, tokenizer_path=tokenizer_path, lr_setting="rlhf.sft_learning_rate")
    if resume:
        trainer.resume_or_restart()
    return trainer.fit()


def train_reward(cfg: DictConfig, rm: RewardModel, tok: Tokenizer, train: list[Preference],
                 held_out: list[Preference], run_dir: Path, device, log=print, info: DistInfo | None = None,
                 resume: bool = False) -> dict:
    max_len = cfg.model.max_seq_len
    val_pairs = [encode_pair(tok, p, max_len) for p in held_out]
    tc = stage_training_cfg(cfg, max_steps=cfg.rlhf.reward_steps, learning_rate=cfg.rlhf.reward_model_lr,
                            warmup_steps=min(20, cfg.rlhf.reward_steps // 10 + 1),
                            eval_interval=max(1, cfg.rlhf.reward_steps // 4))
    batches = PreferenceBatches(train, tok, max_len, tc.batch_size, cfg.seed)
    trainer = Trainer(cfg, rm, batches, run_dir, info or DistInfo(), device, loss_fn=reward_loss, train_cfg=tc,
                      evaluate=lambda m: {"rm_val_accuracy": reward_accuracy(m, val_pairs, tok.pad_id, device)},
                      progress=False, log=log, lr_setting="rlhf.reward_model_lr")
    if resume:
        trainer.resume_or_restart()
    return trainer.fit()


@torch.no_grad()
def generate_responses(model, tok: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                       seed: int, batch_size: int = 32, top_k: int | None = None) -> list[str]:
    """One sampled response per prompt (left-padded batches, stop at end-of-text)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    limit = model.cfg.max_seq_len - max_new_tokens
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = [tok.raw_prompt_ids(p)[-limit:] for p in prompts[i:i + batch_size]]
        ids, mask = pad_left(enc, tok.pad_id, device)
        gen = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, attention_mask=mask,
                             stop_tokens=[tok.eot_id], pad_token_id=tok.pad_id, generator=g)
        for row in gen[:, ids.size(1):].tolist():
            if tok.eot_id in row:
                row = row[:row.index(tok.eot_id)]
            out.append(tok.decode([t for t in row if t != tok.pad_id]))
    return out
