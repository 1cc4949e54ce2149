import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from nanogpt4.config import load_config
from nanogpt4.errors import UserError
from nanogpt4.train.checkpoint import list_checkpoints, load_model, load_trainer_state, load_weights
from nanogpt4.train.distributed import DistInfo
from nanogpt4.train.pretrain import data_passes_note, pretrain
from nanogpt4.train.trainer import Trainer, anneal_step, budget_end_step, lm_loss, lr_at, rank_rows
from nanogpt4.utils import read_jsonl

from .conftest import step_losses


def quiet(_msg):
    pass


def run(prepared, out, *extra, resume=False, log=quiet):
    ov, _ = prepared
    cfg = load_config("tiny", ov + list(extra))
    return pretrain(cfg, out, resume=resume, progress=False, log=log)


def test_a_run_shorter_than_its_warmup_says_so(prepared, tmp_path):
    ov, _ = prepared
    said: list[str] = []
    pretrain(load_config("tiny", [*ov, "training.max_steps=4", "training.warmup_steps=10"]), tmp_path / "r",
             progress=False, log=said.append)
    assert any(m.startswith("training: warmup_steps 10 is longer than the run (4 steps): the learning rate rises "
                            "all run and peaks at ") and "give a training.warmup_steps below 4" in m for m in said)
    said.clear()
    pretrain(load_config("tiny", [*ov, "training.max_steps=4", "training.warmup_steps=4"]), tmp_path / "ok",
             progress=False, log=said.append)
    assert not any("warmup_steps" in m for m in said)  # a warmup as long as the run reaches the rate on its last step


def test_the_run_says_how_often_it_reads_its_data(prepared, tmp_path):
    ov, data_dir = prepared
    train_tokens = json.loads((data_dir / "meta.json").read_text())["train_tokens"]
    said: list[str] = []
    s = pretrain(load_config("tiny", [*ov, "training.max_steps=3"]), tmp_path / "r", progress=False,
                 log=said.append)
    notes = [m for m in said if "passes over" in m]
    planned = 3 * 8 * 32
    assert notes == [f"training: {planned:,} tokens (training.max_steps 3 x batch 8 x 32), "
                     f"{planned / train_tokens:.3g} passes over the {train_tokens:,} training tokens"]
    assert s["epochs"] == pytest.approx(planned / train_tokens)
    tc = load_config("tiny", ["training.max_steps=1000", "training.batch_size=8", "training.max_tokens=40000"]).training
    note = data_passes_note(5000, tc, 32)  # 256,000 tokens in the steps, capped at 40,000: 8 passes over 5,000
    assert note.startswith("training: 40,000 tokens (training.max_steps 1000 x batch 8 x 32, capped by "
                           "training.max_tokens), 8 passes over the 5,000 training tokens; past a few")
    assert note.endswith("watch val_loss, and train on more text or for fewer steps if it turns up")


def test_lr_schedule_warmup_then_cosine_to_min():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=True))


def test_a_cooldown_leaves_the_curve_and_reaches_the_floor_on_the_last_step():
    plain = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(60)]
    cooled = [lr_at(s, 1.0, 10, 110, 0.1, max_steps=60, cooldown=20) for s in range(60)]
    assert cooled[:40] == plain[:40]  # the full run's schedule until the cooldown starts
    down = (plain[40] - 0.1) / 20  # then 20 equal steps down from where the curve was ...
    assert cooled[40:] == pytest.approx([plain[40] - (i + 1) * down for i in range(20)])
    assert cooled[59] == pytest.approx(0.1)  # ... to the floor, reached by the last step
    assert [lr_at(s, 1.0, 10, 110, 0.1, max_steps=60) for s in range(60)] == plain  # no cooldown: unchanged
    with pytest.raises(UserError, match="cooldown_steps must be in"):
        load_config("tiny", ["training.max_steps=10", "training.cooldown_steps=11"])
    with pytest.raises(UserError, match="eval_batch_size must be positive"):
        load_config("tiny", ["training.eval_batch_size=0"])


def test_an_annealing_step_by_step_is_a_straight_line_that_never_rises_when_its_end_moves():
    line, lr = [], 1.0
    for k in range(40, 60):  # a fixed end: lr_at's cooldown from the same start, step for step
        lr = anneal_step(lr, 0.1, k, 60)
        line.append(lr)
    assert line == pytest.approx([1.0 - (i + 1) * 0.9 / 20 for i in range(20)]) and line[-1] == 0.1
    moved, lr = [], 1.0
    for k, end in zip(range(40, 60), [70] * 5 + [55] * 10 + [60] * 5, strict=True):  # later, earlier, later
        lr = anneal_step(lr, 0.1, k, end)
        moved.append(lr)
    assert all(a >= b for a, b in zip(moved, moved[1:], strict=False))  # never back up
    assert moved[14] == 0.1 and moved[-1] == 0.1  # the floor on the last step of the end in force
    assert budget_end_step(10, 5, 1.0, 2.0, 100) == 20  # 5 steps a second, 2 seconds left
    assert budget_end_step(10, 5, 1.0, 200.0, 100) == 100 and budget_end_step(10, 5, 1.0, 0.0, 100) == 11
    assert budget_end_step(10, 0, 0.0, 2.0, 100) == 100  # no pace yet: the configured end


class _Windows:
    """Fixed random (4, 16) token windows."""

    tokens_per_step = 64

    def get(self, step, micro, accum, info, device):
        x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(step))
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


