"""Following a run's jobs: state (scontrol, then sacct), training progress, logs, cancel, wait."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from launch.request import parse_kv
from megadiff import MegadiffError
from megadiff.utils.io import atomic_write_text


def job_records(run_dir: str | Path) -> list[dict]:
    f = Path(run_dir) / "slurm" / "jobs.jsonl"
    if not f.is_file():
        raise MegadiffError(f"{run_dir} has no Slurm jobs (no {f}); submit with `megadiff slurm submit`")
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def job_state(job_id: str) -> dict:
    """State of one job (or array) from scontrol, then sacct, then sacct -c (jobcomp file)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            rows = [parse_kv(line) for line in out.stdout.splitlines() if line.strip()]
            return {
                "job_id": job_id,
                "members": [
                    {k: r.get(k, "") for k in ("JobId", "ArrayTaskId", "JobState", "Reason", "RunTime", "Restarts",
                                                "ExitCode", "NodeList", "StartTime", "EndTime")}
                    for r in rows
                ],
            }
    if shutil.which("sacct"):
        for extra in ([], ["-c"]):
            out = subprocess.run(
                ["sacct", *extra, "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Elapsed,NodeList"],
                capture_output=True, text=True,
            )
            lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
            if out.returncode == 0 and lines:
                members = []
                for ln in lines:
                    jid, st, ec, el, nl = (ln.split("|") + [""] * 5)[:5]
                    members.append({"JobId": jid, "JobState": st, "ExitCode": ec, "RunTime": el, "NodeList": nl})
                return {"job_id": job_id, "members": members}
    return {"job_id": job_id, "members": [], "unknown": True}


def run_progress(run_dir: Path) -> dict:
    out: dict = {}
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        out["latest_checkpoint"] = os.path.realpath(latest) if latest.is_symlink() else latest.read_text().strip()
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            tail = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip().startswith("{")]
        if tail:
            try:
                last = json.loads(tail[-1])
                out["last_step"] = {k: last[k] for k in ("step", "loss") if k in last}
            except json.JSONDecodeError:
                pass
    for marker in ("DONE", "CANCELLED"):
        if (run_dir / "slurm" / marker).exists():
            out["marker"] = marker
    return out


def status(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir).absolute()
    recs = job_records(run_dir)
    jobs = [job_state(j) for rec in recs[-3:] for j in rec["job_ids"]]
    return {"run_dir": str(run_dir), "jobs": jobs, **run_progress(run_dir)}


def log_files(run_dir: str | Path, job_id: Optional[str] = None) -> list[Path]:
    """Batch log(s) and per-node logs of ``job_id`` (default: the latest job) in the run dir."""
    run_dir = Path(run_dir).absolute()
    recs = job_records(run_dir)
    jid = job_id or recs[-1]["job_ids"][-1]
    logs = run_dir / "logs"
    files = sorted(logs.glob(f"slurm-{jid}.out")) + sorted(logs.glob(f"slurm-{jid}_*.out"))
    files += sorted(logs.glob(f"job{jid}-r*.log")) + sorted(logs.glob(f"job{jid}_*-r*.log"))
    return files


def cancel(run_dir: str | Path, *, requeue_now: bool = False) -> list[str]:
    """Cancel the run's queued/running jobs (``requeue_now``: checkpoint and requeue instead)."""
    run_dir = Path(run_dir).absolute()
    ids = [j for rec in job_records(run_dir) for j in rec["job_ids"]]
    if not shutil.which("scancel"):
        raise MegadiffError("scancel not found on PATH: run this on the cluster's login node")
    live = []
    for j in ids:
        st = job_state(j)
        if any(m.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "CONFIGURING")
               for m in st["members"]):
            live.append(j)
    if not live:
        return []
    if requeue_now:
        subprocess.run(["scancel", "--signal=USR1", "--batch", *live], check=False)
        return live
    atomic_write_text(run_dir / "slurm" / "CANCELLED", _dt.datetime.now().isoformat() + "\n")
    subprocess.run(["scancel", *live], check=False)
    return live


TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "SPECIAL_EXIT",
})


def wait(job_ids: Sequence[str], timeout: float = 600.0, poll: float = 1.0) -> dict[str, list[dict]]:
    """Block until every job (all array members) is in a terminal state; return their member states.

    A requeued job counts as unfinished (it goes back to PENDING). Raises TimeoutError.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        states = {j: job_state(j)["members"] for j in job_ids}
        if all(ms and all(m.get("JobState", "").split()[0].rstrip("+") in TERMINAL_STATES for m in ms)
               for ms in states.values()):
            return states
        if time.monotonic() > deadline:
            raise TimeoutError(f"Slurm jobs not finished after {timeout:.0f}s: {states}")
        time.sleep(poll)
