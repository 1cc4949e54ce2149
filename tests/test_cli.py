import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt4.cli import main
from nanogpt4.errors import DiskFull, TrainingStopped

from .conftest import small_overrides


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def trained_run(prepared, tmp_path_factory):
    ov, _ = prepared
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["pretrain", "--out", str(out), *ov, "training.max_steps=6", "--json"])
    assert code == 0
    return out


def test_pretrain_json_summary_is_last_line(prepared, tmp_path, capsys):
    ov, _ = prepared
    code, out, _ = cli(capsys, "pretrain", "--out", tmp_path / "r", *ov, "training.max_steps=3", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["device"] == "cpu"


def test_overrides_may_follow_the_flags(prepared, tmp_path, capsys):
    ov, _ = prepared  # argparse alone takes one run of positionals: the second run would be refused
    code, out, _ = cli(capsys, "pretrain", ov[0], "--out", tmp_path / "r", *ov[1:], "training.max_steps=2", "--json")
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2


@pytest.mark.parametrize("argv,needle", [
    (["pretrain", "--max-steps", "3"], "unrecognized arguments: --max-steps (config keys are set as KEY=VALUE, "
                                       "e.g. training.max_steps=...)"),
    (["prepare", "--source=text:a.txt"], "e.g. data.source=..."),
    (["sample", "--run", "r", "training.max_steps=3"], "nanogpt4 sample: error: unrecognized arguments: training"),
    (["scaling", "fit", "--sweep", "s", "--bogus"], "nanogpt4 scaling fit: error: unrecognized arguments: --bogus"),
    (["scaling", "plan", "--out", "plan"], "nanogpt4 scaling plan: error: unrecognized arguments: --out"),
    # argparse's own errors printed its whole usage block above the line
    (["sample"], "nanogpt4 sample: error: the following arguments are required: --run; see `nanogpt4 sample --help`"),
    (["sample", "--run", "r", "--top-k", "abc"], "argument --top-k: invalid int value: 'abc'"),
    (["sample", "--run", "r", "--chat", "--raw-prompt"], "argument --raw-prompt: not allowed with argument --chat"),
    (["scaling", "count"], "nanogpt4 scaling: error: argument SUBCOMMAND: invalid choice: 'count'"),
])
def test_unknown_arguments_are_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv,needle", [
    (["pretrain", "training.max_stpes=3"], "did you mean 'training.max_steps'"),
    (["pretrain", "model.dim=abc"], "bad value for 'model.dim'"),
    (["pretrain", "--config", "nope.yaml"], "not found"),
    (["prepare", "data.source=text:/does/not/exist/*.txt"], "no file matches"),
    (["sample", "--run", "/does/not/exist"], "neither a checkpoint nor a run"),
    (["pretrain", "--resume"], "--resume needs --out"),
    (["pipeline", "--scale", "0"], "--scale must be in (0, 1]"),
    (["pipeline", "--minutes", "-1"], "--minutes must be a positive number"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err, needle)


def test_a_data_directory_given_as_a_model_says_so(tmp_path, capsys):
    (tmp_path / "meta.json").write_text(json.dumps({"source": "text:my notes/*.md", "tokenizer": "bpe",
                                                    "requested_vocab_size": 8192}))
    (tmp_path / "train.bin").write_bytes(b"")
    code, _, err = cli(capsys, "sample", "--run", tmp_path)
    # the command it names trains on that data as it was prepared (pretrain refuses other settings for it)
    assert_one_line_error(code, err, f"holds prepared data, not a model; train one on it first: nanogpt4 pretrain "
                                     f"data.dir={tmp_path} 'data.source=text:my notes/*.md' model.vocab_size=8192 "
                                     f"--out runs/NAME")



def test_a_folder_of_runs_given_as_a_model_lists_them(trained_run, tmp_path, capsys):
    # a pipeline's output: its stages' runs, one and two levels down, beside folders that are not runs
    (tmp_path / "rlhf").mkdir()
    (tmp_path / "plots").mkdir()
    (tmp_path / "pretrain").symlink_to(trained_run)
    (tmp_path / "rlhf" / "sft").symlink_to(trained_run)
    code, _, err = cli(capsys, "sample", "--run", tmp_path)
    assert_one_line_error(code, err, f"'{tmp_path}' holds 2 runs, not one: pretrain, rlhf/sft; pass the one you "
                                     f"mean ({tmp_path.as_posix()}/NAME)")
    code, _, err = cli(capsys, "sample", "--run", tmp_path / "plots")
    assert_one_line_error(code, err, "is neither a checkpoint nor a run with checkpoints")

@pytest.mark.parametrize("content,needle", [(b"", "contains no text"), (b"\x00\xff\x00\x01" * 100, "looks binary")])
def test_bad_data_files_write_nothing(content, needle, tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_bytes(content)
    data = tmp_path / "data"
    code, _, err = cli(capsys, "prepare", "--out", data, f"data.source=text:{f}")
    assert_one_line_error(code, err, needle)
    assert not data.exists() or not any(data.iterdir())


@pytest.mark.parametrize("argv,needle", [
    (["rlhf", "--pretrained", "/does/not/exist"], "neither a checkpoint nor a run"),
    (["multimodal", "multimodal.data=jsonl:/does/not/exist.jsonl"], "not found"),
    (["pipeline", "training.learning_rate=-1"], "must be positive"),
])
def test_bad_stage_input_creates_no_output_directory(argv, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, *argv, "--out", out)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


@pytest.mark.parametrize("settings,needle", [
    (["rlhf.judge=python-syntax"], "the corpus has no function definitions ('def' lines)"),
    (["rlhf.judge=no_such_module:score"], "cannot load judge 'no_such_module:score'"),
    (["rlhf.judge=sentiment"], "rlhf.max_new_tokens=32 leaves no room for prompts in model.max_seq_len=32"),
    (["rlhf.judge=sentiment", "rlhf.max_new_tokens=8", "multimodal.data=jsonl:/no/such/vqa.jsonl"],
     "multimodal data file '/no/such/vqa.jsonl' not found"),
])
def test_pipeline_refuses_what_its_later_stages_cannot_use_before_pretraining(settings, needle, tmp_path, capsys):
    """Prose with the default python-syntax judge (its prompts are the corpus's functions), or a context too
    short for the RLHF responses, stopped the pipeline at that stage, after pretraining had run its minutes."""
    out = tmp_path / "p"
    code, _, err = cli(capsys, "pipeline", "--out", out, "--scale", "0.01", *settings, *_prose_overrides(tmp_path))
    assert_one_line_error(code, err, needle)
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["pipeline", "--scale", "0.01"], "the pipeline pretrains from scratch: drop training.init_from"),
    (["scaling", "sweep", "--dims", "16,32", "--budgets", "1e9,2e9"],
     "a scaling sweep trains each size from scratch: drop training.init_from"),
])
def test_commands_that_train_from_scratch_refuse_init_from(argv, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, *argv, "--out", out, "training.init_from=runs/some-run")
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_pretrain_help_examples_name_real_flags_and_keys():
    """Each example under `nanogpt4 pretrain --help` parses, and its overrides load as a config."""
    import shlex

    from nanogpt4.cli import PRETRAIN_EXAMPLES, build_parser
    from nanogpt4.config import load_config

    examples = [line.split("#")[0] for line in PRETRAIN_EXAMPLES.splitlines()[1:] if line.strip()]
    assert len(examples) == 5
    for line in examples:
        words = shlex.split(line)
        args = build_parser().parse_args(words[words.index("pretrain"):])
        load_config(args.config, args.overrides)


@pytest.mark.parametrize("where", ["override", "config file"])
def test_pretraining_from_a_checkpoint_refuses_model_settings_before_judging_them(where, tmp_path, capsys):
    """model.* under training.init_from would be dropped for the checkpoint's: refused as such, not judged by the
    config's checks first (model.dim=7 is no multiple of the heads), wherever init_from is set."""
    if where == "override":
        source = ["training.init_from=runs/some-run"]
    else:
        (tmp_path / "mine.yaml").write_text("training:\n  init_from: runs/some-run\n")
        source = ["--config", tmp_path / "mine.yaml"]
    out = tmp_path / "run"
    code, _, err = cli(capsys, "pretrain", "--out", out, *source, "model.dim=7", "model.dropout=0.1")
    assert_one_line_error(code, err, "training.init_from takes model.* from its checkpoint (model.dropout and "
                                     "model.max_seq_len aside): drop model.dim")
    assert not out.exists()


