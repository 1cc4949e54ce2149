"""Scaling-law fits with uncertainty.

- :func:`fit_power_law`: L(C) = a·C^b + c (the GPT-4 report's form; b < 0, c = irreducible loss), least squares
  on log-loss residuals in float64, from a grid of starts, with a bootstrap over runs for 95% intervals on the
  parameters and on any prediction.
- :func:`fit_chinchilla`: L(N, D) = E + A/N^α + B/D^β by Hoffmann et al.'s approach 3 (Huber loss δ=1e-3 on
  log-loss, L-BFGS, grid of initialisations, float64), and the compute-optimal frontier N*(C), D*(C) for C = 6ND.
- :data:`CHINCHILLA`: the published approach-3 constants, for planning when no own fit exists.

Compute is rescaled internally (C / C_ref) so the optimiser works on O(1) numbers; reported parameters are in
the caller's units.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import least_squares
from scipy.special import expit

from nanogpt4.errors import UserError


def check_points(x: np.ndarray, y: np.ndarray, min_points: int = 3) -> None:
    if len(x) < min_points:
        raise UserError(f"a scaling fit needs at least {min_points} runs, got {len(x)}; run a larger sweep")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        bad = int(np.sum(~(np.isfinite(x) & np.isfinite(y))))
        raise UserError(f"{bad} run(s) have non-finite compute or loss (diverged?); drop them or rerun the sweep")
    if np.any(x <= 0) or np.any(y <= 0):
        raise UserError("compute and loss must be positive for a power-law fit")


def _check_distinct(compute: np.ndarray) -> None:
    if len(np.unique(compute)) < 3:
        raise UserError(f"a curve in compute needs runs at 3 or more different compute values, got "
                        f"{len(np.unique(compute))}; add budgets to the sweep")


# --------------------------------------------------------------------------- L(C) = a C^b + c
def _lbfgs(loss_fn, params: torch.Tensor, iters: int = 200) -> tuple[torch.Tensor, float, bool]:
    p = params.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([p], lr=1.0, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss_fn(p)
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        final = float(loss_fn(p))
    grad = torch.autograd.grad(loss_fn(p), p)[0]
    converged = bool(torch.isfinite(grad).all()) and float(grad.abs().max()) < 1e-6 * max(1.0, abs(final)) + 1e-9
    return p.detach(), final, converged


def _exp_or_inf(log_value: float) -> float:
    return math.exp(log_value) if log_value < 709.0 else math.inf


@dataclass
class PowerLawFit:
    """L(C) = a·C^b + c, held as a'·(C/C_ref)^b + c: that form stays finite where a alone does not (a bootstrap
    resample of a few runs can fit b = -30, and then a = a'·C_ref^30 overflows)."""

    a_scaled: float  # a' = a·C_ref^b
    b: float
    c: float
    c_ref: float
    loss: float
    converged: bool
    n_points: int
    bootstrap: list[tuple[float, float, float]] = field(default_factory=list, repr=False)  # (a', b, c) samples

    @property
    def a(self) -> float:
        """a in the caller's units; inf where it overflows."""
        return _exp_or_inf(math.log(self.a_scaled) - self.b * math.log(self.c_ref))

    def predict(self, compute: float | np.ndarray) -> np.ndarray:
        return self.a_scaled * (np.asarray(compute, dtype=np.float64) / self.c_ref) ** self.b + self.c

    def interval(self, compute: float, level: float = 0.95) -> tuple[float, float]:
        """Bootstrap percentile interval of the prediction at ``compute``."""
        if not self.bootstrap:
            v = float(self.predict(compute))
            return v, v
        x = compute / self.c_ref
        preds = np.array([a * x**b + c for a, b, c in self.bootstrap])
        lo, hi = np.percentile(preds, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
        return float(lo), float(hi)

    def param_intervals(self, level: float = 0.95) -> dict:
        if not self.bootstrap:
            return {}
        arr = np.array(self.bootstrap)
        q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
        out = {name: tuple(float(v) for v in np.percentile(arr[:, i], q)) for i, name in ((1, "b"), (2, "c"))}
        # a's percentiles taken on log a (finite for every sample), then mapped back
        log_a = np.log(arr[:, 0]) - arr[:, 1] * math.log(self.c_ref)
        out["a"] = tuple(_exp_or_inf(v) for v in np.percentile(log_a, q))
        return {k: out[k] for k in "abc"}

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("bootstrap")
        d["a"] = self.a
        d["ci95"] = self.param_intervals()
        return d


def _fit_power_law_once(x: np.ndarray, y: np.ndarray, c_ref: float,
                        starts: list[tuple[float, float, float]] | None = None,
                        ) -> tuple[np.ndarray, float, bool, tuple[float, float, float]]:
    """Parameters (a', b, c) in scaled units, minimising squared log residuals; also the raw optimum.

    Raw parameters p keep the constraints (a = e^p0 > 0, b = -softplus(p1) < 0, 0 < c = ymin·sigmoid(p2) <
    ymin), and log L = logaddexp(p0 + b·log x, log c) stays finite wherever a·x^b itself would overflow. The
    Jacobian is analytic and Levenberg-Marquardt (MINPACK, via scipy) fits a resample in milliseconds, which a
    bootstrap of 500 needs.
    """
    lx = np.log(x / c_ref)
    ly = np.log(y)
    ymin = float(np.min(y))

    def logs(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log(a·x^b) and log c."""
        return p[0] - np.logaddexp(0.0, p[1]) * lx, math.log(ymin) - np.logaddexp(0.0, -p[2])

    def residuals(p: np.ndarray) -> np.ndarray:
        """log L̂ - log L."""
        return np.logaddexp(*logs(p)) - ly

    def jacobian(p: np.ndarray) -> np.ndarray:
        u, v = logs(p)
        w = expit(u - v)  # d logaddexp(u, v) / du
        return np.stack([w, w * lx * -expit(p[1]), (1 - w) * expit(-p[2])], axis=1)

    best = None
    grid = starts or list(itertools.product([-2.0, 0.0, 2.0], [-3.0, -1.0, 0.5], [-2.0, 0.0, 2.0]))
    for start in grid:
        res = least_squares(residuals, np.asarray(start, dtype=np.float64), jac=jacobian,
                            method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=2000)
        r, jac = res.fun, res.jac
        value, grad = float(np.mean(r**2)), 2.0 * jac.T @ r / len(r)
        ok = bool(np.isfinite(grad).all()) and float(np.abs(grad).max()) < 1e-6 * max(1.0, abs(value)) + 1e-9
        if math.isfinite(value) and (best is None or value < best[1]):
            best = (res.x, value, ok)
    if best is None:
        raise UserError("the power-law fit failed from every start; check the sweep's losses")
    p, value, ok = best
    a_scaled = math.exp(float(p[0]))
    b = -float(np.logaddexp(0.0, p[1]))
    c = ymin * float(expit(p[2]))
    return np.array([a_scaled, b, c]), value, ok, tuple(float(v) for v in p)


INTERVAL_MIN_COMPUTES = 4


def no_interval_reason(n_computes: int) -> str:
    return (f"no 95% interval: runs at {n_computes} compute values fix L(C) = a*C^b + c exactly (every resample a "
            f"fit can use is the same {n_computes} runs, the same curve), so the bootstrap has nothing to vary; "
            f"add budgets to the sweep until {INTERVAL_MIN_COMPUTES} or more compute values are fitted")


def fit_power_law(compute, loss, bootstrap: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit L(C) = a·C^b + c; ``bootstrap`` resamples runs with replacement for the intervals. With runs at only
    3 compute values the fit has no bootstrap (and no interval): a resample needs all 3 to fit the 3 parameters,
    and those give back the same curve, a zero-width interval that would look like certainty."""
    x = np.asarray(compute, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    check_points(x, y)
    _check_distinct(x)
    c_ref = float(np.exp(np.mean(np.log(x))))
    (a_s, b, c), value, ok, raw = _fit_power_law_once(x, y, c_ref)
    samples = []
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap if len(np.unique(x)) >= INTERVAL_MIN_COMPUTES else 0):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        # resampled fits start from the full fit's optimum (and one generic start, in case it is far off)
        (bs_a, bs_b, bs_c), _, _, _ = _fit_power_law_once(x[idx], y[idx], c_ref, [raw, (0.0, -1.0, 0.0)])
        samples.append((bs_a, bs_b, bs_c))
    return PowerLawFit(a_scaled=a_s, b=b, c=c, c_ref=c_ref, loss=value, converged=ok, n_points=len(x),
                       bootstrap=samples)


HINDCAST_TOLERANCE = 0.03


def hindcast(compute, loss) -> dict | None:
    """Fit L(C) without the largest run and predict that run: the one extrapolation check a sweep can make on
    itself before any target is trained. None with fewer than 4 runs (3 are needed to fit)."""
    x, y = np.asarray(compute, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    order = np.argsort(x)
    x, y = x[order], y[order]
    if len(x) < 4 or len(np.unique(x[:-1])) < 3 or x[-1] <= x[-2]:
        return None
    predicted = float(fit_power_law(x[:-1], y[:-1], bootstrap=0).predict(x[-1]))
    return {"held_out_flops": float(x[-1]), "compute_ratio": float(x[-1] / x[-2]), "predicted_loss": predicted,
            "actual_loss": float(y[-1]), "rel_error": (predicted - float(y[-1])) / float(y[-1])}


def hindcast_warning(h: dict | None) -> str | None:
    if h is None or abs(h["rel_error"]) <= HINDCAST_TOLERANCE:
        return None
    why = ("the runs improve faster with compute than the law allows: small runs often curve downward in log-log "
           "before the power law sets in, so fit on larger runs" if h["rel_error"] > 0 else
           "the largest run improved less than the law expects: check its learning rate and that it did not run out "
           "of data")
    return (f"hindcast: fitted without its largest run, the law misses that run by {h['rel_error']:+.1%} at "
            f"{h['compute_ratio']:.1f}x extrapolation, so a longer extrapolation will likely miss by more; {why}")


# --------------------------------------------------------------------------- Chinchilla approach 3
@dataclass
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = "fit"

    def loss(self, n_params, n_tokens):
        return self.E + self.A / np.asarray(n_params, dtype=np.float64) ** self.alpha + \
            self.B / np.asarray(n_tokens, dtype=np.float64) ** self.beta

    def compute_optimal(self, compute: float) -> dict:
        """N*, D* minimising L(N, D) subject to 6·N·D = C (closed form)."""
        a = self.beta / (self.alpha + self.beta)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n_opt = g * (compute / 6) ** a
        d_opt = compute / (6 * n_opt)
        return {"params": float(n_opt), "tokens": float(d_opt), "loss": float(self.loss(n_opt, d_opt)),
                "tokens_per_param": float(d_opt / n_opt), "law": self.source}


# Hoffmann et al. 2022, approach 3 (their eq. 10)
CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, source="published (Hoffmann et al.)")


def fit_chinchilla(n_params, n_tokens, loss, delta: float = 1e-3) -> ChinchillaLaw:
    """Approach 3: Huber(δ) on log L, L-BFGS from a grid of initialisations, float64."""
    N = torch.tensor(np.asarray(n_params, dtype=np.float64))
    D = torch.tensor(np.asarray(n_tokens, dtype=np.float64))
    y = np.asarray(loss, dtype=np.float64)
    check_points(N.numpy(), y, min_points=5)
    ly = torch.tensor(np.log(y))
    logN, logD = torch.log(N), torch.log(D)

    def objective(p):
        a, b, e, alpha, beta = p
        # log-sum-exp form of log(A/N^α + B/D^β + E), as in the paper
        pred = torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)]), dim=0)
        return torch.nn.functional.huber_loss(pred, ly, delta=delta, reduction="sum")

    # the paper's grid of initialisations; L-BFGS runs from the 16 best of them
    grid = torch.tensor(list(itertools.product([0.0, 5.0, 10.0, 15.0, 20.0], [0.0, 5.0, 10.0, 15.0, 20.0],
                                               [-1.0, -0.5, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.5, 2.0],
                                               [0.0, 0.5, 1.0, 1.5, 2.0])), dtype=torch.float64)
    with torch.no_grad():
        scores = torch.stack([objective(g) for g in grid])
    best = None
    for i in torch.argsort(scores)[:16].tolist():
        p, value, _ = _lbfgs(objective, grid[i], iters=200)
        if math.isfinite(value) and (best is None or value < best[1]):
            best = (p, value)
    if best is None:
        raise UserError("the Chinchilla fit failed from every start; check the sweep's losses")
    a, b, e, alpha, beta = (float(v) for v in best[0])
    return ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, source="fit")


