"""Fitting the pipeline to a budget: scaled step counts, the minutes -> scale plan, and stage reuse rules."""

import json

import pytest
import torch
from omegaconf import OmegaConf

import nanogpt4.plan as plan_mod
from nanogpt4.config import load_config
from nanogpt4.errors import UserError
from nanogpt4.pipeline import _check_same_settings, shortened_note
from nanogpt4.plan import (
    DEFAULT_MINUTES,
    MIN_SCALE,
    Plan,
    _work,
    estimate_s,
    pipeline_plan,
    plan_for_minutes,
    probe,
    save_plan,
    scaled,
    shortened_pretraining,
)

from .conftest import step_losses


def test_scale_multiplies_training_work_and_keeps_evaluations():
    cfg = load_config("tiny", ["multimodal.align_steps=0"])
    s = scaled(cfg, 0.09)
    assert (s.rlhf.sft_steps, s.rlhf.reward_steps, s.rlhf.ppo_steps, s.rlhf.dpo_steps) == (18, 27, 3, 14)
    assert s.rlhf.label_prompts == 288 and s.multimodal.tune_steps == 315
    assert s.multimodal.align_steps == 0  # a stage switched off stays off
    assert s.rlhf.eval_prompts == cfg.rlhf.eval_prompts and s.multimodal.eval_scenes == cfg.multimodal.eval_scenes
    assert s.training == cfg.training  # pretraining is shortened its own way; SFT and the reward model read its batch
    assert cfg.rlhf.sft_steps == 200  # the input is not modified
    tiny = scaled(cfg, 0.001)
    assert tiny.rlhf.ppo_steps == 1 and tiny.rlhf.label_prompts == 64
    assert scaled(cfg, 1.0) == cfg


def test_a_short_pretraining_takes_the_cube_root_of_the_tokens_at_half_the_batch():
    cfg = load_config("tiny")
    t = shortened_pretraining(cfg, 0.027).training
    # cbrt(0.027) = 0.3 of the recipe's tokens: under half, so twice the steps of half the batch
    assert (t.batch_size, t.max_steps) == (16, 600) and t.max_steps * t.batch_size == 0.3 * 1000 * 32
    # the full run's learning-rate curve in steps of the new size, annealed over the last 30% of steps
    assert (t.warmup_steps, t.lr_decay_steps, t.cooldown_steps) == (100, 2000, 180)
    # as many evaluations as the full run (every 60 of 600 steps), on the same held-out windows
    assert (t.eval_interval, t.eval_batch_size, t.eval_iters) == (60, 32, cfg.training.eval_iters)
    assert cfg.training.max_steps == 1000  # the input is not modified
    longer = shortened_pretraining(cfg, 0.216).training  # 0.6 of the tokens: the batch stays
    assert (longer.batch_size, longer.max_steps, longer.cooldown_steps, longer.lr_decay_steps) == (32, 600, 180, 1000)
    odd = shortened_pretraining(load_config("tiny", ["training.batch_size=5"]), 0.027).training
    assert (odd.batch_size, odd.max_steps) == (5, 300)  # an odd batch cannot halve
    assert shortened_pretraining(cfg, 1e-6).training.max_steps == 20  # 0.01 of the tokens
    assert shortened_pretraining(cfg, 1.0) == cfg


def test_a_shortened_pretraining_follows_the_full_run_until_its_cooldown(prepared, tmp_path):
    from nanogpt4.train.pretrain import pretrain

    full_cfg = load_config("tiny", prepared[0] + ["training.max_steps=20", "training.warmup_steps=3"])
    short_cfg = shortened_pretraining(full_cfg, 0.216)  # 12 steps, the last 4 annealed
    assert (short_cfg.training.max_steps, short_cfg.training.cooldown_steps) == (12, 4)
    for cfg, name in ((full_cfg, "full"), (short_cfg, "short")):
        pretrain(cfg, tmp_path / name, progress=False, log=lambda _m: None)
    full, short = step_losses(tmp_path / "full"), step_losses(tmp_path / "short")
    assert short == {s: full[s] for s in range(1, 10)} | {s: short[s] for s in range(10, 13)}  # exact until then
    assert all(short[s] != full[s] for s in range(10, 13))


def test_estimate_follows_the_configured_step_counts():
    tiny = load_config("tiny")
    assert [_work(tiny, stage) for stage in ("setup", "pretrain", "rlhf", "multimodal")] == [0.0, 1.0, 1.0, 1.0]
    double = load_config("tiny", ["training.max_steps=2000", "multimodal.tune_steps=7100"])
    assert _work(double, "pretrain") == 2.0 and _work(double, "multimodal") == 2.0
    assert estimate_s(double, 1.0, 0.1, 0.2) > estimate_s(tiny, 1.0, 0.1, 0.2)
    # a scaled config costs what the scaled estimate says (up to rounding of the step counts); a pretraining at
    # half the batch counts its tokens
    short = shortened_pretraining(scaled(tiny, 0.09), 0.09)
    assert estimate_s(short, 1.0, 0.1, 0.2) == pytest.approx(estimate_s(tiny, 0.09, 0.1, 0.2), rel=0.01)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_bad_scale_is_refused(bad):
    with pytest.raises(UserError, match="--scale must be in"):
        scaled(load_config("tiny"), bad)