@pytest.mark.parametrize("command", ["prepare", "pipeline"])
def test_a_bpe_vocabulary_too_small_is_refused_before_the_corpus_is_read(command, tmp_path, capsys, monkeypatch):
    """It was refused once the BPE trainer started: after reading the corpus (stdlib: seconds), and in the
    pipeline after its planning had timed its models."""
    import nanogpt4.data.prepare as prepare
    import nanogpt4.rlhf.run as rlhf_run

    def unread(*_args, **_kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(prepare, "load_corpus", unread)
    monkeypatch.setattr(rlhf_run, "load_corpus", unread)
    out = tmp_path / "out"
    code, _, err = cli(capsys, command, "--out", out, "--scale" if command == "pipeline" else "--seed", "1",
                       *_prose_overrides(tmp_path), "rlhf.judge=sentiment", "model.vocab_size=100")
    assert_one_line_error(code, err, "model.vocab_size=100 is too small for a byte-level BPE (needs > 263: 256 "
                                     "bytes + 7 special tokens)")
    assert not out.exists()


def test_pipeline_refuses_image_tokens_longer_than_the_context_before_pretraining(tmp_path, capsys):
    """They stopped the multimodal stage after pretraining and RLHF; as the pipeline timed its models, the probe
    failed first, with an internal error ("text_input has 1984 <|image|> slots but 64 images need 4096")."""
    out = tmp_path / "p"
    code, _, err = cli(capsys, "pipeline", "--out", out, "rlhf.judge=sentiment", "rlhf.max_new_tokens=8",
                       *_prose_overrides(tmp_path))
    assert_one_line_error(code, err, "the multimodal stage's shortest question with its answer and the 64 image "
                                     "tokens needs 68 tokens, more than the language model's context (32)")
    assert not out.exists()


def _prose_overrides(tmp_path) -> list[str]:
    prose = tmp_path / "prose.txt"
    prose.write_text("".join(f"Line {i} of a story, told plainly.\n" for i in range(400)))
    return small_overrides(prose.parent, tmp_path / "data", **{"data.source": f"text:{prose}"})


def test_no_stage_writes_into_a_directory_that_holds_another_run(trained_run, tmp_path, capsys):
    """`sft --out` its own pretrained run's directory used to overwrite that run's summary and config and put its
    checkpoints beside the pretraining's; every training stage now wants a new or empty directory."""
    before = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    for argv in (["sft", "--pretrained", trained_run], ["rlhf", "--pretrained", trained_run],
                 ["reward", "--sft", trained_run], ["ppo", "--sft", trained_run, "--reward", trained_run],
                 ["dpo", "--sft", trained_run, "--data", pairs], ["multimodal"]):
        code, _, err = cli(capsys, *argv, "--out", trained_run, "rlhf.max_new_tokens=8")
        assert_one_line_error(code, err, f"--out '{trained_run}' already holds checkpoints, config.yaml, "
                                         f"metrics.jsonl, ...: give a new or empty directory")
    code, _, err = cli(capsys, "pipeline", "--out", trained_run)  # it continues only a pipeline's own directory
    assert_one_line_error(code, err, f"--out '{trained_run}' holds checkpoints, config.yaml, metrics.jsonl, ... but "
                                     f"no pipeline (no pretrain/ or plan.json in it)")
    assert {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()} == before
    code, _, err = cli(capsys, "sft", "--pretrained", trained_run, "--out", pairs)
    assert_one_line_error(code, err, f"--out '{pairs}' is a file")
    examples = tmp_path / "sft.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n" for i in range(8)))
    (tmp_path / "empty").mkdir()
    # SFT on your own rows samples nothing: the 32-token model needs no shorter rlhf.max_new_tokens for it
    code, _, err = cli(capsys, "sft", "--pretrained", trained_run, "--data", examples, "--out", tmp_path / "empty",
                       "rlhf.sft_steps=2")
    assert code == 0 and (tmp_path / "empty" / "summary.json").exists(), err
    code, _, err = cli(capsys, "sft", "--pretrained", trained_run, "--out", tmp_path / "offline", "rlhf.sft_steps=2")
    assert_one_line_error(code, err, "rlhf.max_new_tokens=32 leaves no room for prompts in model.max_seq_len=32")


