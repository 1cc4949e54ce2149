"""The capability metric the scaling fits use: exact-match continuation of held-out tokens."""

import math

import numpy as np
import pytest
import torch

from nanogpt4.config import load_config
from nanogpt4.errors import UserError
from nanogpt4.model.transformer import Transformer
from nanogpt4.scaling.capability import Problems, continuation_problems, evaluate_capability


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(load_config("tiny", ["model.dim=32", "model.n_layers=2", "model.n_heads=4",
                                            "model.vocab_size=16", "model.max_seq_len=32"])).eval()


def test_pass_rate_is_the_exact_probability_of_sampling_the_answer():
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    problems = Problems(torch.randint(0, 16, (5, 8), generator=g), torch.randint(0, 16, (5, 3), generator=g))
    got = evaluate_capability(m, problems, batch_size=2)
    logs, solved = [], 0
    with torch.no_grad():
        for prompt, answer in zip(problems.prompts, problems.answers, strict=True):
            ids, lp = prompt[None], 0.0
            for tok in answer:  # one token at a time, as sampling would
                lp += torch.log_softmax(m(ids)[0, -1], -1)[tok].item()
                ids = torch.cat([ids, tok.view(1, 1)], dim=1)
            logs.append(lp)
            greedy = m.generate(prompt[None], 3, temperature=0)[0, -3:]
            solved += int(torch.equal(greedy, answer))
    assert got["mean_log_pass_rate"] == pytest.approx(float(np.mean(logs)), abs=1e-5)
    assert got["pass_rate"] == pytest.approx(math.exp(np.mean(logs)), rel=1e-5)
    assert got["greedy_exact_match"] == solved / 5


def test_a_model_that_knows_the_answer_solves_it():
    m = tiny_model()
    prompts = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    answers = m.generate(prompts, 3, temperature=0)[:, -3:]  # the model's own greedy continuation
    got = evaluate_capability(m, Problems(prompts, answers))
    assert got["greedy_exact_match"] == 1.0 and got["mean_log_pass_rate"] < 0


def test_continuation_problems_are_deterministic_windows(tmp_path):
    data = np.arange(5000, dtype=np.uint16)
    data.tofile(tmp_path / "val.bin")
    a = continuation_problems(tmp_path / "val.bin", "uint16", n=32, context=10, answer=4, seed=3)
    b = continuation_problems(tmp_path / "val.bin", "uint16", n=32, context=10, answer=4, seed=3)
    assert torch.equal(a.prompts, b.prompts) and torch.equal(a.answers, b.answers)
    assert a.prompts.shape == (32, 10) and a.answers.shape == (32, 4)
    assert torch.equal(a.answers[:, 0], a.prompts[:, -1] + 1)  # the answer is what really follows
    with pytest.raises(UserError, match="too few"):
        continuation_problems(tmp_path / "val.bin", "uint16", n=5000, context=10, answer=4)
