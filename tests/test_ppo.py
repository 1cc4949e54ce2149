import pytest
import torch

from nanogpt4.config import load_config
from nanogpt4.data.tokenizer import Tokenizer
from nanogpt4.model.transformer import Transformer
from nanogpt4.rlhf.ppo import PPOTrainer, response_logprobs


@pytest.fixture()
def setup(prepared):
    ov, data_dir = prepared
    cfg = load_config("tiny", ov + ["rlhf.max_new_tokens=8", "rlhf.rollout_batch_size=16", "rlhf.mini_batch_size=8",
                                    "rlhf.ppo_epochs=2", "rlhf.kl_coef=0.01", "rlhf.target_kl=null"])
    tok = Tokenizer.from_file(data_dir / "tokenizer.json")
    torch.manual_seed(0)
    return cfg, tok, Transformer(cfg)


def test_first_minibatch_ratio_is_exactly_one_and_kl_starts_at_zero(setup):
    cfg, tok, policy = setup
    ppo = PPOTrainer(policy, lambda ids, mask: torch.zeros(ids.size(0)), tok, cfg.rlhf, learning_rate=1e-3)
    stats, ro = ppo.step(["def f(x):\n"] * 16)
    assert stats["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at sampling time
    # the stored log-probs are those of the sampled tokens under the sampling policy
    fresh = response_logprobs(ppo.ref, ro.input_ids, ro.attention_mask, ro.prompt_len)
    assert torch.allclose(fresh * ro.response_mask, ro.ref_logprobs * ro.response_mask, atol=1e-5)


def _trainer(setup, policy):
    cfg, tok, _ = setup
    score = lambda ids, mask: (ids == 9).float().sum(1)  # noqa: E731  a reward the updates can move
    return PPOTrainer(policy, score, tok, cfg.rlhf, learning_rate=1e-3, seed=3)


def test_the_seeds_collect_experience_and_update_policy_are_step(setup):
    import copy

    _, _, policy = setup
    prompts = ["def f(x):\n"] * 16
    stepped, looped = _trainer(setup, copy.deepcopy(policy)), _trainer(setup, copy.deepcopy(policy))
    timing = ("rollout_s", "update_s")
    for _ in range(2):
        stats, ro = stepped.step(prompts)
        collected = looped.collect_experience(prompts)
        assert len(looped.buffer) == 1 and torch.equal(collected.input_ids, ro.input_ids)
        (updated,) = looped.update_policy()
        assert looped.buffer == []
        assert {k: v for k, v in updated.items() if k not in timing} == {
            k: v for k, v in stats.items() if k not in timing}
    assert updated["step"] == 2
    for a, b in zip(stepped.policy.parameters(), looped.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="call collect_experience"):
        looped.update_policy()


def test_responses_longer_than_the_context_are_refused_up_front(setup):
    from nanogpt4.errors import UserError

    cfg, tok, policy = setup
    cfg.rlhf.max_new_tokens = cfg.model.max_seq_len
    with pytest.raises(UserError, match=f"rlhf.max_new_tokens={cfg.model.max_seq_len} leaves no room"):
        PPOTrainer(policy, lambda ids, mask: torch.zeros(ids.size(0)), tok, cfg.rlhf)
    # the CLI's rule (load_policy): a prompt keeps at least 8 tokens of the context
    cfg.rlhf.max_new_tokens = cfg.model.max_seq_len - 7
    with pytest.raises(UserError, match=f"set rlhf.max_new_tokens <= {cfg.model.max_seq_len - 8}"):
        PPOTrainer(policy, lambda ids, mask: torch.zeros(ids.size(0)), tok, cfg.rlhf)
    cfg.rlhf.max_new_tokens = cfg.model.max_seq_len - 8
    PPOTrainer(policy, lambda ids, mask: torch.zeros(ids.size(0)), tok, cfg.rlhf)


def test_experience_collected_before_an_update_trains_against_its_own_log_probs(setup):
    cfg, tok, policy = setup
    # a score that tells the two rollouts apart: their prompts' first token
    ppo = PPOTrainer(policy, lambda ids, mask: ids[:, 0].float(), tok, cfg.rlhf, learning_rate=1e-3, seed=3)
    first, second = ppo.collect_experience(["def f(x):\n"] * 16), ppo.collect_experience(["class A:\n"] * 16)
    stats = ppo.update_policy()
    assert [s["step"] for s in stats] == [1, 2] and ppo.buffer == []
    assert stats[0]["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-6)
    # the first update moved the policy, so the second rollout's sampling-time log-probs are stale: ratio != 1
    assert abs(stats[1]["first_minibatch_ratio"] - 1.0) > 1e-4
    for s, ro in zip(stats, (first, second), strict=True):  # in the order collected
        assert (s["tokens"], s["reward"]) == (int(ro.response_mask.sum()), pytest.approx(ro.scores.mean().item()))
    assert (stats[0]["tokens"], stats[0]["reward"]) != (stats[1]["tokens"], stats[1]["reward"])


def test_bf16_rollout_and_update_keep_fp32_statistics(setup):
    """bf16 autocast: log-probs, values and advantages stay fp32; the first minibatch's ratio is 1 up to bf16
    rounding of the forward passes."""
    cfg, tok, policy = setup
    ppo = PPOTrainer(policy, lambda ids, mask: torch.zeros(ids.size(0)), tok, cfg.rlhf, learning_rate=1e-3,
                     dtype=torch.bfloat16)
    stats, ro = ppo.step(["def f(x):\n"] * 16)
    assert ro.logprobs.dtype == ro.values.dtype == ro.advantages.dtype == torch.float32
    assert stats["first_minibatch_ratio"] == pytest.approx(1.0, abs=2e-2)
    assert abs(stats["first_minibatch_approx_kl"]) < 1e-3
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float))
    # the next rollout samples with the updated weights, not the first step's copy
    ppo.rollout(["def f(x):\n"] * 16)
    for copied, trained in zip(ppo._sampler.parameters(), policy.parameters(), strict=True):
        assert torch.equal(copied, trained.detach().to(torch.bfloat16))