class _Clock:
    """The trainer's clock, moved on by the loss alone: how many steps a time budget holds does not depend on how
    busy the machine running the test is."""

    def __init__(self):
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    perf_counter = time


def test_a_time_budget_shorter_than_the_steps_brings_the_cooldown_forward(tmp_path, monkeypatch):
    """A run that ``training.max_time_s`` stops before ``max_steps`` still anneals to the learning-rate floor
    (the pipeline's last stage, fitted to a time left that a slower machine does not keep): without this, the cut
    lands high on the 400-step cosine."""
    import nanogpt4.train.trainer as trainer_mod
    from nanogpt4.model.transformer import Transformer

    cfg = load_config("tiny", ["model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.vocab_size=64",
                               "model.max_seq_len=16", "training.max_steps=400", "training.max_time_s=1.5",
                               "training.cooldown_steps=40", "training.warmup_steps=5", "training.log_interval=1",
                               "training.eval_interval=1000", "training.checkpoint_interval=1000",
                               "training.learning_rate=1e-3", "training.dtype=float32"])

    clock = _Clock()
    monkeypatch.setattr(trainer_mod, "time", clock)

    def slow_loss(model, batch):
        clock.now += 0.02  # 75 steps fit the 1.5 s
        return lm_loss(model, batch)

    said = []
    torch.manual_seed(0)
    trainer = Trainer(cfg, Transformer(cfg), _Windows(), tmp_path, DistInfo(), torch.device("cpu"),
                      loss_fn=slow_loss, progress=False, log=said.append)
    result = trainer.fit()
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "lr" in r]
    assert 75 <= result["steps"] <= 76 and len(lrs) == result["steps"]  # 1.5 s of 0.02 s steps (as floats add up)
    assert any("anneals to its floor" in m for m in said)
    peak, floor = 1e-3, 1e-4
    assert lrs[-1] <= floor + 0.2 * (peak - floor)  # near the floor where the time ran out (the cosine: ~0.98)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))  # down from the warmup's end, never back up
    assert load_trainer_state(list_checkpoints(tmp_path)[-1][1])["anneal_lr"] == lrs[-1]  # kept for --resume
    said.clear()  # without a cooldown the run stops where it is, and says how to anneal
    Trainer(cfg, Transformer(cfg), _Windows(), tmp_path / "plain", DistInfo(), torch.device("cpu"), loss_fn=slow_loss,
            train_cfg=OmegaConf.merge(cfg.training, {"cooldown_steps": 0}), progress=False, log=said.append).fit()
    assert any("training.cooldown_steps=N anneals" in m for m in said), said
    assert not any("anneals to its floor from" in m for m in said)


def test_mfu_under_several_ranks_is_quoted_against_all_their_peaks(tmp_path, monkeypatch):
    """tok/s counts every rank's rows: against one device's peak, 2 ranks' MFU read twice the truth (8 GPUs', 8x)."""
    import nanogpt4.train.trainer as trainer_mod
    from nanogpt4.model.transformer import Transformer

    cfg = load_config("tiny", ["model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.vocab_size=64",
                               "model.max_seq_len=16", "training.dtype=float32"])
    monkeypatch.setattr(trainer_mod, "peak_flops", lambda device, dtype, fresh=False: 1e9)  # one device's
    monkeypatch.setattr(trainer_mod, "apply_ddp", lambda model, info, device: model)  # no process group here
    for world, mfu in [(1, 0.5), (2, 0.25), (8, 0.0625)]:
        trainer = Trainer(cfg, Transformer(cfg), _Windows(), tmp_path / str(world), DistInfo(0, world),
                          torch.device("cpu"), flops_per_token=1e5, progress=False, log=lambda _m: None)
        assert trainer.peak == world * 1e9 and trainer.mfu(5e3) == pytest.approx(mfu)


def test_the_evaluation_batch_is_a_setting_of_its_own(prepared, tmp_path):
    """``training.eval_batch_size`` picks the evaluation's windows whatever the training batch (the pipeline's
    half-batch pretraining is scored on the full run's windows)."""
    from nanogpt4.data.loader import TokenWindows
    from nanogpt4.data.prepare import load_meta
    from nanogpt4.train.pretrain import make_lm_evaluator

    _, data_dir = prepared
    summary = run(prepared, tmp_path / "r", "training.batch_size=4", "training.eval_batch_size=8",
                  "training.max_steps=2", "training.eval_interval=2")
    model, cfg, _ = load_model(tmp_path / "r", "cpu")
    val = TokenWindows(data_dir / "val.bin", cfg.model.max_seq_len, load_meta(data_dir)["dtype"], cfg.seed + 1)

    def val_loss(windows_per_batch: int) -> float:
        evaluate = make_lm_evaluator(val, cfg.training.eval_iters, windows_per_batch, 1.0, torch.device("cpu"),
                                     torch.float32)
        return evaluate(model)["val_loss"]

    assert summary["val_loss"] == pytest.approx(val_loss(8), abs=1e-6)
    assert val_loss(4) != pytest.approx(val_loss(8), abs=1e-6)  # the training batch's windows would differ


def test_stages_built_on_the_training_section_do_not_inherit_its_length():
    # a pretraining's cooldown, token/time budget, schedule length and samples would corrupt a 20-step SFT
    from nanogpt4.rlhf.stages import stage_training_cfg
    from nanogpt4.scaling.sweep import RunSpec, run_config
    from nanogpt4.train.multimodal import stage_cfg

    cfg = load_config("tiny", ["training.cooldown_steps=300", "training.max_tokens=10000", "training.max_time_s=60",
                               "training.lr_decay_steps=2000"])
    spec = RunSpec("d32", 32, 4, 1e10, 40, 1e-3, 1, 1, 1.0)
    for t in (stage_training_cfg(cfg, max_steps=20), stage_cfg(cfg, 20), run_config(cfg, spec, 2).training):
        assert (t.cooldown_steps, t.max_tokens, t.max_time_s, t.sample_tokens) == (0, None, None, 0)
        assert t.lr_decay_steps in (None, t.max_steps)


