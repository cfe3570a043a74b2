"""Acceptance: real `megadiff train` jobs submitted with `megadiff slurm submit` to the local cluster.

A 2-rank CPU job (DP=2, gloo) on the fake 2-GPU node completes with a checkpoint and an MLflow run;
a second run is preempted mid-run with SIGUSR1, checkpoints, is requeued, resumes the same MLflow run
and ends with per-step losses identical to the uninterrupted run.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli, tiny_train_args

from launch import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 60


def _train_args(data: Path, run_dir: Path) -> list[str]:
    return tiny_train_args(data, run_dir, f"trainer.max_steps={STEPS}", "trainer.save_interval=25",
                           "trainer.eval_interval=0", "trainer.log_interval=10")[1:]


def _submit(*args: str) -> str:
    out = run_cli("slurm", "submit", *args, timeout=120)
    m = re.search(r"submitted training: job (\d+)", out.stdout)
    assert m, out.stdout
    return m.group(1)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _mlflow_runs(run_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        return db.execute("select run_uuid, status from runs").fetchall()


def _diagnose(run_dir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*")))


@pytest.fixture(scope="module")
def reference_run(cluster, tiny_data, tmp_path_factory):
    """Uninterrupted: 2 ranks on the fake 2-GPU node (CUDA_VISIBLE_DEVICES=0,1; CPU torch trains with gloo)."""
    rd = tmp_path_factory.mktemp("slurm_train") / "reference"
    job = _submit(*_train_args(tiny_data, rd), "--cluster", "local", "--gpus-per-node", "2", "--time", "00:10:00")
    states = slurm.wait([job], timeout=300)
    assert states[job][0]["JobState"] == "COMPLETED", (states, _diagnose(rd))
    return rd, job


def test_two_rank_cpu_training_job_completes_with_checkpoint_and_mlflow_run(reference_run):
    rd, job = reference_run
    assert (rd / "checkpoints" / "latest").exists() and (rd / "checkpoints" / f"step_{STEPS:06d}").is_dir()
    run_id = (rd / "mlflow_run_id").read_text().strip()
    assert _mlflow_runs(rd) == [(run_id, "FINISHED")]
    assert sorted(_losses(rd)) == list(range(1, STEPS + 1))
    batch_log = (rd / "logs" / f"slurm-{job}.out").read_text()
    assert "2 tasks" in batch_log and "CUDA_VISIBLE_DEVICES=0,1" in batch_log and "finished" in batch_log
    node_logs = list((rd / "logs").glob(f"job{job}-r0-*.log"))
    assert len(node_logs) == 1
    text = node_logs[0].read_text()
    assert re.search(r"^0: ", text, re.M) and re.search(r"^1: ", text, re.M)  # both ranks, labelled
    st = run_cli("slurm", "status", str(rd)).stdout
    assert f"job {job}: COMPLETED" in st and f"step {STEPS}" in st and "marker: DONE" in st


def test_preempted_job_checkpoints_requeues_resumes_with_identical_losses(reference_run, tiny_data):
    ref_dir, _ = reference_run
    rd = ref_dir.parent / "preempted"
    job = _submit(*_train_args(tiny_data, rd), "--cluster", "local", "--gpus-per-node", "0",
                  "--tasks-per-node", "2", "--time", "00:10:00")
    deadline = time.monotonic() + 180
    while not ((rd / "metrics.jsonl").exists() and max(_losses(rd), default=0) >= 10):
        assert time.monotonic() < deadline, _diagnose(rd)
        st = slurm.job_state(job)["members"]
        assert st and st[0]["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (st, _diagnose(rd))
        time.sleep(0.1)
    run_id = (rd / "mlflow_run_id").read_text().strip()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@T sends
    states = slurm.wait([job], timeout=300)
    m = states[job][0]
    assert m["JobState"] == "COMPLETED" and m["Restarts"] == "1", (m, _diagnose(rd))
    batch_log = (rd / "logs" / f"slurm-{job}.out").read_text()
    assert "got SIGUSR1" in batch_log and "exited with code 75" in batch_log and "requeueing job" in batch_log
    first = "".join(p.read_text() for p in (rd / "logs").glob(f"job{job}-r0-*.log"))
    second = "".join(p.read_text() for p in (rd / "logs").glob(f"job{job}-r1-*.log"))
    m_pre = re.search(r"preempted \(SIGUSR1\) at step (\d+): checkpoint saved", first)
    m_res = re.search(r"resumed from \S+step_0*(\d+)", second)
    assert m_pre and m_res and m_pre.group(1) == m_res.group(1), (first[-2000:], second[-2000:])
    assert 10 <= int(m_pre.group(1)) < STEPS  # preempted mid-run, resumed exactly there
    losses, ref = _losses(rd), _losses(ref_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref, [(s, losses[s], ref[s]) for s in ref if losses.get(s) != ref[s]][:5]
    assert (rd / "mlflow_run_id").read_text().strip() == run_id
    assert _mlflow_runs(rd) == [(run_id, "FINISHED")]  # the resumed job continued the same MLflow run
