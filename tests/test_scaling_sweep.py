import json

import pytest

from nanogpt4.config import load_config
from nanogpt4.errors import UserError
from nanogpt4.scaling.sweep import frontier, plan_runs, predict_and_check, sweep


def base_cfg(prepared):
    ov, _ = prepared
    return load_config("tiny", ov + ["training.warmup_steps=2"])


def quiet(_m):
    pass


@pytest.mark.slow
def test_sweep_resumes_where_it_stopped_and_prediction_is_registered_first(prepared, tmp_path):
    base = base_cfg(prepared)
    out = tmp_path / "sweep"
    rows = sweep(base, out, [16, 32], [5e8, 1e9, 2e9, 4e9], eval_iters=2, log=quiet)
    assert len(rows) >= 3
    first = {r["name"]: r for r in rows}
    # "interrupt": drop the last result and leave a half-written run directory behind
    path = out / "sweep.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    last = json.loads(lines[-1])["name"]
    (out / "runs" / last / "summary.json").unlink()
    logs = []
    rows = sweep(base, out, [16, 32], [5e8, 1e9, 2e9, 4e9], eval_iters=2, log=logs.append)
    assert sorted(r["name"] for r in rows) == sorted(first)  # nothing ran twice, the missing run ran again
    assert sum(1 for m in logs if m.startswith(("d16", "d32"))) == 1
    assert json.loads(path.read_text().splitlines()[-1])["val_loss"] == pytest.approx(first[last]["val_loss"])
    compute, loss, chosen = frontier(rows)
    assert list(compute) == sorted(compute) and len(chosen) == 4

    # three budgets fix a*C^b + c exactly: no interval to check a prediction against (it was a zero-width one)
    three = tmp_path / "three" / "sweep.jsonl"
    three.parent.mkdir()
    three.write_text("".join(json.dumps(r) + "\n" for r in rows if r["budget"] != 4e9))
    with pytest.raises(UserError, match=r"cannot register a prediction: no 95% interval: runs at 3 compute values"):
        predict_and_check(base, three, 1.2e10, 32, tmp_path / "p3", bootstrap=20, log=quiet)
    with pytest.raises(UserError, match="--bootstrap must be 20 or more"):
        predict_and_check(base, path, 1.2e10, 32, tmp_path / "p3", bootstrap=5, log=quiet)
    assert not (tmp_path / "p3").exists()
    result = predict_and_check(base, path, 1.2e10, 32, tmp_path / "predict", bootstrap=20, log=quiet)
    registered = json.loads((tmp_path / "predict" / "prediction.json").read_text())
    assert registered["predicted_loss"] == result["predicted_loss"]
    for key in ("predicted_loss", "ci95", "actual_loss", "rel_error", "covered", "compute_ratio", "fit"):
        assert key in result
    assert result["warnings"] == registered["warnings"] and "hindcast" in registered  # said before the run
    assert result["compute_ratio"] > 2
    # the capability metric rides along: every run has it, and the target's is predicted before it runs
    assert all(-60 < r["mean_log_pass_rate"] < 0 and 0 <= r["greedy_exact_match"] <= 1 for r in rows)
    cap = result["capability"]
    assert cap["predicted_neg_log_pass_rate"] == registered["capability"]["predicted_neg_log_pass_rate"]
    assert cap["actual_neg_log_pass_rate"] > 0 and isinstance(cap["covered"], bool)


def test_a_sweep_continues_and_predicts_only_under_its_own_settings(prepared, tmp_path):
    """`scaling predict` without the sweep's `training.batch_size=4` trained its target on 8x the batch of the
    runs the law was fitted to; a sweep continued with another source or dtype mixed two settings in one fit."""
    from omegaconf import OmegaConf

    from nanogpt4.scaling.sweep import SWEEP_CONFIG

    base = base_cfg(prepared)
    out = tmp_path / "sweep"
    rows = sweep(base, out, [16], [5e8], eval_iters=2, log=quiet)
    assert OmegaConf.load(out / SWEEP_CONFIG) == base
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = OmegaConf.merge(base, {"training": {"batch_size": 4, "dtype": "bfloat16"}})
    with pytest.raises(UserError, match=r"was run with other settings \(training.batch_size 8 -> 4; training.dtype "
                                        r"'float32' -> 'bfloat16'\); give this sweep its own --out, or continue it "
                                        r"with its own settings: add training.batch_size=8 training.dtype=float32"):
        sweep(other, out, [16, 24], [5e8], eval_iters=2, log=quiet)
    with pytest.raises(UserError, match=r"the target must be trained as its runs were: add training.batch_size=8"):
        predict_and_check(other, out / "sweep.jsonl", 2e9, 16, tmp_path / "predict", bootstrap=20, log=quiet)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files and not (tmp_path / "predict").exists()
    # a prediction registered for one target is never checked against another
    (tmp_path / "predict").mkdir()
    (tmp_path / "predict" / "prediction.json").write_text(json.dumps({"target_flops": 2e9, "target_dim": 16}))
    with pytest.raises(UserError, match=r"holds a prediction registered for another target \(--target-flops 3e\+09, "
                                        r"registered 2e\+09\); give this target its own --out"):
        predict_and_check(base, out / "sweep.jsonl", 3e9, 16, tmp_path / "predict", bootstrap=20, log=quiet)
    # what the sweep sets for each run itself, and a compiled run, are not other settings
    same = OmegaConf.merge(base, {"training": {"max_steps": 7, "eval_iters": 3, "compile": True}})
    assert sweep(same, out, [16], [5e8], eval_iters=2, log=quiet) == rows