def test_rank_rows_cover_the_global_batch_once():
    for accum, world in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)]:
        rows = sorted(i for m in range(accum) for r in range(world)
                      for i in range(16)[rank_rows(16, m, accum, DistInfo(r, world))])
        assert rows == list(range(16))
    with pytest.raises(UserError, match="divisible"):
        rank_rows(6, 0, 4, DistInfo())


def test_pretrain_writes_the_run_directory(prepared, tmp_path):
    s = run(prepared, tmp_path / "r")
    r = tmp_path / "r"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "tokenizer.json", "plots/loss.png"):
        assert (r / name).exists(), name
    summary = json.loads((r / "summary.json").read_text())
    for key in ("final_train_loss", "val_loss", "val_bpb", "tokens", "steps", "params", "flops", "tok_per_s",
                "mfu", "wall_s", "device"):
        assert summary[key] is not None, key
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 8 * 32
    # tok_per_s counts the steps after the first (compiling, warming up); evals, samples and checkpoints only
    # slow the wall-clock figure
    assert summary["first_step_s"] > 0 and summary["tok_per_s"] > summary["tok_per_s_wall"] > 0
    assert s["val_loss"] < 6.0  # ln(384) = 5.95 is the untrained loss
    steps = [s for s, _ in list_checkpoints(r)]
    assert steps == [6, 12]  # keep_last=2
    assert (r / "checkpoints" / "best" / "model.safetensors").exists()
    state = load_trainer_state(r / "checkpoints" / "step_12")  # weights_only=True inside
    assert state["step"] == 12 and "optimizer" in state
    rows = read_jsonl(r / "metrics.jsonl")
    assert [x["step"] for x in rows if "val_loss" in x] == [6, 12]
    assert all({"step", "tokens", "loss", "lr", "tok_per_s", "mfu"} <= x.keys() for x in rows if "step_loss" in x)


def test_the_matmul_peak_is_the_fastest_call_not_the_window_mean():
    from nanogpt4.train.metrics import fastest_s

    # 3 warm-up calls, then one undisturbed call among slow ones (another process holding the cores)
    delays = iter([0.0, 0.0, 0.0, 0.03, 0.002] + [0.03] * 100)
    assert fastest_s(lambda: time.sleep(next(delays)), seconds=0.1) < 0.01  # the window's mean is ~0.025


def test_an_mfu_above_one_measures_the_peak_again(prepared, tmp_path, monkeypatch):
    import nanogpt4.train.trainer as trainer_mod

    real = trainer_mod.peak_flops
    fresh_calls = []

    def busy_at_start(device, dtype, fresh=False):  # the first measurement happened on a busy machine
        fresh_calls.append(fresh)
        return real(device, dtype, fresh=True) if fresh else 1e3

    monkeypatch.setattr(trainer_mod, "peak_flops", busy_at_start)
    run(prepared, tmp_path / "r")
    mfus = [x["mfu"] for x in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "mfu" in x]
    assert fresh_calls == [False, True]  # measured again once, at the first logged step
    assert mfus and all(0 < m < 1 for m in mfus)
    assert 0 < json.loads((tmp_path / "r" / "summary.json").read_text())["mfu"] < 1


def test_resume_reproduces_losses_bitwise(prepared, tmp_path):
    run(prepared, tmp_path / "full", "training.max_steps=12")
    # stopped by a token budget after 6 of 12 steps, as an interrupted run would be (same schedule)
    run(prepared, tmp_path / "part", "training.max_steps=12", f"training.max_tokens={6 * 8 * 32}")
    assert list_checkpoints(tmp_path / "part")[-1][0] == 6
    second = run(prepared, tmp_path / "part", "training.max_steps=12", "training.max_tokens=null", resume=True)
    # the summary's run totals span both commands (the training time's: test_training_time_spans_resumes)
    assert second["steps"] == 12 and second["tokens"] == 12 * 8 * 32
    full, part = step_losses(tmp_path / "full"), step_losses(tmp_path / "part")
    assert list(full) == list(range(1, 13)) and list(part) == list(range(1, 13))
    assert full == part  # exact float equality, every step
    a, _, _ = load_model(tmp_path / "full")
    b, _, _ = load_model(tmp_path / "part")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_training_time_spans_resumes(prepared, tmp_path):
    """`train_time_s` is the run's, every command's loop included (`training.max_time_s` budgets it): a resume
    starts from the checkpoint's figure, not from zero. Set to 1000 s there, so no timing noise can pass it."""
    run(prepared, tmp_path / "r", "training.max_steps=6", "training.lr_decay_steps=12")
    ckpt = list_checkpoints(tmp_path / "r")[-1][1]
    state = load_trainer_state(ckpt)
    assert 0 < state["train_time_s"] < 1000
    torch.save({**state, "train_time_s": 1000.0}, ckpt / "trainer_state.pt")
    t0 = time.time()
    second = run(prepared, tmp_path / "r", "training.max_steps=12", resume=True)
    assert second["steps"] == 12
    assert 1000 < second["train_time_s"] <= 1000 + (time.time() - t0)


