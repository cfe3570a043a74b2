"""Read a sweep's results from MLflow and run the fits (`megadiff sweep fit`).

MLflow is reached only through megadiff/tracking/sweep_runs.py. The plan (``plan.json`` in the sweep dir, or the artifact
of the sweep's parent MLflow run) says which runs should exist; every planned run without a
FINISHED MLflow run carrying the metric is reported as missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megadiff import MegadiffError
from megadiff.sweeps import fit as F
from megadiff.sweeps.plan import Plan
from megadiff.tracking import sweep_runs as T
from megadiff.utils.io import atomic_write_json


def final_value(history: Sequence[Any], tail: int) -> float | None:
    """Mean of the last `tail` logged values (one per step: a re-logged step keeps its latest value)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in history:
        if math.isfinite(m.value) and (m.step not in by_step or m.timestamp >= by_step[m.step][0]):
            by_step[m.step] = (m.timestamp, m.value)
    if not by_step:
        return None
    vals = [by_step[s][1] for s in sorted(by_step)][-tail:]
    return float(np.mean(vals))


def collect(plan: Plan, metric: str, tail: int = 1, n_kind: str = "total"
            ) -> tuple[list[F.Observation], list[tuple[str, str]]]:
    """(observations, missing [(run name, why)]) for the plan's feasible runs."""
    found = T.sweep_runs(plan)
    obs, missing = [], []
    for r in plan.feasible:
        mr = found.get(r.name)
        if mr is None:
            missing.append((r.name, "no MLflow run (not launched?)"))
            continue
        if mr.info.status != "FINISHED":
            missing.append((r.name, f"MLflow run {mr.info.run_id[:8]} is {mr.info.status}"))
            continue
        v = final_value(T.metric_history(plan.tracking_uri, mr.info.run_id, metric), tail)
        if v is None:
            missing.append((r.name, f"finished but logged no {metric}"))
            continue
        obs.append(observation(r, v, n_kind))
    return obs, missing


def observation(r: Any, loss: float, n_kind: str = "total") -> F.Observation:
    """A planned run with its final metric as a fit observation (both FLOPs conventions)."""
    u = float(r.unique_tokens or r.tokens)
    return F.Observation(r.name, r.objective, r.budget, float(r.n_for_fit(n_kind)), float(r.tokens),
                         float(r.tokens * (r.flops_per_token_kernel or r.flops_per_token)), float(loss),
                         c_6nd=6.0 * r.n_non_embedding * float(r.tokens), unique_tokens=u, epochs=float(r.tokens) / u)


def _pairs(objectives: Sequence[str]) -> list[tuple[str, str]]:
    """(diffusion-like, autoregressive) pairs to compare, by the objectives' traits (unknown names: none)."""
    from megadiff.diffusion.catalog import OBJECTIVES

    known = [o for o in objectives if o in OBJECTIVES]
    ars = [o for o in known if OBJECTIVES.traits(o).is_autoregressive]
    return [(m, a) for a in ars for m in known if not OBJECTIVES.traits(m).is_autoregressive]