def test_plan_refuses_budgets_too_small_for_a_step(prepared):
    with pytest.raises(UserError, match="no run of the sweep fits") as e:
        plan_runs(base_cfg(prepared), [16, 32], [1e3], train_tokens=10**9)
    # the budgets that would fit, per width: from 20 steps to one epoch, and each end of the range runs
    fits = dict(part.split() for part in str(e.value).split("budgets that fit, in FLOPs: ")[1].split(", "))
    assert list(fits) == ["d16", "d32"]
    for dim, span in fits.items():
        lo, hi = (float(x) for x in span.split("-"))  # printed rounded inwards: both ends as printed run
        runs, _ = plan_runs(base_cfg(prepared), [int(dim[1:])], [lo, hi], train_tokens=10**9)
        assert len(runs) == 2 and runs[0].steps >= 20
    with pytest.raises(UserError, match="the data holds 0 steps"):
        plan_runs(base_cfg(prepared), [16], [1e12], train_tokens=10)
    with pytest.raises(UserError, match="multiples of 8"):
        plan_runs(base_cfg(prepared), [20], [1e9], train_tokens=10**9)
    with pytest.raises(UserError, match="tokens-per-param"):
        plan_runs(base_cfg(prepared), [16], [], train_tokens=10**9, tokens_per_param=-1.0)


def test_family_trains_every_width_on_the_same_tokens_per_parameter(prepared):
    from nanogpt4.scaling.accounting import meta_model
    from nanogpt4.scaling.sweep import family_budget, size_config

    base = base_cfg(prepared)
    runs, skipped = plan_runs(base, [8, 24, 40, 56], [], train_tokens=10**9, tokens_per_param=20)
    assert not skipped and [r.dim for r in runs] == [8, 24, 40, 56]
    tokens_per_step = base.training.batch_size * base.model.max_seq_len
    for r in runs:
        cfg = size_config(base, r.dim)
        assert cfg.model.dim % cfg.model.n_heads == 0
        tokens = r.steps * tokens_per_step
        assert 20 * r.params - tokens_per_step < tokens <= 20 * r.params  # the recipe, in whole steps
        assert r.budget == pytest.approx(tokens * meta_model(cfg).flops_per_token(cfg.model.max_seq_len))
        assert r.budget == family_budget(base, r.dim, 20)
    # one epoch is the limit: a width whose recipe needs more tokens than the data has is skipped, not repeated
    runs, skipped = plan_runs(base, [16, 64], [], train_tokens=20 * runs[1].params, tokens_per_param=20)
    assert [r.dim for r in runs] == [16] and "more than one epoch" in skipped[0]


def test_family_fits_every_run_and_refuses_to_mix_with_a_grid(prepared, tmp_path):
    rows = [{"name": f"d{d}", "dim": d, "flops": f, "val_loss": v, "budget": f, "tokens_per_param": 20.0,
             "tokens": f / (6 * 20 * d * d), "non_embedding_params": 20 * d * d}
            for d, f, v in [(32, 3e9, 5.0), (16, 1e9, 5.5), (48, 9e9, 4.6), (32, 3e9, 5.1)]]  # d32 run twice
    compute, loss, chosen = frontier(rows)
    # every run, in compute order; a repeated width is a second point, not a competitor for its budget
    assert list(compute) == [1e9, 3e9, 3e9, 9e9] and list(loss) == [5.5, 5.0, 5.1, 4.6]
    grid = [dict(r, tokens_per_param=None, budget=1e9) for r in rows]
    # a grid keeps each budget's best run only: one budget is one point, said as the sweep's shape
    with pytest.raises(UserError, match=r"these 4 runs span 1 budget\(s\); it needs 3 or more: add budgets"):
        frontier(grid)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grid))
    with pytest.raises(UserError, match="own --out"):
        sweep(base_cfg(prepared), out, [16], [], log=quiet, tokens_per_param=20)
    with pytest.raises(UserError, match="--target-dim"):
        predict_and_check(base_cfg(prepared), out / "sweep.jsonl", None, None, tmp_path / "p", log=quiet)


