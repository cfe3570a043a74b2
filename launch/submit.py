"""Submission: check, render, write the script into the run dir, sbatch it, record the job ids."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launch.profiles import ClusterProfile
from launch.render import render
from launch.request import JobRequest, check_request, query_nodes
from megadiff import MegadiffError
from megadiff.utils.io import atomic_write_text


@dataclass
class Submission:
    job_ids: list[str]
    script: Path
    run_dirs: list[Path]
    script_text: str = ""

    @property
    def job_id(self) -> str:
        return self.job_ids[-1]


def require_sbatch() -> str:
    exe = shutil.which("sbatch")
    if not exe:
        raise MegadiffError(
            "sbatch not found on PATH: run this on a Slurm login node (or start the test cluster with "
            "`tools/local_slurm.sh start`); `--dry-run` prints the script without submitting"
        )
    return exe


def nodes_for(prof: ClusterProfile) -> Optional[list[dict]]:
    return query_nodes() if prof.check_nodes else None


def _prepare_dirs(req: JobRequest, script_dir: Path) -> None:
    script_dir.mkdir(parents=True, exist_ok=True)
    (script_dir.parent / "logs").mkdir(parents=True, exist_ok=True)  # sbatch cannot create the --output dir
    for rd in req.run_dirs:
        (rd / "logs").mkdir(parents=True, exist_ok=True)
        (rd / "slurm").mkdir(parents=True, exist_ok=True)
        for marker in ("CANCELLED", "DONE"):  # a new submission means: run (again)
            (rd / "slurm" / marker).unlink(missing_ok=True)


def _record(req: JobRequest, script: Path, ids: list[str], mode: str) -> None:
    rec = {
        "job_ids": ids,
        "script": str(script),
        "submitted": _dt.datetime.now().isoformat(timespec="seconds"),
        "array": len(req.commands) if len(req.commands) > 1 else 0,
        "template": req.template,
        "requeue": mode,
        "nodes": req.nodes,
        "gpus_per_node": req.gpus_per_node,
        "tasks_per_node": req.ntasks_per_node,
    }
    for rd in {script.parent.parent, *req.run_dirs}:
        with open(rd / "slurm" / "jobs.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def submit(req: JobRequest, prof: ClusterProfile, *, dry_run: bool = False, check_nodes: Optional[bool] = None) -> Submission:
    """Check, render, write the script into the run dir, sbatch it (``chain`` times), record the ids."""
    if not dry_run:
        require_sbatch()
    nodes_info = query_nodes() if (prof.check_nodes if check_nodes is None else check_nodes) else None
    check_request(req, prof, nodes_info)
    text = render(req, prof)
    script_dir = req.script_dir or req.run_dirs[0] / "slurm"
    if dry_run:
        return Submission([], script_dir / "job-dry-run.sbatch", req.run_dirs, text)
    _prepare_dirs(req, script_dir)
    n = len(list(script_dir.glob("job-*.sbatch")))
    script = script_dir / f"job-{n:03d}.sbatch"
    atomic_write_text(script, text)
    script.chmod(0o755)
    mode = req.requeue or prof.requeue
    ids = []
    for _ in range(req.chain if mode == "chain" else 1):
        out = subprocess.run([require_sbatch(), "--parsable", str(script)], capture_output=True, text=True)
        if out.returncode != 0:
            raise MegadiffError(f"sbatch rejected {script}: {out.stderr.strip() or out.stdout.strip()}")
        ids.append(out.stdout.strip().split(";")[0])
    _record(req, script, ids, mode)
    return Submission(ids, script, req.run_dirs, text)