def test_a_short_run_on_a_longer_schedule_extends_exactly(prepared, tmp_path):
    """`max_steps=6 lr_decay_steps=12`, resumed later with `max_steps=12`, is the 12-step run (the README's way to
    train a short run that can be extended)."""
    run(prepared, tmp_path / "full", "training.max_steps=12")
    run(prepared, tmp_path / "short", "training.max_steps=6", "training.lr_decay_steps=12")
    run(prepared, tmp_path / "short", "training.max_steps=12", resume=True)
    assert step_losses(tmp_path / "full") == step_losses(tmp_path / "short")


def test_resume_with_dropout_restores_rng(prepared, tmp_path):
    common = ("model.dropout=0.2", "training.max_steps=8", "training.checkpoint_interval=4")
    run(prepared, tmp_path / "full", *common)
    run(prepared, tmp_path / "part", *common, f"training.max_tokens={4 * 8 * 32}")
    run(prepared, tmp_path / "part", *common, "training.max_tokens=null", resume=True)
    assert step_losses(tmp_path / "full") == step_losses(tmp_path / "part")


@pytest.mark.parametrize("variant,tol", [
    ("training.grad_accum_steps=4", 1e-5),  # 4 micro-batches of 2 == one batch of 8
    ("training.activation_checkpointing=true", 0.0),  # recomputing the blocks gives the same fp32 numbers
    pytest.param("training.compile=true", 1e-4, marks=pytest.mark.slow),
], ids=["grad-accumulation", "activation-checkpointing", "torch-compile"])
def test_training_variant_matches_baseline(prepared, tmp_path, variant, tol):
    run(prepared, tmp_path / "base", "training.max_steps=5")
    run(prepared, tmp_path / "variant", "training.max_steps=5", variant)
    base, other = step_losses(tmp_path / "base"), step_losses(tmp_path / "variant")
    assert list(base) == list(other) and all(abs(base[s] - other[s]) <= tol for s in base)


