"""Data-constrained scaling (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").

Repeated tokens are worth less than fresh ones. With U unique tokens seen D / U times
(R_D = D / U - 1 repetitions) and U_N = min(N_opt(U), N) the compute-optimal size for U tokens
(R_N = N / U_N - 1 excess parameters), the effective data and parameters are

    D' = U + U R_D* (1 - exp(-R_D / R_D*)),     N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*))

and the loss is the Chinchilla law at (N', D'):  L = E + A / N'^alpha + B / D'^beta.
R_D* is the data-reuse "half-life" in epochs (Muennighoff: ~15 for AR; diffusion LMs are reported at
~500, Prabhudesai et al. 2025). N_opt(U) comes from the law itself: with C = k N D,
N_opt = G (G U)^(a/b) (independent of k).

All seven parameters (a, b, e, alpha, beta, log R_D*, log R_N*) are fitted jointly with the Huber
loss on log-loss residuals (as in fit.py), started from the single-law fit and a grid of R_D*;
bootstrap over runs gives percentile intervals. R_N* is identified only by runs whose N exceeds
N_opt(U); otherwise its interval spans the search bounds and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize

from megadiff import MegadiffError
from megadiff.sweeps import fit as F

LOG_R_BOUNDS = (math.log(0.05), math.log(1e5))
BOUNDS7 = F.BOUNDS + [LOG_R_BOUNDS, LOG_R_BOUNDS]
RD_STARTS = (1.0, 5.0, 15.0, 50.0, 200.0, 1000.0)


def effective_nd(p: dict[str, float], rd_star: float, rn_star: float, n, d, u) -> tuple[np.ndarray, np.ndarray]:
    n, d, u = (np.asarray(x, float) for x in (n, d, u))
    rd = np.maximum(d / u - 1.0, 0.0)
    d_eff = u + u * rd_star * (-np.expm1(-rd / rd_star))
    ex = F.allocation_exponents(p)
    log_un = ex["log_G"] + (ex["a"] / ex["b"]) * (ex["log_G"] + np.log(u))
    un = np.minimum(np.exp(np.minimum(log_un, 700.0)), n)
    rn = np.maximum(n / un - 1.0, 0.0)
    n_eff = un + un * rn_star * (-np.expm1(-rn / rn_star))
    return n_eff, d_eff


def predict(p: dict[str, float], rd_star: float, rn_star: float, n, d, u) -> np.ndarray:
    n_eff, d_eff = effective_nd(p, rd_star, rn_star, n, d, u)
    return F.predict_loss(p, n_eff, d_eff)


def _unpack(th: np.ndarray) -> tuple[dict[str, float], float, float]:
    return F._theta_to_params(th[:5]), math.exp(th[5]), math.exp(th[6])


def _objective(th: np.ndarray, n, d, u, logl, delta: float) -> float:
    p, rd, rn = _unpack(th)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        r = np.log(predict(p, rd, rn, n, d, u)) - logl
    if not np.all(np.isfinite(r)):
        return 1e6
    ar = np.abs(r)
    return float(np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum())


def _fit_once(n, d, u, loss, starts: Sequence[np.ndarray], delta: float) -> tuple[np.ndarray, float]:
    logl = np.log(loss)
    scale = 1.0 / (delta * len(loss) * 1e-4)
    best, best_f = None, math.inf
    for s in starts:
        s = np.clip(np.asarray(s, float), [lo for lo, _ in BOUNDS7], [hi for _, hi in BOUNDS7])
        res = minimize(lambda th: _objective(th, n, d, u, logl, delta) * scale, s, method="L-BFGS-B",
                       bounds=BOUNDS7, options={"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.isfinite(res.x)) and res.fun / scale < best_f:
            best, best_f = res.x, float(res.fun / scale)
    if best is None:
        raise MegadiffError("the data-constrained fit failed from every initialisation")
    return best, best_f


@dataclass
class DataConstrainedFit:
    params: dict[str, float]
    rd_star: float
    rn_star: float
    huber: float
    n_obs: int
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    ci_level: float = 0.95

    def intervals(self) -> dict[str, list[float]]:
        if len(self.boot) < 2:
            return {}
        q = (1 - self.ci_level) / 2
        cols = {"R_D*": np.exp(self.boot[:, 5]), "R_N*": np.exp(self.boot[:, 6]),
                "alpha": self.boot[:, 3], "beta": self.boot[:, 4], "E": np.exp(self.boot[:, 2])}
        return {k: [float(np.quantile(v, q)), float(np.quantile(v, 1 - q))] for k, v in cols.items()}

    def warnings(self) -> list[str]:
        out = []
        ci = self.intervals()
        for key in ("R_D*", "R_N*"):
            lo, hi = ci.get(key, [None, None])
            if lo is not None and (lo <= math.exp(LOG_R_BOUNDS[0]) * 1.5 or hi >= math.exp(LOG_R_BOUNDS[1]) / 1.5):
                out.append(f"the {int(self.ci_level * 100)}% interval of {key} ({lo:.3g}..{hi:.3g}) reaches the search "
                           "bound: the runs do not identify it (more epochs, or N above N_opt(U) for R_N*)")
        if self.n_obs < 12:
            out.append(f"only {self.n_obs} runs for 7 parameters: treat the fit as a smoke test")
        return out

    def predict(self, n, d, u) -> np.ndarray:
        return predict(self.params, self.rd_star, self.rn_star, n, d, u)

    def to_json(self) -> dict[str, Any]:
        return {"params": self.params, "R_D*": self.rd_star, "R_N*": self.rn_star, "huber_loss": self.huber,
                "n_obs": self.n_obs, "n_bootstrap": int(len(self.boot)), "ci_level": self.ci_level,
                "ci": self.intervals(), "warnings": self.warnings()}


def fit_data_constrained(obs: Sequence[F.Observation], n_boot: int = 200, seed: int = 0,
                         delta: float = F.HUBER_DELTA, ci_level: float = 0.95) -> DataConstrainedFit:
    """Joint fit of the data-constrained law with bootstrap intervals (runs need unique_tokens)."""
    if len(obs) < 7:
        raise MegadiffError(f"the data-constrained fit has 7 parameters and needs >= 7 runs; got {len(obs)}")
    n = np.array([o.n for o in obs], float)
    d = np.array([o.d for o in obs], float)
    u = np.array([o.unique_tokens or o.d for o in obs], float)
    loss = np.array([o.loss for o in obs], float)
    if not np.any(d > u * 1.01):
        raise MegadiffError("the data-constrained fit needs runs that repeat data (D > unique_tokens); every run "
                            "saw each token once")
    fresh = d <= u * 1.01
    base_rows = fresh if fresh.sum() >= 5 else np.ones_like(fresh)
    th5, _ = F.fit_parametric_raw(n[base_rows], d[base_rows], loss[base_rows], delta, top=4)
    starts = [np.r_[th5, math.log(r), math.log(r)] for r in RD_STARTS]
    th, f = _fit_once(n, d, u, loss, starts, delta)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(obs), len(obs))
        if len(np.unique(n[idx])) < 2 or not np.any(d[idx] > u[idx] * 1.01):
            continue
        bt, _ = _fit_once(n[idx], d[idx], u[idx], loss[idx], [th], delta)
        boots.append(bt)
    p, rd, rn = _unpack(th)
    return DataConstrainedFit(p, rd, rn, f, len(obs), np.array(boots).reshape(-1, 7), ci_level)
