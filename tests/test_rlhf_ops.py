import math

import pytest
import torch
import torch.nn.functional as F

from nanogpt4.rlhf.ops import (
    AdaptiveKLController,
    bradley_terry_loss,
    compute_gae,
    dpo_loss,
    entropy_from_logits,
    gather_logprobs,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def naive_gae(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum())  # valid tokens are a prefix of the response
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_equals_a_naive_backward_loop(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    mask = torch.ones(4, 9)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    expected = naive_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-12)
    assert torch.all(adv[mask == 0] == 0)


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().abs() < 1e-6 and valid.std(unbiased=True) == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[~mask.bool()] == 0)
    assert masked_mean(x, mask).item() == pytest.approx(3.0)


def test_gather_logprobs_and_entropy():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    ref = F.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(gather_logprobs(logits, labels), ref, atol=1e-6)
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8))


def test_first_minibatch_ratio_is_one_and_kl_zero():
    logp = torch.randn(3, 6)
    adv = torch.randn(3, 6)
    mask = torch.ones(3, 6)
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask, clip=0.2)
    assert stats["ratio"] == pytest.approx(1.0) and stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert stats["clipfrac"] == 0.0 and loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-6)
    for kind in ("k1", "k2", "k3"):
        assert torch.all(kl_penalty(logp, logp, kind) == 0)


def test_policy_loss_clips_only_beyond_epsilon():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(1.1)]])  # ratios 1.5 (clipped) and 1.1 (not)
    adv = torch.ones(1, 2)
    new.requires_grad_(True)
    loss, stats = ppo_policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    loss.backward()
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0  # no gradient through the clipped token


def test_value_loss_is_pessimistic():
    old, ret = torch.zeros(1, 1), torch.ones(1, 1)
    loss, stats = ppo_value_loss(torch.full((1, 1), 0.9), old, ret, torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2)  # the clipped prediction (0.2) is worse: it counts
    assert stats["value_clipfrac"] == 1.0


def test_bradley_terry_values():
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-2))))
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=2.0).item() == pytest.approx(
        math.log(2))


def test_dpo_loss_values():
    z = torch.zeros(4)
    loss, stats = dpo_loss(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and stats["reward_margin"] == 0
    loss, stats = dpo_loss(torch.full((4,), 1.0), z, z, z, beta=0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))))
    assert stats["reward_accuracy"] == 1.0


def test_adaptive_kl_controller_moves_toward_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) > 0.1  # too much KL: penalise harder
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(1.0, 10) < 0.1
    assert AdaptiveKLController(0.1, target=None).update(50.0, 10) == 0.1


def test_policy_logprobs_are_left_padding_invariant():
    from nanogpt4.config import load_config
    from nanogpt4.model.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(load_config("tiny", ["model.dim=32", "model.n_heads=4", "model.n_layers=2",
                                         "model.vocab_size=50", "model.max_seq_len=16"])).eval()
    seq = torch.randint(1, 50, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], dim=1).long()
    a = gather_logprobs(m(seq)[:, :-1], seq[:, 1:])
    b = gather_logprobs(m(padded, attention_mask=mask)[:, 4:-1], seq[:, 1:])
    assert torch.allclose(a, b, atol=1e-5)
