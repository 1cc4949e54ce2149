import copy
import json

import pytest
import torch

from nanogpt4.config import load_config
from nanogpt4.data.tokenizer import Tokenizer
from nanogpt4.errors import UserError
from nanogpt4.model.transformer import Transformer
from nanogpt4.rlhf.data import (
    Example,
    Preference,
    code_completion_examples,
    cut_examples,
    encode_example,
    format_chat,
    load_preferences,
    load_prompts,
    load_sft,
    warn_long_prompts,
)
from nanogpt4.rlhf.judges import (
    label_pairs,
    load_judge,
    python_syntax,
    sentiment,
    syntax_score,
    valid_python_lines,
)
from nanogpt4.rlhf.models import RewardModel, last_token_index
from nanogpt4.rlhf.stages import encode_pair, generate_responses, reward_accuracy, train_reward, train_sft

from .conftest import small_overrides


def test_syntax_judge():
    assert syntax_score("x = 1\ny = 2\n") == 1.0
    assert syntax_score("x = 1\ny = (\nz = 3\nw = 4\n") < 1.0
    assert syntax_score("def f(:\n") < 1.0 and syntax_score("") == 0.0
    assert syntax_score("import os\nos.system('rm -rf /')\n") == 1.0  # parsed, never executed
    early, late = syntax_score("x = )\na = 1\nb = 2\nc = 3\n"), syntax_score("a = 1\nb = 2\nc = 3\nx = )\n")
    assert late > early
    assert python_syntax(["def f(x):\n"], ["    return x\n"]) == [1.0]


def test_valid_python_lines_counts_the_longest_parseable_start():
    # a sample cut off mid-statement: its first three lines parse, the unclosed call does not
    assert valid_python_lines("def f(x):\n    return x\n\nclass A(\n    b") == (3, 5)
    # a header with no body yet, or an error at the start, parses nowhere
    assert valid_python_lines("def f():\n") == (0, 1) and valid_python_lines("x = )\ny = 1\n") == (0, 2)
    # a prompt from inside a block starts indented, after blank lines or not
    assert valid_python_lines("\n    for i in range(3):\n        print(i)\nx = 1\n") == (4, 4)
    assert valid_python_lines("") == (0, 0)


def test_valid_python_lines_so_far_counts_a_valid_unfinished_start():
    # cut inside its first function: nothing parses whole, yet every line is Python as far as it goes
    cut = 'def parse(text):\n    """Split the\n    text into words.\n    for word in text'
    assert valid_python_lines(cut) == (0, 4) and valid_python_lines(cut, unfinished_ok=True) == (4, 4)
    assert valid_python_lines("x = foo(1,\n    2", unfinished_ok=True) == (2, 2)
    # an error ends it, unfinished or not: a bad line, a dedent to no level, a return outside any function
    assert valid_python_lines("def f(x):\n    return x +\n    y = 1\n", unfinished_ok=True) == (1, 3)
    assert valid_python_lines("if x:\n    y = 1\n  z = 2\n", unfinished_ok=True) == (2, 3)
    assert valid_python_lines("import os\nreturn 3\n", unfinished_ok=True) == (1, 2)
    assert valid_python_lines("x = )\n", unfinished_ok=True) == (0, 1)
    assert valid_python_lines("\n    for i in x:\n", unfinished_ok=True) == (2, 2)  # indented: an if body


def test_judge_score_intervals_stay_in_the_scores_range():
    import numpy as np

    from nanogpt4.rlhf.run import mean_ci

    piled_at_one = [1.0] * 14 + [0.2, 0.0]  # 16 prompts, most fully valid: the normal approximation said 1.016
    mean, (lo, hi) = mean_ci(piled_at_one)
    assert mean == pytest.approx(0.8875) and 0.6 < lo < mean < hi <= 1.0
    assert mean_ci(piled_at_one) == (mean, [lo, hi])  # the same scores, the same interval
    assert mean_ci([0.4]) == (0.4, [0.4, 0.4]) and mean_ci([1.0] * 5) == (1.0, [1.0, 1.0])
    wide = np.random.default_rng(1).normal(0.0, 1.0, 2000)  # where the normal approximation holds, it agrees
    _, (lo, hi) = mean_ci(wide)
    half = 1.96 * wide.std(ddof=1) / np.sqrt(len(wide))
    assert lo == pytest.approx(wide.mean() - half, abs=0.1 * half) and hi == pytest.approx(wide.mean() + half,
                                                                                            abs=0.1 * half)


