"""The Slurm launcher against the real local cluster (tools/local_slurm.sh start): submission, fake GPUs,
job arrays, dependency chains, the SIGUSR1 -> checkpoint -> exit 75 -> requeue path, cancel, bad input
(the Ray data-pipeline template runs across both nodes in test_slurm_ray.py).

The trainer stand-in below is a small program with the trainer's signal/exit-code contract (SIGUSR1 or
SIGTERM: save, exit 75; resume from its saved state). It tests the batch script's trap/forward/requeue
logic with real sbatch/srun/scontrol; the real trainer runs in test_slurm_train.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import slurm
from launch.slurm import JobRequest
from megadiff import MegadiffError

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]

STANDIN = r'''
import os, signal, sys, time
run_dir, steps = sys.argv[1], int(sys.argv[2])
rank = os.environ["RANK"]
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
ckpt = os.path.join(run_dir, f"ckpt.rank{rank}")
start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
with open(os.path.join(run_dir, f"events.rank{rank}"), "a") as f:
    f.write(f"start {start} restart={os.environ.get('SLURM_RESTART_COUNT', '0')} world={os.environ['WORLD_SIZE']} "
            f"cvd={os.environ.get('CUDA_VISIBLE_DEVICES', '')} master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}\n")
for step in range(start, steps):
    if got:
        open(ckpt, "w").write(str(step))
        with open(os.path.join(run_dir, f"events.rank{rank}"), "a") as f:
            f.write(f"signal {got[0]} saved {step}\n")
        sys.exit(75)
    time.sleep(0.1)
with open(os.path.join(run_dir, f"events.rank{rank}"), "a") as f:
    f.write(f"done {steps}\n")
'''


@pytest.fixture
def standin(tmp_path):
    p = tmp_path / "standin.py"
    p.write_text(STANDIN)
    return p


def _cmd(standin, run_dir, steps):
    return [sys.executable, str(standin), str(run_dir), str(steps)]


def _events(run_dir, rank):
    f = Path(run_dir) / f"events.rank{rank}"
    return f.read_text().splitlines() if f.exists() else []


def _wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _member_states(states):
    return [m["JobState"] for ms in states.values() for m in ms]


def test_trivial_job_two_tasks_runs_and_leaves_per_node_logs(cluster, tmp_path, standin):
    rd = tmp_path / "run"
    req = JobRequest(name="md-test-trivial", run_dirs=[rd], commands=[_cmd(standin, rd, 3)], tasks_per_node=2,
                     gpus_per_node=0, time="00:05:00")
    sub = slurm.submit(req, cluster)
    states = slurm.wait(sub.job_ids, timeout=120)
    assert _member_states(states) == ["COMPLETED"], states
    for rank in (0, 1):
        ev = _events(rd, rank)
        assert ev[0].startswith("start 0 restart=0 world=2") and ev[-1] == "done 3", ev
    assert (rd / "slurm" / "DONE").exists()
    assert (rd / "slurm" / "job-000.sbatch").is_file()
    logs = slurm.log_files(rd)
    names = [p.name for p in logs]
    host = slurm.job_state(sub.job_id)["members"][0]["NodeList"]  # a one-node job: one node name
    assert f"slurm-{sub.job_id}.out" in names and f"job{sub.job_id}-r0-{host}.log" in names, names
    assert "finished" in (rd / "logs" / f"slurm-{sub.job_id}.out").read_text()
    st = slurm.status(rd)
    assert st["jobs"][0]["members"][0]["JobState"] == "COMPLETED" and st["marker"] == "DONE"


def test_fake_two_gpu_node_gives_each_rank_two_devices(cluster, tmp_path, standin):
    rd = tmp_path / "gpu"
    req = JobRequest(name="md-test-gpu", run_dirs=[rd], commands=[_cmd(standin, rd, 1)], gpus_per_node=2,
                     time="00:05:00")
    text = slurm.render(req, cluster)
    assert "#SBATCH --gpus-per-node=2" in text and "#SBATCH --ntasks-per-node=2" in text
    sub = slurm.submit(req, cluster)
    assert _member_states(slurm.wait(sub.job_ids, timeout=120)) == ["COMPLETED"]
    for rank in (0, 1):
        assert "world=2 cvd=0,1 " in _events(rd, rank)[0]
    assert "CUDA_VISIBLE_DEVICES=0,1" in (rd / "logs" / f"slurm-{sub.job_id}.out").read_text()


def test_job_array_runs_every_member_in_its_own_run_dir(cluster, tmp_path, standin):
    rds = [tmp_path / f"member{i}" for i in range(3)]
    req = JobRequest(name="md-test-array", run_dirs=rds, commands=[_cmd(standin, rd, 2) for rd in rds],
                     gpus_per_node=0, array_parallel=2, time="00:05:00", script_dir=tmp_path / "sweep" / "slurm")
    sub = slurm.submit(req, cluster)
    states = slurm.wait(sub.job_ids, timeout=180)
    assert _member_states(states) == ["COMPLETED"] * 3, states
    for rd in rds:
        assert _events(rd, 0)[-1] == "done 2" and (rd / "slurm" / "DONE").exists()
        assert list((rd / "logs").glob(f"job{sub.job_id}_*-r0-*.log"))
    assert len(list((tmp_path / "sweep" / "logs").glob(f"slurm-{sub.job_id}_*.out"))) == 3


def test_dependency_chain_runs_in_order_and_resumes(cluster, tmp_path, standin):
    """requeue-mode chain: 3 jobs linked by --dependency=singleton; each link is 'preempted' once."""
    rd = tmp_path / "chain"
    # each link is signalled while running (as a time limit would); the last link finishes the run
    req = JobRequest(name=f"md-test-chain-{os.getpid()}", run_dirs=[rd], commands=[_cmd(standin, rd, 30)],
                     gpus_per_node=0, requeue="chain", chain=3, time="00:05:00")
    sub = slurm.submit(req, cluster)
    assert len(sub.job_ids) == 3
    for link in range(2):
        _wait_for(lambda n=link: sum(e.startswith("start") for e in _events(rd, 0)) > n, 60, f"link {link} start")
        time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", sub.job_ids[link]], check=True)
    states = slurm.wait(sub.job_ids, timeout=180)
    assert _member_states(states) == ["COMPLETED"] * 3, states
    ev = _events(rd, 0)
    starts = [e for e in ev if e.startswith("start")]
    assert len(starts) == 3 and ev[-1] == "done 30", ev
    assert [e.split()[0] for e in ev] == ["start", "signal", "start", "signal", "start", "done"], ev
    saved = [int(e.split()[-1]) for e in ev if e.startswith("signal")]
    assert [int(s.split()[1]) for s in starts] == [0, *saved]  # each link resumed where the last one saved
    ends = [states[j][0]["EndTime"] for j in sub.job_ids]
    begins = [states[j][0]["StartTime"] for j in sub.job_ids]
    assert begins[1] >= ends[0] and begins[2] >= ends[1], (begins, ends)


def test_usr1_is_forwarded_the_trainer_exits_75_and_the_job_is_requeued(cluster, tmp_path, standin):
    rd = tmp_path / "preempt"
    req = JobRequest(name="md-test-requeue", run_dirs=[rd], commands=[_cmd(standin, rd, 40)], tasks_per_node=2,
                     gpus_per_node=0, time="00:05:00")
    sub = slurm.submit(req, cluster)
    _wait_for(lambda: _events(rd, 0) and _events(rd, 1), 60, "ranks started")
    time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", sub.job_id], check=True)
    states = slurm.wait(sub.job_ids, timeout=180)
    m = states[sub.job_id][0]
    assert m["JobState"] == "COMPLETED" and m["Restarts"] == "1", m
    for rank in (0, 1):
        ev = _events(rd, rank)
        assert ev[0].startswith("start 0 restart=0") and ev[1].startswith("signal USR1 saved"), ev
        saved = int(ev[1].split()[-1])
        assert 0 < saved < 40 and ev[2].startswith(f"start {saved} restart=1") and ev[3] == "done 40", ev
    out = (rd / "logs" / f"slurm-{sub.job_id}.out").read_text()
    assert "got SIGUSR1; forwarding" in out and "requeueing job" in out and "finished" in out
    assert list((rd / "logs").glob(f"job{sub.job_id}-r1-*.log"))  # the restart logs separately


def test_cancel_checkpoints_and_does_not_requeue(cluster, tmp_path, standin):
    rd = tmp_path / "cancel"
    req = JobRequest(name="md-test-cancel", run_dirs=[rd], commands=[_cmd(standin, rd, 600)], gpus_per_node=0,
                     time="00:05:00")
    sub = slurm.submit(req, cluster)
    _wait_for(lambda: _events(rd, 0), 60, "started")
    assert slurm.cancel(rd) == [sub.job_id]
    states = slurm.wait(sub.job_ids, timeout=120)
    assert _member_states(states) == ["CANCELLED"], states
    _wait_for(lambda: len(_events(rd, 0)) >= 2, 30, "checkpoint on SIGTERM")
    assert _events(rd, 0)[1].startswith("signal TERM saved")
    assert (rd / "slurm" / "CANCELLED").exists() and states[sub.job_id][0]["Restarts"] == "0"


def _queued(name):
    return subprocess.run(["squeue", "-h", "-n", name], capture_output=True, text=True).stdout.strip()


def test_bad_input_against_the_real_cluster_submits_nothing(cluster, tmp_path):
    tiny = str(REPO / "configs" / "tiny_cpu.yaml")
    mega = [sys.executable, "-m", "megadiff.cli", "slurm", "submit", tiny, f"trainer.run_dir={tmp_path}/r"]
    cases = [
        (["--cluster", "nope"], "unknown cluster profile 'nope'"),
        (["--cluster", "local", "--gpus-per-node", "3"], "--gpus-per-node 3 is impossible"),
    ]
    big = tmp_path / "big.yaml"  # a profile promising more GPUs than the node really has
    big.write_text("partition: debug\ngpus_per_node: 8\ncpus_per_gpu: 1\n")
    cases.append((["--cluster", str(big), "--gpus-per-node", "4"], "largest node has 2 GPU"))
    for extra, msg in cases:
        out = subprocess.run(mega + extra, capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 2 and msg in out.stderr, (extra, out.stderr)
    with pytest.raises(MegadiffError, match="4 CPUs is impossible"):
        slurm.check_request(JobRequest(name="x", run_dirs=[tmp_path], commands=[["true"]], tasks_per_node=4),
                            cluster, slurm.query_nodes())
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # python but no sbatch
    out = subprocess.run(mega + ["--cluster", "local"], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2 and "sbatch not found on PATH" in out.stderr, out.stderr
    assert not (tmp_path / "r").exists() and not _queued(slurm.job_name(tmp_path / "r"))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEGADIFF_SLURM_TIMELIMIT_TEST"),
                    reason="takes 1.5-3 min: set MEGADIFF_SLURM_TIMELIMIT_TEST=1 to run it")
def test_time_limit_signal_saves_and_requeues_until_done(cluster, tmp_path, standin):
    """The real `--signal=B:USR1@T` timer: a 70 s job under a 1 min limit finishes through requeues."""
    rd = tmp_path / "limit"
    req = JobRequest(name="md-test-limit", run_dirs=[rd], commands=[_cmd(standin, rd, 700)], gpus_per_node=0,
                     time="00:01:00", signal_seconds=30)
    sub = slurm.submit(req, cluster)
    states = slurm.wait(sub.job_ids, timeout=600)
    m = states[sub.job_id][0]
    ev = _events(rd, 0)
    assert m["JobState"] == "COMPLETED" and int(m["Restarts"]) >= 1 and ev[-1] == "done 700", (m, ev)
    assert sum(e.startswith("signal USR1") for e in ev) == int(m["Restarts"])


def _procs(names: set[str]) -> list[str]:
    """Processes named one of ``names``, and the `sleep 314` of the test's job."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            comm, cmd = (d / "comm").read_text().strip(), (d / "cmdline").read_text()
        except OSError:
            continue
        if d.name.isdigit() and (comm in names or (comm == "sleep" and cmd.endswith("\0" "314\0"))):
            out.append(f"{d.name}:{comm}")
    return out


