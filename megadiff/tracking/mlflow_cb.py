"""MLflow tracking callback (rank 0 of the logging stage only). The only place megadiff imports mlflow
besides `megadiff runs`.

* Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir>/mlflow.db`` with
  artifacts in ``<run_dir>/mlartifacts``.
* A resumed run continues the same MLflow run: its id is kept in ``<run_dir>/mlflow_run_id``.
* If the server is down, training goes on: the failure is reported once, metrics are appended to
  ``<run_dir>/mlflow_buffer.jsonl`` and replayed (then the buffer is removed) once the server answers.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from megadiff.config import to_flat_dict, to_yaml
from megadiff.train.callbacks import Callback
from megadiff.utils.io import atomic_write_text

log = logging.getLogger("megadiff.tracking")


def tracking_uri(cfg: Any, run_dir: Path) -> str:
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def artifact_location(uri: str, run_dir: Path) -> str | None:
    return (Path(run_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def sanitize(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ :" else "_" for ch in name)


class MLflowCallback(Callback):
    RETRY_S = 30.0

    def __init__(self, cfg: Any, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.uri = tracking_uri(cfg, run_dir)
        self.client = None
        self.run_id: str | None = None
        self.down_since: float | None = None
        self.buffer = self.run_dir / "mlflow_buffer.jsonl"
        self.active = False

    # ------------------------------------------------------------------ connection
    def _connect(self, trainer) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # a dead server must cost seconds, not mlflow's default minutes of retries with backoff
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            self.cfg.tracking.experiment, artifact_location=artifact_location(self.uri, self.run_dir))
        id_file = self.run_dir / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        ctx, cfg = trainer.ctx, self.cfg
        tags = {
            "mlflow.runName": cfg.tracking.run_name or self.run_dir.name,
            "megadiff.git_commit": git_commit(),
            "megadiff.preset": str(cfg.model.preset or "custom"),
            "megadiff.layout": ctx.layout,
            "megadiff.objective": cfg.diffusion.objective,
            "megadiff.run_dir": str(self.run_dir.resolve()),
            **{str(k): str(v) for k, v in (cfg.tracking.tags or {}).items()},
        }
        if cfg.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = str(cfg.tracking.parent_run_id)
        run = self.client.create_run(exp_id, tags=tags)
        self.run_id = run.info.run_id
        params = {sanitize(k)[:250]: str(v)[:6000] for k, v in to_flat_dict(cfg).items()}
        params["model.n_params"] = str(sum(p.numel() for p in trainer.built.model.parameters()))
        params["model.flops_per_token"] = f"{trainer.flops_tok:.6g}"
        params.update({f"fusion.{k}": str(v) for k, v in trainer.built.fusions.items()})
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        cfg_path = self.run_dir / "config.yaml"
        atomic_write_text(cfg_path, to_yaml(cfg))
        self.client.log_artifact(self.run_id, str(cfg_path))
        atomic_write_text(id_file, self.run_id + "\n")
        del mlflow

    def _call(self, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
            if self.down_since is not None:
                log.warning("MLflow at %s answers again; replaying buffered metrics", self.uri)
                self.down_since = None
            return True
        except Exception as e:  # server down, network, locked db
            if self.down_since is None:
                print(f"warning: MLflow tracking at {self.uri} failed ({type(e).__name__}: {str(e)[:200]}); training "
                      f"continues, metrics are buffered in {self.buffer} and replayed when it answers", flush=True)
            self.down_since = self.down_since or time.time()
            return False

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer) -> None:
        self.active = trainer.ctx.is_logging_rank
        if not self.active:
            return
        self._last_try = time.time()
        if not self._call(self._connect, trainer):
            self.client = None
        self._replay()

    def _metrics(self, rec: dict[str, Any]) -> list:
        from mlflow.entities import Metric

        ts = int(rec.get("ts", time.time()) * 1000)
        return [Metric(k, float(v), ts, int(rec["step"])) for k, v in rec["metrics"].items()]

    def _log(self, rec: dict[str, Any]) -> None:
        if self.client is None and time.time() - self._last_try > self.RETRY_S:
            self._last_try = time.time()
            if self._call(self._connect, self._trainer):
                self._replay()
        if self.client is not None and self.down_since is None:
            if self._call(self.client.log_batch, self.run_id, metrics=self._metrics(rec)):
                return
        elif self.client is not None and time.time() - self._last_try > self.RETRY_S:
            self._last_try = time.time()
            if self._call(self.client.log_batch, self.run_id, metrics=self._metrics(rec)):
                self._replay()
                return
        with open(self.buffer, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _replay(self) -> None:
        if self.client is None or not self.buffer.exists() or self.run_id is None:
            return
        recs = [json.loads(line) for line in self.buffer.read_text().splitlines() if line.strip()]
        metrics = [m for r in recs for m in self._metrics(r)]
        for i in range(0, len(metrics), 500):
            if not self._call(self.client.log_batch, self.run_id, metrics=metrics[i : i + 500]):
                return
        self.buffer.unlink()

    def on_step_end(self, trainer, stats) -> None:
        if not self.active:
            return
        self._trainer = trainer
        li = max(1, self.cfg.trainer.log_interval)
        if stats["step"] % li and stats["step"] != trainer.max_steps:
            return
        keys = ("loss", "nelbo", "grad_norm", "lr", "tokens_per_s", "tflops", "mfu", "data_wait_s", "mem_gib")
        metrics = {f"train/{k}": stats[k] for k in keys if _finite(stats[k])}
        metrics["train/skipped_steps"] = stats["skipped_steps"]
        self._log({"step": stats["step"], "ts": time.time(), "metrics": metrics})

    def on_eval(self, trainer, step, metrics) -> None:
        if self.active:
            self._trainer = trainer
            self._log({"step": step, "ts": time.time(),
                       "metrics": {f"val/{k}": v for k, v in metrics.items() if _finite(v)}})

    def on_fit_end(self, trainer, reason) -> None:
        if not self.active or self.client is None:
            return
        self._replay()
        for name in ("loss_curve.png", "samples.jsonl", "metrics.jsonl"):
            p = self.run_dir / name
            if name == "loss_curve.png":
                from megadiff.tracking.plots import plot_loss_curve

                try:
                    plot_loss_curve(self.run_dir / "metrics.jsonl", p)
                except Exception as e:  # a plot must never fail a run
                    log.warning("loss curve not plotted: %s", e)
            if p.exists():
                self._call(self.client.log_artifact, self.run_id, str(p))
        status = "FINISHED" if reason == "done" else "KILLED" if reason == "preempted" else "FAILED"
        self._call(self.client.set_terminated, self.run_id, status)


def _finite(v: Any) -> bool:
    try:
        return v == v and abs(float(v)) != float("inf")
    except (TypeError, ValueError):
        return False