def test_minutes_pick_the_largest_scale_that_fits(monkeypatch):
    monkeypatch.setattr(plan_mod, "probe", lambda cfg: (0.1, 0.2))
    cfg = load_config("tiny")
    full = estimate_s(cfg, 1.0, 0.1, 0.2)
    plan = plan_for_minutes(cfg, full / 60 / 3, log=lambda _m: None)
    assert 0 < plan.scale < 1 and plan.estimate_s <= full / 3 + 1e-6
    assert estimate_s(cfg, plan.scale + 0.001, 0.1, 0.2) > full / 3  # not a smaller scale than the budget allows
    assert plan_for_minutes(cfg, full / 60 * 2, log=lambda _m: None).scale == 1.0  # never above the recipe
    with pytest.raises(UserError, match="give at least --minutes"):
        plan_for_minutes(cfg, estimate_s(cfg, MIN_SCALE / 2, 0.1, 0.2) / 60, log=lambda _m: None)
    with pytest.raises(UserError, match="--minutes must be a positive"):
        plan_for_minutes(cfg, -1, log=lambda _m: None)


def test_a_minutes_plan_is_reused_by_the_same_command(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(plan_mod, "probe", lambda cfg: calls.append(1) or (0.2, 0.4))
    cfg = load_config("tiny")
    default = pipeline_plan(cfg, tmp_path, None, None, log=lambda _m: None)
    assert default.minutes == DEFAULT_MINUTES == 13.5 and 0 < default.scale < 1  # no flag: the default budget
    from nanogpt4.cli import main

    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    assert f"(default: {DEFAULT_MINUTES:g}, so that" in " ".join(capsys.readouterr().out.split())  # the CLI says so
    first = pipeline_plan(cfg, tmp_path, None, 30.0, log=lambda _m: None)
    save_plan(first, tmp_path)
    again = pipeline_plan(cfg, tmp_path, None, 30.0, log=lambda _m: None)
    assert again == first and len(calls) == 2  # a rerun keeps the scale its finished stages used
    pipeline_plan(cfg, tmp_path, None, 45.0, log=lambda _m: None)
    assert len(calls) == 3
    assert json.loads((tmp_path / "plan.json").read_text())["minutes"] == 30.0
    with pytest.raises(UserError, match="not both"):
        pipeline_plan(cfg, tmp_path, 0.5, 30.0)


def test_probe_times_both_models_without_moving_the_random_streams():
    cfg = load_config("tiny", ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=40",
                               "training.batch_size=2", "multimodal.batch_size=2", "multimodal.image_size=16",
                               "multimodal.patch_size=8", "multimodal.encoder_dim=16", "multimodal.encoder_heads=2",
                               "training.dtype=float32", "device=cpu"])
    torch.manual_seed(5)
    before = torch.get_rng_state()
    lm, vlm = probe(cfg)
    assert lm > 0 and vlm > 0
    assert probe(cfg, lm=False)[0] is None  # retiming the last stage's model alone
    assert torch.equal(torch.get_rng_state(), before)
    plan, said = Plan(0.1, 15.0, lm, vlm / 10), []
    plan_mod.retime(cfg, plan, log=said.append)
    assert plan.vlm_step_now_s > 0 and "slower now than when the run began" in said[0]
    assert torch.equal(torch.get_rng_state(), before)


def test_retime_reads_twice_before_it_believes_a_slowdown(monkeypatch):
    readings, said = [], []

    def fake_probe(cfg, lm=True):
        readings.append(lm)
        return None, times.pop(0)

    monkeypatch.setattr(plan_mod, "probe", fake_probe)
    times = [0.52]  # as fast as the probe at the start: one reading
    plan = Plan(0.3, 15.0, 0.3, 0.5)
    plan_mod.retime(None, plan, log=said.append)
    assert (plan.vlm_step_now_s, readings, said) == (0.52, [False], [])
    times = [0.70, 0.51]  # a passing stall: the second reading is kept
    plan_mod.retime(None, plan, log=said.append)
    assert plan.vlm_step_now_s == 0.51 and readings == [False] * 3 and said == []
    times = [0.70, 0.66]  # slower in both: the faster of the two, and the log says so
    plan_mod.retime(None, plan, log=said.append)
    assert plan.vlm_step_now_s == 0.66 and "takes 0.66 s, was 0.50 s" in said[0]