def fit_pass_rate(compute, pass_rate, bootstrap: int = 200, seed: int = 0) -> PowerLawFit:
    """Capability: −E[log pass_rate] = α·C^(−k), the GPT-4 report's HumanEval form (a power law with c = 0)."""
    x = np.asarray(compute, dtype=np.float64)
    p = np.asarray(pass_rate, dtype=np.float64)
    if np.any((p <= 0) | (p > 1)):
        raise UserError("pass rates must be in (0, 1]; a run that never passes has an infinite -log pass rate")
    y = -np.log(p)
    check_points(x, np.maximum(y, 1e-12))
    _check_distinct(x)
    c_ref = float(np.exp(np.mean(np.log(x))))
    lx, ly = np.log(x / c_ref), np.log(np.maximum(y, 1e-12))

    def fit(ix):  # (α', slope, 0) with α' = α·C_ref^slope, as fit_power_law keeps its samples
        slope, intercept = np.polyfit(lx[ix], ly[ix], 1)
        return math.exp(intercept), slope, 0.0

    a_s, b, c = fit(np.arange(len(x)))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) >= 2:
            samples.append(fit(idx))
    resid = float(np.mean((np.log(a_s) + b * lx - ly) ** 2))
    return PowerLawFit(a_scaled=a_s, b=b, c=c, c_ref=c_ref, loss=resid, converged=True, n_points=len(x),
                       bootstrap=samples)
