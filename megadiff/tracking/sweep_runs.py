"""The MLflow side of a sweep: parent run, child runs by sweep tag, metric histories, fit artifacts.

megadiff/sweeps/ never imports mlflow; it calls these helpers (mlflow is imported inside them). A
``plan`` here is a ``megadiff.sweeps.plan.Plan`` (only its attributes are used: tracking sits below sweeps).

    client = sweep_client(uri)
    parent_id = ensure_parent(plan)            # get or create the parent run; log plan.json to it
    runs = sweep_runs(plan)                    # {run name: latest MLflow run (FINISHED preferred)}
    history = metric_history(uri, run_id, "val/nelbo")
    plan_json, parent_id = plan_from_mlflow(sweep_id, uri)   # the plan.json logged to the parent run
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from megadiff import MegadiffError
from megadiff.utils.io import atomic_write_json

TAG_SWEEP = "sweep_id"  # every run of a sweep (parent and children)
TAG_RUN = "sweep_run"  # a child run: its planned run name
TAG_ROLE = "sweep_role"  # "parent" on the sweep's parent run
Plan = Any


def sweep_client(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, plan: Plan) -> str:
    exp = client.get_experiment_by_name(plan.experiment)
    if exp is not None:
        return exp.experiment_id
    loc = (Path(plan.out_dir) / "mlartifacts").as_uri() if plan.tracking_uri.startswith("sqlite:") else None
    return client.create_experiment(plan.experiment, artifact_location=loc)


def find_parent(client, sweep_id: str, experiment_ids: list[str] | None = None):
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return None
    runs = client.search_runs(experiment_ids, f"tags.{TAG_SWEEP} = '{sweep_id}' and tags.{TAG_ROLE} = 'parent'",
                              max_results=10, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def parent_id(uri: str, sweep_id: str) -> str | None:
    parent = find_parent(sweep_client(uri), sweep_id)
    return parent.info.run_id if parent else None


def ensure_parent(plan: Plan) -> str:
    """Get or create the sweep's parent MLflow run; log the plan to it. Returns its run id."""
    client = sweep_client(plan.tracking_uri)
    exp_id = ensure_experiment(client, plan)
    parent = find_parent(client, plan.sweep_id, [exp_id])
    if parent is None:
        parent = client.create_run(exp_id, run_name=f"sweep-{plan.sweep_id}",
                                   tags={TAG_SWEEP: plan.sweep_id, TAG_ROLE: "parent"})
        budgets = sorted({r.budget for r in plan.runs})
        for k, v in {"budgets": ",".join(f"{b:.4g}" for b in budgets),
                     "objectives": ",".join(sorted({r.objective for r in plan.runs})),
                     "sizes": ",".join(dict.fromkeys(r.size for r in plan.runs)),
                     "base_config": plan.base_config, "vocab_size": plan.vocab_size, "seq_len": plan.seq_len,
                     "n_runs": len(plan.feasible)}.items():
            client.log_param(parent.info.run_id, k, str(v)[:6000])
    run_id = parent.info.run_id
    plan_file = Path(plan.out_dir) / "plan.json"
    atomic_write_json(plan_file, plan.to_json())
    client.log_artifact(run_id, str(plan_file))
    return run_id


def sweep_runs(plan: Plan) -> dict[str, Any]:
    """Latest MLflow run per sweep run name (FINISHED preferred)."""
    client = sweep_client(plan.tracking_uri)
    exp = client.get_experiment_by_name(plan.experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.{TAG_SWEEP} = '{plan.sweep_id}'", max_results=50000)
    best: dict[str, Any] = {}
    for r in runs:
        name = r.data.tags.get(TAG_RUN)
        if not name:
            continue
        key = (r.info.status == "FINISHED", r.info.start_time or 0)
        old = best.get(name)
        if old is None or key > (old.info.status == "FINISHED", old.info.start_time or 0):
            best[name] = r
    return best


def finished_runs(plan: Plan) -> set[str]:
    return {n for n, r in sweep_runs(plan).items() if r.info.status == "FINISHED"}


def metric_history(uri: str, run_id: str, metric: str) -> list[Any]:
    return sweep_client(uri).get_metric_history(run_id, metric)


def finish_parent(plan: Plan, run_id: str) -> None:
    """Mark the parent run FINISHED once every feasible run is done."""
    sweep_client(plan.tracking_uri).set_terminated(run_id, "FINISHED")


def plan_from_mlflow(sweep_id: str, uri: str) -> tuple[dict[str, Any], str]:
    """(plan.json as logged to the sweep's parent run, parent run id), for `megadiff sweep fit SWEEP_ID`."""
    client = sweep_client(uri)
    parent = find_parent(client, sweep_id)
    if parent is None:
        raise MegadiffError(f"no parent run of sweep {sweep_id!r} in the MLflow store {uri}; pass the sweep "
                            "YAML, or the tracking URI the sweep used (--tracking-uri or $MLFLOW_TRACKING_URI)")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent.info.run_id, "plan.json", tmp)
        return json.loads(Path(path).read_text()), parent.info.run_id


def log_fit(uri: str, run_id: str, files: Sequence[Path], res: dict[str, Any]) -> None:
    """Log the fit's files (under fit/) and its exponents and parameters as metrics of the parent run."""
    client = sweep_client(uri)
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="fit")
    for obj, r in res["objectives"].items():
        for approach in ("approach3", "approach2"):
            a = r.get(approach, {})
            for k in ("a", "b"):
                if isinstance(a.get(k), float) and math.isfinite(a[k]):
                    client.log_metric(run_id, f"fit/{obj}/{approach}/{k}", a[k])
        for k, v in r.get("approach3", {}).get("params", {}).items():
            client.log_metric(run_id, f"fit/{obj}/approach3/{k}", float(v))