def run_fits(obs: Sequence[F.Observation], *, n_boot: int = 200, seed: int = 0, ci_level: float = 0.95,
             compare_at: Sequence[float] = (), convention: str = "kernel") -> dict[str, Any]:
    """Approach 2 and 3 per objective (what the data allow) and MDM vs AR; a JSON-ready dict + fit objects."""
    out: dict[str, Any] = {"objectives": {}, "comparison": {}, "notes": []}
    fits: dict[str, dict[str, Any]] = {}
    budgets = sorted({o.budget for o in obs})
    targets = sorted(set(budgets) | {float(c) for c in compare_at})
    dfits: dict[str, Any] = {}
    for objective in sorted({o.objective for o in obs}):
        every = [o for o in obs if o.objective == objective]
        rows = [o for o in every if o.epochs <= 1.01]  # the compute laws: runs that saw each token once
        res: dict[str, Any] = {"n_runs": len(every)}
        fits[objective] = {}
        if len(rows) < len(every):
            res["data_constrained"] = _fit_repeated(every, objective, out["notes"], dfits, n_boot, seed, ci_level)
        if not rows:
            out["objectives"][objective] = res
            continue
        try:
            p3 = F.fit_parametric(rows, n_boot=n_boot, seed=seed, ci_level=ci_level, convention=convention)
            fits[objective]["approach3"] = p3
            res["approach3"] = p3.to_json(targets)
            out["notes"] += [f"{objective}: Approach 3: {w}" for w in res["approach3"]["warnings"]]
        except MegadiffError as e:
            res["approach3"] = {"error": str(e)}
            out["notes"].append(f"{objective}: Approach 3 not fitted: {e}")
        iso = F.fit_isoflop(rows, n_boot=n_boot, seed=seed, ci_level=ci_level)
        fits[objective]["approach2"] = iso
        res["approach2"] = iso.to_json()
        if len(rows) < len(every) and not iso.profiles:  # a data-constrained grid has no IsoFLOP budgets
            out["objectives"][objective] = res
            continue
        out["notes"] += [f"{objective}: {s}" for s in iso.skipped]
        if iso.a is None:
            out["notes"].append(f"{objective}: Approach 2 needs >= 2 budgets with a parabola; got {len(iso.profiles)}")
        out["objectives"][objective] = res
    for mdm, arn in _pairs(list(fits)):
        m, ar = fits[mdm], fits[arn]
        cmp: dict[str, Any] = {}
        if "approach3" in m and "approach3" in ar:
            cvs = [cv for cv in F.CONVENTIONS if cv in m["approach3"].flops and cv in ar["approach3"].flops]
            for cv in cvs:  # the primary convention first, under "approach3"; the other beside it
                key = "approach3" if cv == m["approach3"].convention else f"approach3_{cv}"
                cmp[key] = F.compare(m["approach3"], ar["approach3"], targets, ci_level, convention=cv)
        if "approach2" in m and "approach2" in ar and m["approach2"].a is not None and ar["approach2"].a is not None:
            cmp["approach2"] = F.compare_isoflop(m["approach2"], ar["approach2"], targets)
        out["comparison"][f"{mdm}_vs_{arn}"] = cmp
    if _pairs(list(fits)):
        out["notes"].append("the AR loss averages L-1 next-token targets per sequence, the MDM's L positions; D counts "
                            "L tokens per sequence for both (an O(1/L) difference in supervised tokens, stated not "
                            "corrected)")
    out["_fits"] = fits
    out["_dfits"] = dfits
    return out


def _fit_repeated(rows, objective: str, notes: list, dfits: dict, n_boot: int, seed: int, ci_level: float) -> dict:
    from megadiff.sweeps.data_fit import fit_data_constrained

    try:
        f = fit_data_constrained(rows, n_boot=n_boot, seed=seed, ci_level=ci_level)
    except MegadiffError as e:
        notes.append(f"{objective}: data-constrained law not fitted: {e}")
        return {"error": str(e)}
    dfits[objective] = f
    notes.extend(f"{objective}: data-constrained: {w}" for w in f.warnings())
    return f.to_json()


def _fmt_ci(ci: dict, key: str) -> str:
    return f" [{ci[key][0]:.3g}, {ci[key][1]:.3g}]" if key in ci else ""


