"""PPO throughput: nanogpt4 ``PPOTrainer`` vs TRL's ``PPOTrainer`` on the same tiny model and batch.

Both run the same work per PPO step: sample ``--rollout`` responses of up to ``--response`` tokens with a
KV cache, score them with a reward model, compute policy / reference / value log-probs, then
``--epochs`` x (rollout / minibatch) clipped policy + value updates. Same GPT-2-shaped weights (ours
exported with ``to_hf``), same threads, and the same precision for each pair of rows: fp32, and bf16 autocast
(ours: ``training.dtype=bfloat16``; TRL: ``bf16=True``, accelerate's autocast). Tokens/s counts prompt +
response tokens of every rollout (ours: real tokens up to end-of-text; TRL: the full padded width, which
favours TRL), over whole PPO steps (rollout + update), after one warm-up step.

TRL dropped ``PPOTrainer`` after 0.23; install the last release that has it next to this package:

    pip install "trl==0.23.1"   # in an environment where `import nanogpt4` works
    python benchmarks/ppo_throughput.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, save_result  # noqa: E402

from nanogpt4.config import load_config  # noqa: E402
from nanogpt4.data.sources import load_corpus  # noqa: E402
from nanogpt4.data.tokenizer import BPETokenizer  # noqa: E402
from nanogpt4.model.hf_export import to_hf  # noqa: E402
from nanogpt4.model.transformer import Transformer  # noqa: E402
from nanogpt4.rlhf.models import RewardModel, ValueModel  # noqa: E402
from nanogpt4.rlhf.ppo import PPOTrainer  # noqa: E402


def prompts_of(tok: BPETokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` real-text prompts of exactly ``length`` tokens (windows of the standard library)."""
    corpus = load_corpus("stdlib", 0.05, 2_000_000, "text", None)
    ids = tok.encode("".join(corpus.train))
    stride = max(1, (len(ids) - length) // n)
    return [ids[i * stride:i * stride + length] for i in range(n)]


def run_ours(cfg, policy, rm, tok, prompts: list[list[int]], steps: int, dtype: torch.dtype) -> tuple[float, int]:
    r = cfg.rlhf
    value = ValueModel(copy.deepcopy(rm.transformer))
    ppo = PPOTrainer(policy, lambda ids, mask: rm(ids, mask), tok, r, value_model=value,
                     ref_policy=copy.deepcopy(policy), learning_rate=1e-5, seed=0, dtype=dtype)
    texts = [tok.decode(p) for p in prompts]
    B = r.rollout_batch_size
    ppo.step(texts[:B])  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for s in range(1, steps + 1):
        _, ro = ppo.step(texts[s * B:(s + 1) * B])
        tokens += int(ro.attention_mask.sum())
    return time.perf_counter() - t0, tokens


def run_trl(cfg, policy, rm, tok, prompts: list[list[int]], steps: int, dtype: torch.dtype) -> tuple[float, int]:
    import transformers
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, PreTrainedTokenizerFast
    from trl import PPOConfig
    from trl import PPOTrainer as TRLPPOTrainer

    r = cfg.rlhf
    with tempfile.TemporaryDirectory() as d:
        tok.save(Path(d) / "tokenizer.json")
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(d) / "tokenizer.json"), eos_token="<|endoftext|>",
                                         pad_token="<|pad|>")
    hf_policy = to_hf(policy, tok)
    hf_ref = to_hf(copy.deepcopy(policy), tok)

    def scalar_model(src: RewardModel) -> GPT2ForSequenceClassification:
        m = GPT2ForSequenceClassification(transformers.GPT2Config(**{**hf_policy.config.to_dict(), "num_labels": 1}))
        m.transformer.load_state_dict(to_hf(src.transformer, tok).transformer.state_dict())
        m.score.weight.data.copy_(src.reward_head.weight.data)
        return m

    reward_model, value_model = scalar_model(rm), scalar_model(rm)
    B = r.rollout_batch_size
    ds = Dataset.from_dict({"input_ids": prompts[:(steps + 1) * B]})
    with tempfile.TemporaryDirectory() as out:
        # TRL 0.23: rollout batch = per_device_train_batch_size x accumulation, split into num_mini_batches
        args = PPOConfig(output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                         num_mini_batches=B // r.mini_batch_size, num_ppo_epochs=r.ppo_epochs,
                         total_episodes=(steps + 1) * B, response_length=r.max_new_tokens,
                         stop_token_id=tok.eot_id, missing_eos_penalty=1.0, kl_coef=r.kl_coef,
                         local_rollout_forward_batch_size=B, num_sample_generations=0, learning_rate=1e-5,
                         temperature=1.0, report_to=[], save_strategy="no", logging_steps=1000, use_cpu=True,
                         bf16=dtype == torch.bfloat16, fp16=False, seed=0, dataloader_num_workers=0)
        trainer = TRLPPOTrainer(args=args, processing_class=hf_tok, model=hf_policy, ref_model=hf_ref,
                                reward_model=reward_model, train_dataset=ds, value_model=value_model)
        ends: list[float] = []

        class StepEnds(transformers.TrainerCallback):
            def on_step_end(self, *a, **k):
                ends.append(time.perf_counter())

        trainer.add_callback(StepEnds())
        trainer.train()
    if len(ends) != steps + 1:
        raise RuntimeError(f"TRL ran {len(ends)} PPO steps, expected {steps + 1}")
    # whole steps (rollout + update) between consecutive step ends: the first (warm-up) step is left out
    elapsed = ends[-1] - ends[0]
    tokens = steps * B * (len(prompts[0]) + r.max_new_tokens)
    return elapsed, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rollout", type=int, default=32)
    ap.add_argument("--minibatch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config("tiny", ["model.max_seq_len=128", f"rlhf.rollout_batch_size={args.rollout}",
                               f"rlhf.mini_batch_size={args.minibatch}", f"rlhf.ppo_epochs={args.epochs}",
                               f"rlhf.max_new_tokens={args.response}"])
    corpus = load_corpus("stdlib", 0.05, 2_000_000, "text", None)
    tok = BPETokenizer.train(corpus.train, cfg.model.vocab_size)
    prompts = prompts_of(tok, (args.steps + 1) * args.rollout, args.prompt)
    torch.manual_seed(0)
    policy = Transformer(cfg)
    rm = RewardModel(copy.deepcopy(policy)).eval().requires_grad_(False)

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        t, n = run_ours(cfg, copy.deepcopy(policy), rm, tok, prompts, args.steps, dtype)
        ours = {"impl": "nanogpt4", "dtype": dtype_name, "s_per_step": t / args.steps, "tok_per_s": n / t}
        rows.append(ours)
        try:
            t, n = run_trl(cfg, copy.deepcopy(policy), rm, tok, prompts, args.steps, dtype)
        except ImportError as e:
            print(f"TRL's PPOTrainer is not importable ({e}); pip install 'trl==0.23.1' to compare")
            continue
        rows.append({"impl": "trl", "dtype": dtype_name, "s_per_step": t / args.steps, "tok_per_s": n / t})
        ours["speedup"] = ours["tok_per_s"] / rows[-1]["tok_per_s"]
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    if len(fp32) == 2 and any(r["impl"] == "nanogpt4" and r["dtype"] == "bfloat16" for r in rows):
        ours_bf16 = next(r for r in rows if r["impl"] == "nanogpt4" and r["dtype"] == "bfloat16")
        print(f"nanogpt4 bf16 vs TRL fp32 (each library's default on this CPU): "
              f"{ours_bf16['tok_per_s'] / fp32[1]['tok_per_s']:.2f}x")
    print_table(rows, ["impl", "dtype", "s_per_step", "tok_per_s", "speedup"])
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    save_result("ppo_throughput", {"config": vars(args), "model": "tiny (4L, 192d, vocab 4096)",
                                   "trl": trl_version, "rows": rows})


if __name__ == "__main__":
    main()
