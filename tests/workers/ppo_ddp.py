"""PPO update on fixed sequences, run by one process or by torchrun (each rank holds its rows of the batch).

    python tests/workers/ppo_ddp.py OUT              # one process, all rows
    torchrun --nproc_per_node=2 tests/workers/ppo_ddp.py OUT
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanogpt4.config import load_config
from nanogpt4.data.tokenizer import BPETokenizer
from nanogpt4.model.transformer import Transformer
from nanogpt4.rlhf.models import ValueModel
from nanogpt4.rlhf.ppo import PPOTrainer
from nanogpt4.train.distributed import init_distributed, shutdown_distributed

ROWS, P, R = 4, 5, 7


def main(out: Path) -> None:
    # one thread in either mode: with two, one process gave one of two results run to run on an Intel Xeon (AMX;
    # the first minibatch's log-probs 1.3e-5 apart, 3 runs in 10 under pytest), which Adam's normalised step
    # turned into 1.6e-3 for a weight whose gradient is near zero; that is torch's threading, not DDP
    torch.set_num_threads(1)
    info, device = init_distributed(torch.device("cpu"))
    cfg = load_config("tiny", ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=300",
                               "model.max_seq_len=32", "rlhf.ppo_epochs=2", f"rlhf.mini_batch_size={ROWS}",
                               f"rlhf.max_new_tokens={R}", "rlhf.target_kl=4.0"])
    tok = BPETokenizer.train(["def f(x):\n    return x\n"] * 10, 300)
    torch.manual_seed(0)
    policy = Transformer(cfg)
    value = ValueModel(Transformer(cfg))
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(10, 300, (ROWS, P + R), generator=g)
    seq[1, P + 3] = tok.eot_id  # responses of different lengths
    seq[2, P + 5] = tok.eot_id
    prompt_mask = torch.ones(ROWS, P, dtype=torch.long)
    prompt_mask[3, :2] = 0  # a left-padded prompt
    seq[3, :2] = tok.pad_id

    def score(ids, mask):  # a fixed "reward model": share of even tokens in the sequence
        return ((ids % 2 == 0) & (mask > 0)).float().mean(1)

    before = [p.detach().clone() for p in policy.parameters()]
    ppo = PPOTrainer(policy, score, tok, cfg.rlhf, value_model=value, learning_rate=1e-2, no_eos_penalty=0.3,
                     info=info)
    rows = slice(info.rank * ROWS // info.world_size, (info.rank + 1) * ROWS // info.world_size)
    ro = ppo.score_rollout(seq[rows], prompt_mask[rows], P)
    stats = ppo.update(ro)
    tensors = {f"policy.{k}": v.contiguous() for k, v in policy.state_dict().items() if k != "head.weight"}
    tensors.update({f"value.{k}": v.contiguous() for k, v in value.state_dict().items()
                    if k != "transformer.head.weight"})
    tensors["advantages"] = ro.advantages.contiguous()
    tensors["first_ratio"] = torch.tensor(stats["first_minibatch_ratio"])
    tensors["moved"] = sum((p.detach() - b).abs().sum() for p, b in zip(policy.parameters(), before, strict=True))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"rank{info.rank}.safetensors"))
    shutdown_distributed(wait_for=info)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