def format_report(res: dict[str, Any], missing: Sequence[tuple[str, str]], n_obs: int,
                  excluded: Sequence[tuple[F.Observation, str]] = ()) -> str:
    lines = [f"{n_obs} finished runs used" + (f"; {len(missing)} missing" if missing else "")
             + (f"; {len(excluded)} excluded" if excluded else "")]
    for name, why in missing:
        lines.append(f"  missing {name}: {why}")
    for o, why in excluded:
        lines.append(f"  excluded {o.name} (loss {o.loss:.4g}): {why}")
    for obj, r in res["objectives"].items():
        lines.append(f"\n== {obj} ({r['n_runs']} runs)")
        dc = r.get("data_constrained", {})
        if "R_D*" in dc:
            ci = dc["ci"]
            lines.append(f"Data-constrained law (Muennighoff et al. 2023; {dc['n_bootstrap']} bootstrap fits): "
                         f"R_D* = {dc['R_D*']:.4g}{_fmt_ci(ci, 'R_D*')} epochs, R_N* = {dc['R_N*']:.4g}"
                         f"{_fmt_ci(ci, 'R_N*')}; alpha = {dc['params']['alpha']:.3g}, beta = {dc['params']['beta']:.3g}")
        elif "error" in dc:
            lines.append(f"Data-constrained law: not fitted ({dc['error']})")
        a3 = r.get("approach3", {})
        if "params" in a3:
            p, ci = a3["params"], a3["ci"]
            lines.append(f"Approach 3: L = E + A/N^alpha + B/D^beta   (Huber {a3['huber_loss']:.3g}, "
                         f"{a3['n_bootstrap']} bootstrap fits, {int(a3['ci_level'] * 100)}% intervals)")
            for k in F.PARAMS:
                lines.append(f"  {k:>5} = {p[k]:.4g}{_fmt_ci(ci, k)}")
            lines.append(f"  N_opt ∝ C^{a3['a']:.3f}{_fmt_ci(ci, 'a')}   D_opt ∝ C^{a3['b']:.3f}{_fmt_ci(ci, 'b')}"
                         "   (C = k N D limit)")
            fl = a3["flops"]
            lines.append("  FLOPs per token (per-run power law f(N) = k N^g): " + "; ".join(
                f"{cv}: g={fl[cv]['g']:.3f}, f/N at 1e8 = {fl[cv]['k_at_1e8']:.2f}" for cv in fl))
            by = {a3["convention"]: a3["optimal"], **a3.get("optimal_by_convention", {})}
            cvs = list(by)
            lines.append(f"  {'C':>10}  " + "  ".join(f"{'N_opt ' + cv:>12}  {'D_opt ' + cv:>12}  {'L_opt':>7}"
                                                      for cv in cvs))
            for i, o in enumerate(by[cvs[0]]):
                lines.append(f"  {o['C']:>10.3g}  " + "  ".join(
                    f"{by[cv][i]['N_opt']:>12.3g}  {by[cv][i]['D_opt']:>12.3g}  {by[cv][i]['L_opt']:>7.4f}" for cv in cvs))
        elif "error" in a3:
            lines.append(f"Approach 3: not fitted ({a3['error']})")
        a2 = r.get("approach2")
        if a2 is None or (dc and not a2["profiles"]):
            continue
        lines.append("Approach 2 (IsoFLOP parabolas):")
        for pr in a2["profiles"]:
            lines.append(f"  C={pr['budget']:.3g}: N*={pr['n_opt']:.3g} D*={pr['d_opt']:.3g} L*={pr['l_opt']:.4f}"
                         + (" (minimum outside the sizes run: extrapolated)" if pr["extrapolated"] else ""))
        if a2["a"] is not None:
            lines.append(f"  N_opt ∝ C^{a2['a']:.3f}{_fmt_ci(a2['ci'], 'a')}   "
                         f"D_opt ∝ C^{a2['b']:.3f}{_fmt_ci(a2['ci'], 'b')}")
    for key, cmp in res["comparison"].items():
        lines.append(f"\n== {key}: compute the MDM needs to match the AR's compute-optimal loss")
        for akey in [k for k in cmp if k.startswith("approach3")]:
            for row in cmp[akey]:
                ci = row.get("multiplier_ci")
                lines.append(f"  [{row['convention']:>6} FLOPs] C={row['C']:.3g}: L_ar*={row['L_ar']:.4f} "
                             f"L_mdm*={row['L_mdm']:.4f} multiplier={row['multiplier']:.3g}"
                             + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
        for row in cmp.get("approach2", []):
            lines.append(f"  (Approach 2 power laws) C={row['C']:.3g}: multiplier={row['multiplier']:.3g}")
    for n in res["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def write_outputs(res: dict[str, Any], obs: Sequence[F.Observation], missing, sweep_id: str, out_dir: Path,
                  report: str, excluded: Sequence[tuple[F.Observation, str]] = ()) -> list[Path]:
    """fit.json, fit.txt, runs.csv (every run, excluded ones too) and the PNG plots; returns the files."""
    from megadiff.sweeps import plots
    from megadiff.sweeps.external import write_csv
    from megadiff.utils.io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"sweep_id": sweep_id, "runs": [o.__dict__ for o in obs],
           "excluded": [{"run": o.name, "why": w} for o, w in excluded],
           "missing": [{"run": n, "why": w} for n, w in missing], **res}
    files = [out_dir / "fit.json", out_dir / "fit.txt", out_dir / "runs.csv"]
    atomic_write_json(files[0], _jsonable(doc))
    atomic_write_text(files[1], report + "\n")
    write_csv(list(obs) + [o for o, _ in excluded], files[2])
    files += plots.make_all(obs, res["_fits"], res["comparison"], out_dir, title=f"sweep {sweep_id}",
                            excluded=[o for o, _ in excluded], dfits=res.get("_dfits"))
    return files
