"""Launching a planned sweep: the MLflow parent run, done/resume bookkeeping, local and Slurm executors.

Sweep directory (``out_dir`` of the sweep file)::

    plan.json            the plan as launched (run names, N, D, C, overrides)
    sweep_state.json     sweep id, tracking URI, experiment, parent MLflow run id
    mlflow.db            the shared MLflow store (default tracking URI)
    mlartifacts/         MLflow artifacts of the parent and every run
    <run name>/          trainer.run_dir of each run (checkpoints, metrics, logs)
        sweep_done.json  written when `megadiff train` exited 0 (local executor)
        slurm/DONE       written by the Slurm batch script when the trainer exited 0

A run counts as finished when either marker exists or its MLflow run has status FINISHED.
Relaunching skips finished runs and starts the others again with the same command: the trainer
resumes from ``<run_dir>/checkpoints/latest`` and continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from megadiff import MegadiffError
from megadiff.sweeps.plan import TAG_ROLE, TAG_RUN, TAG_SWEEP, Plan, PlannedRun
from megadiff.utils.io import atomic_write_json

DONE_MARKER = "sweep_done.json"


# ----------------------------------------------------------------------------- MLflow


def _client(uri: str):
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


def ensure_parent(plan: Plan) -> str:
    """Get or create the sweep's parent MLflow run; log the plan to it. Returns its run id."""
    client = _client(plan.tracking_uri)
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


def mlflow_runs(plan: Plan) -> dict[str, Any]:
    """Latest MLflow run per sweep run name (FINISHED preferred)."""
    client = _client(plan.tracking_uri)
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


# ----------------------------------------------------------------------------- state


def is_done(run: PlannedRun, finished_in_mlflow: set[str] = frozenset()) -> bool:
    d = Path(run.run_dir)
    return (d / DONE_MARKER).exists() or (d / "slurm" / "DONE").exists() or run.name in finished_in_mlflow


def run_state(run: PlannedRun, finished_in_mlflow: set[str] = frozenset()) -> str:
    if not run.ok:
        return "refused"
    if is_done(run, finished_in_mlflow):
        return "done"
    if (Path(run.run_dir) / "checkpoints" / "latest").exists():
        return "partial"
    if Path(run.run_dir).exists():
        return "started"
    return "new"


def write_state(plan: Plan, parent_id: str) -> None:
    atomic_write_json(Path(plan.out_dir) / "sweep_state.json", {
        "sweep_id": plan.sweep_id, "tracking_uri": plan.tracking_uri, "experiment": plan.experiment,
        "parent_run_id": parent_id,
    })


def check_relaunch(plan: Plan, force: bool = False) -> None:
    """Refuse to resume a started run whose training overrides changed since it was launched."""
    old_file = Path(plan.out_dir) / "plan.json"
    if not old_file.exists() or force:
        return
    old = Plan.from_json(json.loads(old_file.read_text()))
    old_runs = {r.name: r for r in old.runs}
    changed = []
    for r in plan.feasible:
        o = old_runs.get(r.name)
        if o is not None and Path(r.run_dir).exists() and o.overrides != r.overrides:
            diff = sorted(set(r.overrides) ^ set(o.overrides))
            changed.append(f"{r.name}: {diff[:4]}")
    if changed:
        raise MegadiffError(
            "the sweep file changed for runs that already started (resuming them would mix two settings):\n  "
            + "\n  ".join(changed) + "\nuse a new sweep name/out_dir, delete those run dirs, or pass --force"
        )


def pending_runs(plan: Plan) -> tuple[list[PlannedRun], list[PlannedRun]]:
    """(finished, to run) among the feasible runs; marks MLflow-FINISHED runs done on disk."""
    finished = {n for n, r in mlflow_runs(plan).items() if r.info.status == "FINISHED"}
    done, todo = [], []
    for r in plan.feasible:
        if is_done(r, finished):
            if not (Path(r.run_dir) / DONE_MARKER).exists():
                atomic_write_json(Path(r.run_dir) / DONE_MARKER, {"source": "mlflow FINISHED", "time": time.time()})
            done.append(r)
        else:
            todo.append(r)
    return done, todo