def test_dpo_refuses_an_evaluation_it_cannot_run_before_training(tmp_path, capsys, monkeypatch):
    """On a corpus without `def` lines the python-syntax judge has no held-out prompts: DPO trained on the pairs
    and then ended with that error, its policy unsaved (a checkpoint directory, no tokenizer, no summary)."""
    ov = _prose_overrides(tmp_path)
    assert main(["pretrain", "--out", str(tmp_path / "prose-run"), *ov, "training.max_steps=2"]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Line {i}", "chosen": " of a story", "rejected": " x"}) + "\n"
                             for i in range(8)))
    dpo = ["dpo", "--sft", tmp_path / "prose-run", "--data", pairs, "rlhf.dpo_steps=2", "rlhf.max_new_tokens=8"]
    code, _, err = cli(capsys, *dpo, "--out", tmp_path / "d")
    assert_one_line_error(code, err, "the corpus has no function definitions ('def' lines) for the python-syntax "
                                     "judge's code prompts")
    assert not any((tmp_path / "d").rglob("*"))  # refused before training: nothing written
    assert "or pass --no-eval to skip the held-out judge evaluation" in err
    # a judge that fails only when it scores: the trained policy is saved before the evaluation meets it
    (tmp_path / "one_score.py").write_text("def judge(prompts, completions):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = cli(capsys, *dpo, "--out", tmp_path / "d1", "rlhf.judge=one_score:judge", "rlhf.eval_prompts=4")
    assert_one_line_error(code, err, "judge 'one_score:judge' returned 1 scores for 4 completions")
    code, _, err = cli(capsys, "sample", "--run", tmp_path / "d1", "--prompt", "Line", "--max-new-tokens", "3")
    assert code == 0, err
    code, _, err = cli(capsys, *dpo, "--out", tmp_path / "d2", "rlhf.judge=sentiment", "rlhf.eval_prompts=4")
    assert code == 0, err
    assert "judge_dpo" in json.loads((tmp_path / "d2" / "summary.json").read_text())
    code, _, err = cli(capsys, "sample", "--run", tmp_path / "d2", "--prompt", "Line", "--max-new-tokens", "3")
    assert code == 0, err


def test_eval_scores_every_token_once_as_the_model_does(trained_run, tmp_path, capsys, monkeypatch):
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from nanogpt4.train.checkpoint import load_model

    monkeypatch.chdir(tmp_path)  # its shards go to runs/data/ here, as `prepare`'s do
    code, out, err = cli(capsys, "eval", "--run", trained_run, "--json", "--batch-size", "5")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["split"] == "val" and f"over {summary['tokens']:,} tokens of the val split of " in out
    model, cfg, _ = load_model(trained_run)
    (data_dir,) = (tmp_path / "runs" / "data").iterdir()
    meta = json.loads((data_dir / "meta.json").read_text())
    val = np.fromfile(data_dir / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    # encoded with the run's tokenizer: the very val split the run held out, token for token
    assert np.array_equal(np.fromfile(Path(cfg.data.dir) / "val.bin", dtype=meta["dtype"]), val)
    T, n = cfg.model.max_seq_len, len(val) - 1
    with torch.no_grad():  # by hand: consecutive windows of T, every token after the first scored once
        losses = torch.cat([F.cross_entropy(model(torch.tensor(val[s:min(s + T, n)])[None])[0],
                                            torch.tensor(val[s + 1:min(s + T, n) + 1]), reduction="none")
                            for s in range(0, n, T)])
    # a short last window in a batch of full ones: it goes alone
    assert summary["tokens"] == n == losses.numel() and n % T and (n // T + 1) % 5 > 1
    assert summary["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert summary["bpb"] == pytest.approx(summary["loss"] / math.log(2) / (meta["val_bytes"] / meta["val_tokens"]))
    (tmp_path / "new.txt").write_text("def area(r):\n    return 3.14 * r * r\n" * 40)
    code, out, err = cli(capsys, "eval", "--run", trained_run, "--data", f"text:{tmp_path / 'new.txt'}",
                         "--split", "train", "--max-tokens", "50", "--json")
    assert code == 0, err
    head = json.loads(out.strip().splitlines()[-1])
    assert head["tokens"] == 50
    # text other than the run's own is read whole by default: both its splits, every token after the first
    code, out, err = cli(capsys, "eval", "--run", trained_run, "--data", f"text:{tmp_path / 'new.txt'}", "--json")
    assert code == 0, err
    whole = json.loads(out.strip().splitlines()[-1])
    (new_dir,) = (p for p in (tmp_path / "runs" / "data").iterdir() if p != data_dir)
    new_meta = json.loads((new_dir / "meta.json").read_text())
    assert whole["split"] == "all" and whole["tokens"] == new_meta["train_tokens"] + new_meta["val_tokens"] - 1
    assert whole["bpb"] == pytest.approx(whole["loss"] / math.log(2) / (
        (new_meta["train_bytes"] + new_meta["val_bytes"]) / (new_meta["train_tokens"] + new_meta["val_tokens"])))
    assert f"over {whole['tokens']:,} tokens of text:{tmp_path / 'new.txt'} (" in out.splitlines()[-2]
    code, out, err = cli(capsys, "eval", "--run", trained_run, "--data", f"text:{tmp_path / 'new.txt'}",
                         "--max-tokens", "50", "--json")  # the whole text's first 50: the train split's
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["loss"] == head["loss"], err
    for argv, said in [(["model.dim=64"], "eval takes the model, its tokenizer and its settings from --run"),
                       (["data.tokenizer=gpt2"], "drop data.tokenizer"), (["--max-tokens", "0"], "must be >= 1")]:
        code, _, err = cli(capsys, "eval", "--run", trained_run, *argv)
        assert_one_line_error(code, err, said)


@pytest.mark.parametrize("sig, code, said", [("SIGINT", 130, "interrupted at step 3 of 10"),
                                             ("SIGTERM", 143, "stopped: SIGTERM at step 3 of 10")])
def test_a_stopped_stage_names_what_it_kept_and_how_to_train_it_again(trained_run, tmp_path, capsys, monkeypatch,
                                                                     ctrl_c_raises, sig, code, said):
    import os
    import signal

    from nanogpt4.train.trainer import Trainer

    real, calls = Trainer._loss_scales, []

    def signalled_in_step_3(self, batches):  # a signal while step 3 trains: it finishes and is checkpointed
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), getattr(signal, sig))
        return real(self, batches)

    monkeypatch.setattr(Trainer, "_loss_scales", signalled_in_step_3)
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n" for i in range(4)))
    out = tmp_path / "s"
    got, _, err = cli(capsys, "sft", "--pretrained", trained_run, "--data", rows, "--out", out, "rlhf.sft_steps=10")
    assert got == code and err.strip().splitlines()[-1] == (
        f"{said}; {out / 'checkpoints' / 'step_3'} is kept, a partly trained model; continue with: nanogpt4 sft "
        f"--pretrained {trained_run} --data {rows} --out {out} rlhf.sft_steps=10 --resume")
    # a command with no --resume says how to train it again instead
    from nanogpt4.cli import _stage_stop_hint

    other = argparse.Namespace(command="other", stage_dir=out, argv=["other", "--out", str(out)])
    assert _stage_stop_hint(other) == (f"; {out / 'checkpoints' / 'step_3'} is kept, a partly trained model; this "
                                       f"stage does not resume: to train it again, delete {out} or give another "
                                       f"--out")


def test_a_stop_under_torchrun_says_to_relaunch_as_many_processes(tmp_path, monkeypatch):
    from nanogpt4.cli import _launcher, _stage_stop_hint

    (tmp_path / "checkpoints" / "step_2").mkdir(parents=True)
    args = argparse.Namespace(command="ppo", stage_dir=tmp_path, resume=False, argv=["ppo", "--out", str(tmp_path)])
    assert _stage_stop_hint(args).endswith(f"continue with: nanogpt4 ppo --out {tmp_path} --resume")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _stage_stop_hint(args).endswith(
        f"continue with: torchrun --nproc_per_node=4 -m nanogpt4 ppo --out {tmp_path} --resume")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _launcher() == "torchrun --nnodes=2 (and your rendezvous flags) --nproc_per_node=2 -m nanogpt4"


def _rlhf_stage_argv(stage: str, trained_run, tmp_path) -> list:
    rows, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i % 3}"}) + "\n" for i in range(12)))
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "good", "rejected": f"bad {i}"}) + "\n"
                             for i in range(30)))
    return {"sft": ["sft", "--pretrained", trained_run, "--data", rows, "rlhf.sft_steps=8"],
            "reward": ["reward", "--sft", trained_run, "--data", pairs, "rlhf.reward_steps=8"],
            "dpo": ["dpo", "--sft", trained_run, "--data", pairs, "rlhf.dpo_steps=8", "--no-eval"]}[stage] + [
        "training.log_interval=1"]


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_a_stopped_rlhf_stage_resumes_exactly_with_its_command_and_resume(trained_run, tmp_path, capsys,
                                                                          monkeypatch, stage):
    """SIGTERM at step 3 of 8; the command it began with plus --resume goes on from that checkpoint to the
    uninterrupted run's per-step losses and summary (reward: both of its models, each in its directory)."""
    import os
    import shlex
    import signal

    from nanogpt4.train.trainer import Trainer

    from .conftest import step_losses

    argv = _rlhf_stage_argv(stage, trained_run, tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli(capsys, *argv, "--out", full)[0] == 0
    real, calls = Trainer._loss_scales, []

    def signalled_in_step_3(self, batches):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches)

    monkeypatch.setattr(Trainer, "_loss_scales", signalled_in_step_3)
    code, _, err = cli(capsys, *argv, "--out", part)
    again = shlex.join(["nanogpt4", *map(str, argv), "--out", str(part), "--resume"])
    assert code == 143 and err.strip().splitlines()[-1] == (
        f"stopped: SIGTERM at step 3 of 8; {part / 'checkpoints' / 'step_3'} is kept, a partly trained model; "
        f"continue with: {again}"), err
    code, out, err = cli(capsys, *shlex.split(again)[1:], "--json")
    assert code == 0 and f"{stage}: resuming {part} from {part / 'checkpoints' / 'step_3'}" in out, err
    logs = sorted(p.relative_to(full) for p in full.glob("**/metrics.jsonl"))
    assert logs == sorted(p.relative_to(part) for p in part.glob("**/metrics.jsonl")) and logs
    for log in logs:  # exact float equality, every step, each logged once: steps 4-8 trained, 1-3 kept
        assert step_losses(full / log.parent) == step_losses(part / log.parent) and step_losses(part / log.parent)
        assert (part / log).read_text().count('"step_loss"') == 8
    ours, theirs = json.loads(out.strip().splitlines()[-1]), json.loads((full / "summary.json").read_text())
    for key in ("sft_train_loss", "rm_val_accuracy", "rm_val_accuracy_frozen_base", "dpo_train_loss"):
        assert ours.get(key) == theirs.get(key), key
    assert_one_line_error(*cli(capsys, *shlex.split(again)[1:])[::2], "has finished: nothing to resume")
    # stopped after training, in its evaluation or before its summary: the trained model is kept, not trained on
    (full / "summary.json").unlink()
    code, out, err = cli(capsys, *argv, "--out", full, "--resume", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]).get("dpo_train_loss") == theirs.get("dpo_train_loss")
    for log in logs:
        assert step_losses(full / log.parent) == step_losses(part / log.parent)
        assert (full / log).read_text().count('"step_loss"') == 8


class Killed(BaseException):
    """The process's death, as far as the code under test can tell: nothing after it runs (no handler, no save)."""


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_a_killed_rlhf_stage_resumes_from_its_last_periodic_checkpoint(trained_run, tmp_path, capsys, monkeypatch,
                                                                       stage):
    """Killed in step 8 of 8 (PPO: 4 of 4) with no chance to save: the checkpoint of step 6 (PPO: 2), written every
    training.checkpoint_interval steps, is what --resume goes on from, to the uninterrupted run's steps."""
    from nanogpt4.rlhf.ppo import PPOTrainer
    from nanogpt4.train.trainer import Trainer
    from nanogpt4.utils import read_jsonl

    if stage == "ppo":
        assert cli(capsys, *_rlhf_stage_argv("reward", trained_run, tmp_path), "--out", tmp_path / "rm")[0] == 0
        argv = ["ppo", "--sft", trained_run, "--reward", tmp_path / "rm", "--prompts", tmp_path / "sft.jsonl",
                "rlhf.ppo_steps=4", "rlhf.rollout_batch_size=4", "rlhf.mini_batch_size=2", "rlhf.max_new_tokens=8",
                "rlhf.eval_prompts=4", "training.checkpoint_interval=2"]
        cls, method, kill_in, kept = PPOTrainer, "update", 4, 2
    else:
        argv = [*_rlhf_stage_argv(stage, trained_run, tmp_path), "training.checkpoint_interval=3"]
        cls, method, kill_in, kept = Trainer, "_loss_scales", 8, 6
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli(capsys, *argv, "--out", full)[0] == 0
    real, calls = getattr(cls, method), []

    def killed(self, *a):
        calls.append(1)
        if len(calls) == kill_in:
            raise Killed
        return real(self, *a)

    monkeypatch.setattr(cls, method, killed)
    with pytest.raises(Killed):
        cli(capsys, *argv, "--out", part)
    monkeypatch.setattr(cls, method, real)
    code, out, err = cli(capsys, *argv, "--out", part, "--resume")
    assert code == 0 and f"{stage}: resuming {part} from {part / 'checkpoints' / f'step_{kept}'}" in out, err
    timing = ("rollout_s", "update_s", "tok_per_s", "step_s", "elapsed_s", "train_s", "wall_s")
    ours, theirs = ([{k: v for k, v in row.items() if k not in timing and "time" not in k}
                     for row in read_jsonl(d / "metrics.jsonl")] for d in (part, full))
    assert ours == theirs and len(ours) >= 4 and all({"step_loss", "reward"} & row.keys() for row in ours)


