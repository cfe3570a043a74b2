"""Budget-centred IsoFLOP grids: spend each budget's runs near its predicted optimum (no torch).

With ``grid.center`` set, a budget C runs only the ladder sizes whose N lies within
[N_opt(C) / span, N_opt(C) x span], N_opt from a prior law:

* ``chinchilla``: Hoffmann et al. 2022's fit (E, A, B, alpha, beta) = (1.69, 406.4, 410.7, 0.34, 0.28)
  with C = 6 N D;
* ``fit``: the Approach 3 law of each objective in an earlier sweep's ``fit.json`` (``grid.prior_fit``),
  with that sweep's FLOPs-per-token law (the convention it was fitted with);
* ``params``: ``grid.prior_params`` {E, A, B, alpha, beta} with C = 6 N D.

N_opt is compared with N as the fits count it (``fit.n_kind``: total or non_embedding).
If fewer than ``grid.min_sizes`` sizes fall in the span, the nearest ones in log N are taken (a
parabola needs 3). Every run whose D/N lies outside ``grid.tokens_per_param`` is flagged in the
plan table (not refused: a deliberate off-optimum point is allowed, an accidental one is visible).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megadiff import MegadiffError
from megadiff.sweeps import fit as F

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def prior_law(spec: Any, objective: str) -> tuple[dict[str, float], F.FlopsLaw]:
    """(params, FLOPs law) of the prior the grid is centred on, for one objective."""
    g = spec.grid
    if g.center == "chinchilla":
        return dict(CHINCHILLA), F.FlopsLaw(math.log(6.0))
    if g.center == "params":
        return {k: float(v) for k, v in g.prior_params.items()}, F.FlopsLaw(math.log(6.0))
    path = Path(g.prior_fit)
    if not path.is_file():
        raise MegadiffError(f"grid.prior_fit {str(path)!r} not found; point it at the fit.json of an earlier sweep "
                            "(<out_dir>/fit/fit.json)")
    doc = json.loads(path.read_text())
    a3 = doc.get("objectives", {}).get(objective, {}).get("approach3", {})
    if "params" not in a3:
        have = ", ".join(doc.get("objectives", {})) or "none"
        raise MegadiffError(f"grid.prior_fit {path} has no Approach 3 law for objective {objective!r} (it has: {have});"
                            " fit that objective first, or centre with grid.center: chinchilla")
    fl = a3.get("flops", {}).get(a3.get("convention", "kernel"))
    law = F.FlopsLaw(float(fl["log_k"]), float(fl["g"])) if fl else F.FlopsLaw(math.log(float(a3["k"])))
    return {k: float(a3["params"][k]) for k in F.PARAMS}, law


def n_opt(spec: Any, objective: str, budget: float) -> float:
    p, law = prior_law(spec, objective)
    return float(F.optimal_allocation(p, budget, law)["N_opt"])


def centred_sizes(spec: Any, objective: str, budget: float, table: list) -> list:
    """The ladder sizes (objects with .n_params) to run at this budget, in ladder order."""
    g = spec.grid
    if g.center == "none":
        return list(table)
    target = math.log(n_opt(spec, objective, budget))
    span = math.log(float(g.span))

    def log_n(s) -> float:  # N as the fits count it (fit.n_kind)
        return math.log(s.n_non_embedding if spec.fit.n_kind == "non_embedding" else s.n_params)

    inside = [s for s in table if abs(log_n(s) - target) <= span]
    if len(inside) < g.min_sizes:
        near = sorted(table, key=lambda s: abs(log_n(s) - target))[: g.min_sizes]
        inside = [s for s in table if s in near]
    return inside


def flag_tokens_per_param(spec: Any, run: Any) -> None:
    lo, hi = (float(x) for x in spec.grid.tokens_per_param)
    kind = spec.fit.n_kind
    tpp = run.tokens / max(run.n_for_fit(kind), 1)
    if run.ok and run.tokens and not lo <= tpp <= hi:
        run.flag = (f"D/N = {tpp:.3g} tokens per parameter (N {kind}) is outside grid.tokens_per_param "
                    f"[{lo:g}, {hi:g}]: far from any plausible compute optimum")
