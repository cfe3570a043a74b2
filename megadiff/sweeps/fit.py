"""Scaling-law fits (pure numpy + scipy; no torch, no mlflow).

Approach 3 (parametric, Hoffmann et al. 2022):

    L(N, D) = E + A / N^alpha + B / D^beta

fitted as ``log L ~ LSE(a - alpha log N, b - beta log D, e)`` (a = log A, b = log B, e = log E)
with a Huber loss (delta = 1e-3) on the log-loss residuals, by L-BFGS-B started from the best
points of a grid of initialisations. Bootstrap (resampling runs) gives percentile intervals.
Compute is C = f(N) D with f the training FLOPs per token of a model of N parameters, fitted per
run as a power law f(N) = k N^g through the runs' own (N, C/D) (:class:`FlopsLaw`; attention and
embedding FLOPs make g differ from 1 on a small ladder). The compute-optimal allocation minimises
L(N, C / f(N)) over N (numerically); for g = 1 (C = k N D) it is the closed form

    N_opt(C) = G (C/k)^a,  D_opt(C) = (C/k) / N_opt(C),  G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta / (alpha + beta),  b = alpha / (alpha + beta),

and a, b are reported as the exponents. Two FLOPs conventions are kept side by side: ``kernel``
(model/flops.py: matmuls + attention, bidirectional in full, causal at half) and ``6nd`` (SMDM's
C = 6 N_non-embedding D for every objective).

Approach 2 (IsoFLOP profiles): per budget a parabola of the loss in log N; its minimum gives
N*(C) (and D*(C) by interpolating log D in log N along that budget's runs); power laws through
the minima give N_opt ∝ C^a and D_opt ∝ C^b.

MDM vs AR: :func:`compute_multiplier` answers "how much more compute does the MDM need to reach
the AR's compute-optimal loss at C" from the two fitted frontiers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import brentq, minimize

from megadiff import MegadiffError

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")
# the initialisation grid (Hoffmann et al. 2022, appendix D.2)
GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
BOUNDS = [(-50.0, 80.0), (-50.0, 80.0), (-10.0, 5.0), (1e-3, 5.0), (1e-3, 5.0)]  # a, b, e, alpha, beta


CONVENTIONS = ("kernel", "6nd")


@dataclass(frozen=True)
class Observation:
    """One finished run (or a row of an external table): what the fits consume."""

    name: str
    objective: str
    budget: float  # nominal budget C (FLOPs) the run was planned for (groups IsoFLOP profiles)
    n: float  # parameters
    d: float  # training tokens (all repetitions included)
    c: float  # training FLOPs actually spent, kernel convention (flops_per_token x D); 0: unknown
    loss: float  # final (or tail-averaged) validation NELBO, nats/token
    c_6nd: float = 0.0  # 6 x N_non-embedding x D (SMDM's convention); 0: unknown
    unique_tokens: float = 0.0  # U: distinct training tokens (0: every token seen once, U = D)
    epochs: float = 1.0  # D / U

    def compute(self, convention: str) -> float:
        return self.c if convention == "kernel" else self.c_6nd


@dataclass(frozen=True)
class FlopsLaw:
    """Training FLOPs per token as a function of N: f(N) = exp(log_k) N^g (g = 1: C = k N D)."""

    log_k: float
    g: float = 1.0

    def __call__(self, n):
        return np.exp(self.log_k + self.g * np.log(np.asarray(n, float)))

    @property
    def linear(self) -> bool:
        return abs(self.g - 1.0) < 1e-9

    @property
    def k(self) -> float:
        """FLOPs per parameter per token at g = 1 (else at N = 1e8, for display)."""
        return float(math.exp(self.log_k)) if self.linear else float(self(1e8) / 1e8)


def fit_flops_law(n: Sequence[float], c: Sequence[float], d: Sequence[float]) -> FlopsLaw:
    """Least-squares power law of the runs' FLOPs per token C/D in N (per-run, not one median k)."""
    n, fpt = np.asarray(n, float), np.asarray(c, float) / np.asarray(d, float)
    if len(np.unique(n)) < 2:
        return FlopsLaw(float(np.median(np.log(fpt / n))))
    g, log_k = np.polyfit(np.log(n), np.log(fpt), 1)
    if abs(g - 1.0) < 1e-6:
        g, log_k = 1.0, float(np.median(np.log(fpt / n)))
    return FlopsLaw(float(log_k), float(g))


# ----------------------------------------------------------------------------- Approach 3