@pytest.mark.parametrize("stop_in", [2, 4])
def test_a_stopped_ppo_run_resumes_to_the_uninterrupted_runs_rollouts(trained_run, tmp_path, capsys, monkeypatch,
                                                                      stop_in):
    """SIGTERM during PPO update 2 of 4 (or the last): the step finishes and is checkpointed (the policy, the
    critic, the optimizer, the KL coefficient, the rollouts' seed); the command plus --resume then logs the
    uninterrupted run's steps exactly, and ends with its policy and held-out scores."""
    import os
    import shlex
    import signal

    from nanogpt4.rlhf.ppo import PPOTrainer
    from nanogpt4.train.checkpoint import load_trainer_state
    from nanogpt4.utils import read_jsonl

    assert cli(capsys, *_rlhf_stage_argv("reward", trained_run, tmp_path), "--out", tmp_path / "rm")[0] == 0
    argv = ["ppo", "--sft", trained_run, "--reward", tmp_path / "rm", "--prompts", tmp_path / "sft.jsonl",
            "rlhf.ppo_steps=4", "rlhf.rollout_batch_size=4", "rlhf.mini_batch_size=2", "rlhf.max_new_tokens=8",
            "rlhf.eval_prompts=4", "rlhf.target_kl=1.0"]  # the KL coefficient moves, so it must be restored
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli(capsys, *argv, "--out", full)[0] == 0
    real, calls = PPOTrainer.update, []

    def signalled(self, ro):
        calls.append(1)
        if len(calls) == stop_in:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, ro)

    monkeypatch.setattr(PPOTrainer, "update", signalled)
    code, _, err = cli(capsys, *argv, "--out", part)
    kept = part / "checkpoints" / f"step_{stop_in}"
    again = shlex.join(["nanogpt4", *map(str, argv), "--out", str(part), "--resume"])
    assert code == 143 and err.strip().splitlines()[-1] == (
        f"stopped: SIGTERM at PPO step {stop_in} of 4; {kept} is kept, a partly trained model; continue with: "
        f"{again}"), err
    assert ("optimizer" in load_trainer_state(kept)) == (stop_in < 4)  # the last step's: the trained policy
    assert_one_line_error(*cli(capsys, *shlex.split(again)[1:], "rlhf.ppo_steps=1")[::2],
                          f"'{part}' is at PPO step {stop_in}, past the 1 steps now asked for (rlhf.ppo_steps)")
    if stop_in < 4:  # other prompts to roll out: it trains on, and says the run no longer matches
        import shutil

        shutil.copytree(part, tmp_path / "other")
        other = tmp_path / "other.jsonl"
        other.write_text((tmp_path / "sft.jsonl").read_text().replace('"a1"', '"b1"').replace('"q1"', '"r1"'))
        moved = [str(a).replace(str(tmp_path / "sft.jsonl"), str(other)).replace(str(part), str(tmp_path / "other"))
                 for a in shlex.split(again)[1:]]
        code, out, err = cli(capsys, *moved)
        assert code == 0 and f"warning: the prompts to roll out are not those PPO step {stop_in} was trained on" in out
    code, out, err = cli(capsys, *shlex.split(again)[1:], "--json")
    assert code == 0 and f"ppo: resuming {part} from {kept}" in out and "warning" not in out, err
    timing = ("rollout_s", "update_s")
    ours, theirs = ([{k: v for k, v in row.items() if k not in timing} for row in read_jsonl(d / "metrics.jsonl")]
                    for d in (part, full))
    assert [r["step"] for r in ours] == [1, 2, 3, 4] and ours == theirs
    assert theirs[0]["kl_coef"] != theirs[-1]["kl_coef"]
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("judge_sft", "judge_ppo", "kl_ppo"):
        assert summary[key] == json.loads((full / "summary.json").read_text())[key], key
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step_4"]
    assert (part / "checkpoints" / "step_4" / "model.safetensors").read_bytes() == (
        full / "checkpoints" / "step_4" / "model.safetensors").read_bytes()


def test_rlhf_stage_resume_refusals(trained_run, tmp_path, capsys):
    argv = _rlhf_stage_argv("sft", trained_run, tmp_path)
    assert_one_line_error(*cli(capsys, *argv, "--resume")[::2], "--resume needs --out RUN_DIR")
    assert_one_line_error(*cli(capsys, *argv, "--out", tmp_path / "none", "--resume")[::2],
                          "nothing to resume: '")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert_one_line_error(*cli(capsys, *argv, "--out", tmp_path / "empty", "--resume")[::2],
                          "was stopped before its first checkpoint")
    assert cli(capsys, *argv, "--out", tmp_path / "r")[0] == 0
    (tmp_path / "r" / "summary.json").unlink()
    assert_one_line_error(*cli(capsys, *argv, "--out", tmp_path / "r", "--resume", "rlhf.sft_steps=5")[::2],
                          "is at step 8, past the 5 steps now asked for")


def test_rows_longer_than_the_context_are_said_not_cut_silently(trained_run, tmp_path, capsys):
    # a 32-token model: the long rows were cut to fit (prompts from the left, responses from the right, their end
    # token with them) without a word
    long = "x = 1\n" * 40
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": long, "response": "a"}) + "\n" + json.dumps({"prompt": "q", "response": "a"}))
    code, _, err = cli(capsys, "sft", "--pretrained", trained_run, "--data", sft, "--out", tmp_path / "s",
                       "rlhf.sft_steps=1")
    assert code == 0 and "warning: 1 of 2 examples do not fit the model's context (model.max_seq_len)" in err, err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "q", "chosen": long, "rejected": "b"},
                                                            {"prompt": "r", "chosen": "a", "rejected": "b"}]))
    code, _, err = cli(capsys, "dpo", "--sft", trained_run, "--data", pairs, "--out", tmp_path / "d",
                       "rlhf.dpo_steps=1", "--no-eval")
    assert code == 0 and "warning: 1 of 4 responses (chosen and rejected, each after its prompt) do not fit" in err
    sft.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    code, _, err = cli(capsys, "sft", "--pretrained", trained_run, "--data", sft, "--out", tmp_path / "s2",
                       "rlhf.sft_steps=1")
    assert code == 0 and "warning" not in err, err


def test_sweep_with_no_runnable_budget_creates_no_output_directory(prepared, tmp_path, capsys):
    ov, _ = prepared
    out = tmp_path / "sweep"
    code, _, err = cli(capsys, "scaling", "sweep", "--out", out, "--dims", "16", "--budgets", "1e3", *ov)
    assert_one_line_error(code, err, "no run of the sweep fits")
    # --eval-iters 0 ended in a ZeroDivisionError with the runs' directory made; a width given twice stopped at
    # its second run, after the first had trained
    for flags, said in ([("--eval-iters", "0"), "--eval-iters must be positive, got 0"],
                        [("--dims", "16,32,16"), "--dims gives 16 more than once; list each once"],
                        [("--budgets", "1e10,1e10"), "--budgets gives 1e+10 more than once; list each once"]):
        code, _, err = cli(capsys, "scaling", "sweep", "--out", out, *flags, *ov)
        assert_one_line_error(code, err, said)
    assert not out.exists()


