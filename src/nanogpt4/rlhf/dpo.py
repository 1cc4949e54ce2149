"""DPO on the shared Trainer: the standard loss against a frozen reference, on the same preference pairs."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import DictConfig

from nanogpt4.data.tokenizer import Tokenizer
from nanogpt4.rlhf.data import Example, Preference, encode_example
from nanogpt4.rlhf.ops import dpo_loss, gather_logprobs
from nanogpt4.rlhf.stages import PreferenceBatches, stage_training_cfg
from nanogpt4.train.distributed import DistInfo, unwrap
from nanogpt4.train.trainer import Trainer


def sequence_logprob(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p over the labelled (response) tokens of each row; the LM head runs on those tokens only."""
    hidden = model(ids, attention_mask=mask, return_hidden=True)[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    rows = torch.arange(ids.size(0), device=ids.device)[:, None].expand_as(target)[keep]
    lp = gather_logprobs(unwrap(model).head(hidden[keep]), target[keep])  # the tied head, also under DDP
    return torch.zeros(ids.size(0), dtype=lp.dtype, device=ids.device).index_add(0, rows, lp)


def _collate(items: list[tuple[list[int], list[int]]], pad: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(i) for i, _ in items)
    ids = torch.tensor([[pad] * (width - len(i)) + i for i, _ in items], device=device)
    labels = torch.tensor([[-100] * (width - len(i)) + lab for i, lab in items], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in items], device=device)
    return ids, mask, labels


class DPOBatches(PreferenceBatches):
    """Preference batches that keep response labels and carry the frozen reference's log-probs."""

    def __init__(self, prefs: list[Preference], ref, tok: Tokenizer, max_len: int, batch_size: int, seed: int):
        self.ref = ref
        super().__init__(prefs, tok, max_len, batch_size, seed)

    def encode(self, tok: Tokenizer, pref: Preference, max_len: int):
        return (encode_example(tok, Example(pref.prompt, pref.chosen), max_len),
                encode_example(tok, Example(pref.prompt, pref.rejected), max_len))

    def collate(self, pairs: list, device) -> dict:
        ids, mask, labels = _collate([c for c, _ in pairs] + [r for _, r in pairs], self.pad, device)
        with torch.no_grad():
            ref_lp = sequence_logprob(self.ref, ids, mask, labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "ref_logprobs": ref_lp,
                "n_pairs": len(pairs)}


def make_dpo_loss(beta: float):
    def loss_fn(model, batch: dict) -> torch.Tensor:
        lp = sequence_logprob(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        n, ref = batch["n_pairs"], batch["ref_logprobs"]
        loss, _ = dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], beta)
        return loss

    return loss_fn


def train_dpo(cfg: DictConfig, policy, tok: Tokenizer, prefs: list[Preference], run_dir: Path, device,
              steps: int, log=print, info: DistInfo | None = None, resume: bool = False) -> dict:
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    tc = stage_training_cfg(cfg, max_steps=steps, learning_rate=cfg.rlhf.dpo_learning_rate, batch_size=16,
                            grad_accum_steps=1,
                            warmup_steps=min(20, steps // 10 + 1), eval_interval=steps,
                            dtype="float32")
    batches = DPOBatches(prefs, ref, tok, cfg.model.max_seq_len, tc.batch_size, cfg.seed)
    trainer = Trainer(cfg, policy, batches, run_dir, info or DistInfo(), device,
                      loss_fn=make_dpo_loss(cfg.rlhf.dpo_beta), train_cfg=tc, progress=False, log=log,
                      lr_setting="rlhf.dpo_learning_rate")
    if resume:  # the reference is the policy as given (the SFT model), so its log-probs are the first run's
        trainer.resume_or_restart()
    return trainer.fit()