# ----------------------------------------------------------------------------- executors


def train_argv(plan: Plan, run: PlannedRun, parent_id: str | None, command: list[str] | None = None) -> list[str]:
    base = list(command) if command else [sys.executable, "-m", "megadiff.cli", "train"]
    return base + [plan.base_config] + run.train_overrides(parent_id)


_RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"    (cannot read {path}: {e})"
    return "\n".join("    " + ln for ln in lines[-n:])


def launch_local(plan: Plan, runs: list[PlannedRun], parent_id: str, *, parallel: int = 1,
                 command: list[str] | None = None, echo: Callable[[str], None] = print) -> dict[str, int]:
    """Run `megadiff train` for each run (up to `parallel` at once); returns {run name: exit code}."""
    # each run is its own job: rendezvous/rank variables of the calling process must not leak into it
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    queue = list(runs)
    live: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    codes: dict[str, int] = {}
    try:
        while queue or live:
            while queue and len(live) < max(1, parallel):
                r = queue.pop(0)
                Path(r.run_dir).mkdir(parents=True, exist_ok=True)
                log = open(Path(r.run_dir) / "sweep_train.log", "ab")
                argv = train_argv(plan, r, parent_id, command)
                log.write(f"\n# {time.ctime()}: {' '.join(argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                live[r.name] = (proc, log, time.time())
                echo(f"[sweep {plan.sweep_id}] started {r.name} (pid {proc.pid}; log {log.name})")
            time.sleep(0.5)
            for name, (proc, log, t0) in list(live.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del live[name]
                codes[name] = rc
                r = plan.run(name)
                if rc == 0:
                    atomic_write_json(Path(r.run_dir) / DONE_MARKER,
                                      {"source": "local executor", "time": time.time(), "seconds": time.time() - t0})
                    echo(f"[sweep {plan.sweep_id}] finished {name} in {time.time() - t0:.0f}s")
                else:
                    echo(f"[sweep {plan.sweep_id}] FAILED {name} (exit {rc}); see {log.name}; its last lines:")
                    echo(_tail(Path(log.name), 12))
    except BaseException:
        for proc, _log, _ in live.values():  # only the processes this function started
            proc.terminate()
        for proc, log, _ in live.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        raise
    return codes


def launch_slurm(plan: Plan, runs: list[PlannedRun], parent_id: str, slurm_opts: dict[str, Any],
                 dry_run: bool = False):
    """Submit the runs as one job array through launch/slurm.py (`submit_array`)."""
    try:
        from launch import slurm as slurm_launch
    except ImportError as e:
        raise MegadiffError(f"the Slurm executor needs launch/slurm.py ({e})") from None
    opts = dict(slurm_opts)
    cluster = opts.pop("cluster", None)
    if not cluster:
        names = slurm_launch.profile_names()
        raise MegadiffError(
            "set launch.slurm.cluster in the sweep file (or --cluster): a profile from slurm/clusters/ "
            f"({', '.join(names) or 'none found'}) or a profile YAML path"
        )
    allowed = {"nodes", "gpus_per_node", "tasks_per_node", "time", "max_parallel", "requeue", "dependency",
               "sbatch_extra"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise MegadiffError(f"launch.slurm: unknown keys {bad}; allowed: cluster, {', '.join(sorted(allowed))}")
    specs = [slurm_launch.RunSpec(plan.base_config, r.train_overrides(parent_id)) for r in runs]
    return slurm_launch.submit_array(specs, cluster, sweep_dir=plan.out_dir, dry_run=dry_run, **opts)


def finish_parent(plan: Plan, parent_id: str) -> None:
    """Mark the parent run FINISHED once every feasible run is done (a relaunch may reopen nothing)."""
    _client(plan.tracking_uri).set_terminated(parent_id, "FINISHED")
