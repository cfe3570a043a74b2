"""Launching a planned sweep: done/resume bookkeeping, the local executor, the lookup of the others.

Executors other than the built-in ``local`` are entry points of the group ``megadiff.sweep_executors``
(``slurm = "launch.sweep_executor:launch_slurm"`` in pyproject.toml), called as
``fn(plan, runs, parent_id, opts, dry_run=False)``. The MLflow side lives in megadiff/tracking/sweep_runs.py.

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
from megadiff.sweeps.plan import Plan, PlannedRun
from megadiff.tracking import sweep_runs
from megadiff.utils.io import atomic_write_json

DONE_MARKER = "sweep_done.json"


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
    finished = sweep_runs.finished_runs(plan)
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


EXECUTOR_GROUP = "megadiff.sweep_executors"


def executor_names() -> list[str]:
    """Executors other than the built-in `local`: the entry points of the group ``megadiff.sweep_executors``."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=EXECUTOR_GROUP)})


def external_executor(name: str) -> Callable[..., Any]:
    """The executor ``name`` from the entry-point group, called as ``fn(plan, runs, parent_id, opts, dry_run=)``."""
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group=EXECUTOR_GROUP) if ep.name == name]
    if not eps:
        have = ", ".join(["local"] + executor_names())
        raise MegadiffError(
            f"sweep executor {name!r} is not installed: no entry point {name!r} in the group {EXECUTOR_GROUP} "
            f"(installed: {have}). The Slurm executor ships with the repository's launch/ package: reinstall "
            "megadiff from the repository (pip install -e .), or use --executor local"
        )
    try:
        return eps[0].load()
    except ImportError as e:
        raise MegadiffError(f"sweep executor {name!r} ({eps[0].value}) failed to import: {e}") from None

