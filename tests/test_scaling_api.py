import pytest

from nanogpt4.config import load_config
from nanogpt4.scaling import PredictableScaling
from nanogpt4.scaling.predictable import scaled_config


def test_scale_one_is_the_config_itself():
    cfg = load_config("configs/base.yaml")
    ps = PredictableScaling(cfg)
    p = ps.predict_performance(1.0)
    assert p["parameters"] == ps.base_params == 123_751_680
    assert (p["dim"], p["n_layers"], p["n_heads"]) == (768, 12, 12)
    assert p["memory_gb"] > p["parameters"] * 16 / 1024**3  # weights + grads + AdamW at least


def test_the_seeds_base_params_count_the_built_model_exactly():
    from nanogpt4.model.transformer import Transformer

    for ov in ([], ["model.pos_embedding=rope", "model.mlp=swiglu", "model.norm=rmsnorm", "model.n_kv_heads=2",
                    "model.bias=false"]):
        cfg = load_config("tiny", ov)
        ps = PredictableScaling(cfg)
        assert ps._calculate_base_params() == ps.base_params == Transformer(cfg).num_parameters()


def test_scaling_rule_keeps_head_dim_and_grows_about_cubically():
    cfg = load_config("configs/base.yaml")
    half = scaled_config(cfg, 0.5)
    assert half.model.dim == 384 and half.model.n_layers == 6 and half.model.dim // half.model.n_heads == 64
    ps = PredictableScaling(cfg)
    ratio = ps.predict_performance(2.0)["non_embedding_parameters"] / ps.predict_performance(1.0)[
        "non_embedding_parameters"]
    assert 7.5 < ratio < 8.5


def test_find_optimal_scale_respects_both_budgets():
    cfg = load_config("configs/base.yaml")
    ps = PredictableScaling(cfg)
    target = ps.predict_performance(1.0)["flops_per_token"]
    scale, pred = ps.find_optimal_scale(target, max_memory=1000)
    assert pred["flops_per_token"] <= target and scale == pytest.approx(1.0, abs=0.05)
    small_mem = ps.predict_performance(0.5)["memory_gb"]
    scale, pred = ps.find_optimal_scale(1e15, max_memory=small_mem)
    assert pred["memory_gb"] <= small_mem and scale < 0.6


def test_chinchilla_planner_for_gpt2_and_1b_budgets():
    ps = PredictableScaling(load_config("configs/base.yaml"))
    small = ps.compute_optimal(6 * 124e6 * 2.5e9)  # GPT-2-small-class budget
    assert 5e7 < small["params"] < 3e8 and small["law"].startswith("published")
    big = ps.compute_optimal(6 * 1e9 * 20e9)  # a 1B model at 20 tokens/param
    assert 5e8 < big["params"] < 3e9
