"""sbatch rendering: a pure function of a request and a profile (no files written, no commands run)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import shlex
from pathlib import Path

from launch.profiles import SLURM_DIR, ClusterProfile
from launch.request import JobRequest, cpus_per_task
from megadiff import MegadiffError


def job_name(run_dir: Path) -> str:
    h = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:6]
    return f"md-{run_dir.name[:40]}-{h}"


def _sbatch_lines(req: JobRequest, prof: ClusterProfile, log_dir: Path) -> list[str]:
    mode = req.requeue or prof.requeue
    lines = [
        f"--job-name={req.name}",
        f"--nodes={req.nodes}",
        f"--ntasks-per-node={req.ntasks_per_node}",
        f"--time={req.time or prof.time}",
        f"--chdir={Path.cwd().resolve()}",
        "--open-mode=append",
    ]
    if req.template == "train":  # USR1 before the time limit: the trainer saves and asks to be requeued
        lines.append(f"--signal=B:USR1@{req.signal_seconds if req.signal_seconds is not None else prof.signal_seconds}")
    array = len(req.commands) > 1
    lines.append(f"--output={log_dir}/slurm-{'%A_%a' if array else '%j'}.out")
    if array:
        lines.append(f"--array=0-{len(req.commands) - 1}" + (f"%{req.array_parallel}" if req.array_parallel else ""))
    for key in ("partition", "account", "qos"):
        if getattr(prof, key):
            lines.append(f"--{key}={getattr(prof, key)}")
    lines.append(f"--cpus-per-task={cpus_per_task(req, prof)}")
    if req.gpus_per_node:
        lines.insert(-1, f"--gpus-per-node={req.gpus_per_node}")
        if prof.mem_per_gpu:
            lines.append(f"--mem-per-gpu={prof.mem_per_gpu}")
    elif prof.mem_per_cpu:
        lines.append(f"--mem-per-cpu={prof.mem_per_cpu}")
    lines.append("--requeue" if mode == "requeue" else "--no-requeue")
    deps = [d for d in (req.dependency, "singleton" if mode == "chain" else None) if d]
    if deps:
        lines.append(f"--dependency={','.join(deps)}")
    lines += list(prof.sbatch_extra) + list(req.sbatch_extra)
    return [f"#SBATCH {ln}" for ln in lines]


def _srun_args(prof: ClusterProfile) -> str:
    args = []
    if prof.container_image:
        args.append(f"--container-image={prof.container_image}")
        if prof.container_mounts:
            args.append(f"--container-mounts={','.join(prof.container_mounts)}")
        args.append(f"--container-workdir={prof.container_workdir or os.getcwd()}")
    args += list(prof.srun_extra)
    return " ".join(shlex.quote(a) for a in args)


def _select_command(req: JobRequest) -> str:
    if len(req.commands) == 1:
        return f"RUN_DIR={shlex.quote(str(req.run_dirs[0]))}\nCMD=({shlex.join(req.commands[0])})"
    out = ['case "${SLURM_ARRAY_TASK_ID:?not a job array}" in']
    for i, (cmd, rd) in enumerate(zip(req.commands, req.run_dirs)):
        out.append(f"  {i}) RUN_DIR={shlex.quote(str(rd))}; CMD=({shlex.join(cmd)}) ;;")
    out.append('  *) echo "no array member $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
    out.append("esac")
    out.append('STATE_DIR="$RUN_DIR/slurm"; mkdir -p "$RUN_DIR/logs" "$STATE_DIR"')
    return "\n".join(out)


_ON_REQUEUE = {
    "requeue": """say "checkpoint saved; requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    say "scontrol requeue failed; resubmit to resume"
    exit 75""",
    "chain": """say "checkpoint saved; the next job of the chain (--dependency=singleton) resumes from it"
    exit 0""",
    "none": """say "checkpoint saved; submit the same command again to resume"
    exit 75""",
}


def render(req: JobRequest, prof: ClusterProfile) -> str:
    """The sbatch script for ``req`` on ``prof`` (pure: no files written, no commands run)."""
    if len(req.run_dirs) != len(req.commands):
        raise MegadiffError("internal: one run directory per command expected")
    tpl_path = SLURM_DIR / "templates" / f"{req.template}.sbatch"
    if not tpl_path.is_file():
        raise MegadiffError(f"sbatch template {str(tpl_path)!r} not found")
    script_dir = req.script_dir or req.run_dirs[0] / "slurm"
    log_dir = (script_dir.parent / "logs") if len(req.commands) > 1 else req.run_dirs[0] / "logs"
    values = {
        "RENDERED_AT": _dt.datetime.now().isoformat(timespec="seconds"),
        "SBATCH_LINES": "\n".join(_sbatch_lines(req, prof, log_dir)),
        "RUN_DIR": shlex.quote(str(log_dir.parent)),
        "SETUP": "\n".join(prof.setup),
        "ENV": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in prof.env.items()),
        "SELECT_COMMAND": _select_command(req),
        "SRUN_ARGS": _srun_args(prof),
        "ON_REQUEUE": _ON_REQUEUE[req.requeue or prof.requeue],
        "PYTHON": shlex.quote(prof.interpreter),
    }
    text = tpl_path.read_text()

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise MegadiffError(f"template {tpl_path.name}: unknown placeholder {m.group(0)}")
        return values[m.group(1)]

    return re.sub(r"\{\{([A-Z_]+)\}\}", sub, text)