def test_start_refuses_next_to_a_foreign_slurmctld_and_stop_leaves_nothing_running(cluster, tmp_path):
    script = str(REPO / "tools" / "local_slurm.sh")
    fake = tmp_path / "slurmctld"  # a process named slurmctld that the script did not start
    shutil.copy("/bin/sleep", fake)
    foreign = subprocess.Popen([str(fake), "60"])
    try:
        out = subprocess.run(["bash", script, "start"], capture_output=True, text=True)
    finally:
        foreign.kill()
        foreign.wait()
    assert out.returncode == 1 and f"a slurmctld not started by this script is running (pid {foreign.pid})" in out.stderr
    # a job step left running when the cluster stops is killed with it
    job = subprocess.run(["sbatch", "--parsable", "-N", "2", "-o", str(tmp_path / "%j.out"), "--wrap", "srun sleep 314"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        _wait_for(lambda: len(_procs(set())) >= 2 or None, 60, f"job {job} running")  # one per node
        out = subprocess.run(["bash", script, "stop"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert _procs({"slurmctld", "slurmd", "slurmstepd", "munged"}) == []
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert "mdslurm" not in links and not list(Path("/run/netns").glob("mdslurm-*"))
    finally:
        subprocess.run(["bash", script, "start"], check=True, timeout=120)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True).stdout.split("\n")
    assert sorted(n for n in nodes if n) == ["mdnode1 idle", "mdnode2 idle"]