def test_predict_refuses_rows_no_sweep_wrote_and_bad_targets(tmp_path, capsys):
    """Pretrain summaries (enough for `scaling fit`) or a nonpositive target reached the fit and ended in a
    KeyError's traceback."""
    rows = [{"flops": c, "val_loss": 2 + 50 * c ** -0.12, "tokens": c / 6e5, "non_embedding_params": 1e5}
            for c in (1e12, 3e12, 1e13, 3e13, 1e14)]
    summaries = tmp_path / "summaries.jsonl"
    summaries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(capsys, "scaling", "predict", "--sweep", summaries, "--out", tmp_path / "p",
                       "--target-flops", "1e15")
    assert_one_line_error(code, err, f"{summaries}:1 lacks name, dim, budget: predict reads the sweep.jsonl of "
                                     f"`nanogpt4 scaling sweep`")
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text("".join(json.dumps({**r, "name": f"d32_{i}", "dim": 32, "budget": r["flops"]}) + "\n"
                             for i, r in enumerate(rows)))
    for flags, said in ((("--target-flops", "0"), "--target-flops must be positive, got 0"),
                        (("--target-flops", "1e15", "--target-dim", "12"),
                         "--target-dim must be a positive multiple of 8 (as the sweep's widths), got 12")):
        code, _, err = cli(capsys, "scaling", "predict", "--sweep", sweep, "--out", tmp_path / "p", *flags)
        assert_one_line_error(code, err, said)
    assert not (tmp_path / "p").exists()


def test_scaling_plan_says_where_activation_checkpointing_saves_nothing(capsys):
    """A 22B model at micro-batch 32 x 128 read "330.5 GiB (...; 335.7 GiB with activation checkpointing)", as if
    checkpointing were worth turning on: its peak is the weight gradients, beside which it keeps block inputs."""
    code, out, _ = cli(capsys, "scaling", "plan", "--config", "base", "model.n_layers=48", "model.dim=6144",
                       "model.n_heads=48")
    assert code == 0 and "activation checkpointing saves nothing here (335.7 GiB)" in out, out
    code, out, _ = cli(capsys, "scaling", "plan", "--config", "tiny")
    assert code == 0 and "; 207.8 MiB with activation checkpointing)" in out, out


def test_scaling_plan_rejects_a_nonpositive_time_budget(capsys):
    code, _, err = cli(capsys, "scaling", "plan", "--config", "tiny", "--minutes", "-3")
    assert_one_line_error(code, err, "--minutes must be positive")


def test_scaling_plan_rejects_a_nonpositive_batch(capsys):
    # 0 was read as "not given" and the config's 32 accounted for without a word
    code, _, err = cli(capsys, "scaling", "plan", "--batch-size", "0")
    assert_one_line_error(code, err, "--batch-size must be >= 1 (the micro-batch to account for), got 0")


def test_scaling_plan_refuses_flags_it_would_ignore(capsys):
    # an --mfu without the --minutes budget it scales used to be accepted and ignored (as were --out and --seed)
    code, _, err = cli(capsys, "scaling", "plan", "--mfu", "0.5")
    assert_one_line_error(code, err, "--mfu is the utilisation assumed for a --minutes budget")
    code, _, err = cli(capsys, "scaling", "plan", "--minutes", "1", "--mfu", "2")
    assert_one_line_error(code, err, "--mfu in (0, 1]")



def test_a_full_disk_outside_the_atomic_writes_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import errno

    import nanogpt4.data.prepare
    import nanogpt4.train.pretrain

    def full(what):
        def fail(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / what))
        return fail

    monkeypatch.setattr(nanogpt4.train.pretrain, "pretrain", full("metrics.jsonl"))
    code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "the disk is full ([Errno 28] No space left on device: ")
    assert err.strip().endswith("metrics.jsonl'); no checkpoint was written yet")
    monkeypatch.setattr(nanogpt4.data.prepare, "prepare_data", full("train.bin"))
    code, _, err = cli(capsys, "prepare", "--out", tmp_path / "data")
    assert_one_line_error(code, err, "train.bin'); free space, or write elsewhere with --out")
    # any other OS error is not the user's to fix: it keeps its traceback
    monkeypatch.setattr(nanogpt4.data.prepare, "prepare_data", lambda *a, **k: (tmp_path / "no" / "such").read_text())
    with pytest.raises(FileNotFoundError):
        main(["prepare", "--out", str(tmp_path / "data")])


def test_wrong_checkpoint_for_resume(trained_run, capsys):
    code, _, err = cli(capsys, "pretrain", "--out", trained_run, "--resume", "model.dim=64")
    assert_one_line_error(code, err, "cannot change model")


def test_sample_reads_the_prompt_as_the_start_of_a_file(trained_run, capsys, monkeypatch):
    from nanogpt4.model.transformer import Transformer
    from nanogpt4.train.checkpoint import load_model

    seen, generate = [], Transformer.generate
    monkeypatch.setattr(Transformer, "generate", lambda self, x, *a, **k: seen.append(x) or generate(self, x, *a, **k))
    code, out, _ = cli(capsys, "sample", "--run", trained_run, "--prompt", "import", "--max-new-tokens", 4, "--json")
    tok = load_model(trained_run)[2]
    assert code == 0 and seen[0][0].tolist() == [tok.eot_id] + tok.encode("import")
    assert json.loads(out.strip().splitlines()[-1])["samples"][0].startswith("import")
    code, out, _ = cli(capsys, "sample", "--run", trained_run, "--prompt", "import", "--max-new-tokens", 4,
                       "--raw-prompt", "--json")
    assert code == 0 and seen[1][0].tolist() == tok.encode("import")  # an RLHF policy's prompts start mid-file
    assert json.loads(out.strip().splitlines()[-1])["samples"][0].startswith("import")


def test_one_sample_prints_as_it_is_written(trained_run, capsys, monkeypatch):
    from nanogpt4.model.transformer import Transformer

    printed_while_generating, generate = [], Transformer.generate

    def watched(self, *a, **k):
        out = generate(self, *a, **k)
        printed_while_generating.append(capsys.readouterr().out)  # before cmd_sample prints anything itself
        return out

    monkeypatch.setattr(Transformer, "generate", watched)
    code, out, _ = cli(capsys, "sample", "--run", trained_run, "--prompt", "def f(x):", "--max-new-tokens", 12,
                       "--seed", 3, "--json")
    sample = json.loads(out.strip().splitlines()[-1])["samples"][0]
    # the prompt and the new tokens' text came out during generation; the stream and the rest are the sample
    streamed = printed_while_generating[0]
    assert code == 0 and streamed.startswith("def f(x):") and len(streamed) > len("def f(x):")
    assert streamed + out.rsplit("\n", 2)[0] == sample
    code, out, _ = cli(capsys, "sample", "--run", trained_run, "--prompt", "def f(x):", "--max-new-tokens", 12,
                       "--seed", 3, "--num-samples", 2)
    assert code == 0 and printed_while_generating[1] == "" and out.startswith("--- sample 0\ndef f(x):")


def test_a_sample_that_ends_its_document_early_says_so(trained_run, capsys, monkeypatch):
    import torch

    from nanogpt4.model.transformer import Transformer
    from nanogpt4.train.checkpoint import load_model

    tok = load_model(trained_run)[2]
    (a,), (b,) = tok.encode("x"), tok.encode("y")
    ends = {1: [[a, b, b, b, b]], 2: [[a, b, tok.eot_id, tok.pad_id, tok.pad_id], [a, b, b, b, b]]}
    monkeypatch.setattr(Transformer, "generate", lambda self, x, n, **k: torch.cat(
        [x, torch.tensor(ends[x.size(0)] if n == 5 else [[a, tok.eot_id, tok.pad_id, tok.pad_id, tok.pad_id]])], 1))
    code, out, err = cli(capsys, "sample", "--run", trained_run, "--prompt", "v =", "--max-new-tokens", 5, "--json")
    assert code == 0 and err == "" and json.loads(out.splitlines()[-1])["ended_at_end_of_text"] == [False]
    code, out, err = cli(capsys, "sample", "--run", trained_run, "--prompt", "v =", "--max-new-tokens", 5,
                         "--num-samples", 2, "--json")
    summary = json.loads(out.splitlines()[-1])
    assert code == 0 and summary["ended_at_end_of_text"] == [True, False]
    assert summary["samples"] == ["v =xy", "v =xyyyy"]  # the text stops at the token, stdout unchanged
    assert err == ("note: 1 of the 2 samples ended at the end-of-text token, where the model ends its text, after "
                   "2 of the 5 new tokens asked for\n")
    code, out, err = cli(capsys, "sample", "--run", trained_run, "--prompt", "v =", "--max-new-tokens", 6)
    assert code == 0 and out == "v =x\n" and "the sample ended at the end-of-text token" in err
    assert "after 1 of the 6 new tokens" in err


