"""A capability metric for scaling fits: exact-match continuation of held-out text.

Each problem is a window of held-out tokens (``context`` tokens of prompt) and the ``answer`` tokens that
really follow. A problem's pass rate is the probability that the model, sampling at temperature 1, writes the
answer exactly: the product of its next-token probabilities along the answer, computed exactly from one forward
pass instead of estimated from samples. Over problems, ``mean_log_pass_rate`` = E[log pass_rate] is what the
GPT-4 report fits for HumanEval (−E[log pass_rate] = α·C^(−k)); every problem has a non-zero pass rate, so no
problem has to be dropped. ``greedy_exact_match`` (the share of problems greedy decoding solves) is reported
beside it as the readable number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanogpt4.errors import UserError


@dataclass
class Problems:
    prompts: torch.Tensor  # (n, context)
    answers: torch.Tensor  # (n, answer)


def continuation_problems(tokens_path: str | Path, dtype: str, n: int = 256, context: int = 48, answer: int = 4,
                          seed: int = 0) -> Problems:
    """``n`` problems at deterministic positions of a token file (the prepared ``val.bin``)."""
    data = np.memmap(tokens_path, dtype=np.dtype(dtype), mode="r")
    width = context + answer
    if len(data) < width + n:
        raise UserError(f"'{tokens_path}' has {len(data):,} tokens, too few for {n} problems of {width} tokens")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(len(data) - width, size=n, replace=False))
    windows = torch.from_numpy(np.stack([data[s:s + width].astype(np.int64) for s in starts]))
    return Problems(windows[:, :context], windows[:, context:])


@torch.no_grad()
def evaluate_capability(model, problems: Problems, device=None, batch_size: int = 64) -> dict:
    """``mean_log_pass_rate``, ``pass_rate`` (its exponential: the geometric mean) and ``greedy_exact_match``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    log_pass, solved = [], 0
    k = problems.answers.size(1)
    for i in range(0, problems.prompts.size(0), batch_size):
        prompt = problems.prompts[i:i + batch_size].to(device)
        answer = problems.answers[i:i + batch_size].to(device)
        ids = torch.cat([prompt, answer], dim=1)
        logits = model(ids[:, :-1])[:, -k:].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, answer[..., None]).squeeze(-1)
        log_pass.append(lp.sum(1).cpu())
        solved += int((logits.argmax(-1) == answer).all(1).sum())  # greedy == teacher-forced argmax on a match
    model.train(was_training)
    log_pass_t = torch.cat(log_pass).double()
    mean_log = float(log_pass_t.mean())
    return {"mean_log_pass_rate": mean_log, "pass_rate": math.exp(mean_log),
            "greedy_exact_match": solved / problems.prompts.size(0), "problems": problems.prompts.size(0)}
