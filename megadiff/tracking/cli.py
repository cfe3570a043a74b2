"""`megadiff runs ls`: runs in an MLflow store with their last metrics."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("runs", help="list tracked runs (MLflow)")
    rs = p.add_subparsers(dest="runs_cmd", metavar="SUBCOMMAND")
    ls = rs.add_parser("ls", help="runs with their last metrics", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ls.add_argument("where", nargs="?", default=None,
                    help="a run dir (uses its mlflow.db) or a tracking URI; default $MLFLOW_TRACKING_URI")
    ls.add_argument("--experiment", default=None, help="only this experiment")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=list_runs)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def resolve_uri(where: str | None) -> str:
    import os

    from megadiff import MegadiffError

    if where is None:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        raise MegadiffError("give a run directory or a tracking URI (or set MLFLOW_TRACKING_URI)")
    if "://" in where:
        return where
    db = Path(where) / "mlflow.db"
    if not db.exists():
        raise MegadiffError(f"{db} not found: {where} is not a run directory with a local MLflow store")
    return f"sqlite:///{db.resolve()}"


def list_runs(args) -> int:
    from mlflow.tracking import MlflowClient
    from rich.console import Console
    from rich.table import Table

    client = MlflowClient(resolve_uri(args.where))
    exps = [e for e in client.search_experiments() if args.experiment in (None, e.name)]
    runs = client.search_runs([e.experiment_id for e in exps], max_results=args.limit,
                              order_by=["attributes.start_time DESC"]) if exps else []
    t = Table(title=f"{len(runs)} run(s)")
    for col in ("run", "experiment", "status", "layout", "step", "train/loss", "val/nelbo", "val/ppl_bound", "tok/s"):
        t.add_column(col)
    names = {e.experiment_id: e.name for e in exps}
    for r in runs:
        m = r.data.metrics
        step = max((h.step for h in client.get_metric_history(r.info.run_id, "train/loss")), default=0)

        def f(k, fmt="{:.4f}", m=m):
            return fmt.format(m[k]) if k in m else "-"

        t.add_row(r.data.tags.get("mlflow.runName", r.info.run_id[:8]), names.get(r.info.experiment_id, "?"),
                  r.info.status, r.data.tags.get("megadiff.layout", "-"), str(step), f("train/loss"), f("val/nelbo"),
                  f("val/ppl_bound", "{:.1f}"), f("train/tokens_per_s", "{:.0f}"))
    Console(width=140).print(t)
    return 0