def test_response_mask_stops_after_end_of_text(setup):
    cfg, tok, policy = setup
    ppo = PPOTrainer(policy, lambda ids, mask: torch.zeros(ids.size(0)), tok, cfg.rlhf)
    ro = ppo.rollout(["import"] * 16)
    resp = ro.input_ids[:, ro.prompt_len:]
    for row, m in zip(resp.tolist(), ro.response_mask.tolist(), strict=True):
        if tok.eot_id in row:
            k = row.index(tok.eot_id)
            assert m[:k + 1] == [1] * (k + 1) and all(v == 0 for v in m[k + 1:])
        else:
            assert all(m)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_raises_a_simple_reward(setup, seed):
    """Reward = 4 x how often one token appears in the response; from a random policy that samples it ~1% of
    the time, PPO must make it the usual token (12 of 12 seeds reach >= 3.0 by step 80; the rise starts anywhere
    from step 15 to 60, which is why 30 steps passed or failed on the critic's initial head)."""
    cfg, tok, policy = setup
    prompts = ["def f(x):\n", "import os\n", "class A:\n", "    return"] * 4
    # the target: a token the initial policy samples now and then (the 3rd most frequent in its responses)
    probe = PPOTrainer(policy, lambda ids, mask: torch.zeros(ids.size(0)), tok, cfg.rlhf, seed=123)
    counts = torch.bincount(probe.rollout(prompts * 2).input_ids[:, -cfg.rlhf.max_new_tokens:].flatten(),
                            minlength=cfg.model.vocab_size)
    counts[[tok.eot_id, tok.pad_id]] = 0
    target = int(counts.argsort(descending=True)[2])

    def score(ids, mask):
        resp = ids[:, -cfg.rlhf.max_new_tokens:]
        return (resp == target).float().mean(1) * 4

    ppo = PPOTrainer(policy, score, tok, cfg.rlhf, learning_rate=3e-3, no_eos_penalty=0.0, seed=seed)
    history = [ppo.step(prompts)[0]["reward"] for _ in range(80)]
    assert sum(history[-5:]) / 5 > sum(history[:5]) / 5 + 2.0, history


def test_critic_head_comes_from_the_trainer_seed_not_the_global_rng(setup):
    cfg, tok, policy = setup

    def head(seed):
        torch.rand(1000)  # what earlier work in the same process would draw
        return PPOTrainer(policy, lambda ids, mask: torch.zeros(ids.size(0)), tok, cfg.rlhf,
                          seed=seed).value.reward_head.weight.detach()

    assert torch.equal(head(3), head(3)) and not torch.equal(head(3), head(4))


@pytest.mark.slow
def test_two_process_ppo_update_equals_one_process(tmp_path):
    """Each rank holds half the rollout: global advantage whitening and global token normalisation make the
    summed gradients, and so the updated policy and critic, those of one process holding every row."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).parent / "workers" / "ppo_ddp.py"
    one = subprocess.run([sys.executable, str(worker), str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    r0, r1 = (load_file(str(tmp_path / "two" / f"rank{r}.safetensors")) for r in (0, 1))
    # 1e-4: one process holds 4 rows, each rank 2, and the values' rounding differs by that (2.0e-5 seen once in
    # ~10 runs on an AMX Xeon, with 2 threads); whitening each rank alone would be off by ~0.1-1
    torch.testing.assert_close(torch.cat([r0["advantages"], r1["advantages"]]), single["advantages"],
                               atol=1e-4, rtol=1e-4)
    assert float(r0["first_ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(single["moved"]) > 1e-2  # the update did change the policy
    moved = 0
    for k, v in single.items():
        if k in ("advantages", "first_ratio", "moved"):
            continue
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0)  # ranks stay identical
        # Adam divides by sqrt(v): float rounding differences of near-zero gradients show up at ~1e-5
        torch.testing.assert_close(r0[k], v, atol=1e-4, rtol=1e-3)  # and equal to one process (steps are ~1e-2)
        moved += 1
    assert moved > 10


def test_a_diverging_update_stops_with_a_clear_error(setup):
    from nanogpt4.errors import TrainingDiverged

    cfg, tok, policy = setup
    ppo = PPOTrainer(policy, lambda ids, mask: torch.full((ids.size(0),), float("nan")), tok, cfg.rlhf)
    with pytest.raises(TrainingDiverged, match="gradient became nan in update 1;.*rewards are finite"):
        ppo.step(["def f(x):\n"] * 16)
