"""One writer per run directory: a lock file that names its holder (host, pid, Slurm job).

``RUN_DIR/.megadiff.lock`` is created with ``link(2)`` from a fully written temp file, which is
atomic and fails when the file exists, also on NFS. A second writer fails with an error naming the
holder. A lock whose holder is gone is taken over:
- the holder ran on this host and its process is dead (or its pid now belongs to another process),
- the holder was an earlier run (restart) of our own Slurm job (requeue), or
- the holder's Slurm job is no longer running (finished, cancelled, failed, requeued and pending, or
  unknown to the controller).
A holder on another host outside Slurm cannot be checked: the error says how to clear it by hand.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from megadiff import MegadiffError

LOCK_NAME = ".megadiff.lock"
# Slurm job states in which the job's processes may still be running
_LIVE_JOB_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
                              "STAGE_OUT", "RESIZING"})


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if gone, also when
    it has exited but is not reaped yet (a zombie: a killed launcher's orphaned rank can stay one for long
    where PID 1 does not reap)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _proc_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "since": _dt.datetime.now().isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }


def slurm_job_state(job_id: str) -> Optional[str]:
    """``JobState`` of a job from scontrol; "UNKNOWN_JOB" when the controller no longer knows it;
    None when it cannot be asked (no scontrol, controller down)."""
    if not shutil.which("scontrol"):
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "UNKNOWN_JOB" if "Invalid job id" in out.stderr else None
    for tok in out.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return None


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']} (restart {holder.get('slurm_restart', '0')})" \
        if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, since {holder.get('since')}"


def stale_reason(holder: dict, me: dict) -> Optional[str]:
    """Why ``holder`` no longer writes (its lock may be taken over), or None when it may still be running."""
    if holder.get("host") == me["host"]:
        pid = int(holder.get("pid", 0))
        start = _proc_start(pid) if pid > 0 else None
        if start is None or (holder.get("pid_start") and start != holder["pid_start"]):
            return f"process {pid} on {me['host']} is gone"
        return None
    job = holder.get("slurm_job_id")
    if job:
        if job == me["slurm_job_id"] and holder.get("slurm_restart") != me["slurm_restart"]:
            return f"it was restart {holder.get('slurm_restart')} of this job ({job}), now requeued"
        state = slurm_job_state(job)
        if state is not None and state.split()[0].rstrip("+") not in _LIVE_JOB_STATES:
            return f"Slurm job {job} is {state.lower()}"
    return None


class RunLock:
    """``RunLock(run_dir).acquire()`` ... ``.release()``; or ``with hold_run_dir(run_dir):``."""

    def __init__(self, run_dir: str | os.PathLike, echo=print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.me = _me()
        self.echo = echo

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.me['token']}.tmp")
        tmp.write_text(json.dumps(self.me, indent=1) + "\n")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": 0, "host": "?", "since": "?", "token": "unreadable"}

    def _take_over(self, holder: dict, reason: str) -> None:
        """Move the stale lock aside; put it back if what we moved turns out to be someone else's fresh lock."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first; try again
        moved = json.loads(aside.read_text() or "{}") if aside.stat().st_size else {}
        if moved.get("token") != holder.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        else:
            self.echo(f"run dir {self.run_dir}: taking over the lock of {describe(holder)}: {reason}")
        aside.unlink(missing_ok=True)

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                return self
            holder = self._read()
            if holder is None:
                continue
            reason = stale_reason(holder, self.me)
            same_host = holder.get("host") == self.me["host"]
            for _ in range(20 if same_host else 0):  # a holder killed a moment ago may still be exiting
                if reason is not None:
                    break
                time.sleep(0.1)
                reason = stale_reason(holder, self.me)
            if reason is None:
                raise MegadiffError(
                    f"run directory {self.run_dir} is in use by another writer: {describe(holder)} (lock file "
                    f"{self.path}). Wait for it to finish or stop it (`megadiff slurm cancel RUN_DIR`, or kill that "
                    f"process), or use another trainer.run_dir; if that writer is gone, delete {self.path}"
                )
            self._take_over(holder, reason)
        raise MegadiffError(f"could not take the lock {self.path}: other processes keep taking it; try again")

    def release(self) -> None:
        holder = self._read()
        if holder and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_run_dir(run_dir: str | os.PathLike, rank: Optional[int] = None) -> Iterator[Optional[RunLock]]:
    """Hold the run dir's lock on rank 0 (``RANK`` from the environment by default); other ranks do nothing."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        yield None
        return
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
