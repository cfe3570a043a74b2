"""Log evaluation results to a training run's own MLflow run (<run_dir>/mlflow_run_id)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megadiff import MegadiffError
from megadiff.tracking.mlflow_cb import sanitize, tracking_uri


def log_to_training_run(cfg: Any, run_dir: Path, step: int, metrics: dict, artifacts: list[Path]) -> None:
    """Log to the run's own MLflow run (<run_dir>/mlflow_run_id; tracking URI as in training)."""
    import os

    id_file = run_dir / "mlflow_run_id"
    if not id_file.is_file():
        raise MegadiffError(f"--mlflow: {id_file} not found (the run was trained with tracking.enabled=false or "
                            f"elsewhere); results are in the JSON file only")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg, run_dir)
    run_id = id_file.read_text().strip()
    try:
        client = MlflowClient(tracking_uri=uri)
        ts = int(time.time() * 1000)
        items = [Metric(sanitize(k)[:250], float(v), ts, int(step)) for k, v in metrics.items()
                 if v == v and abs(float(v)) != float("inf")]
        client.log_batch(run_id, metrics=items)
        for a in artifacts:
            client.log_artifact(run_id, str(a), artifact_path="eval")
    except Exception as e:
        raise MegadiffError(f"--mlflow: logging to run {run_id} at {uri} failed ({type(e).__name__}: {str(e)[:200]}); "
                            f"the results are in the JSON file") from None
    print(f"logged {len(items)} metrics to MLflow run {run_id} ({uri})")
