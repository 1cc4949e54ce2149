"""Small, separately tested math for RLHF (the pieces TRL / OpenRLHF keep out of their trainer loops).

Conventions: tensors are (batch, response_len); ``mask`` is 1 on real response tokens and 0 on padding;
every mean is a masked mean over valid tokens, never over padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position from (B, T, V) logits, in fp32, without materialising all log-probs twice."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over valid tokens only; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    The value after the last valid token is 0 (the episode ends), and padding neither contributes nor
    receives advantage. Vectorised over the batch, one reverse pass over time.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimates of policy vs reference on sampled tokens (Schulman's k1, k2, k3)."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{kind}'; use k1, k2 or k3")


def masked_total_mean(x: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor | float | None) -> torch.Tensor:
    """``masked_mean``, or the masked sum over ``n_valid`` (the valid-token count of the whole minibatch across
    data-parallel ranks: summed gradients then equal the single-process mean)."""
    if n_valid is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / n_valid


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2, n_valid=None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate; also returns clip fraction, approx KL (k3 of new vs old) and the mean ratio."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_total_mean(torch.maximum(unclipped, clipped), mask, n_valid)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2, n_valid=None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: the worse of the clipped and unclipped squared errors (as in PPO2/TRL)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * masked_total_mean(torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2), mask,
                                   n_valid)
    with torch.no_grad():
        frac = masked_mean(((values - returns) ** 2 < (clipped_values - returns) ** 2).float(), mask).item()
    return loss, {"value_clipfrac": frac}


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> torch.Tensor:
    """-log σ(r_chosen - r_rejected - margin), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """DPO on summed response log-probs: -log σ(β[(π_c - ref_c) - (π_r - ref_r)])."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    with torch.no_grad():
        stats = {"reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
                 "reward_margin": (chosen_reward - rejected_reward).mean().item()}
    return loss, stats


@dataclass
class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: move the KL coefficient so the observed KL tracks a target."""

    kl_coef: float
    target: float | None = 6.0
    horizon: int = 10000

    def update(self, observed_kl: float, n_steps: int) -> float:
        if self.target is None or not math.isfinite(observed_kl):
            return self.kl_coef
        error = max(-0.2, min(0.2, observed_kl / self.target - 1))
        self.kl_coef *= 1 + error * n_steps / self.horizon
        return self.kl_coef
