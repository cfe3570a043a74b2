"""Read a sweep's results from MLflow and run the fits (`megadiff sweep fit`).

Imports mlflow only inside functions. The plan (``plan.json`` in the sweep dir, or the artifact
of the sweep's parent MLflow run) says which runs should exist; every planned run without a
FINISHED MLflow run carrying the metric is reported as missing.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megadiff import MegadiffError
from megadiff.sweeps import fit as F
from megadiff.sweeps.launch import _client, find_parent, mlflow_runs
from megadiff.sweeps.plan import Plan
from megadiff.utils.io import atomic_write_json


def plan_from_mlflow(sweep_id: str, uri: str) -> tuple[Plan, str]:
    """The plan logged to the sweep's parent run (for `megadiff sweep fit SWEEP_ID`)."""
    client = _client(uri)
    parent = find_parent(client, sweep_id)
    if parent is None:
        raise MegadiffError(f"no parent run of sweep {sweep_id!r} in the MLflow store {uri}; pass the sweep "
                            "YAML, or the tracking URI the sweep used (--tracking-uri or $MLFLOW_TRACKING_URI)")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent.info.run_id, "plan.json", tmp)
        plan = Plan.from_json(json.loads(Path(path).read_text()))
    plan.tracking_uri = uri
    return plan, parent.info.run_id


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
    client = _client(plan.tracking_uri)
    found = mlflow_runs(plan)
    obs, missing = [], []
    for r in plan.feasible:
        mr = found.get(r.name)
        if mr is None:
            missing.append((r.name, "no MLflow run (not launched?)"))
            continue
        if mr.info.status != "FINISHED":
            missing.append((r.name, f"MLflow run {mr.info.run_id[:8]} is {mr.info.status}"))
            continue
        v = final_value(client.get_metric_history(mr.info.run_id, metric), tail)
        if v is None:
            missing.append((r.name, f"finished but logged no {metric}"))
            continue
        obs.append(F.Observation(r.name, r.objective, r.budget, float(r.n_for_fit(n_kind)), float(r.tokens),
                                 float(r.compute), v))
    return obs, missing


def run_fits(obs: Sequence[F.Observation], *, n_boot: int = 200, seed: int = 0, ci_level: float = 0.95,
             compare_at: Sequence[float] = ()) -> dict[str, Any]:
    """Approach 2 and 3 per objective (what the data allow) and MDM vs AR; a JSON-ready dict + fit objects."""
    out: dict[str, Any] = {"objectives": {}, "comparison": {}, "notes": []}
    fits: dict[str, dict[str, Any]] = {}
    budgets = sorted({o.budget for o in obs})
    targets = sorted(set(budgets) | {float(c) for c in compare_at})
    for objective in sorted({o.objective for o in obs}):
        rows = [o for o in obs if o.objective == objective]
        res: dict[str, Any] = {"n_runs": len(rows)}
        fits[objective] = {}
        try:
            p3 = F.fit_parametric(rows, n_boot=n_boot, seed=seed, ci_level=ci_level)
            fits[objective]["approach3"] = p3
            res["approach3"] = p3.to_json(targets)
            out["notes"] += [f"{objective}: Approach 3: {w}" for w in res["approach3"]["warnings"]]
        except MegadiffError as e:
            res["approach3"] = {"error": str(e)}
            out["notes"].append(f"{objective}: Approach 3 not fitted: {e}")
        iso = F.fit_isoflop(rows, n_boot=n_boot, seed=seed, ci_level=ci_level)
        fits[objective]["approach2"] = iso
        res["approach2"] = iso.to_json()
        out["notes"] += [f"{objective}: {s}" for s in iso.skipped]
        if iso.a is None:
            out["notes"].append(f"{objective}: Approach 2 needs >= 2 budgets with a parabola; got {len(iso.profiles)}")
        out["objectives"][objective] = res
    ar = fits.get("ar", {})
    for mdm in ("mdlm", "llada"):
        m = fits.get(mdm, {})
        if not ar or not m:
            continue
        cmp: dict[str, Any] = {}
        if "approach3" in m and "approach3" in ar:
            cmp["approach3"] = F.compare(m["approach3"], ar["approach3"], targets, ci_level)
        if m["approach2"].a is not None and ar["approach2"].a is not None:
            cmp["approach2"] = F.compare_isoflop(m["approach2"], ar["approach2"], targets)
        out["comparison"][f"{mdm}_vs_ar"] = cmp
    out["_fits"] = fits
    return out