def test_sentiment_judge_and_labelling():
    pytest.importorskip("vaderSentiment")
    good, bad = sentiment(["", ""], ["what a wonderful happy day", "this is awful and sad"])
    assert good > 0 > bad
    pairs = label_pairs(sentiment, ["p", "q"], ["I love it", "same"], ["I hate it", "same"])
    assert pairs == [("p", "I love it", "I hate it", pytest.approx(pairs[0][3]))]


def test_load_judge_by_module_path():
    assert load_judge("python-syntax") is python_syntax
    assert load_judge("nanogpt4.rlhf.judges:syntax_score").__wrapped__ is syntax_score
    with pytest.raises(UserError, match="unknown judge"):
        load_judge("bogus")
    with pytest.raises(UserError, match="cannot load judge"):
        load_judge("nanogpt4.rlhf.judges:nope")


def test_a_module_judge_must_give_one_finite_number_per_completion(corpus_dir, tmp_path, monkeypatch):
    """One score for 16 prompts was read as the first one's (judge_sft 1.0), NaN reached summary.json, strings
    stopped the stage with numpy's traceback; the pipeline has the judge score one task before pretraining."""
    from nanogpt4.rlhf.run import check_tasks

    (tmp_path / "my_judges.py").write_text(
        "import numpy as np\n\n\ndef length(prompts, completions):\n"
        "    return np.array([len(c) for c in completions])\n\n\ndef one(prompts, completions):\n"
        "    return [1.0]\n\n\ndef words(prompts, completions):\n    return ['good' for c in completions]\n\n\n"
        "def nan(prompts, completions):\n    return [float('nan') if len(c) == 1 else 0.0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_judge("my_judges:length")(["p", "q"], ["a", "bb"]) == [1.0, 2.0]
    for name, said in [("one", "judge 'my_judges:one' returned 1 scores for 2 completions: it must return one finite "
                               "number per completion"),
                       ("words", "judge 'my_judges:words' returned list ['good', 'good']: it must return one finite "
                                 "number per completion (could not convert string to float: 'good')"),
                       ("nan", "judge 'my_judges:nan' gave nan to the completion 'a': it must return one finite "
                               "number per completion")]:
        with pytest.raises(UserError) as e:
            load_judge(f"my_judges:{name}")(["p", "q"], ["a", "bb"])
        assert str(e.value) == said
    ov = small_overrides(corpus_dir, tmp_path / "data") + ["rlhf.max_new_tokens=8"]
    check_tasks(load_config("tiny", ov + ["rlhf.judge=my_judges:length"]))
    with pytest.raises(UserError, match="returned 1 scores for 2 completions"):  # two held-out tasks
        check_tasks(load_config("tiny", ov + ["rlhf.judge=my_judges:one"]))


def test_jsonl_loaders_report_file_and_line(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 1}\n')
    with pytest.raises(UserError, match=r"sft.jsonl:2: expected"):
        load_sft(p)
    p.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (ex,) = load_sft(p)
    assert ex.prompt == "<|user|>hi<|end|><|assistant|>" and ex.response == "yo<|end|>"
    q = tmp_path / "pref.jsonl"
    q.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    with pytest.raises(UserError, match=r"pref.jsonl:2: malformed JSON"):
        load_preferences(q)
    # a pair with chosen == rejected states no preference: it was trained on and scored as a miss
    q.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    said = []
    assert [p.rejected for p in load_preferences(q, warn=said.append)] == ["c"]
    assert said == [f"warning: '{q}': skipped 1 pair(s) whose chosen and rejected responses are the same text: they "
                    f"state no preference (kept 1)"]
    q.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(UserError, match=r"holds no preference pairs \(only 1 pair\(s\) whose chosen and rejected"):
        load_preferences(q)
    with pytest.raises(UserError, match="last message must be the assistant"):
        format_chat([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def tiny(prepared):
    ov, data_dir = prepared
    cfg = load_config("tiny", ov + ["rlhf.sft_steps=6", "rlhf.reward_steps=30", "rlhf.reward_model_lr=3e-3",
                                    "rlhf.sft_learning_rate=1e-3"])
    tok = Tokenizer.from_file(data_dir / "tokenizer.json")
    torch.manual_seed(0)
    return cfg, tok, Transformer(cfg)


def test_encode_example_masks_prompt_and_truncates(tiny):
    cfg, tok, _ = tiny
    ids, labels = encode_example(tok, Example("def f(x):\n", "    return x\n"), 32)
    n_prompt = len(tok.encode("def f(x):\n"))
    assert all(v == -100 for v in labels[:n_prompt]) and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eot_id
    ids, labels = encode_example(tok, Example("x = 1\n" * 100, "y = 2\n"), 32)  # over-long prompt
    assert len(ids) == 32 and labels[-1] == tok.eot_id and labels.count(-100) == 32 - len(tok.encode("y = 2\n")) - 1


def test_sft_on_a_conversation_learns_every_assistant_turn(tiny):
    # only the last reply was learned: a three-turn chat taught one of its three answers
    cfg, tok, _ = tiny
    ex = format_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "x = 1"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "y = 2"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "z = 3"}])
    assert [ex.prompt[s:e] for s, e in ex.replies] == ["x = 1<|end|>", "y = 2<|end|>"]
    ids, labels = encode_example(tok, ex, 200)
    assert ids == tok.encode(ex.prompt + ex.response) + [tok.eot_id]  # the same tokens as the whole text
    learned = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
    assert learned == "x = 1<|end|>y = 2<|end|>z = 3<|end|><|endoftext|>"
    assert all(lab in (-100, t) for t, lab in zip(ids, labels, strict=True))
    # cut from the left, the labels go with their tokens: the first reply's are gone, the second's stay
    n = len(ids) - len(tok.encode("<|system|>be brief<|end|><|user|>a<|end|><|assistant|>x = 1<|end|>"))
    cut_ids, cut_labels = encode_example(tok, ex, n)
    assert cut_ids == ids[-n:] and cut_labels == labels[-n:]
    assert tok.decode([t for t, lab in zip(cut_ids, cut_labels, strict=True) if lab != -100]).startswith("y = 2")


