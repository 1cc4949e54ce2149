import numpy as np
import pytest

from nanogpt4.errors import UserError
from nanogpt4.scaling.laws import CHINCHILLA, ChinchillaLaw, fit_chinchilla, fit_pass_rate, fit_power_law


def synthetic(a=80.0, b=-0.12, c=1.8, noise=0.005, n=12, seed=0):
    rng = np.random.default_rng(seed)
    C = np.logspace(12, 15, n)
    L = (a * C**b + c) * np.exp(rng.normal(0, noise, n))
    return C, L


def test_power_law_recovers_known_parameters_and_interval_covers():
    C, L = synthetic()
    fit = fit_power_law(C, L, bootstrap=100)
    assert fit.converged or fit.loss < 1e-4
    assert fit.b == pytest.approx(-0.12, abs=0.03) and fit.c == pytest.approx(1.8, abs=0.15)
    target = 3e16  # 30x beyond the largest point
    truth = 80.0 * target**-0.12 + 1.8
    lo, hi = fit.interval(target)
    assert lo <= truth <= hi
    assert abs(float(fit.predict(target)) - truth) / truth < 0.02
    ci = fit.param_intervals()
    assert ci["b"][0] <= -0.12 <= ci["b"][1]


def test_three_compute_values_give_no_interval_rather_than_a_zero_width_one():
    C, L = synthetic(n=4)
    assert not fit_power_law(C[:3], L[:3], bootstrap=50).bootstrap  # every usable resample is the same 3 runs
    lo, hi = fit_power_law(C, L, bootstrap=50).interval(1e16)
    assert hi - lo > 1e-3


def test_power_law_noise_free_is_exact():
    C, L = synthetic(noise=0.0)
    fit = fit_power_law(C, L, bootstrap=0)
    assert np.allclose(fit.predict(C), L, rtol=1e-5)


@pytest.mark.parametrize("compute,loss,needle", [
    ([1e12, 1e13], [3.0, 2.5], "at least 3 runs"),
    ([1e12, 1e13, 1e14], [3.0, float("nan"), 2.2], "non-finite"),
    ([1e12, 0.0, 1e14], [3.0, 2.5, 2.2], "positive"),
    ([1e12, 1e12, 1e13, 1e13], [3.0, 2.9, 2.5, 2.6], "3 or more different compute values"),
])
def test_bad_sweeps_are_refused(compute, loss, needle):
    with pytest.raises(UserError, match=needle):
        fit_power_law(compute, loss)


def test_chinchilla_fit_recovers_a_known_law():
    law = ChinchillaLaw(E=1.8, A=300.0, B=500.0, alpha=0.33, beta=0.3)
    rng = np.random.default_rng(0)
    N = np.repeat(np.logspace(5, 8, 6), 5)
    D = np.tile(np.logspace(7, 10, 5), 6)
    L = law.loss(N, D) * np.exp(rng.normal(0, 0.002, len(N)))
    fit = fit_chinchilla(N, D, L)
    grid_N, grid_D = np.logspace(5, 8, 4), np.logspace(7, 10, 4)
    for n in grid_N:
        for d in grid_D:
            assert abs(fit.loss(n, d) - law.loss(n, d)) / law.loss(n, d) < 0.01
    assert abs(fit.E - 1.8) < 0.18


def test_chinchilla_published_frontier():
    # the approach-3 frontier: N* ~ C^(beta/(alpha+beta)) = C^0.45, and C = 6 N D holds
    small, big = CHINCHILLA.compute_optimal(1e21), CHINCHILLA.compute_optimal(1e23)
    assert big["params"] / small["params"] == pytest.approx(100 ** (0.28 / 0.62), rel=1e-6)
    assert 6 * big["params"] * big["tokens"] == pytest.approx(1e23, rel=1e-9)
    # Chinchilla's own budget (5.76e23 FLOPs): approach 3 puts the optimum in the tens of billions
    opt = CHINCHILLA.compute_optimal(5.76e23)
    assert 2e10 < opt["params"] < 6e10


def test_pass_rate_fit():
    C = np.logspace(12, 15, 8)
    p = np.exp(-2.0 * (C / 1e12) ** -0.3)
    fit = fit_pass_rate(C, p, bootstrap=50)
    assert fit.b == pytest.approx(-0.3, abs=1e-6)
    with pytest.raises(UserError, match="pass rates"):
        fit_pass_rate(C, np.zeros_like(C))


def test_steep_bootstrap_resamples_keep_the_interval_finite():
    # six real sweep runs (one-epoch widths 8-64): some resamples fit b near -30, where a = a'·C_ref^(-b)
    # overflows; the interval and the parameter intervals must stay finite and bracket the fit
    C = np.array([5.82e11, 1.213e12, 1.894e12, 2.623e12, 4.230e12, 6.034e12])
    L = np.array([5.3414, 4.9403, 4.7330, 4.5721, 4.7008, 4.3584])
    fit = fit_power_law(C, L, bootstrap=30, seed=7)  # a seed whose resamples include one
    assert any(b < -25 for _, b, _ in fit.bootstrap)  # the case this test is about does occur
    for target in (1.9e13, 4e13):
        lo, hi = fit.interval(target)
        assert np.isfinite([lo, hi]).all() and lo <= float(fit.predict(target)) <= hi
    ci = fit.param_intervals()
    assert all(np.isfinite(ci[k]).all() for k in "bc") and ci["a"][0] <= ci["a"][1]
    assert np.isfinite(fit.predict(C)).all()
