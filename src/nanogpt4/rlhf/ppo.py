"""PPO for language models, done as InstructGPT / TRL do it.

One step: sample responses with the KV-cache generator -> store the rollout's log-probs (policy and frozen
reference) and values once -> per-token reward ``-β·KL`` plus the reward-model score on the last response
token (minus a penalty when no end-of-text was produced) -> GAE over response tokens -> whitened advantages
-> K epochs of clipped policy + clipped value updates over minibatches -> adaptive β.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from nanogpt4.data.tokenizer import Tokenizer
from nanogpt4.errors import TrainingDiverged, UserError
from nanogpt4.rlhf.data import pad_left
from nanogpt4.rlhf.models import ValueModel
from nanogpt4.rlhf.ops import (
    AdaptiveKLController,
    compute_gae,
    entropy_from_logits,
    gather_logprobs,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from nanogpt4.train.distributed import DistInfo
from nanogpt4.utils import autocast_ctx


def all_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_whiten(x: torch.Tensor, mask: torch.Tensor, info: DistInfo, eps: float = 1e-8) -> torch.Tensor:
    """``masked_whiten`` over the valid tokens of every data-parallel rank's rollout (mean and unbiased
    variance of the global batch, as one process holding all of it would compute)."""
    m = mask.to(x.dtype)
    n = all_sum(m.sum(), info)
    mean = all_sum((x * m).sum(), info) / n.clamp(min=1)
    sq = all_sum((((x - mean) * m) ** 2).sum(), info)
    var = sq / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sequence ids, attention mask) -> (B,) scores


MIN_PROMPT_TOKENS = 8  # what a prompt keeps of the context after the longest response


def check_response_room(max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse responses so long that the context keeps fewer than ``MIN_PROMPT_TOKENS`` of the prompt."""
    if max_new_tokens > max_seq_len - MIN_PROMPT_TOKENS:
        raise UserError(f"rlhf.max_new_tokens={max_new_tokens} leaves no room for prompts in model.max_seq_len="
                        f"{max_seq_len}; set rlhf.max_new_tokens <= {max_seq_len - MIN_PROMPT_TOKENS}")


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + R) prompt (left-padded) + response
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # (B, R): response tokens up to and including end-of-text
    prompt_len: int
    logprobs: torch.Tensor  # (B, R) policy log-probs at sampling time
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (B,) reward-model score (with the no-EOS penalty)
    advantages: torch.Tensor
    returns: torch.Tensor


def response_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                      with_entropy: bool = False):
    """log p(response token | prefix) for every response position (logits of the previous position).

    The LM head runs on response positions only: prompt logits are never needed.
    """
    hidden = model(ids, attention_mask=mask, return_hidden=True)[:, prompt_len - 1:-1]
    logits = model.head(hidden)
    lp = gather_logprobs(logits, ids[:, prompt_len:])
    return (lp, entropy_from_logits(logits)) if with_entropy else lp