def test_cut_rows_are_counted_as_encode_example_cuts_them(tiny):
    cfg, tok, _ = tiny
    fits, long_prompt, long_answer = (Example("def f(x):\n", "    return x\n"), Example("x = 1\n" * 100, "y\n"),
                                      Example("q", "y = 2\n" * 100))
    n = len(encode_example(tok, fits, 1000)[0])  # its whole length, the end token included
    assert cut_examples(tok, [fits], n) == 0 and cut_examples(tok, [fits], n - 1) == 1
    assert len(encode_example(tok, fits, n - 1)[0]) == n - 1
    assert cut_examples(tok, [fits, long_prompt, long_answer], 32) == 2
    said = []
    warn_long_prompts(tok, ["a", "x = 1\n" * 100], 16, said.append)
    assert said == ["warning: 1 of 2 prompts are longer than the 16 tokens the context leaves before a response "
                    "(model.max_seq_len - rlhf.max_new_tokens): they keep their last 16 tokens"]
    warn_long_prompts(tok, ["a"], 16, said.append)
    assert len(said) == 1


def test_reward_model_reads_the_last_real_token(tiny):
    cfg, tok, base = tiny
    rm = RewardModel(base).eval()
    seq = torch.randint(2, 300, (1, 10))
    padded = torch.cat([torch.full((1, 3), tok.pad_id), seq], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], 1).long()
    assert torch.allclose(rm(seq), rm(padded, mask), atol=1e-5)
    assert last_token_index(torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])).tolist() == [1, 3]