def _lse_terms(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    return m + np.log(s), w / s


def huber_objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray,
                    delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of log-loss residuals and its gradient in (a, b, e, alpha, beta)."""
    pred, w = _lse_terms(theta, logn, logd)
    r = pred - logl
    ar = np.abs(r)
    f = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum()
    h = np.clip(r, -delta, delta)
    g = np.array([
        (h * w[0]).sum(),
        (h * w[1]).sum(),
        (h * w[2]).sum(),
        -(h * w[0] * logn).sum(),
        -(h * w[1] * logd).sum(),
    ])
    return float(f), g


def _grid_starts(logn: np.ndarray, logd: np.ndarray, logl: np.ndarray, top: int, delta: float) -> np.ndarray:
    """The `top` grid points with the lowest objective (evaluated in one vectorised pass)."""
    grid = np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))
    a, b, e, al, be = (grid[:, i : i + 1] for i in range(5))
    t1 = a - al * logn[None, :]
    t2 = b - be * logd[None, :]
    t3 = np.broadcast_to(e, t1.shape)
    pred = np.logaddexp(np.logaddexp(t1, t2), t3)
    r = np.abs(pred - logl[None, :])
    f = np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(axis=1)
    return grid[np.argsort(f)[:top]]


def _lbfgs(theta0: np.ndarray, logn, logd, logl, delta) -> tuple[np.ndarray, float]:
    # the objective is tiny (residuals ~1e-2, delta 1e-3): scale it so L-BFGS's absolute
    # tolerances do not stop it early
    scale = 1.0 / (delta * max(len(logl), 1) * 1e-4)

    def fun(th):
        f, g = huber_objective(th, logn, logd, logl, delta)
        return f * scale, g * scale

    start = np.clip(theta0, [lo for lo, _ in BOUNDS], [hi for _, hi in BOUNDS])
    res = minimize(fun, start, jac=True, method="L-BFGS-B", bounds=BOUNDS,
                   options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
    return res.x, float(res.fun / scale)


def fit_parametric_raw(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = HUBER_DELTA,
                       top: int = 16, extra_starts: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, float]:
    """Best (a, b, e, alpha, beta) over L-BFGS runs from the `top` best grid points (+ extra starts)."""
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    starts = list(extra_starts) + list(_grid_starts(logn, logd, logl, top, delta))
    best, best_f = None, math.inf
    for s in starts:
        th, f = _lbfgs(np.asarray(s, float), logn, logd, logl, delta)
        if np.all(np.isfinite(th)) and f < best_f:
            best, best_f = th, f
    if best is None:
        raise MegadiffError("the parametric fit failed from every initialisation")
    return best, best_f


def _theta_to_params(th: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(x) for x in th)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def allocation_exponents(p: dict[str, float]) -> dict[str, float]:
    s = p["alpha"] + p["beta"]
    log_g = (math.log(p["alpha"] * p["A"]) - math.log(p["beta"] * p["B"])) / s
    return {"a": p["beta"] / s, "b": p["alpha"] / s, "G": math.exp(min(log_g, 700.0)), "log_G": log_g}


def _log_n_opt_numeric(p: dict[str, float], logc: np.ndarray, law: FlopsLaw) -> np.ndarray:
    """argmin over log N of L(N, C / f(N)) for each log C (bounded scalar search, float64)."""
    from scipy.optimize import minimize_scalar

    out = np.empty_like(logc)
    for i, lc in enumerate(logc.ravel()):
        def f(x, lc=lc):
            log_d = lc - law.log_k - law.g * x
            return p["A"] * math.exp(-p["alpha"] * x) + p["B"] * math.exp(max(-p["beta"] * log_d, -700.0))
        hi = (lc - law.log_k) / law.g  # D = 1 token
        r = minimize_scalar(f, bounds=(max(hi - 120.0, -50.0), hi), method="bounded", options={"xatol": 1e-10})
        out.ravel()[i] = r.x
    return out


def optimal_allocation(p: dict[str, float], c: float | np.ndarray, k: float | FlopsLaw) -> dict[str, Any]:
    """N_opt, D_opt and L_opt at compute C = f(N) D (f = k N for a number k; computed in log space)."""
    law = k if isinstance(k, FlopsLaw) else FlopsLaw(math.log(k))
    logc_raw = np.log(np.asarray(c, float))
    if law.linear:
        ex = allocation_exponents(p)
        logc = logc_raw - law.log_k
        log_n = ex["log_G"] + ex["a"] * logc
    else:
        log_n = _log_n_opt_numeric(p, np.atleast_1d(logc_raw).astype(float), law).reshape(logc_raw.shape)
    log_d = logc_raw - law.log_k - law.g * log_n
    with np.errstate(over="ignore", under="ignore"):
        l_opt = p["E"] + p["A"] * np.exp(-p["alpha"] * log_n) + p["B"] * np.exp(-p["beta"] * log_d)
        return {"N_opt": np.exp(log_n), "D_opt": np.exp(log_d), "L_opt": l_opt}


def predict_loss(p: dict[str, float], n, d):
    n, d = np.asarray(n, float), np.asarray(d, float)
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


@dataclass
class ParametricFit:
    params: dict[str, float]
    flops: dict[str, FlopsLaw]  # FLOPs per token by convention (kernel and/or 6nd): C = f(N) D
    huber: float
    n_obs: int
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # bootstrap thetas (a, b, e, alpha, beta)
    ci_level: float = 0.95
    convention: str = "kernel"  # the one used for allocations and the MDM-vs-AR multiplier by default

    @property
    def law(self) -> FlopsLaw:
        return self.flops[self.convention]

    @property
    def k(self) -> FlopsLaw:
        """The FLOPs law of the primary convention (accepted wherever a number k was)."""
        return self.law

    @property
    def exponents(self) -> dict[str, float]:
        return allocation_exponents(self.params)

    def boot_params(self) -> list[dict[str, float]]:
        return [_theta_to_params(t) for t in self.boot]

    def intervals(self) -> dict[str, list[float]]:
        """Percentile bootstrap intervals of E, A, B, alpha, beta, a, b."""
        if len(self.boot) < 2:
            return {}
        rows = [dict(p, **{k: v for k, v in allocation_exponents(p).items() if k in ("a", "b")})
                for p in self.boot_params()]
        q = (1 - self.ci_level) / 2
        return {k: [float(np.quantile([r[k] for r in rows], q)), float(np.quantile([r[k] for r in rows], 1 - q))]
                for k in rows[0]}

    def warnings(self) -> list[str]:
        """Signs that the data do not pin the law down (the numbers are then not to be trusted)."""
        out = []
        for name, (lo, hi) in (("alpha", BOUNDS[3]), ("beta", BOUNDS[4])):
            v = self.params[name]
            if v <= lo * 1.01 or v >= hi * 0.99:
                out.append(f"{name}={v:.3g} sits at the search bound [{lo}, {hi}]: the runs do not identify "
                           "the law (too few, too noisy, or too far from convergence)")
        if self.n_obs < 10:
            out.append(f"only {self.n_obs} runs for 5 parameters: treat the fit as a smoke test")
        ci = self.intervals()
        for key in ("a", "b"):
            if key in ci and ci[key][1] - ci[key][0] > 0.5:
                out.append(f"the {int(self.ci_level * 100)}% interval of {key} is {ci[key][0]:.2f}..{ci[key][1]:.2f}: "
                           "exponent not determined")
        return out

    def predictions(self, budgets: Sequence[float], convention: str | None = None) -> list[dict[str, Any]]:
        """N_opt, D_opt, L_opt (with bootstrap intervals) at each C under one FLOPs convention."""
        law = self.flops[convention or self.convention]
        preds = []
        for c in budgets:
            o = optimal_allocation(self.params, c, law)
            row = {"C": float(c), **{k: float(v) for k, v in o.items()}}
            if len(self.boot) >= 2:
                bo = [optimal_allocation(p, c, law) for p in self.boot_params()]
                q = (1 - self.ci_level) / 2
                for key in ("N_opt", "D_opt", "L_opt"):
                    vals = np.array([float(b[key]) for b in bo])
                    vals = vals[np.isfinite(vals)]
                    row[f"{key}_ci"] = [float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))]
            preds.append(row)
        return preds

    def to_json(self, budgets: Sequence[float] = ()) -> dict[str, Any]:
        ex = self.exponents
        return {
            "params": self.params, "a": ex["a"], "b": ex["b"], "G": ex["G"], "k": self.law.k,
            "flops": {cv: {"log_k": f.log_k, "g": f.g, "k_at_1e8": f.k} for cv, f in self.flops.items()},
            "convention": self.convention,
            "huber_loss": self.huber, "n_obs": self.n_obs, "n_bootstrap": int(len(self.boot)),
            "ci_level": self.ci_level, "ci": self.intervals(), "optimal": self.predictions(budgets),
            "optimal_by_convention": {cv: self.predictions(budgets, cv) for cv in self.flops if cv != self.convention},
            "warnings": self.warnings(),
        }


def flops_laws(obs: Sequence[Observation]) -> dict[str, FlopsLaw]:
    """The per-run FLOPs-per-token law of each convention the observations carry."""
    out = {}
    for cv in CONVENTIONS:
        c = np.array([o.compute(cv) for o in obs], float)
        if np.all(c > 0):
            out[cv] = fit_flops_law([o.n for o in obs], c, [o.d for o in obs])
    if not out:
        raise MegadiffError("the runs carry no training FLOPs (neither kernel C nor 6 N D): cannot allocate compute")
    return out


def fit_parametric(obs: Sequence[Observation], n_boot: int = 200, seed: int = 0, delta: float = HUBER_DELTA,
                   ci_level: float = 0.95, convention: str = "kernel") -> ParametricFit:
    """Approach 3 with bootstrap intervals (resampling runs with replacement)."""
    if len(obs) < 5:
        raise MegadiffError(f"the parametric fit (Approach 3) has 5 parameters and needs >= 5 runs; got {len(obs)}")
    n = np.array([o.n for o in obs], float)
    d = np.array([o.d for o in obs], float)
    loss = np.array([o.loss for o in obs], float)
    if np.any(~np.isfinite(loss)) or np.any(loss <= 0):
        raise MegadiffError("the losses must be finite and positive to fit a scaling law")
    laws = flops_laws(obs)
    if convention not in laws:
        convention = next(iter(laws))
    th, f = fit_parametric_raw(n, d, loss, delta)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(obs), len(obs))
        if len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
            continue
        bt, _ = fit_parametric_raw(n[idx], d[idx], loss[idx], delta, top=2, extra_starts=[th])
        boots.append(bt)
    return ParametricFit(_theta_to_params(th), laws, f, len(obs), np.array(boots).reshape(-1, 5), ci_level,
                         convention)


# ----------------------------------------------------------------------------- Approach 2


@dataclass
class IsoFlopProfile:
    budget: float
    coeffs: list[float]  # loss = c0 + c1 x + c2 x^2, x = ln N
    n_opt: float
    d_opt: float
    l_opt: float
    extrapolated: bool  # minimum outside the sizes of this budget
    n_runs: int


def _profile(budget: float, n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> IsoFlopProfile | str:
    if len(np.unique(n)) < 3:
        return f"budget {budget:.3g}: {len(np.unique(n))} model sizes; a parabola needs >= 3"
    x = np.log(n)
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if c2 <= 0:
        return f"budget {budget:.3g}: the loss is not convex in log N (no minimum)"
    xs = -c1 / (2 * c2)
    s1, s0 = np.polyfit(x, np.log(d), 1)  # along an IsoFLOP, log D is (nearly) linear in log N
    return IsoFlopProfile(float(budget), [float(c0), float(c1), float(c2)], float(math.exp(xs)),
                          float(math.exp(s0 + s1 * xs)), float(c0 + c1 * xs + c2 * xs * xs),
                          bool(xs < x.min() or xs > x.max()), int(len(n)))


def _powerlaw(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, icpt = np.polyfit(np.log(c), np.log(y), 1)
    return float(slope), float(icpt)


@dataclass
class IsoFlopFit:
    profiles: list[IsoFlopProfile]
    skipped: list[str]
    a: float | None = None  # N_opt ∝ C^a
    b: float | None = None  # D_opt ∝ C^b
    n_icpt: float | None = None
    d_icpt: float | None = None
    l_slope: float | None = None  # L_opt ∝ C^l_slope (a pure power law through the minima)
    l_icpt: float | None = None
    ci: dict[str, list[float]] = field(default_factory=dict)

    def n_opt(self, c):
        return np.exp(self.n_icpt) * np.asarray(c, float) ** self.a

    def d_opt(self, c):
        return np.exp(self.d_icpt) * np.asarray(c, float) ** self.b

    def l_opt(self, c):
        return np.exp(self.l_icpt) * np.asarray(c, float) ** self.l_slope

    def to_json(self) -> dict[str, Any]:
        return {
            "profiles": [p.__dict__ for p in self.profiles], "skipped": self.skipped,
            "a": self.a, "b": self.b, "N_opt_intercept_ln": self.n_icpt, "D_opt_intercept_ln": self.d_icpt,
            "L_opt_slope": self.l_slope, "L_opt_intercept_ln": self.l_icpt, "ci": self.ci,
        }


def _isoflop_once(groups: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> IsoFlopFit:
    profiles, skipped = [], []
    for budget in sorted(groups):
        pr = _profile(budget, *groups[budget])
        (skipped if isinstance(pr, str) else profiles).append(pr)
    fit = IsoFlopFit(profiles, skipped)
    if len(profiles) >= 2:
        c = np.array([p.budget for p in profiles])
        fit.a, fit.n_icpt = _powerlaw(c, np.array([p.n_opt for p in profiles]))
        fit.b, fit.d_icpt = _powerlaw(c, np.array([p.d_opt for p in profiles]))
        fit.l_slope, fit.l_icpt = _powerlaw(c, np.array([max(p.l_opt, 1e-12) for p in profiles]))
    return fit


def fit_isoflop(obs: Sequence[Observation], n_boot: int = 200, seed: int = 0, ci_level: float = 0.95) -> IsoFlopFit:
    """Approach 2: parabola per budget, power laws through the minima, bootstrap within budgets."""
    groups: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for budget in sorted({o.budget for o in obs}):
        rows = [o for o in obs if o.budget == budget]
        groups[budget] = tuple(np.array([getattr(o, k) for o in rows], float) for k in ("n", "d", "loss"))
    fit = _isoflop_once(groups)
    if fit.a is None or n_boot <= 0:
        return fit
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(n_boot):
        g2 = {}
        for budget, (n, d, loss) in groups.items():
            idx = rng.integers(0, len(n), len(n))
            g2[budget] = (n[idx], d[idx], loss[idx])
        f2 = _isoflop_once(g2)
        if f2.a is not None and len(f2.profiles) == len(fit.profiles):
            samples["a"].append(f2.a)
            samples["b"].append(f2.b)
    q = (1 - ci_level) / 2
    if len(samples["a"]) >= 10:
        fit.ci = {k: [float(np.quantile(v, q)), float(np.quantile(v, 1 - q))] for k, v in samples.items()}
    return fit


# ----------------------------------------------------------------------------- MDM vs AR


def frontier_loss(p: dict[str, float], k: float | FlopsLaw, c) -> np.ndarray:
    return optimal_allocation(p, c, k)["L_opt"]


def compute_multiplier(p_mdm: dict[str, float], k_mdm: float | FlopsLaw, p_ar: dict[str, float],
                       k_ar: float | FlopsLaw, c: float) -> float:
    """C'/C with L*_mdm(C') = L*_ar(C): the compute the MDM needs to match the AR at C (inf: never)."""
    target = float(frontier_loss(p_ar, k_ar, c))
    if target <= p_mdm["E"] * (1 + 1e-12):
        return math.inf

    def g(logc: float) -> float:
        return float(frontier_loss(p_mdm, k_mdm, math.exp(logc))) - target

    lo, hi = math.log(c) - 40.0, math.log(c) + 40.0
    if g(lo) < 0:
        return 0.0
    if g(hi) > 0:
        return math.inf
    return math.exp(brentq(g, lo, hi, xtol=1e-10)) / c


def compare(mdm: ParametricFit, ar: ParametricFit, budgets: Sequence[float], ci_level: float = 0.95,
            convention: str | None = None) -> list[dict]:
    """The MDM compute multiplier at each C (one FLOPs convention), with a paired-bootstrap interval."""
    cv = convention or mdm.convention
    km, ka = mdm.flops[cv], ar.flops[cv]
    out = []
    nb = min(len(mdm.boot), len(ar.boot))
    q = (1 - ci_level) / 2
    for c in budgets:
        row = {"C": float(c), "convention": cv, "L_ar": float(frontier_loss(ar.params, ka, c)),
               "L_mdm": float(frontier_loss(mdm.params, km, c)),
               "multiplier": compute_multiplier(mdm.params, km, ar.params, ka, c)}
        if nb >= 10:
            pm, pa = mdm.boot_params()[:nb], ar.boot_params()[:nb]
            vals = np.array([compute_multiplier(m, km, a, ka, c) for m, a in zip(pm, pa)])
            row["multiplier_ci"] = [float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))]
            row["multiplier_inf_fraction"] = float(np.mean(~np.isfinite(vals)))
        out.append(row)
    return out


def compare_isoflop(mdm: IsoFlopFit, ar: IsoFlopFit, budgets: Sequence[float]) -> list[dict]:
    """Same question from the Approach 2 power laws L*(C) = exp(l0) C^l1 (no floor)."""
    if mdm.l_slope is None or ar.l_slope is None or mdm.l_slope >= 0:
        return []
    out = []
    for c in budgets:
        target = float(ar.l_opt(c))
        c2 = math.exp((math.log(target) - mdm.l_icpt) / mdm.l_slope)
        out.append({"C": float(c), "multiplier": c2 / c})
    return out