def test_a_stage_is_reused_only_with_its_own_settings(tmp_path):
    cfg = load_config("tiny")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    _check_same_settings(tmp_path, cfg, ("model", "training", "seed"))
    _check_same_settings(tmp_path, load_config("tiny", ["rlhf.ppo_steps=3"]), ("model", "training", "seed"))
    changed = (r"training.batch_size 32 -> 16; training.checkpoint_interval 250 -> 124; "
               r"training.cooldown_steps 0 -> 150 and 5 more")
    with pytest.raises(UserError, match=changed):
        _check_same_settings(tmp_path, shortened_pretraining(cfg, 0.015625), ("model", "training", "seed"))
    with pytest.raises(UserError, match="give the --scale/--minutes it ran with"):
        _check_same_settings(tmp_path, shortened_pretraining(cfg, 0.5), ("model", "training", "seed"))
    with pytest.raises(UserError, match="seed 1337 -> 7"):
        _check_same_settings(tmp_path, load_config("tiny", ["seed=7"]), ("model", "training", "seed"))


def test_a_shortened_report_says_so():
    tiny = load_config("tiny")
    assert shortened_note(Plan(0.027), shortened_pretraining(tiny, 0.027)).startswith(
        "Scale 0.027 (as asked): pretraining trained on 0.3 of the full recipe's tokens (600 steps of batch 16 on "
        "the full run's learning-rate curve, the last 180 falling linearly to its floor), RLHF and the multimodal "
        "stage for 0.027 of theirs.")
    assert "(the largest that fits the 15-minute budget here)" in shortened_note(Plan(0.137, 15.0), tiny)
    refitted = Plan(1.0, 15.0, multimodal_scale=0.5)  # only the last stage was cut to the time left
    assert refitted.shortened and refitted.vlm_scale == 0.5
    assert "the multimodal stage for 0.5 (fitted to the time left" in shortened_note(refitted, tiny)
    assert not Plan(1.0, 15.0, multimodal_scale=1.0).shortened and not Plan(1.0).shortened


def test_the_multimodal_stage_is_fitted_to_the_time_left():
    cfg = load_config("tiny")
    plan = Plan(0.1, 15.0, 0.1, 0.2)
    quiet = {"log": lambda _m: None}
    _, fixed, variable = plan_mod.COSTS["multimodal"]

    def cost(scale):  # the stage's estimate
        return (fixed + scale * variable) * 0.2

    s = plan_mod.multimodal_scale(cfg, plan, 300.0, **quiet)
    assert 300 + cost(s) <= 900 * plan_mod.LAST_STAGE_SHARE < 300 + cost(s + 0.001)
    # the hard stop behind the refit keeps half again the evaluation's estimate (until the stage times its own)
    assert plan_mod.evaluation_reserve_s(plan) == pytest.approx(1.5 * fixed * 0.2)
    # the earlier stages ran slower than planned: the last stage trains less
    late = plan_mod.multimodal_scale(cfg, plan, 400.0, **quiet)
    assert late < s and 400 + cost(late) <= 900 * plan_mod.LAST_STAGE_SHARE
    assert plan_mod.multimodal_scale(cfg, plan, 100.0, **quiet) == 1.0  # never above the recipe
    said = []
    assert plan_mod.multimodal_scale(cfg, plan, 950.0, log=said.append) == MIN_SCALE
    assert "the run will overrun it" in said[0]
    # timed again before the stage: slower now, so it trains less and stops earlier; faster, and the plan holds
    slower = Plan(0.1, 15.0, 0.1, 0.2, vlm_step_now_s=0.25)
    assert plan_mod.multimodal_scale(cfg, slower, 300.0, **quiet) < s
    assert plan_mod.evaluation_reserve_s(slower) == pytest.approx(1.5 * fixed * 0.25)
    faster = Plan(0.1, 15.0, 0.1, 0.2, vlm_step_now_s=0.15)
    assert plan_mod.multimodal_scale(cfg, faster, 300.0, **quiet) == s
    assert plan_mod.evaluation_reserve_s(faster) == plan_mod.evaluation_reserve_s(plan)


def test_the_report_samples_prose_as_prose():
    # a pipeline on prose (data.source=text:book.txt, rlhf.judge=sentiment) was sampled from "def" and "class" and
    # scored by CPython's parser: "the first 1 of 85 lines parse"
    from pathlib import Path

    from nanogpt4.pipeline import _next_steps, is_python_source, samples_section

    assert all(is_python_source(s) for s in ("stdlib", "stdlib:all", "text:src/**/*.py"))
    assert not any(is_python_source(s) for s in ("shakespeare", "text:book.txt", "jsonl:x.jsonl", "hf:a/b"))
    md, scores = samples_section([("", "ROMEO:\nO, she doth teach")], python=False)
    assert scores == {} and "parser accepts" not in md and "```text\nROMEO:\nO, she doth teach\n```" in md
    md, scores = samples_section([("def", "def f(x):\n    return x\nclass (")], python=True)
    assert scores == {"sample_python_lines": 2 / 3, "sample_python_lines_so_far": 2 / 3}
    assert md.startswith("CPython's parser accepts the first 2 of 3 lines")
    assert "--prompt" not in _next_steps(Path("p"), python=False) and '"def parse("' in _next_steps(Path("p"))