def _fmt_ci(ci: dict, key: str) -> str:
    return f" [{ci[key][0]:.3g}, {ci[key][1]:.3g}]" if key in ci else ""


def format_report(res: dict[str, Any], missing: Sequence[tuple[str, str]], n_obs: int) -> str:
    lines = [f"{n_obs} finished runs used" + (f"; {len(missing)} missing" if missing else "")]
    for name, why in missing:
        lines.append(f"  missing {name}: {why}")
    for obj, r in res["objectives"].items():
        lines.append(f"\n== {obj} ({r['n_runs']} runs)")
        a3 = r.get("approach3", {})
        if "params" in a3:
            p, ci = a3["params"], a3["ci"]
            lines.append(f"Approach 3: L = E + A/N^alpha + B/D^beta   (Huber {a3['huber_loss']:.3g}, "
                         f"{a3['n_bootstrap']} bootstrap fits, {int(a3['ci_level'] * 100)}% intervals)")
            for k in F.PARAMS:
                lines.append(f"  {k:>5} = {p[k]:.4g}{_fmt_ci(ci, k)}")
            lines.append(f"  N_opt ∝ C^{a3['a']:.3f}{_fmt_ci(ci, 'a')}   D_opt ∝ C^{a3['b']:.3f}{_fmt_ci(ci, 'b')}"
                         f"   (C = {a3['k']:.2f} N D)")
            lines.append(f"  {'C':>10}  {'N_opt':>10}  {'D_opt':>10}  {'L_opt':>8}")
            for o in a3["optimal"]:
                lines.append(f"  {o['C']:>10.3g}  {o['N_opt']:>10.3g}  {o['D_opt']:>10.3g}  {o['L_opt']:>8.4f}")
        elif "error" in a3:
            lines.append(f"Approach 3: not fitted ({a3['error']})")
        a2 = r["approach2"]
        lines.append("Approach 2 (IsoFLOP parabolas):")
        for pr in a2["profiles"]:
            lines.append(f"  C={pr['budget']:.3g}: N*={pr['n_opt']:.3g} D*={pr['d_opt']:.3g} L*={pr['l_opt']:.4f}"
                         + (" (minimum outside the sizes run: extrapolated)" if pr["extrapolated"] else ""))
        if a2["a"] is not None:
            lines.append(f"  N_opt ∝ C^{a2['a']:.3f}{_fmt_ci(a2['ci'], 'a')}   "
                         f"D_opt ∝ C^{a2['b']:.3f}{_fmt_ci(a2['ci'], 'b')}")
    for key, cmp in res["comparison"].items():
        lines.append(f"\n== {key}: compute the MDM needs to match the AR's compute-optimal loss")
        for row in cmp.get("approach3", []):
            ci = row.get("multiplier_ci")
            lines.append(f"  C={row['C']:.3g}: L_ar*={row['L_ar']:.4f} L_mdm*={row['L_mdm']:.4f} "
                         f"multiplier={row['multiplier']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
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


def write_outputs(res: dict[str, Any], obs: Sequence[F.Observation], missing, plan: Plan, out_dir: Path,
                  report: str) -> list[Path]:
    """fit.json, fit.txt and the PNG plots in out_dir; returns the files written."""
    from megadiff.sweeps import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"sweep_id": plan.sweep_id, "runs": [o.__dict__ for o in obs],
           "missing": [{"run": n, "why": w} for n, w in missing], **res}
    files = [out_dir / "fit.json", out_dir / "fit.txt"]
    atomic_write_json(files[0], _jsonable(doc))
    files[1].write_text(report + "\n")
    files += plots.make_all(obs, res["_fits"], res["comparison"], out_dir, title=f"sweep {plan.sweep_id}")
    return files


def log_to_parent(uri: str, parent_id: str, files: Sequence[Path], res: dict[str, Any]) -> None:
    client = _client(uri)
    for f in files:
        client.log_artifact(parent_id, str(f), artifact_path="fit")
    for obj, r in res["objectives"].items():
        for approach in ("approach3", "approach2"):
            a = r.get(approach, {})
            for k in ("a", "b"):
                if isinstance(a.get(k), float) and math.isfinite(a[k]):
                    client.log_metric(parent_id, f"fit/{obj}/{approach}/{k}", a[k])
        for k, v in r.get("approach3", {}).get("params", {}).items():
            client.log_metric(parent_id, f"fit/{obj}/approach3/{k}", float(v))
