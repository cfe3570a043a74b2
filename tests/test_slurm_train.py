"""Acceptance: real `megadiff train` jobs submitted with `megadiff slurm submit` to the local cluster.

A 2-rank CPU job (DP=2, gloo) on one fake 2-GPU node completes with a checkpoint and an MLflow run (the
reference). The same layout across the two test nodes (one rank per node) is preempted mid-run with SIGUSR1,
checkpoints, is requeued as a whole, resumes the same MLflow run and ends with per-step losses identical to
the reference. A two-node job that loses a node ends with a clear state; a resubmit resumes from the last
complete checkpoint with the reference's losses.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, tiny_train_args

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


def _wait_for_step(rd: Path, job: str, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ((rd / "metrics.jsonl").exists() and max(_losses(rd), default=0) >= step):
        assert time.monotonic() < deadline, _diagnose(rd)
        st = slurm.job_state(job)["members"]
        assert st and st[0]["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (st, _diagnose(rd))
        time.sleep(0.1)


def _node_log(rd: Path, job: str, restart: int, node: str) -> str:
    return (rd / "logs" / f"job{job}-r{restart}-{node}.log").read_text()


def test_two_node_job_preempted_requeues_as_a_whole_and_matches_the_one_node_losses(reference_run, tiny_data):
    """`--nodes 2`: one rank per node (one per fake GPU), env:// rendezvous at the first node's address,
    gloo between the namespaces; SIGUSR1 mid-run -> every rank stops at the same step, checkpoint, exit 75,
    the whole job is requeued and resumes; per-step losses equal the uninterrupted one-node 2-rank run."""
    ref_dir, _ = reference_run
    rd = ref_dir.parent / "two_nodes"
    job = _submit(*_train_args(tiny_data, rd), "--cluster", "local", "--nodes", "2", "--gpus-per-node", "1",
                  "--time", "00:10:00")
    _wait_for_step(rd, job, 10)
    run_id = (rd / "mlflow_run_id").read_text().strip()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@T sends
    states = slurm.wait([job], timeout=300)
    m = states[job][0]
    assert m["JobState"] == "COMPLETED" and m["Restarts"] == "1" and m["NodeList"] == "mdnode[1-2]", (m, _diagnose(rd))
    batch_log = (rd / "logs" / f"slurm-{job}.out").read_text()
    assert "2 tasks, master 10.87.0.11:" in batch_log, batch_log  # the first node's address, not its name
    assert "got SIGUSR1" in batch_log and "exited with code 75" in batch_log and "requeueing job" in batch_log
    for restart in (0, 1):  # rank 0 on the first node, rank 1 on the second, in both runs of the job
        assert re.search(r"^0: ", _node_log(rd, job, restart, "mdnode1"), re.M)
        assert re.search(r"^1: ", _node_log(rd, job, restart, "mdnode2"), re.M)
        assert not re.search(r"^0: ", _node_log(rd, job, restart, "mdnode2"), re.M)
    m_pre = re.search(r"preempted \(SIGUSR1\) at step (\d+): checkpoint saved", _node_log(rd, job, 0, "mdnode1"))
    m_res = re.search(r"resumed from \S+step_0*(\d+)", _node_log(rd, job, 1, "mdnode1"))
    assert m_pre and m_res and m_pre.group(1) == m_res.group(1), _diagnose(rd)
    assert 10 <= int(m_pre.group(1)) < STEPS  # preempted mid-run, resumed exactly there
    losses, ref = _losses(rd), _losses(ref_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref, [(s, losses[s], ref[s]) for s in ref if losses.get(s) != ref[s]][:5]
    assert (rd / "mlflow_run_id").read_text().strip() == run_id
    assert _mlflow_runs(rd) == [(run_id, "FINISHED")]  # the requeued job continued the same MLflow run
    assert (rd / "checkpoints" / f"step_{STEPS:06d}").is_dir() and not (rd / ".megadiff.lock").exists()


def test_node_lost_mid_job_ends_with_a_clear_state_and_a_resubmit_resumes(cluster, tiny_data, tmp_path):
    """A node lost as a whole (tools/local_slurm.sh lose-node: slurmd, slurmstepd and the rank killed) ends the
    job; `megadiff slurm status` says so; the same submit again resumes from the last complete checkpoint and
    recomputes the lost steps with identical losses (a shorter run than the reference: its LR schedule differs)."""
    rd = tmp_path / "node_lost"
    steps = 32  # a shorter run: lost after the step-25 checkpoint, resumed there
    args = (*_train_args(tiny_data, rd), f"trainer.max_steps={steps}", "--cluster", "local", "--nodes", "2",
            "--gpus-per-node", "1", "--time", "00:10:00", "--requeue-mode", "none")
    job = _submit(*args)
    try:
        _wait_for_step(rd, job, 27)  # past the step-25 checkpoint
        subprocess.run(["bash", str(ROOT / "tools" / "local_slurm.sh"), "lose-node", "mdnode2"], check=True)
        states = slurm.wait([job], timeout=120)
    finally:
        subprocess.run(["bash", str(ROOT / "tools" / "local_slurm.sh"), "start"], check=True)
    state = states[job][0]["JobState"]
    assert state in ("FAILED", "NODE_FAIL"), (states, _diagnose(rd))
    st = run_cli("slurm", "status", str(rd)).stdout
    assert re.search(rf"job {job}: {state}\b.* nodes mdnode\[1-2\]", st), st
    before = _losses(rd)  # the lost job's steps (metrics.jsonl is cut back to the checkpoint on resume)
    lost_at = max(before)
    job2 = _submit(*args)
    states = slurm.wait([job2], timeout=300)
    assert states[job2][0]["JobState"] == "COMPLETED", (states, _diagnose(rd))
    m_res = re.search(r"resumed from \S+step_0*(\d+)", _node_log(rd, job2, 0, "mdnode1"))
    assert m_res and 25 <= int(m_res.group(1)) <= lost_at, _diagnose(rd)
    # the steps after the checkpoint ran twice: in the lost job and again after the resume, with equal losses
    resumed, after = int(m_res.group(1)), _losses(rd)
    assert sorted(after) == list(range(1, steps + 1)) and resumed < lost_at
    assert {s_: after[s_] for s_ in before} == before, [(s_, before[s_], after[s_]) for s_ in before]