def test_reward_head_init_ignores_the_global_rng(tiny):
    _, _, base = tiny
    a = RewardModel(base, seed=3).reward_head.weight.detach().clone()
    torch.rand(1000)  # what an earlier stage in the same process would draw
    b = RewardModel(base, seed=3).reward_head.weight.detach()
    assert torch.equal(a, b) and not torch.equal(a, RewardModel(base, seed=4).reward_head.weight.detach())


def test_sft_then_reward_model_learns_a_judge(tiny, corpus_dir, tmp_path):
    cfg, tok, base = tiny
    docs = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))]
    examples = code_completion_examples(docs, 64, seed=0)
    assert len(examples) > 40
    from nanogpt4.rlhf.dpo import _collate, sequence_logprob

    ids, mask, labels = _collate([encode_example(tok, e, 32) for e in examples[:16]], tok.pad_id, "cpu")
    before = sequence_logprob(base.eval(), ids, mask, labels).mean().item()
    result = train_sft(cfg, base, tok, examples, tmp_path / "sft", torch.device("cpu"), log=lambda _m: None)
    assert result["steps"] == 6
    after = sequence_logprob(base.eval(), ids, mask, labels).mean().item()
    assert after > before + 1.0  # SFT makes the true responses (next tokens, not the current ones) likelier
    # preferences from a judge that can be learned from the text: more "x" is better
    judge = lambda prompts, comps: [c.count("x") for c in comps]  # noqa: E731
    prompts = [e.prompt for e in examples]
    pairs = label_pairs(judge, prompts, ["x x x\n" + e.response for e in examples], [e.response for e in examples])
    prefs = [Preference(p, c, r) for p, c, r, _ in pairs]
    rm = RewardModel(base)
    train_reward(cfg, rm, tok, prefs[:48], prefs[48:], tmp_path / "rm", torch.device("cpu"), log=lambda _m: None)
    acc = reward_accuracy(rm, [encode_pair(tok, p, 32) for p in prefs[48:]], tok.pad_id, torch.device("cpu"))
    assert acc >= 0.9
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("rm_val_accuracy" in r for r in rows)


def test_generate_responses_stop_and_decode(tiny):
    cfg, tok, base = tiny
    outs = generate_responses(base, tok, ["def f(x):\n", "import"], 8, temperature=1.0, seed=0)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


