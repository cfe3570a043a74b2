"""One writer per run directory (megadiff/utils/runlock.py): a second writer fails naming the holder; the
lock of a dead process, a reused pid, or a finished/cancelled Slurm job (on another node) is taken over."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ENV, ROOT, run_cli

from megadiff import MegadiffError
from megadiff.utils.runlock import LOCK_NAME, RunLock, hold_run_dir

HOLD = ("import sys, time; from megadiff.utils.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('HELD', flush=True); time.sleep(float(sys.argv[2])); lock.release()")
TRY = ("import sys; from megadiff import MegadiffError; from megadiff.utils.runlock import RunLock\n"
       "try:\n    RunLock(sys.argv[1], echo=lambda m: print('TAKEOVER', m)).acquire(); print('ACQUIRED')\n"
       "except MegadiffError as e:\n    print('REFUSED', e)")
PYENV = dict(ENV, PYTHONPATH=str(ROOT))


def _holder(run_dir: Path, seconds: float = 300) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], stdout=subprocess.PIPE, text=True,
                         env=PYENV)
    assert p.stdout.readline().strip() == "HELD"
    return p


def test_second_writer_fails_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    rd = tmp_path / "run"
    holder = _holder(rd)
    try:
        with pytest.raises(MegadiffError, match=rf"in use by another writer: pid {holder.pid} on host "
                                                rf"{socket.gethostname()}, since .*delete {rd / LOCK_NAME}"):
            RunLock(rd).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing: the lock file stays
        holder.wait()
    assert json.loads((rd / LOCK_NAME).read_text())["pid"] == holder.pid
    said = []
    lock = RunLock(rd, echo=said.append).acquire()
    assert f"taking over the lock of pid {holder.pid}" in said[0] and "is gone" in said[0]
    assert json.loads((rd / LOCK_NAME).read_text())["token"] == lock.me["token"]
    lock.release()
    assert not (rd / LOCK_NAME).exists() and os.listdir(rd) == []


def test_a_killed_but_unreaped_holders_lock_is_taken_over(tmp_path):
    """A holder killed but not yet reaped (a zombie: an orphaned rank of a killed launcher where PID 1 does not
    reap) has exited: its lock is taken over, as a resumed job right after a kill needs."""
    rd = tmp_path / "run"
    holder = _holder(rd)
    holder.send_signal(signal.SIGKILL)
    deadline = time.time() + 30
    while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline, "the killed holder did not become a zombie"
        time.sleep(0.01)
    try:  # not reaped yet: /proc still lists the pid
        said = []
        lock = RunLock(rd, echo=said.append).acquire()
        assert f"taking over the lock of pid {holder.pid}" in said[0]
        lock.release()
    finally:
        holder.wait()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    """The lock names pid + process start time: our own (live) pid with another start time is stale."""
    rd = tmp_path / "run"
    rd.mkdir()
    me = RunLock(rd).me
    (rd / LOCK_NAME).write_text(json.dumps(dict(me, pid_start="1", token="old")))
    with hold_run_dir(rd, rank=0) as lock:
        assert json.loads((rd / LOCK_NAME).read_text())["token"] == lock.me["token"]
    with hold_run_dir(rd, rank=1) as lock:  # only rank 0 takes the lock
        assert lock is None and not (rd / LOCK_NAME).exists()


@pytest.mark.slow
def test_megadiff_train_refuses_a_run_dir_with_a_live_writer(tmp_path, tiny_data):
    from conftest import tiny_train_args

    rd = tmp_path / "run"
    holder = _holder(rd)
    try:
        out = run_cli(*tiny_train_args(tiny_data, rd, "trainer.max_steps=2"), check=False, timeout=300)
    finally:
        holder.terminate()
        holder.wait()
    assert out.returncode != 0 and f"in use by another writer: pid {holder.pid}" in out.stderr, out.stderr[-3000:]
    assert not (rd / "checkpoints").exists() and not (rd / "metrics.jsonl").exists()


def _sbatch(node: str, code: str, rd: Path, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", "-w", node, "-o", str(rd.parent / f"%j-{node}.out"),
                          f"--export=ALL,PYTHONPATH={ROOT}", "--wrap",
                          shlex.join([sys.executable, "-c", code, str(rd), *args])],
                         capture_output=True, text=True, env=ENV, check=True)
    return out.stdout.strip().split(";")[0]


def _output(rd: Path, job: str, node: str, want: str, timeout: float = 60) -> str:
    f = rd.parent / f"{job}-{node}.out"
    deadline = time.monotonic() + timeout
    while not (f.exists() and want in f.read_text()):
        assert time.monotonic() < deadline, f"{f}: {f.read_text() if f.exists() else 'missing'}"
        time.sleep(0.2)
    return f.read_text()


@pytest.mark.slurm
def test_lock_across_two_nodes_refuses_a_running_job_and_takes_over_a_cancelled_ones(cluster, tmp_path):
    from launch import slurm

    rd = tmp_path / "shared_run"
    first = _sbatch("mdnode1", HOLD, rd, "300")
    _output(rd, first, "mdnode1", "HELD")
    second = _sbatch("mdnode2", TRY, rd)
    refused = _output(rd, second, "mdnode2", "REFUSED")
    assert f"host mdnode1, Slurm job {first} (restart 0)" in refused, refused
    subprocess.run(["scancel", first], check=True, env=ENV)  # SIGTERM kills the holder: its lock file stays
    slurm.wait([first], timeout=60)
    assert json.loads((rd / LOCK_NAME).read_text())["slurm_job_id"] == first
    third = _sbatch("mdnode2", TRY, rd)
    took = _output(rd, third, "mdnode2", "ACQUIRED")
    assert f"TAKEOVER run dir {rd}: taking over the lock of pid" in took and f"Slurm job {first} is cancelled" in took