class PPOTrainer:
    def __init__(self, policy: nn.Module, score_fn: ScoreFn, tokenizer: Tokenizer, rlhf_cfg,
                 value_model: ValueModel | None = None, ref_policy: nn.Module | None = None,
                 learning_rate: float = 1e-5, value_learning_rate: float | None = None,
                 no_eos_penalty: float = 1.0, vf_coef: float = 0.5, seed: int = 0, info: DistInfo | None = None,
                 dtype: torch.dtype = torch.float32):
        """Under data parallelism (``info`` from ``init_distributed``) every rank rolls out its share of the
        prompts, advantages are whitened over the global batch, and gradients are summed over ranks with the
        loss normalised by the global minibatch's token count: the update equals one process's. ``dtype``
        bfloat16 runs rollouts and update forwards under autocast (log-probs, values, advantages and losses stay
        fp32); the first minibatch's ratio is then 1 up to bf16 rounding instead of exactly."""
        check_response_room(rlhf_cfg.max_new_tokens, policy.cfg.max_seq_len)
        self.info = info or DistInfo()
        self.policy = policy
        self.ref = ref_policy if ref_policy is not None else copy.deepcopy(policy)
        self.ref.eval().requires_grad_(False)
        self.value = value_model if value_model is not None else ValueModel(copy.deepcopy(policy), seed=seed)
        self.score_fn = score_fn
        self.tok = tokenizer
        self.c = rlhf_cfg
        self.no_eos_penalty = no_eos_penalty
        self.vf_coef = vf_coef
        self.kl_ctl = AdaptiveKLController(rlhf_cfg.kl_coef, rlhf_cfg.target_kl, rlhf_cfg.kl_horizon)
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": learning_rate},
             {"params": [p for p in self.value.parameters() if p.requires_grad],
              "lr": value_learning_rate or learning_rate * 2}], weight_decay=0.0, betas=(0.9, 0.95))
        self.device = next(policy.parameters()).device
        self.dtype = dtype
        self._sampler: nn.Module | None = None  # a low-precision copy of the policy for rollouts
        self.seed = seed
        self.generator = torch.Generator(device=self.device)  # seeded for each rollout (``rollout_seed``)
        self.rollouts = 0  # rollouts drawn so far, this rank's
        if self.info.enabled:  # every rank starts from rank 0's weights
            for p in [*policy.parameters(), *self.value.parameters()]:
                dist.broadcast(p.data, src=0)
        self.step_count = 0
        self.buffer: list[tuple[Rollout, float]] = []  # collected, not yet trained on: (rollout, its seconds)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Rollout:
        c, tok = self.c, self.tok
        limit = self.policy.cfg.max_seq_len - c.max_new_tokens
        enc = [tok.raw_prompt_ids(p)[-limit:] for p in prompts]
        prompt_ids, prompt_mask = pad_left(enc, tok.pad_id, self.device)
        P = prompt_ids.size(1)
        self.generator.manual_seed(self.rollout_seed())
        self.rollouts += 1
        seq = self.sampler().generate(prompt_ids, c.max_new_tokens, temperature=1.0, attention_mask=prompt_mask,
                                      stop_tokens=[tok.eot_id], pad_token_id=tok.pad_id, generator=self.generator)
        return self.score_rollout(seq, prompt_mask, P)

    def rollout_seed(self) -> int:
        """The sampling seed of this rank's next rollout: a function of the trainer's seed, the rank and how many
        rollouts came before, so a resumed run (``load_state_dict``) draws what the uninterrupted one would have."""
        state = np.random.SeedSequence([self.seed, self.info.rank, self.rollouts]).generate_state(1, np.uint64)
        return int(state[0]) >> 1  # below 2**63: a torch seed

    def state_dict(self) -> dict:
        """What a stopped run needs, besides the policy's and the critic's weights, to go on exactly (plain
        tensors and numbers: ``torch.load(..., weights_only=True)`` reads it). Taken between steps: nothing
        collected is waiting to be trained on."""
        if self.buffer:
            raise RuntimeError("state_dict() with collected experience not yet trained on: call update_policy() "
                               "first")
        return {"step": self.step_count, "rollouts": self.rollouts, "kl_coef": self.kl_ctl.kl_coef,
                "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.rollouts = int(state["step"]), int(state["rollouts"])
        self.kl_ctl.kl_coef = float(state["kl_coef"])
        self.opt.load_state_dict(state["optimizer"])

    def sampler(self) -> nn.Module:
        """The policy that samples rollouts: itself in fp32; in bf16 a bf16 copy with the current weights, since
        autocast would cast every weight again at every decoding step. The log-probs PPO trains on are
        recomputed from the fp32 policy in ``score_rollout``, so the copy only decides which tokens are drawn."""
        if self.dtype == torch.float32:
            return self.policy
        if self._sampler is None:
            self._sampler = copy.deepcopy(self.policy).to(self.dtype).eval().requires_grad_(False)
        with torch.no_grad():
            for dst, src in zip(self._sampler.parameters(), self.policy.parameters(), strict=True):
                dst.copy_(src)
        return self._sampler

    @torch.no_grad()
    def score_rollout(self, seq: torch.Tensor, prompt_mask: torch.Tensor, P: int) -> Rollout:
        """Everything PPO stores about sampled sequences: log-probs, reference log-probs, values, scores,
        rewards, GAE advantages (whitened) and returns. ``seq`` = left-padded prompts (width ``P``) + responses."""
        c, tok = self.c, self.tok
        response = seq[:, P:]
        # valid = up to and including the first end-of-text
        is_eot = response == tok.eot_id
        after_eot = (is_eot.long().cumsum(1) - is_eot.long()) > 0
        response_mask = (~after_eot).long()
        mask = torch.cat([prompt_mask, response_mask], dim=1)
        self.policy.eval()
        with autocast_ctx(self.device, self.dtype):
            logprobs = response_logprobs(self.policy, seq, mask, P)
            ref_logprobs = response_logprobs(self.ref, seq, mask, P)
            values = self.value(seq, mask)[:, P - 1:-1]
            scores = self.score_fn(seq, mask).float()
        ended = is_eot.any(dim=1)
        scores = scores - self.no_eos_penalty * (~ended).float()
        # rewards: -β·KL on every response token, the score on the last one
        kl = (logprobs - ref_logprobs) * response_mask
        rewards = -self.kl_ctl.kl_coef * kl
        last = response_mask.sum(1).clamp(min=1) - 1
        rewards[torch.arange(rewards.size(0)), last] += scores
        advantages, returns = compute_gae(rewards, values, response_mask, c.gamma, c.lam)
        advantages = global_whiten(advantages, response_mask, self.info)
        return Rollout(seq, mask, response_mask, P, logprobs, ref_logprobs, values, scores, advantages, returns)

    # ------------------------------------------------------------------ update
    def update(self, ro: Rollout) -> dict:
        c = self.c
        B = ro.input_ids.size(0)
        # dropout stays off in rollouts and updates alike, so the first minibatch's ratio is exactly 1
        self.policy.eval()
        self.value.eval()
        stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "ratio",
                                                         "entropy", "value_clipfrac")}
        first_ratio = None
        g = torch.Generator().manual_seed(self.step_count * 1009 + self.info.rank)
        mini = max(1, c.mini_batch_size // self.info.world_size)  # the config's minibatch is global
        for _ in range(c.ppo_epochs):
            order = torch.randperm(B, generator=g)
            for i in range(0, B, mini):
                idx = order[i:i + mini].to(self.device)
                ids, mask, rmask = ro.input_ids[idx], ro.attention_mask[idx], ro.response_mask[idx]
                n_valid = all_sum(rmask.sum().float(), self.info) if self.info.enabled else None
                with autocast_ctx(self.device, self.dtype):
                    logp, entropy = response_logprobs(self.policy, ids, mask, ro.prompt_len, with_entropy=True)
                    values = self.value(ids, mask)[:, ro.prompt_len - 1:-1]
                pg_loss, pg_stats = ppo_policy_loss(logp, ro.logprobs[idx], ro.advantages[idx], rmask, c.clip_epsilon,
                                                    n_valid)
                vf_loss, vf_stats = ppo_value_loss(values, ro.values[idx], ro.returns[idx], rmask, c.value_clip,
                                                   n_valid)
                loss = pg_loss + self.vf_coef * vf_loss
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for grp in self.opt.param_groups for p in grp["params"]]
                if self.info.enabled:  # losses are already over the global token count: sum, not average
                    for p in params:
                        if p.grad is not None:
                            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                # the norm of the all-reduced gradients: every rank sees the same value and stops together
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                if not torch.isfinite(grad_norm):
                    raise TrainingDiverged(
                        f"PPO's gradient became {grad_norm.item()} in update {self.step_count + 1}; lower the PPO "
                        f"learning rate (now {self.opt.param_groups[0]['lr']:g}, rlhf.ppo_learning_rate) and check "
                        f"that the rewards are finite", self.step_count, 0)
                self.opt.step()
                if first_ratio is None:
                    first_ratio = (pg_stats["ratio"], pg_stats["approx_kl"])
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["entropy"].append(masked_mean(entropy.detach(), rmask).item())
                for k in ("clipfrac", "approx_kl", "ratio"):
                    stats[k].append(pg_stats[k])
                stats["value_clipfrac"].append(vf_stats["value_clipfrac"])
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["first_minibatch_ratio"], out["first_minibatch_approx_kl"] = first_ratio
        return out

    # ------------------------------------------------------------------ the seed's loop
    def collect_experience(self, prompts: list[str]) -> Rollout:
        """Roll out ``prompts`` and keep the experience (responses, their log-probs at sampling time, reference
        log-probs, values, scores, advantages) for ``update_policy``."""
        t0 = time.time()
        ro = self.rollout(prompts)
        self.buffer.append((ro, time.time() - t0))
        return ro

    def update_policy(self) -> list[dict]:
        """One PPO update (``ppo_epochs`` over minibatches) per collected rollout, in the order collected, each
        followed by the adaptive KL controller's update; the buffer is then empty. Returns each update's
        statistics. A rollout collected before an earlier one's update still trains against its own stored
        log-probs: its ratios start away from 1, and the clip bounds the step."""
        if not self.buffer:
            raise RuntimeError("update_policy() has no experience to train on: call collect_experience(prompts) "
                               "first")
        world = self.info.world_size
        mean = lambda t: (all_sum(t.float().sum(), self.info) / (t.numel() * world)).item()  # noqa: E731
        results = []
        while self.buffer:
            ro, rollout_s = self.buffer.pop(0)
            t1 = time.time()
            stats = self.update(ro)
            kl_per_seq = mean(((ro.logprobs - ro.ref_logprobs) * ro.response_mask).sum(1))
            self.kl_ctl.update(kl_per_seq, ro.input_ids.size(0) * world)
            self.step_count += 1
            stats.update({"step": self.step_count, "reward": mean(ro.scores), "kl": kl_per_seq,
                          "kl_coef": self.kl_ctl.kl_coef, "response_length": mean(ro.response_mask.sum(1)),
                          "rollout_s": rollout_s, "update_s": time.time() - t1,
                          "tokens": int(ro.response_mask.sum().item())})
            results.append(stats)
        return results

    def step(self, prompts: list[str]) -> tuple[dict, Rollout]:
        """``collect_experience(prompts)`` then ``update_policy()``: this rollout's statistics, and the rollout."""
        ro = self.collect_experience(prompts)
        return self.update_policy()[-1], ro