def test_chat_samples_reply_to_a_user_turn_and_stop_at_its_end(trained_run, capsys, monkeypatch):
    import torch

    from nanogpt4.model.transformer import Transformer
    from nanogpt4.rlhf.data import format_chat
    from nanogpt4.train.checkpoint import load_model

    tok = load_model(trained_run)[2]
    end = tok.token_id("<|end|>")
    reply = tok.encode("hello there")
    asked = []

    def generate(self, x, n, **k):
        asked.append((x[0].tolist(), k["stop_tokens"]))
        for t in reply + [end]:
            k["on_token"](torch.tensor([t])) if k["on_token"] else None
        return torch.cat([x, torch.tensor([reply + [end, tok.eot_id]] * x.size(0))], 1)

    monkeypatch.setattr(Transformer, "generate", generate)
    code, out, err = cli(capsys, "sample", "--run", trained_run, "--chat", "--prompt", "hi", "--json")
    # the prompt as SFT encoded a {"messages": [...]} row's: the template, no file-start EOT
    template = format_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]).prompt
    assert code == 0 and asked[0] == (tok.encode(template), [tok.eot_id, end])
    assert template == "<|user|>hi<|end|><|assistant|>"
    lines = out.splitlines()
    assert lines[0] == "hello there" and json.loads(lines[-1])["samples"] == ["hello there"]
    assert err == ""  # ending at its <|end|> is a reply's end: no note about an early end of text
    code, out, _ = cli(capsys, "sample", "--run", trained_run, "--chat", "--prompt", "hi", "--num-samples", 2)
    assert code == 0 and out == "--- sample 0\nhello there\n--- sample 1\nhello there\n"

    # a model never tuned on chat rows ends its document, or runs on, instead of ending its turn: a note says so
    def untuned(self, x, n, **k):
        rows = [reply + [tok.eot_id] + [tok.pad_id] * (n - len(reply) - 1), (reply * n)[:n]]
        return torch.cat([x, torch.tensor(rows[:x.size(0)])], 1)

    monkeypatch.setattr(Transformer, "generate", untuned)
    common = ("sample", "--run", trained_run, "--chat", "--prompt", "hi", "--max-new-tokens", 8)
    code, out, err = cli(capsys, *common, "--num-samples", 2)
    assert code == 0 and out.startswith("--- sample 0\nhello there\n")
    assert err == ("note: 2 of the 2 replies did not end at <|end|> (some at the end-of-text token, some at the "
                   "token limit); a model tuned on chat rows (`nanogpt4 sft`) ends its replies at <|end|>, so this "
                   "one may not know the chat template\n")
    code, out, err = cli(capsys, *common)
    assert code == 0 and err.startswith("note: the reply ended at the end-of-text token, not at <|end|>; ")


def test_streamed_text_waits_for_whole_characters(capsys):
    import torch

    from nanogpt4.cli import TextStream
    from nanogpt4.data.tokenizer import Tokenizer

    class Bytes(Tokenizer):  # one token per byte: "é" is two tokens
        eot_id = pad_id = 256

        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    stream, shown = TextStream(Bytes(), [256, *b"caf"]), []
    for t in [0xC3, 0xA9, ord("!"), 256, 256]:  # the end of the document, then its padding
        stream(torch.tensor([t]))
        shown.append(capsys.readouterr().out)
    stream.finish("caf\u00e9!")
    assert shown == ["caf", "\u00e9", "!", "", ""] and capsys.readouterr().out == "\n"


def test_a_stream_decodes_only_what_it_has_not_shown(capsys):
    import torch

    from nanogpt4.cli import TextStream
    from nanogpt4.data.tokenizer import BPETokenizer

    text = "def café(x):\n    return x + 'naïve ✓ 日本'\n" * 3
    tok = BPETokenizer.train([text] * 20, 300)
    ids = tok.encode(text)
    lengths = []
    decode = tok.decode
    tok.decode = lambda part: lengths.append(len(part)) or decode(part)
    stream = TextStream(tok, ids[:5])
    for t in ids[5:]:
        stream(torch.tensor([t]))
    # the same text as decoding the row whole, each token's text decoded once, with the few tokens of a
    # character split between them
    assert capsys.readouterr().out == decode(ids) and len(ids) - 5 <= sum(lengths[1:]) <= 2 * (len(ids) - 5)
    assert max(lengths[1:]) <= 4


def test_a_streamed_chat_reply_stops_short_of_a_spelled_out_end(capsys):
    import torch

    from nanogpt4.cli import TextStream
    from nanogpt4.data.tokenizer import Tokenizer

    class Bytes(Tokenizer):  # as GPT-2's BPE: <|end|> is text, written over several tokens
        eot_id = pad_id = 256

        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    stream, shown = TextStream(Bytes(), list(b"<|user|>q<|end|><|assistant|>"), reply_only=True), []
    for t in b"a<b<|end|>zz":
        stream(torch.tensor([t]))
        shown.append(capsys.readouterr().out)
    # "<" is held back while it could open <|end|>, shown once it does not; nothing from <|end|> on
    assert "".join(shown) == "a<b" and shown[:4] == ["a", "", "<b", ""]


def test_sample_and_long_prompt_warning(trained_run, capsys):
    code, out, err = cli(capsys, "sample", "--run", trained_run, "--prompt", "def f(x):", "--max-new-tokens", 5,
                         "--json", "--seed", 1)
    assert code == 0
    samples = json.loads(out.strip().splitlines()[-1])["samples"]
    assert samples[0].startswith("def f(x):") and "<|endoftext|>" not in samples[0]
    code, out, err = cli(capsys, "sample", "--run", trained_run, "--prompt", "x = 1\n" * 200,
                         "--max-new-tokens", 3, "--json")
    assert code == 0 and "longer than the context" in err and "keeping the last 32" in err
    code, _, err = cli(capsys, "sample", "--run", trained_run, "--top-p", "1.5")
    assert_one_line_error(code, err, "--top-p")
    code, _, err = cli(capsys, "sample", "--run", trained_run, "--top-k", "-3")
    assert_one_line_error(code, err, "--top-k must be >= 0")
    code, _, err = cli(capsys, "sample", "--run", trained_run, "--temperature", "nan")
    assert_one_line_error(code, err, "--temperature >= 0 (and finite)")
    # greedy sampling is deterministic across calls, and compiled decoding gives the same text
    a = cli(capsys, "sample", "--run", trained_run, "--prompt", "import", "--temperature", 0, "--json")[1]
    compiled = ["--compile"] if shutil.which("g++") else []  # torch.compile on CPU needs a C++ compiler
    b = cli(capsys, "sample", "--run", trained_run, "--prompt", "import", "--temperature", 0, "--json",
            *compiled)[1]
    assert a.splitlines()[-1] == b.splitlines()[-1]


def test_export_hf_cli_with_tokenizer(trained_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanogpt4.train.checkpoint import load_model

    code, _, _ = cli(capsys, "export-hf", "--run", trained_run, "--out", tmp_path / "hf")
    assert code == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    model, _, tok = load_model(trained_run)
    text = "def add(a, b):\n    return a + b\n"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text) and hf_tok.eos_token == "<|endoftext|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)
    # a chat-tuned model is used as it was trained: apply_chat_template writes the template `sft --data` encodes
    # from messages rows, and generate() ends a reply at its <|end|>
    from nanogpt4.rlhf.data import format_chat

    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}]
    assert (hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == format_chat([*chat, {"role": "assistant", "content": ""}]).prompt)
    assert hf.generation_config.eos_token_id == [tok.eot_id, tok.token_id("<|end|>")]


def test_export_hf_replaces_only_an_earlier_export(trained_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from nanogpt4.train.checkpoint import latest_checkpoint
    # the export replaces its --out whole; a folder of the user's own files used to be deleted with it
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = cli(capsys, "export-hf", "--run", trained_run, "--out", mine)
    assert_one_line_error(code, err, f"--out '{mine}' already holds files an export does not write (notes.txt); "
                                     f"give a new or empty directory (nothing in it was changed)")
    assert [p.name for p in tmp_path.iterdir()] == ["models"] and (mine / "notes.txt").read_text() == "keep me"
    monkeypatch.chdir(mine)  # '.': refused the same way, where it was a traceback (a path with no name)
    code, _, err = cli(capsys, "export-hf", "--run", trained_run, "--out", ".")
    assert_one_line_error(code, err, "--out '.' already holds files an export does not write (notes.txt)")
    code, _, err = cli(capsys, "export-hf", "--run", trained_run, "--out", "notes.txt")
    assert_one_line_error(code, err, "--out 'notes.txt' is a file")
    hf = tmp_path / "hf"
    for _ in range(2):  # a second export replaces the first
        assert cli(capsys, "export-hf", "--run", trained_run, "--out", hf)[0] == 0
    assert (hf / "config.json").exists() and not list(tmp_path.glob(".*"))
    (tmp_path / "latest").symlink_to(hf)  # a link to the export: the export behind it is replaced, the link kept
    assert cli(capsys, "export-hf", "--run", trained_run, "--out", tmp_path / "latest")[0] == 0
    assert (tmp_path / "latest").is_symlink() and (hf / "config.json").exists() and not list(tmp_path.glob(".*"))
    (hf / "README.md").write_text("my model card")  # an earlier export the user added to: kept as it is
    code, _, err = cli(capsys, "export-hf", "--run", trained_run, "--out", hf)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: --out '{hf}' already holds files an "
                                                                 f"export does not write (README.md)")
    assert (hf / "README.md").read_text() == "my model card" and not list(tmp_path.glob(".*"))
    # weights without their tokenizer export alone, and say so
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        shutil.copyfile(latest_checkpoint(trained_run) / name, bare / name)
    code, _, err = cli(capsys, "export-hf", "--run", bare, "--out", tmp_path / "bare-hf")
    assert code == 0 and f"warning: '{bare}' has no tokenizer.json: exporting the model alone" in err


