"""What a job asks for (``JobRequest``) and the checks against a profile and the live nodes."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launch.profiles import REQUEUE_MODES, ClusterProfile
from megadiff import MegadiffError

_TIME_RE = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass
class JobRequest:
    """What to run and with which resources. ``commands`` has one argv per job (>1: a job array)."""

    name: str
    run_dirs: list[Path]  # per command: where its logs and markers go
    commands: list[list[str]]
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None  # default: gpus_per_node, or 1 on CPU-only jobs
    cpus_per_task: Optional[int] = None  # default: the profile's cpus_per_gpu (GPU jobs) or cpus_per_task
    time: Optional[str] = None  # default: the profile's
    requeue: Optional[str] = None  # requeue | chain | none; default: the profile's
    chain: int = 1  # chain mode: number of jobs linked with --dependency=singleton
    array_parallel: int = 0  # job arrays: at most this many members at once (0: no limit)
    signal_seconds: Optional[int] = None
    dependency: Optional[str] = None  # extra --dependency (e.g. afterok:123)
    sbatch_extra: list[str] = field(default_factory=list)
    template: str = "train"
    script_dir: Optional[Path] = None  # where the script and jobs.jsonl go (default: run_dirs[0]/slurm)

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def check_request(req: JobRequest, prof: ClusterProfile, nodes_info: Optional[list[dict]] = None) -> None:
    """Fail with a clear message on requests the cluster cannot satisfy (before writing anything)."""
    if req.nodes < 1:
        raise MegadiffError(f"--nodes must be >= 1, got {req.nodes}")
    if req.gpus_per_node < 0 or req.ntasks_per_node < 1:
        raise MegadiffError("--gpus-per-node must be >= 0 and --tasks-per-node >= 1")
    if prof.max_nodes and req.nodes > prof.max_nodes:
        raise MegadiffError(f"--nodes {req.nodes} exceeds the {prof.max_nodes} nodes of cluster profile {prof.name!r}")
    if req.gpus_per_node > prof.gpus_per_node:
        raise MegadiffError(
            f"--gpus-per-node {req.gpus_per_node} is impossible on cluster {prof.name!r}: its nodes have "
            f"{prof.gpus_per_node} GPU(s) (slurm/clusters/{prof.name}.yaml gpus_per_node); use more nodes instead"
        )
    if req.gpus_per_node and req.tasks_per_node and req.tasks_per_node != req.gpus_per_node:
        raise MegadiffError("with GPUs, the trainer runs one task per GPU: leave --tasks-per-node unset")
    t = req.time or prof.time
    if not _TIME_RE.match(t):
        raise MegadiffError(f"--time {t!r} is not a Slurm time; use HH:MM:SS or D-HH:MM:SS")
    mode = req.requeue or prof.requeue
    if mode not in REQUEUE_MODES:
        raise MegadiffError(f"--requeue-mode must be one of {', '.join(REQUEUE_MODES)}, got {mode!r}")
    if req.chain < 1:
        raise MegadiffError(f"--chain must be >= 1, got {req.chain}")
    if nodes_info:
        _check_against_nodes(req, prof, nodes_info)


def _check_against_nodes(req: JobRequest, prof: ClusterProfile, nodes: list[dict]) -> None:
    if prof.partition:
        nodes = [n for n in nodes if prof.partition in n.get("Partitions", "").split(",")]
        if not nodes:  # not this profile's cluster (or a partition we cannot see): sbatch will judge
            return
    gpus = [gres_gpus(n.get("Gres", "")) for n in nodes]
    cpus = [int(n.get("CPUTot", 0) or 0) for n in nodes]
    if req.gpus_per_node > max(gpus, default=0):
        raise MegadiffError(
            f"--gpus-per-node {req.gpus_per_node} is impossible: the largest node has {max(gpus, default=0)} GPU(s) "
            f"(scontrol show node)"
        )
    need_cpus = req.ntasks_per_node * cpus_per_task(req, prof)
    fit = [c for c, g in zip(cpus, gpus) if g >= req.gpus_per_node and c >= need_cpus]
    if not fit:
        raise MegadiffError(
            f"{req.ntasks_per_node} task(s) per node x {need_cpus // req.ntasks_per_node} CPU(s) = {need_cpus} CPUs "
            f"is impossible: no node with {req.gpus_per_node} GPU(s) has that many (largest: {max(cpus, default=0)}); "
            f"lower cpus_per_gpu/cpus_per_task in the profile or --tasks-per-node"
        )
    if req.nodes > len(fit):
        raise MegadiffError(f"--nodes {req.nodes} is impossible: only {len(fit)} node(s) fit the per-node request")


def cpus_per_task(req: JobRequest, prof: ClusterProfile) -> int:
    if req.cpus_per_task:
        return req.cpus_per_task
    return prof.cpus_per_gpu if req.gpus_per_node else prof.cpus_per_task


def gres_gpus(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def query_nodes() -> Optional[list[dict]]:
    """``scontrol show node -o`` parsed into dicts; None when scontrol is missing or fails."""
    if not shutil.which("scontrol"):
        return None
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [parse_kv(line) for line in out.stdout.splitlines() if line.strip()]


def parse_kv(line: str) -> dict:
    d = {}
    for tok in line.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            d[k] = v
    return d