def test_refuses_to_overwrite_and_to_resume_nothing(prepared, tmp_path):
    run(prepared, tmp_path / "r", "training.max_steps=2")
    with pytest.raises(UserError, match="already holds a run"):
        run(prepared, tmp_path / "r", "training.max_steps=2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="nothing to resume"):
        run(prepared, tmp_path / "empty", resume=True)
    (tmp_path / "project").mkdir()  # `--out .` in a project: its own config.yaml was replaced by the run's
    (tmp_path / "project" / "config.yaml").write_text("mine\n")
    with pytest.raises(UserError, match="'.*project' holds config.yaml: give a new or empty directory"):
        run(prepared, tmp_path / "project", "training.max_steps=2")
    assert [p.name for p in (tmp_path / "project").iterdir()] == ["config.yaml"]
    assert (tmp_path / "project" / "config.yaml").read_text() == "mine\n"


def test_a_run_stopped_before_its_first_checkpoint_is_not_sent_round_in_circles(prepared, tmp_path):
    """It was told "already holds a run; pass --resume", and then with --resume "nothing to resume; drop
    --resume"; the pipeline stopped there was refused on every rerun."""
    from nanogpt4.pipeline import _pretrain_stage

    out = tmp_path / "r"
    run(prepared, out, "training.max_steps=2")
    shutil.rmtree(out / "checkpoints")
    (out / "summary.json").unlink()  # as a run killed at step 1 of a 1000-step checkpoint interval leaves it
    with pytest.raises(UserError, match="holds a run stopped before its first checkpoint, so nothing can resume it; "
                                        "delete it to start again"):
        run(prepared, out, "training.max_steps=2")
    with pytest.raises(UserError, match=r"nothing to resume: '.*' was stopped before its first checkpoint \(training"
                                        r".checkpoint_interval=6\); delete it and start again without --resume"):
        run(prepared, out, "training.max_steps=2", resume=True)
    from nanogpt4.train.checkpoint import resolve_checkpoint  # `sample`/`export-hf --run` (was: "neither a run ...")
    with pytest.raises(UserError, match="holds a run stopped before its first checkpoint: it has no weights to load"):
        resolve_checkpoint(out)
    logs: list[str] = []
    ov, _ = prepared
    summary = _pretrain_stage(load_config("tiny", [*ov, "training.max_steps=2"]), out, False, logs.append)
    assert summary["steps"] == 2 and "was stopped before its first checkpoint" in logs[0]


def test_a_resume_with_nothing_left_to_train_changes_nothing(prepared, tmp_path):
    """A finished run resumed at its budget (or past it) used to train no step and overwrite its summary with a
    null val_loss (the CLI then crashed printing it). A run stopped between its last checkpoint and its summary
    resumes to write that summary, from its log."""
    out = tmp_path / "r"
    summary = run(prepared, out, "training.max_steps=4", "training.eval_interval=2")
    files = {p: p.read_bytes() for p in (out / "summary.json", out / "metrics.jsonl", out / "config.yaml")}
    for extra, said in [(["training.max_steps=4"], "has finished at step 4"),
                        (["training.max_steps=3"], "past training.max_steps=3"),
                        (["training.max_steps=9", "training.max_tokens=64"], "has finished at step 4")]:
        with pytest.raises(UserError, match=said):
            run(prepared, out, "training.eval_interval=2", *extra, resume=True)
        assert {p: p.read_bytes() for p in files} == files
    # a run its time budget stopped: resumed under that budget it trained one more step and rewrote its summary
    timed = tmp_path / "timed"
    run(prepared, timed, "training.max_steps=50", "training.max_time_s=0.001")
    timed_files = {p: p.read_bytes() for p in timed.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"has finished at step \d+: its time budget is spent \(.* s trained, "
                                        r"training.max_time_s=0.001\); give a larger training.max_time_s"):
        run(prepared, timed, "training.max_steps=50", "training.max_time_s=0.001", resume=True)
    assert {p: p.read_bytes() for p in timed.rglob("*") if p.is_file()} == timed_files
    (out / "summary.json").unlink()
    rebuilt = run(prepared, out, "training.max_steps=4", "training.eval_interval=2", resume=True)
    for key in ("val_loss", "val_bpb", "final_train_loss", "steps", "tokens", "sample"):
        assert rebuilt[key] == summary[key], key
    assert (out / "metrics.jsonl").read_bytes() == files[out / "metrics.jsonl"]  # read back, no row added


def test_a_resume_reads_its_data_with_its_own_tokenizer_and_a_refused_one_changes_nothing(prepared, tmp_path):
    """Resumed on another source, a run used to train on a freshly trained BPE's token ids (its loss jumped from
    2.9 to 7.7) and overwrite its tokenizer.json. Now that is refused, and the fix it names, the run's own
    tokenizer.json as data.tokenizer, encodes the new source with it."""
    import nanogpt4.cli

    out = tmp_path / "r"
    run(prepared, out, "training.max_steps=4", "training.eval_interval=2", "training.checkpoint_interval=2")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    new_source = f"data.source=text:{nanogpt4.cli.__file__}"
    with pytest.raises(UserError, match=rf"tokenized with another tokenizer than '{out}' was trained with; .* add "
                                        rf"data.tokenizer={out}/tokenizer.json and a new data.dir \(nothing"):
        run(prepared, out, "training.max_steps=8", new_source, f"data.dir={tmp_path / 'bpe'}", resume=True)
    # an override that fails once the data is read used to leave config.yaml rewritten with it
    with pytest.raises(UserError, match="fewer than one batch"):
        run(prepared, out, "training.max_steps=8", "training.batch_size=100000", resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    ours = [new_source, f"data.dir={tmp_path / 'ours'}", f"data.tokenizer={out}/tokenizer.json"]
    said: list[str] = []
    assert run(prepared, out, "training.max_steps=8", *ours, resume=True, log=said.append)["steps"] == 8
    # the new text goes on silently no more: the run cannot match an uninterrupted one
    assert "warning: the training data is not what step 4 was trained on" in "\n".join(said)
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == before[out / "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == before[out / "tokenizer.json"]
    written = (out / "config.yaml").read_text()
    assert f"tokenizer: {out}/tokenizer.json" in written and "max_steps: 8" in written
    said.clear()
    assert run(prepared, out, "training.max_steps=10", *ours, resume=True, log=said.append)["steps"] == 10
    assert not any("warning" in m for m in said), said  # the data step 8 trained on
    for bad, said in [("nope.json", "data.tokenizer file 'nope.json' not found"),
                      (str(out / "summary.json"), "is not a tokenizer.json"), ("bpe2", "is not one of bpe, gpt2")]:
        with pytest.raises(UserError, match=said):
            run(prepared, tmp_path / "fresh", new_source, f"data.dir={tmp_path / 'other'}", f"data.tokenizer={bad}")
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "other").exists()


def test_a_validation_split_too_short_for_a_window_leaves_no_run_behind(prepared, tmp_path):
    """The refusal came after the run directory was made: it left a run holding only config.yaml."""
    ov, _ = prepared
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    (tmp_path / "short.txt").write_text("\n".join(" ".join(words[(i + j) % 10] for j in range(6)) for i in range(40)))
    ov = [o for o in ov if not o.startswith(("data.dir=", "data.source="))]
    ov += [f"data.source=text:{tmp_path / 'short.txt'}", f"data.dir={tmp_path / 'data'}", "training.max_steps=1"]
    with pytest.raises(UserError, match=r"val.bin' has \d+ tokens, fewer than one batch needs \(33\); use more "
                                        r"text, a larger data.val_fraction \(now 0.05\)"):
        pretrain(load_config("tiny", ov), tmp_path / "r", progress=False, log=quiet)
    assert not (tmp_path / "r").exists()
    ov = [f"data.dir={tmp_path / 'more'}" if o.startswith("data.dir=") else o for o in ov]
    assert pretrain(load_config("tiny", [*ov, "data.val_fraction=0.3"]), tmp_path / "r", progress=False,
                    log=quiet)["steps"] == 1


def test_a_data_dir_prepared_with_other_settings_is_never_overwritten(prepared, tmp_path):
    ov, data_dir = prepared
    mine = tmp_path / "mine"  # the user's own prepared data, from the corpus files
    shutil.copytree(data_dir, mine)
    before = {f.name: f.read_bytes() for f in mine.iterdir()}
    ov = [o for o in ov if not o.startswith("data.dir=")] + [f"data.dir={mine}"]
    # `pretrain data.dir=mine` under the preset's own source (stdlib) used to re-prepare mine from the stdlib
    stdlib = [o for o in ov if not o.startswith("data.source=")]
    with pytest.raises(UserError, match=rf"data.dir '{mine}' holds data prepared with data.source=text:.*\*.py, not "
                                        rf"data.source=stdlib: add 'data.source=text:.*\*.py' to train on it"):
        pretrain(load_config("tiny", stdlib), tmp_path / "r", progress=False, log=quiet)
    with pytest.raises(UserError, match=r"prepared with model.vocab_size=384, not model.vocab_size=512: add "
                                        r"model.vocab_size=384"):
        pretrain(load_config("tiny", [*ov, "model.vocab_size=512"]), tmp_path / "r", progress=False, log=quiet)
    assert {f.name: f.read_bytes() for f in mine.iterdir()} == before
    assert not (tmp_path / "r").exists()  # refused before the run directory was made
    pretrain(load_config("tiny", [*ov, "training.max_steps=1"]), tmp_path / "r", progress=False, log=quiet)
    assert {f.name: f.read_bytes() for f in mine.iterdir()} == before  # its own settings: used as it is


def test_a_token_budget_brings_the_cooldown_forward(prepared, tmp_path):
    """``training.max_tokens`` that stops a run before ``max_steps`` ends its cooldown there: 2,555 tokens (10 steps
    of 8 x 32) with a 3-step cooldown trains exactly as the first 10 steps of the 100-step cosine annealed over
    their last 3, not cut near its peak rate. (Without a cooldown a token budget only stops the run, which then
    resumes exactly: test_resume_reproduces_losses_bitwise.)"""
    steps = run(prepared, tmp_path / "steps", "training.max_steps=10", "training.lr_decay_steps=100",
                "training.cooldown_steps=3")
    tokens = run(prepared, tmp_path / "tokens", "training.max_steps=100", "training.max_tokens=2555",
                 "training.cooldown_steps=3")
    assert steps["steps"] == tokens["steps"] == 10 and tokens["tokens"] == 2560
    for key in ("lr", "step_loss"):
        assert step_losses(tmp_path / "tokens", key) == step_losses(tmp_path / "steps", key)
    assert step_losses(tmp_path / "tokens", "lr")[10] == pytest.approx(3e-3 * 0.1)  # the floor on the last step


def test_wrong_checkpoint_shape_is_named(prepared, tmp_path):
    run(prepared, tmp_path / "r", "training.max_steps=2")
    from nanogpt4.model.transformer import Transformer

    other = Transformer(load_config("tiny", prepared[0] + ["model.dim=64"]))
    with pytest.raises(UserError, match=r"tensor '.*' has shape .* but the config builds"):
        load_weights(other, tmp_path / "r" / "checkpoints" / "step_2" / "model.safetensors")
    rope = Transformer(load_config("tiny", prepared[0] + ["model.pos_embedding=rope"]))
    with pytest.raises(UserError, match="does not match the model"):
        load_weights(rope, tmp_path / "r" / "checkpoints" / "step_2" / "model.safetensors")


def test_a_damaged_checkpoint_names_the_one_before_it(prepared, tmp_path):
    out = tmp_path / "r"
    run(prepared, out, "training.max_steps=12")  # checkpoints at steps 6 and 12
    last, before = out / "checkpoints" / "step_12", out / "checkpoints" / "step_6"
    state = (last / "trainer_state.pt").read_bytes()
    for damage in (state[:5000], b"garbage"):  # a copy cut short; not a checkpoint of ours at all
        (last / "trainer_state.pt").write_bytes(damage)
        with pytest.raises(UserError, match=rf"cannot read the trainer state '{last}/trainer_state.pt': .*; if it "
                                            rf"is damaged, move {last} away to use the checkpoint before it "
                                            rf"\({before}\)") as e:
            run(prepared, out, "training.max_steps=14", resume=True)
        assert "weights_only=False" not in str(e.value)  # torch's advice to load it unsafely is not passed on
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=rf"cannot read weights '{weights}': .*move {last} away"):
        load_model(out)
    last.rename(tmp_path / "damaged")
    assert run(prepared, out, "training.max_steps=8", resume=True)["steps"] == 8


def test_budget_stops(prepared, tmp_path):
    s = run(prepared, tmp_path / "tok", "training.max_tokens=1024", "training.max_steps=100")
    assert s["steps"] == 4  # 1024 tokens / (8 x 32) per step
    s = run(prepared, tmp_path / "time", "training.max_time_s=0.0001", "training.max_steps=100")
    assert s["steps"] == 1


def _wait_for(pred, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(prepared, tmp_path):
    ov, _ = prepared
    # a long schedule, so the run is still going when it is killed; both runs stop at step 60 by tokens
    common = ov + ["training.max_steps=5000", "training.checkpoint_interval=5", "training.eval_interval=25",
                   "training.keep_last=3"]
    stop_at = f"training.max_tokens={60 * 8 * 32}"
    # three processes of one thread each: two threads can sum in another order from one process to the next
    # (an AMX Xeon once logged a few steps' losses 1e-7-3e-6 apart, steps 12-19 equal)
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nanogpt4", "pretrain", "--out", str(tmp_path / "killed"), *common]
    subprocess.run([*cmd[:5], str(tmp_path / "full"), *common, stop_at], check=True, env=one_thread,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread)
    try:
        saw_two = _wait_for(lambda: len(list_checkpoints(tmp_path / "killed")) >= 2, 120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert saw_two, "the run never wrote two checkpoints"
    last = list_checkpoints(tmp_path / "killed")[-1][0]
    assert 10 <= last < 60, f"killed at an unexpected point (checkpoint {last})"
    subprocess.run([sys.executable, "-m", "nanogpt4", "pretrain", "--out", str(tmp_path / "killed"), "--resume",
                    stop_at], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread)
    full, resumed = step_losses(tmp_path / "full"), step_losses(tmp_path / "killed")
    assert list(resumed) == list(range(1, 61))
    assert resumed == full  # bit for bit


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted at step "),
                                             (signal.SIGTERM, 143, "stopped: SIGTERM at step ")],
                         ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_names_the_kept_checkpoint_and_the_resume_command(prepared, tmp_path, sig, code, said):
    ov, _ = prepared
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "nanogpt4", "pretrain", "--out", str(out), *ov, "training.max_steps=5000",
           "training.checkpoint_interval=5", "training.eval_interval=1000"]
    # a shell without job control starts background jobs with SIGINT ignored, and Python then never turns Ctrl-C into
    # KeyboardInterrupt: give the run the terminal's default, whatever launched pytest
    log = tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert _wait_for(lambda: list_checkpoints(out), 120), "the run never wrote a checkpoint"
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    # a rare miss (2 seen, both Ctrl-C on a loaded 2-core VM; 0 of 25 in a loop on an idle one): the run ignored
    # the signal and finished its 5,000 steps with nothing on stderr; its last log lines say when it ended
    assert proc.returncode == code, err[-2000:] + "".join(log.read_text().splitlines(True)[-3:])
    last = err.strip().splitlines()[-1]
    assert last.startswith(said) and f"nanogpt4 pretrain --out {out} --resume" in last
    step, kept = list_checkpoints(out)[-1]
    assert str(kept) in last
    # a scheduler's preemption or a first Ctrl-C: the step in flight finishes and is checkpointed
    assert last.startswith(f"{said}{step} of 5000;")
    assert not (out / "summary.json").exists()  # cut short, not finished: the pipeline and sweeps rerun it
    resumed = subprocess.run([*cmd[:6], "--resume", f"training.max_steps={step + 3}"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 3



def test_the_best_checkpoint_is_one_evaluated_at_its_own_step(prepared, tmp_path):
    """Checkpoints at steps 3 and 5, evaluations at 2, 4 and 5: step 3's weights were never evaluated, so step 2's
    loss must not make them the best."""
    run(prepared, tmp_path / "r", "training.max_steps=5", "training.eval_interval=2", "training.checkpoint_interval=3",
        "training.keep_last=5")
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [3, 5]
    assert load_trainer_state(tmp_path / "r" / "checkpoints" / "step_3")["best_val"] == math.inf
    assert (tmp_path / "r" / "checkpoints" / "best" / "STEP").read_text() == "5"


def test_ctrl_c_checkpoints_the_step_in_flight_and_a_second_stops_at_once(prepared, tmp_path, monkeypatch,
                                                                          ctrl_c_raises):
    from nanogpt4.train import pretrain as pretrain_mod

    real_get, ctrl_c = pretrain_mod.LMBatches.get, {}

    def get(self, step, *args):  # Ctrl-C pressed while a step's batch is read (once, or twice as a user would)
        for _ in range(ctrl_c.pop(step, 0)):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs before the next press
        return real_get(self, step, *args)

    monkeypatch.setattr(pretrain_mod.LMBatches, "get", get)
    term = signal.getsignal(signal.SIGTERM)
    ctrl_c[3] = 1  # during step 4
    with pytest.raises(KeyboardInterrupt, match="^ at step 4 of 12$"):
        run(prepared, tmp_path / "once", "training.max_steps=12", "training.checkpoint_interval=100")
    assert [s for s, _ in list_checkpoints(tmp_path / "once")] == [4]
    assert not (tmp_path / "once" / "summary.json").exists()
    # no evaluation at the stop (step 4 is no eval step): the checkpoint comes at once, the log is the run's
    assert [r["step"] for r in read_jsonl(tmp_path / "once" / "metrics.jsonl") if "val_loss" in r] == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.getsignal(signal.SIGTERM) == term
    ctrl_c[11] = 1  # during the last step: the run is done, but the program still stops (no next stage)
    with pytest.raises(KeyboardInterrupt, match="^ at step 12 of 12$"):
        run(prepared, tmp_path / "once", "training.max_steps=12", resume=True)
    assert not (tmp_path / "once" / "summary.json").exists()
    assert run(prepared, tmp_path / "once", "training.max_steps=12", resume=True)["steps"] == 12  # from its log

    ctrl_c[3] = 2
    with pytest.raises(KeyboardInterrupt) as stopped:  # at once: step 4 never ends, nor is it checkpointed
        run(prepared, tmp_path / "twice", "training.max_steps=12", "training.checkpoint_interval=100")
    assert stopped.value.args == () and list_checkpoints(tmp_path / "twice") == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.getsignal(signal.SIGTERM) == term


def _disk_reports_free(monkeypatch, free: int) -> None:
    import collections

    usage = collections.namedtuple("usage", "total used free")(1 << 40, (1 << 40) - free, free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def test_a_full_disk_keeps_the_last_checkpoint_and_names_the_resume_command(prepared, tmp_path, capsys,
                                                                            monkeypatch):
    from nanogpt4.cli import main

    ov, _ = prepared
    out = tmp_path / "full"
    real_save, saves = torch.save, []

    # the second checkpoint's trainer state fails as torch.save reports a full disk (a short write, no errno),
    # with the disk then reporting nothing free (measured on a 45 MiB tmpfs)
    def save_filling_the_disk(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:
            _disk_reports_free(monkeypatch, 0)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4737280 vs 4737172")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_filling_the_disk)
    argv = ["pretrain", "--out", str(out), *ov, "training.checkpoint_interval=5", "training.eval_interval=100"]
    assert main([*argv, "training.max_steps=12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    kept = out / "checkpoints" / "step_5"
    assert len(err) == 1 and err[0].startswith(f"error: the disk filled up while writing {kept.parent / 'step_10'} "
                                               f"(the partial copy is removed); free space (or lower training.keep")
    assert f"{kept} is kept, continue with: nanogpt4 pretrain --out {out} --resume" in err[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_5"]  # no partial step_10
    monkeypatch.undo()
    assert main(["pretrain", "--out", str(out), "--resume", "training.max_steps=12"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_a_checkpoint_that_cannot_fit_is_refused_before_it_is_written(prepared, tmp_path, monkeypatch):
    from nanogpt4.errors import DiskFull
    from nanogpt4.model.transformer import Transformer
    from nanogpt4.train.checkpoint import save_checkpoint

    cfg = load_config("tiny", prepared[0])
    model = Transformer(cfg)
    state = {"optimizer": {"m": torch.zeros(1 << 20)}}  # 4 MiB of optimizer moments
    _disk_reports_free(monkeypatch, 3 << 20)
    with pytest.raises(DiskFull, match=r"not enough disk space for checkpoint step_3 in .*checkpoints: it needs "
                                       r"[\d.]+ MiB, 3\.0 MiB free; free space \(or lower training\.keep_last\)") as e:
        save_checkpoint(tmp_path, 3, model, cfg, None, state, keep_last=2)
    assert float(str(e.value).split("it needs ")[1].split()[0]) > 4.0  # the weights and the optimizer's state
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_resume_point_refuses_what_more_steps_cannot_continue(prepared, tmp_path):
    from nanogpt4.errors import UserError
    from nanogpt4.model.transformer import Transformer
    from nanogpt4.train.checkpoint import resume_point, save_checkpoint

    # the one place every stage's --resume (the trainer's, PPO's) decides where it picks up
    cfg = load_config("tiny", prepared[0])
    model = Transformer(cfg)
    assert resume_point(tmp_path, 10) is None  # no checkpoint: the stage starts again
    save_checkpoint(tmp_path, 4, model, cfg, None, {"optimizer": {}, "step": 4}, keep_last=2)
    step, ckpt, state = resume_point(tmp_path, 10)
    assert (step, ckpt.name, state["step"]) == (4, "step_4", 4)
    with pytest.raises(UserError, match=r"is at PPO step 4, past the 3 steps now asked for \(rlhf\.ppo_steps\); "
                                        r"give at least 4 to train on"):
        resume_point(tmp_path, 3, "PPO step", " (rlhf.ppo_steps)")
    save_checkpoint(tmp_path, 6, model, cfg, None, {"step": 6}, keep_last=2)  # a trained model: no optimizer
    assert resume_point(tmp_path, 6)[0] == 6  # where it was trained to: nothing is left to train
    with pytest.raises(UserError, match=r"step_6 holds the trained model without the optimizer state that more "
                                        r"steps would need; train on from it in a new run"):
        resume_point(tmp_path, 8)


def test_an_atomic_write_cut_short_by_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from nanogpt4.errors import DiskFull
    from nanogpt4.utils import atomic_path

    target = tmp_path / "train.bin"
    cut_short = r"the disk filled up while writing .*train.bin \(the partial file is removed"
    with pytest.raises(DiskFull, match=cut_short), atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 100)
        _disk_reports_free(monkeypatch, 0)
        raise OSError("407104 requested and 66297 written")  # numpy's tofile on a full disk: no errno
    assert list(tmp_path.iterdir()) == []
    # an error with an errno is judged by it, not by the free space: this one is not about space
    with pytest.raises(PermissionError), atomic_path(target):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.undo()
    with pytest.raises(DiskFull), atomic_path(target):  # ENOSPC says so whatever the free space reads
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_run_stops_with_a_one_line_error_and_writes_no_checkpoint(prepared, tmp_path):
    from nanogpt4.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="training loss became nan at step .*lower training.learning_rate"):
        run(prepared, tmp_path / "nan", "training.learning_rate=1e5", "training.grad_clip=0",
            "training.max_steps=30", "training.checkpoint_interval=100")
    assert not list_checkpoints(tmp_path / "nan")
    assert issubclass(TrainingDiverged, UserError)  # the CLI prints it as one line and exits 2


def test_tensorboard_without_the_package_is_a_clear_error(prepared, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        run(prepared, tmp_path / "tb", "training.max_steps=2", "training.tensorboard=true")


def test_tensorboard_gets_the_logged_scalars(prepared, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(prepared, tmp_path / "tb", "training.max_steps=4", "training.tensorboard=true")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard")).Reload()
    logged = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in train]
    assert "val_loss" in events.Tags()["scalars"]
    # stopped after step 4 with its last checkpoint at 2 (as a kill leaves it), then resumed: TensorBoard shows
    # each step once, the resumed run's (the steps after the checkpoint used to show twice, from both runs)
    out = tmp_path / "tb2"
    run(prepared, out, "training.max_steps=4", "training.tensorboard=true", "training.checkpoint_interval=2",
        "training.learning_rate=1e-2")
    shutil.rmtree(out / "checkpoints" / "step_4")
    (out / "summary.json").unlink()
    run(prepared, out, "training.max_steps=4", "training.tensorboard=true", "training.checkpoint_interval=2",
        resume=True)  # the default learning rate from step 3 on: other losses than the first run's
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in train]


def test_allocator_tuning_is_applied_on_glibc_and_can_be_turned_off():
    import os
    import platform

    code = "from nanogpt4.utils import keep_freed_memory_for_reuse as k; print(k())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NANOGPT4_DEFAULT_MALLOC": "1"}).stdout.strip()
    assert off == "False"
    assert on == ("True" if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" else "False")