def test_version(capsys):
    import torch

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    # torch's own version names its build (2.13.0+cpu, +cu130), its package metadata does not
    assert out.startswith("nanogpt4 0.") and f"(torch {torch.__version__}" in out
    assert out.endswith(f", Python {sys.version.split()[0]})")


def test_module_entry_point_exit_code(tmp_path):
    res = subprocess.run([sys.executable, "-m", "nanogpt4", "pretrain", "model.n_heads=5"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


@pytest.mark.slow
def test_pipeline_end_to_end(corpus_dir, tmp_path, capsys):
    rlhf = {"rlhf.sft_steps": 6, "rlhf.reward_steps": 6, "rlhf.ppo_steps": 2, "rlhf.dpo_steps": 2,
            "rlhf.sft_examples": 60, "rlhf.label_prompts": 60, "rlhf.eval_prompts": 16, "rlhf.best_of_n": 2,
            "rlhf.rollout_batch_size": 8, "rlhf.mini_batch_size": 4, "rlhf.max_new_tokens": 12,
            "rlhf.label_min_gap": 0.0}
    mm = {"multimodal.image_size": 16, "multimodal.patch_size": 8, "multimodal.encoder_dim": 32,
          "multimodal.eval_scenes": 8, "multimodal.batch_size": 8, "multimodal.align_steps": 2,
          "multimodal.tune_steps": 4, "model.max_seq_len": 64}
    ov = small_overrides(corpus_dir, tmp_path / "data", **{"training.max_steps": 20, "training.eval_interval": 10},
                         **rlhf, **mm)
    code, out, _ = cli(capsys, "pipeline", "--out", tmp_path / "p", *ov, "--json")
    assert code == 0
    p = Path(tmp_path / "p")
    report = (p / "report.md").read_text()
    assert "## Pretraining" in report and "plots/pretrain_loss.png" in report and "## Samples" in report
    assert "## RLHF" in report and (p / "rlhf" / "summary.json").exists()
    assert "## Multimodal" in report and (p / "plots" / "multimodal_examples.png").exists()
    assert (p / "plots" / "pretrain_loss.png").stat().st_size > 1000
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["pretrain_val_loss"] < 6.0
    assert 0 <= summary["sample_python_lines"] <= summary["sample_python_lines_so_far"] <= 1
    assert "CPython's parser accepts the first" in report and "are Python so far" in report
    # no flag: the default budget, which this small configuration fits whole, the last stage refitted too
    from nanogpt4.plan import DEFAULT_MINUTES

    plan = json.loads((p / "plan.json").read_text())
    assert (plan["minutes"], plan["scale"], plan["multimodal_scale"]) == (DEFAULT_MINUTES, 1.0, 1.0)
    assert plan["vlm_step_now_s"] > 0  # timed again before the last stage was fitted
    assert summary["scale"] == summary["multimodal_scale"] == 1.0 and "## Shortened run" not in report
    stages = [summary[f"{name}_wall_s"] for name in ("pretrain", "rlhf", "multimodal")]
    assert all(t > 0 for t in stages) and sum(stages) <= summary["wall_s"]
    assert f"- **pretrain_val_loss**: {summary['pretrain_val_loss']:.4g}\n" in report  # rounded, not 17 digits
    assert f"- **pretrain_params**: {summary['pretrain_params']:,}\n" in report
    assert f"| tok_per_s | {summary['pretrain_tok_per_s']:,.0f} |" in report  # not 2.757e+04
    # part 4 on this run: the accounting's exact count is the trained model's
    assert "## Scaling accounting" in report and f"| params | {summary['pretrain_params']:,} |" in report
    assert "| train_flops_per_token |" in report and "nanogpt4 scaling predict" in report
    # every command the report offers under "Use the results" works on this run (a random picture for `ask`)
    import shlex

    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    commands = [line.split("  #")[0] for line in report.split("## Use the results")[1].splitlines()
                if line.startswith("nanogpt4 ")]
    assert [c.split()[1] for c in commands] == ["sample", "sample", "sample", "ask", "export-hf"]
    for command in commands:
        argv = [a if a != "photo.png" else str(tmp_path / "p.png") for a in shlex.split(command)[1:]]
        assert cli(capsys, *argv)[0] == 0, command
    # re-running reuses the finished stage instead of training again
    code, out, _ = cli(capsys, "pipeline", "--out", tmp_path / "p", *ov)
    assert code == 0 and "reusing finished run" in out
    # ... but never for a command that asks for other training (here: half the pretraining's tokens)
    code, _, err = cli(capsys, "pipeline", "--out", tmp_path / "p", *ov, "--scale", "0.125")
    assert_one_line_error(code, err, "training.checkpoint_interval 6 -> 3; training.cooldown_steps 0 -> 3")


def test_cuda_requested_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli(capsys, "pretrain", "--device", "cuda")
    assert_one_line_error(code, err, "CUDA is not available")


def test_scaling_plan_json_fields(capsys):
    code, out, _ = cli(capsys, "scaling", "plan", "--config", "configs/base.yaml", "--json",
                       "--budget-flops", "1e21")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("params", "non_embedding_params", "train_flops_per_token", "train_memory_bytes",
                "inference_kv_bytes_per_token"):
        assert result[key] > 0
    assert result["compute_optimal"]["params"] > 1e8


def test_scaling_fit_cli_and_errors(tmp_path, capsys):
    import numpy as np

    sweep = tmp_path / "sweep.jsonl"
    rows = [{"flops": float(c), "val_loss": float(50 * c**-0.1 + 2.0)} for c in np.logspace(12, 14, 6)]
    sweep.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = cli(capsys, "scaling", "fit", "--sweep", sweep, "--target-flops", "3e15", "--bootstrap", "20",
                       "--out", tmp_path, "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["prediction"]["compute_ratio"] == pytest.approx(30.0)
    assert (tmp_path / "scaling_fit.png").exists()
    assert result["warnings"] == [] and abs(result["hindcast"]["rel_error"]) < 1e-3  # an exact law hindcasts
    # an IsoFLOP grid: the fit uses each budget's best run, as `scaling predict` does, not every run
    grid = [{"flops": r["flops"], "budget": r["flops"], "val_loss": r["val_loss"] + extra}
            for r in rows for extra in (0.0, 0.3)]
    sweep.write_text("".join(json.dumps(r) + "\n" for r in grid))
    code, out, _ = cli(capsys, "scaling", "fit", "--sweep", tmp_path, "--bootstrap", "0", "--json")  # its directory
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["n_runs"], result["n_rows"]) == (6, 12) and result["fit"]["c"] == pytest.approx(2.0, abs=1e-3)
    (tmp_path / "runs").mkdir()  # a directory without a sweep used to read as "data file not found"
    code, _, err = cli(capsys, "scaling", "fit", "--sweep", tmp_path / "runs")
    assert_one_line_error(code, err, f"--sweep '{tmp_path / 'runs'}' is a directory without a sweep.jsonl")
    # runs that curve downward in log-log (small models before the power law sets in): the hindcast warns
    bent = [{"flops": float(c), "val_loss": float(6.0 - 0.05 * np.log(c / 1e12) ** 2)} for c in np.logspace(12, 14, 6)]
    sweep.write_text("".join(json.dumps(r) + "\n" for r in bent))
    code, out, _ = cli(capsys, "scaling", "fit", "--sweep", sweep, "--bootstrap", "0")
    assert code == 0 and "warning: hindcast" in out
    sweep.write_text("".join(json.dumps(r) + "\n" for r in grid[:-1] + [{**grid[-1], "val_loss": None}]))
    code, _, err = cli(capsys, "scaling", "fit", "--sweep", sweep)
    assert_one_line_error(code, err, "non-finite")
    sweep.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    code, out, _ = cli(capsys, "scaling", "fit", "--sweep", sweep, "--target-flops", "1e15")  # was "95% [x, x]"
    assert code == 0 and "95% [" not in out and "warning: no 95% interval: runs at 3 compute values" in out
    for flag, value, needle in (("--bootstrap", "-5", "--bootstrap is a number of resamples"),
                                ("--target-flops", "-1", "--target-flops must be a positive number")):
        code, _, err = cli(capsys, "scaling", "fit", "--sweep", sweep, flag, value)
        assert_one_line_error(code, err, needle)
    sweep.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    code, _, err = cli(capsys, "scaling", "fit", "--sweep", sweep)
    assert_one_line_error(code, err, "at least 3 runs")
    sweep.write_text('{"flops": 1}\n')
    code, _, err = cli(capsys, "scaling", "fit", "--sweep", sweep)
    assert_one_line_error(code, err, "needs 'flops' and 'val_loss'")


def test_scaling_fit_cli_fits_capability_and_chinchilla_when_the_runs_carry_them(tmp_path, capsys):
    import numpy as np

    # runs from a known Chinchilla law L = E + A/N^alpha + B/D^beta at C = 6ND, each with a capability metric
    # -E[log pass] = 3 * (C/1e12)^-0.2
    E, A, B, alpha, beta = 1.7, 400.0, 410.0, 0.34, 0.28
    rows = []
    for n in (1e5, 3e5, 1e6):
        for d in (1e7, 3e7, 1e8):
            c = 6 * n * d
            rows.append({"flops": c, "params": n, "tokens": d, "val_loss": E + A / n**alpha + B / d**beta,
                         "mean_log_pass_rate": -3.0 * (c / 1e12) ** -0.2})
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = cli(capsys, "scaling", "fit", "--sweep", sweep, "--target-flops", "1e16", "--bootstrap", "20",
                       "--out", tmp_path, "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    cap = result["capability"]
    assert cap["k"] == pytest.approx(0.2, rel=1e-6) and cap["n_runs"] == 9
    want = 3.0 * (1e16 / 1e12) ** -0.2
    assert cap["prediction"]["neg_log_pass_rate"] == pytest.approx(want, rel=1e-6)
    lo, hi = cap["prediction"]["ci95"]
    assert lo <= want <= hi
    law = result["chinchilla"]
    assert (law["alpha"], law["beta"], law["E"]) == pytest.approx((alpha, beta, E), rel=1e-3)  # an exact law
    assert (tmp_path / "capability_fit.png").stat().st_size > 0 and (tmp_path / "scaling_fit.png").exists()
    assert np.isfinite(result["prediction"]["loss"])
    code, out, _ = cli(capsys, "scaling", "fit", "--sweep", sweep, "--target-flops", "1e16", "--bootstrap", "20")
    assert "capability: -E[log pass rate] = 753.6 * C^-0.2000   (9 runs)" in out  # 3·1e12^0.2; was --json only


def test_compile_without_a_cpp_compiler_is_a_one_line_error(prepared, trained_run, tmp_path, capsys, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    # the finder require_compiler calls (torch 2.4 names it _get_cpp_compiler)
    finder = "get_cpp_compiler" if hasattr(cpp_builder, "get_cpp_compiler") else "_get_cpp_compiler"
    monkeypatch.setattr(cpp_builder, finder, no_compiler)
    code, _, err = cli(capsys, "sample", "--run", trained_run, "--compile")
    assert_one_line_error(code, err, "needs a C++ compiler")
    code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "r", *prepared[0], "training.compile=true")
    assert_one_line_error(code, err, "needs a C++ compiler")
    assert not (tmp_path / "r" / "checkpoints").exists()  # failed before training: nothing half-written


@pytest.mark.parametrize("stop, code, said", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (TrainingStopped("SIGTERM at step 3 of 10"), 143, "stopped: SIGTERM at step 3 of 10"),
    (DiskFull("the disk filled up while writing x"), 2, "error: the disk filled up while writing x")],
    ids=["ctrl-c", "sigterm", "disk-full"])
def test_a_stopped_pipeline_says_how_to_continue(tmp_path, capsys, monkeypatch, stop, code, said):
    import nanogpt4.pipeline

    def stopped(*_args, **_kwargs):
        raise stop

    monkeypatch.setattr(nanogpt4.pipeline, "run_pipeline", stopped)
    got, _, err = cli(capsys, "pipeline", "--out", tmp_path / "p")
    assert got == code
    assert err.strip() == (f"{said}; finished stages are kept and an interrupted one resumes from its last "
                           "checkpoint: run the same command again to continue")


def test_every_install_hint_names_an_extra_that_exists():
    import re
    import tomllib

    root = Path(__file__).parent.parent
    extras = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    hinted = {(p.name, m) for p in (root / "src" / "nanogpt4").rglob("*.py")
              for m in re.findall(r"nanogpt4\[(\w+)\]", p.read_text())}
    assert hinted and all(extra in extras for _, extra in hinted), sorted(hinted)


def test_every_command_in_the_readme_parses_and_its_overrides_are_valid_config():
    """Documentation rot check: each `nanogpt4 ...` line of the README's bash blocks names real subcommands
    and flags, and its dotted overrides are keys and values the config accepts (nothing is run)."""
    import re
    import shlex

    from nanogpt4.cli import parse_cli
    from nanogpt4.config import load_config

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
             for line in block.replace("\\\n", " ").splitlines() if "nanogpt4 " in line]
    checked = 0
    for line in lines:
        words = shlex.split(line, comments=True)
        if "pip" in words:  # the set-up commands at the top; the pipeline part is checked by its own test
            continue
        argv = words[words.index("nanogpt4") + 1:]
        args = parse_cli(argv)  # an unknown flag or subcommand exits 2 here
        overrides = [o for o in getattr(args, "overrides", []) if "=" in o]
        load_config(getattr(args, "config", None) or "tiny", overrides)
        checked += 1
    assert checked >= 15, checked


def test_the_readme_python_blocks_run(trained_run, capsys):
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code.replace('"runs/tiny"', repr(str(trained_run))), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert int(printed[1]) > 124e6  # the seed's 124M GPT scaled by 2 (then the trained run's continuation)
    ratio, reward = map(float, printed[-1].split())  # the seed's PPO loop, last
    assert ratio == pytest.approx(1.0, abs=1e-6) and -1 <= reward <= 1


@pytest.mark.parametrize("command", ["sweep", "predict"])
def test_a_stopped_sweep_or_prediction_says_that_finished_runs_are_kept(command, tmp_path, capsys, monkeypatch):
    from nanogpt4.scaling import cli as scaling_cli

    def stopped(*_args, **_kwargs):
        raise TrainingStopped("SIGTERM at step 7 of 40")

    monkeypatch.setattr(scaling_cli, f"cmd_{command}", stopped)
    argv = ["scaling", command, "--out", tmp_path / "s"] + (["--sweep", tmp_path / "x.jsonl"] if command == "predict"
                                                             else ["--dims", "16", "--budgets", "1e9"])
    got, _, err = cli(capsys, *argv)
    assert got == 143
    assert err.strip() == ("stopped: SIGTERM at step 7 of 40; finished runs are kept: run the same command again "
                           "to continue")


@pytest.mark.parametrize("argv", [["reward", "--sft", "s"], ["ppo", "--sft", "s", "--reward", "r"],
                                  ["dpo", "--sft", "s", "--data", "p.jsonl"], ["multimodal"]])
def test_fsdp_outside_pretrain_and_sft_is_refused_under_torchrun(argv, tmp_path, capsys, monkeypatch):
    """FSDP failed inside the reward model's and DPO's training ('invalid python storage'), and PPO ignored it."""
    import nanogpt4.train.distributed

    monkeypatch.setenv("RANK", "0")  # as torchrun starts rank 0 of 2: refused before any process group exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    # a torchrun rank ends through os._exit where communication threads outlive it: here that would be pytest
    monkeypatch.setattr(nanogpt4.train.distributed, "leave_rank", lambda code: None)
    code, _, err = cli(capsys, *argv, "--out", tmp_path / "o", "training.fsdp=true")
    assert_one_line_error(code, err, f"training.fsdp=true shards `nanogpt4 pretrain` and `nanogpt4 sft`; "
                                     f"`nanogpt4 {argv[0]}` trains data-parallel with DDP under torchrun")
    assert not (tmp_path / "o").exists()