@pytest.mark.slow
def test_rlhf_end_to_end_writes_the_summary(prepared, tmp_path, capsys):
    from nanogpt4.cli import main

    ov, _ = prepared
    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=30"]) == 0
    code = main(["rlhf", "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "rlhf"), "--device", "cpu",
                 "rlhf.sft_steps=10", "rlhf.reward_steps=10", "rlhf.ppo_steps=3", "rlhf.dpo_steps=4",
                 "rlhf.sft_examples=100", "rlhf.label_prompts=120", "rlhf.eval_prompts=24", "rlhf.best_of_n=2",
                 "rlhf.rollout_batch_size=8", "rlhf.mini_batch_size=4", "rlhf.max_new_tokens=12",
                 "rlhf.label_min_gap=0.0",
                 f"data.source=text:{ov[0].split(':', 1)[1]}", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("rm_val_accuracy", "judge_sft", "judge_ppo", "judge_dpo", "judge_best_of_n", "kl_ppo",
                "prompts_eval"):
        assert summary[key] is not None, key
    for key in ("judge_sft_ci95", "judge_ppo_ci95", "judge_dpo_ci95", "judge_best_of_n_ci95"):
        lo, hi = summary[key]
        assert lo <= summary[key[:-5]] <= hi
    assert (tmp_path / "rlhf" / "report.md").exists() and (tmp_path / "rlhf" / "plots" / "rlhf.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "judge", "kl", "entropy", "clipfrac", "approx_kl", "vf_loss", "response_length"} <= rows[0].keys()
    # the aligned policies are kept, each with its tokenizer, and `sample` reads them
    for name in ("ppo", "dpo"):
        capsys.readouterr()
        assert main(["sample", "--run", str(tmp_path / "rlhf" / name), "--prompt", "def f(", "--raw-prompt",
                     "--max-new-tokens", "4", "--json"]) == 0, name
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"][0].startswith("def f(")


@pytest.mark.slow
def test_a_stopped_rlhf_run_resumes_to_the_uninterrupted_runs_numbers(prepared, tmp_path, capsys, monkeypatch):
    """SIGTERM in the reward model's training, then `rlhf ... --resume`; SIGTERM in PPO's first update, then the
    same; SIGTERM in DPO, then the pipeline's rerun: SFT, the reward models, PPO and DPO go on from their
    checkpoints (PPO's: the one it was stopped in, or its trained policy), to the uninterrupted run's summary."""
    import os
    import signal

    from nanogpt4.cli import main
    from nanogpt4.pipeline import _rlhf_stage
    from nanogpt4.rlhf.ppo import PPOTrainer
    from nanogpt4.train.trainer import Trainer
    from nanogpt4.utils import read_jsonl

    ov, _ = prepared
    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=30"]) == 0
    small = ["rlhf.sft_steps=10", "rlhf.reward_steps=10", "rlhf.ppo_steps=2", "rlhf.dpo_steps=4",
             "rlhf.sft_examples=100", "rlhf.label_prompts=120", "rlhf.eval_prompts=16", "rlhf.best_of_n=2",
             "rlhf.rollout_batch_size=8", "rlhf.mini_batch_size=4", "rlhf.max_new_tokens=12",
             "rlhf.label_min_gap=0.0", f"data.source=text:{ov[0].split(':', 1)[1]}"]
    argv = ["rlhf", "--pretrained", str(tmp_path / "pre"), *small, "--device", "cpu", "--json"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    real, calls, stop_at = Trainer._loss_scales, [], []

    def signalled(self, batches):  # SFT's steps are calls 1-10, the two reward models' 11-30, DPO's 31-34
        calls.append(1)
        if len(calls) in stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches)

    monkeypatch.setattr(Trainer, "_loss_scales", signalled)
    stop_at.append(15)
    assert main([*argv, "--out", str(tmp_path / "part")]) == 143
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "part"), "--resume"]) == 0
    assert "rlhf: resuming" in capsys.readouterr().out
    real_update = PPOTrainer.update

    def signalled_update(self, ro):
        if self.step_count == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(self, ro)

    with monkeypatch.context() as m:
        m.setattr(PPOTrainer, "update", signalled_update)
        assert main([*argv, "--out", str(tmp_path / "in-ppo")]) == 143
    assert "stopped: SIGTERM at PPO step 1 of 2" in capsys.readouterr().err
    updates = []
    with monkeypatch.context() as m:
        m.setattr(PPOTrainer, "update", lambda self, ro: updates.append(self.step_count) or real_update(self, ro))
        assert main([*argv, "--out", str(tmp_path / "in-ppo"), "--resume"]) == 0
    assert f"from {tmp_path / 'in-ppo' / 'ppo' / 'checkpoints' / 'step_1'}" in capsys.readouterr().out
    assert updates == [1]  # PPO's second step alone: its first was kept
    stop_at.append(len(calls) + 10 + 10 + 10 + 2)  # a fresh run: DPO's second step
    assert main([*argv, "--out", str(tmp_path / "piped")]) == 143
    cfg = load_config("tiny", [*small, "device=cpu"])
    said = []
    _rlhf_stage(cfg, tmp_path / "pre", tmp_path / "piped", said.append)
    assert said[0] == f"rlhf: resuming interrupted run {tmp_path / 'piped'}"
    for run in ("part", "in-ppo", "piped"):
        ours = json.loads((tmp_path / run / "summary.json").read_text())
        for key in ("rm_val_accuracy", "rm_val_accuracy_frozen_base", "judge_sft", "judge_ppo", "judge_dpo",
                    "judge_best_of_n", "kl_ppo"):
            assert ours[key] == full[key], (run, key)
        assert len((tmp_path / run / "metrics.jsonl").read_text().splitlines()) == 2  # PPO's steps, once
        for stage in ("sft", "reward", "reward/frozen_base", "dpo"):  # each logged step once: resumed, not redone
            steps = [[r["step"] for r in read_jsonl(tmp_path / d / stage / "metrics.jsonl") if "step_loss" in r]
                     for d in ("full", run)]
            assert steps[0] == steps[1], (run, stage)


@pytest.mark.slow
def test_stage_commands_chain_sft_reward_ppo_dpo(prepared, tmp_path, capsys):
    """`nanogpt4 sft` -> `reward` -> `ppo` / `dpo`, each reading the previous run directory."""
    from nanogpt4.cli import main

    ov, _ = prepared
    small = ["rlhf.sft_steps=6", "rlhf.reward_steps=6", "rlhf.ppo_steps=2", "rlhf.dpo_steps=3",
             "rlhf.sft_examples=60", "rlhf.label_prompts=120", "rlhf.eval_prompts=16", "rlhf.rollout_batch_size=8",
             "rlhf.mini_batch_size=4", "rlhf.max_new_tokens=10", "rlhf.label_min_gap=0.0",
             f"data.source=text:{ov[0].split(':', 1)[1]}", "--device", "cpu", "--json"]

    def run(*argv) -> dict:
        assert main(list(argv) + small) == 0, argv
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=20"]) == 0
    capsys.readouterr()
    sft = run("sft", "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "sft"))
    assert sft["steps"] == 6 and "judge_pretrained" in sft and "judge_sft" in sft
    reward = run("reward", "--sft", str(tmp_path / "sft"), "--out", str(tmp_path / "rm"))
    # the fine-tuned reward model and its frozen-base twin are both reported
    assert 0 <= reward["rm_val_accuracy"] <= 1 and 0 <= reward["rm_val_accuracy_frozen_base"] <= 1
    assert (tmp_path / "rm" / "preferences.jsonl").exists()
    ppo = run("ppo", "--sft", str(tmp_path / "sft"), "--reward", str(tmp_path / "rm"), "--out", str(tmp_path / "ppo"))
    assert {"judge_sft", "judge_ppo", "kl_ppo"} <= ppo.keys()
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "nanogpt4", "ppo", "--sft", str(tmp_path / "sft"), "--reward", str(tmp_path / "rm"),
                          "--out", str(tmp_path / "ppo2"), *small], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["processes"] == 2
    # PPO on your own prompts: the reward stage's preference file as it is, every 10th prompt held out
    prefs = tmp_path / "rm" / "preferences.jsonl"
    held_out = load_prompts(prefs)[1]
    mine = run("ppo", "--sft", str(tmp_path / "sft"), "--reward", str(tmp_path / "rm"), "--out",
               str(tmp_path / "ppo-mine"), "--prompts", str(prefs))
    assert mine["prompts_eval"] == min(16, len(held_out)) != ppo["prompts_eval"]
    dpo = run("dpo", "--sft", str(tmp_path / "sft"), "--data", str(tmp_path / "rm" / "preferences.jsonl"),
              "--out", str(tmp_path / "dpo"), "--no-eval")
    assert dpo["preference_pairs"] > 0
    # the seed's RewardModel.load_pretrained: the trained weights, frozen, in eval mode
    from safetensors.torch import load_file

    from nanogpt4.train.checkpoint import latest_checkpoint

    rm = RewardModel.load_pretrained(tmp_path / "rm")
    saved = load_file(str(latest_checkpoint(tmp_path / "rm") / "model.safetensors"))
    assert torch.equal(rm.reward_head.weight, saved["reward_head.weight"]) and rm.reward_offset != 0
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    # stopped after its model was saved, before its summary: --resume evaluates it and centres it no further
    (tmp_path / "rm" / "summary.json").unlink()
    again = run("reward", "--sft", str(tmp_path / "sft"), "--out", str(tmp_path / "rm"), "--resume")
    assert again["rm_val_accuracy"] == reward["rm_val_accuracy"]
    assert RewardModel.load_pretrained(tmp_path / "rm").reward_offset.item() == rm.reward_offset.item()
    with pytest.raises(UserError, match="is not a reward model"):
        RewardModel.load_pretrained(tmp_path / "sft")
    # PPO refuses a reward model trained on another model, naming the tensor
    assert main(["pretrain", "--out", str(tmp_path / "wide"), *ov, "training.max_steps=2", "model.dim=96"]) == 0
    assert main(["sft", "--pretrained", str(tmp_path / "wide"), "--out", str(tmp_path / "sft-wide"), *small]) == 0
    capsys.readouterr()
    assert main(["ppo", "--sft", str(tmp_path / "sft-wide"), "--reward", str(tmp_path / "rm"),
                 "--out", str(tmp_path / "ppo-wide"), *small]) == 2
    err = capsys.readouterr().err
    assert "was trained on another model than the SFT policy" in err and "nanogpt4 reward --sft" in err
    assert not (tmp_path / "ppo-wide").exists()
    # the PPO policy is a normal checkpoint: `sample` reads it
    assert main(["sample", "--run", str(tmp_path / "ppo"), "--prompt", "def", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    # the reward model is not a language model: sampling or exporting it says so, and writes nothing
    for argv in (["sample"], ["export-hf", "--out", str(tmp_path / "rm-hf")]):
        assert main([*argv, "--run", str(tmp_path / "rm")]) == 2
        assert "is a reward model" in capsys.readouterr().err
    assert not (tmp_path / "rm-hf").exists()


def test_stage_commands_report_bad_input(tmp_path, capsys):
    from nanogpt4.cli import main

    assert main(["sft", "--pretrained", str(tmp_path / "missing")]) == 2
    assert "neither a checkpoint nor a run" in capsys.readouterr().err
    assert main(["ppo", "--sft", str(tmp_path / "a"), "--reward", str(tmp_path / "b")]) == 2


HH_ROWS = [
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: No."},
]


def test_hh_rlhf_layout_through_hf_on_a_local_fixture(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "hh"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HH_ROWS))
    prefs = load_preferences(f"hf:{d}")
    assert prefs[0] == Preference("<|user|>What is 2+2?<|end|><|assistant|>", "4.<|end|>", "Go away.<|end|>")
    assert prefs[1].prompt == ("<|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>Name a colour.<|end|>"
                               "<|assistant|>")
    assert (prefs[1].chosen, prefs[1].rejected) == ("Blue.<|end|>", "No.<|end|>")
    assert len(load_preferences(f"hf:{d}", max_rows=1)) == 1


def test_hh_rlhf_rows_that_do_not_share_a_prefix_are_rejected(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"})
                 + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: chosen and rejected must share"):
        load_preferences(f)
    f.write_text(json.dumps({"chosen": "no turns here", "rejected": "none"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: not in the HH-RLHF layout"):
        load_preferences(f)


def test_a_diverging_stage_names_its_own_learning_rate_setting(tiny, corpus_dir, tmp_path):
    from omegaconf import OmegaConf

    from nanogpt4.errors import TrainingDiverged

    cfg, tok, base = tiny
    cfg = OmegaConf.merge(cfg, {"rlhf": {"sft_learning_rate": 1e5}, "training": {"grad_clip": 0.0}})
    examples = code_completion_examples([p.read_text() for p in sorted(corpus_dir.glob("*.py"))], 64, seed=0)
    with pytest.raises(TrainingDiverged, match=r"lower rlhf\.sft_learning_rate \(now 100000\)"):
        # a copy: the module's shared model must not be left with broken weights
        train_sft(cfg, copy.deepcopy(base), tok, examples, tmp_path / "sft", torch.device("cpu"), log=lambda _m: None)


def test_sft_with_grad_accumulation_matches_the_whole_batch(tiny, corpus_dir, tmp_path):
    """Each micro-batch's loss is a mean over its own response tokens; averaged over micro-batches, a row with few
    response tokens weighed as much as a whole micro-batch of long ones (the gradient-accumulation bug HF
    transformers fixed in 4.46). Weighted by response tokens, 4 micro-batches of 2 rows train as one of 8."""
    from omegaconf import OmegaConf

    cfg, tok, base = tiny
    examples = code_completion_examples([p.read_text() for p in sorted(corpus_dir.glob("*.py"))], 64, seed=0)
    cfg = OmegaConf.merge(cfg, {"training": {"dtype": "float32"}})
    losses, weights = {}, {}
    for accum in (1, 4):
        model = copy.deepcopy(base)
        run_cfg = OmegaConf.merge(cfg, {"training": {"grad_accum_steps": accum}})
        train_sft(run_cfg, model, tok, examples, tmp_path / f"a{accum}", torch.device("cpu"), log=lambda _m: None)
        rows = [json.loads(line) for line in (tmp_path / f"a{accum}" / "metrics.jsonl").read_text().splitlines()]
        losses[accum] = [r["step_loss"] for r in rows if "step_loss" in r]
        weights[accum] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert len(losses[1]) == 6 and losses[4] == pytest.approx(losses[1], abs=1e-5)
    assert torch.allclose(weights[4], weights[1], atol=1e-5)


def test_your_preference_file_is_held_out_at_random_prompts():
    """`reward --data` held out the file's first tenth of prompts: a file sorted by topic measured one topic."""
    from nanogpt4.rlhf.run import split_pairs

    pairs = [Preference(f"{topic} {i}", "good", f"bad {k}") for topic in ("maths", "poems") for i in range(50)
             for k in range(2)]
    first = {p.prompt.split()[0] for p in split_pairs(pairs)[1]}
    train, val = split_pairs(pairs, seed=0)
    assert first == {"maths"} and {p.prompt.split()[0] for p in val} == {"maths", "poems"}
    assert not {p.prompt for p in val} & {p.prompt for p in train} and len(train) + len(val) == len(pairs)
    assert split_pairs(pairs, seed=0) == (train, val)  # the same split on every run


def test_prompts_from_prose_say_which_judge_reads_them(tmp_path):
    """PPO on a run pretrained on prose failed with "no function definitions found in the corpus", naming
    neither the corpus nor the setting that takes prose."""
    from nanogpt4.rlhf.run import make_tasks

    (tmp_path / "prose.txt").write_text("".join(f"line {i} of a story that has no code in it.\n" for i in range(400)))
    cfg = load_config("tiny", [f"data.source=text:{tmp_path / 'prose.txt'}"])
    with pytest.raises(UserError, match=r"no function definitions .* give rlhf.judge=sentiment or a module:function "
                                        r"judge, whose prompts are the text's own lines \(data.source=text:.*prose"):
        make_tasks(cfg, 4, "train", 0)
    cfg = load_config("tiny", [f"data.source=text:{tmp_path / 'prose.txt'}", "rlhf.judge=sentiment"])
    tasks = make_tasks(cfg, 4, "train", 0)
    assert len(tasks) == 4 and all("line" in t.prompt + t.response for t in tasks)


def test_ppo_prompts_load_from_preference_sft_and_chat_rows(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(12)]
    rows += [{"prompt": "p3", "response": "again"},  # a repeated prompt counts once
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"}]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out = load_prompts(f)
    found = [f"p{i}" for i in range(12)] + ["<|user|>hi<|end|><|assistant|>", "<|user|>q<|end|><|assistant|>"]
    assert held_out == ["p0", "p10"] and train == [p for p in found if p not in held_out]
    f.write_text(json.dumps({"prompt": "only"}) + "\n" + json.dumps({"prompt": "only"}) + "\n")
    with pytest.raises(UserError, match="holds 1 distinct prompt"):
        load_prompts(f)
    f.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match=r"prompts.jsonl:1: expected a string field prompt"):
        load_prompts(f)
    from nanogpt4.rlhf.run import rollout_order

    order = rollout_order(train, 25, seed=0)  # 12 prompts, 25 rollouts: three passes, each a new order
    passes = [order[i:i + 12] for i in range(0, len(order), 12)]
    assert len(order) == 36 and all(sorted(p) == sorted(train) for p in passes) and passes[0] != passes[1]
    assert rollout_order(train, 25, seed=0) == order