def test_predict_without_a_sweep(prepared, tmp_path):
    with pytest.raises(UserError, match="no sweep results"):
        predict_and_check(base_cfg(prepared), tmp_path / "none.jsonl", 1e9, None, tmp_path / "p", log=quiet)


def test_a_target_far_off_the_frontier_is_flagged_before_it_runs():
    # the 30x IsoFLOP check missed by 8% because its target (d192 on one epoch) had 1 token per parameter
    # against the frontier's 8: that has to be said when the prediction is registered, not found afterwards
    from nanogpt4.scaling.sweep import _data_limited_warning

    chosen = [{"tokens": 8 * 10_000, "params": 10_000}]  # the largest frontier run: 8 tokens per parameter

    def warning(tokens_per_param, ratio=None):
        return _data_limited_warning(tokens_per_param, chosen, 10**6, ratio)

    assert "tokens per parameter" in warning(1.0) and "8.0" in warning(1.0)
    assert warning(4.0) is None  # within 4x of the frontier's ratio
    assert warning(1.0, ratio=20.0) is None  # a recipe-matched family fixes tokens per parameter by design


def test_predict_prints_the_fit_runs_and_the_target_as_a_table():
    from nanogpt4.scaling.cli import prediction_table

    result = {"fit_runs": [{"name": "d8_c4.30e+09", "flops": 4.24e9, "val_loss": 7.0876},
                           {"name": "d16_c4.30e+11", "flops": 4.3e11, "val_loss": 5.3059}],
              "target_dim": 128, "target_flops": 1.3e13, "actual_loss": 4.3291, "predicted_loss": 4.2675,
              "ci95": [4.1437, 4.7570], "rel_error": 0.0142, "compute_ratio": 30.2, "covered": True}
    lines = prediction_table(result).splitlines()
    assert len(lines) == 4 and lines[1].split() == ["d8_c4.30e+09", "4.24e+09", "7.0876"]
    assert lines[-1].split()[:7] == ["target", "d128", "1.30e+13", "4.3291", "4.2675", "[4.1437,", "4.7570]"]
    assert "1.42%" in lines[-1] and "30.2x" in lines[-1] and "; covered by the interval" in lines[-1]
    assert "NOT covered" in prediction_table({**result, "covered": False})


def test_the_chosen_target_width_fits_in_one_epoch():
    # a law fitted on small runs favours tiny widths trained on many tokens; the width picked for the target must
    # still train within one epoch (it once picked a width needing 40M tokens of an 8M-token corpus, after minutes
    # of fitting)
    from nanogpt4.scaling.accounting import meta_model
    from nanogpt4.scaling.laws import ChinchillaLaw
    from nanogpt4.scaling.sweep import _best_dim, size_config

    cfg = load_config("tiny", ["training.batch_size=8"])
    law = ChinchillaLaw(E=1.0, A=5.0, B=400.0, alpha=0.3, beta=0.4)  # data-hungry: the free optimum is tiny
    budget = 4e13

    def tokens(d):
        return budget / meta_model(size_config(cfg, d)).flops_per_token(cfg.model.max_seq_len)

    capped = _best_dim(cfg, law, budget, [16], train_tokens=8_000_000)
    assert tokens(capped) <= 8_000_000 < tokens(capped - 16)  # the narrowest width that fits: this law's choice
    with pytest.raises(UserError, match="one epoch"):
        _best_dim(cfg, law, 1e20, [16], train_tokens=1000)


def test_a_diverged_run_is_recorded_and_every_fit_refuses_it(prepared, tmp_path):
    base = load_config("tiny", prepared[0] + ["training.warmup_steps=1", "training.grad_clip=0",
                                              "training.learning_rate=1e5"])
    logs = []
    rows = sweep(base, tmp_path / "sweep", [16], [5e8, 1.5e9, 4e9], eval_iters=1, log=logs.append)
    assert len(rows) == 3 and all(r["val_loss"] is None for r in rows)  # recorded (as null), not dropped
    assert all("training loss became" in r["diverged"] for r in rows)
    assert sum("non-finite loss" in m and "dropped from sweep.jsonl" in m for m in logs) == 3
    assert rows[0]["flops"] > 0 and rows[0]["steps"] < 20  # stopped where it diverged
    with pytest.raises(UserError, match="non-finite"):
        frontier(rows)
    with pytest.raises(UserError, match="non-finite"):  # predict fits the same rows: it refuses them too
        predict_and_check(base, tmp_path / "sweep" / "sweep.jsonl", 1e10, None, tmp_path / "p", log=quiet)
    # an IsoFLOP minimum never hides a diverged run behind a finite one at the same budget
    fine = [{"flops": c, "budget": c, "val_loss": 5.0 - i} for i, c in enumerate([1e9, 1e10, 1e11])]
    with pytest.raises(UserError, match="1 run"):
        frontier(fine + [{**fine[-1], "val_loss": float("nan")}])
