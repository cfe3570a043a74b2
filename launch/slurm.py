"""Slurm submission: cluster profiles, sbatch rendering, submission, status, logs, cancel.

Imports no torch, megatron or ray (a test checks it), so `megadiff slurm submit` runs on a login
node in a second. The batch scripts come from ``slurm/templates/*.sbatch``; cluster profiles from
``slurm/clusters/*.yaml``. Everything a submission produces lives in the run directory:

    RUN_DIR/slurm/config.yaml        resolved config the job trains with (overrides applied)
    RUN_DIR/slurm/job-<n>.sbatch     each rendered script
    RUN_DIR/slurm/jobs.jsonl         one line per submission: job id, script, time, kind
    RUN_DIR/slurm/DONE | CANCELLED   markers read by the batch script (finished / do not requeue)
    RUN_DIR/logs/slurm-<job>.out     batch script output (appended across requeues)
    RUN_DIR/logs/job<job>-r<restart>-<node>.log   per node, per restart; lines prefixed by rank

Rendezvous: one Slurm task per GPU (see docs/slurm.md for why, not one torchrun per node).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from megadiff import MegadiffError
from megadiff.utils.io import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("MEGADIFF_SLURM_DIR", REPO_ROOT / "slurm"))
REQUEUE_EXIT_CODE = 75  # the trainer's "checkpoint saved, please requeue" exit code
REQUEUE_MODES = ("requeue", "chain", "none")
_TIME_RE = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


# ----------------------------------------------------------------------------- cluster profiles


@dataclass
class ClusterProfile:
    """A cluster's submission defaults (``slurm/clusters/<name>.yaml``)."""

    name: str = "?"
    description: str = ""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: int = 0  # GPUs a node has (the most a job may ask per node); 0: CPU-only nodes
    cpus_per_gpu: int = 8  # CPU cores per task when tasks are GPUs
    cpus_per_task: int = 1  # CPU cores per task on CPU-only nodes
    mem_per_gpu: Optional[str] = None  # e.g. 200G; None: the cluster's default
    mem_per_cpu: Optional[str] = None  # CPU-only jobs; None: the cluster's default (DefMemPerCPU)
    max_nodes: int = 0  # 0: no limit known
    time: str = "01:00:00"  # default wall-clock limit
    signal_seconds: int = 300  # USR1 this long before the time limit: save and requeue
    requeue: str = "requeue"  # requeue (scontrol requeue) | chain (--dependency=singleton) | none
    python: str = "auto"  # interpreter inside the job; auto: the one running `megadiff slurm`
    container_image: Optional[str] = None  # pyxis --container-image (squashfs path or registry image)
    container_mounts: list[str] = field(default_factory=list)  # pyxis --container-mounts entries
    container_workdir: Optional[str] = None  # pyxis --container-workdir (default: submit dir)
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, venv activate)
    env: dict[str, Any] = field(default_factory=dict)  # exported in the job (NCCL_*, network vars)
    sbatch_extra: list[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. --exclusive
    srun_extra: list[str] = field(default_factory=list)  # extra srun options for the training step
    check_nodes: bool = True  # also check requests against `scontrol show node` when reachable

    @property
    def interpreter(self) -> str:
        return sys.executable if self.python == "auto" else self.python


def profile_names() -> list[str]:
    return sorted(p.stem for p in (SLURM_DIR / "clusters").glob("*.yaml"))


def load_profile(name_or_path: str) -> ClusterProfile:
    """Load ``slurm/clusters/<name>.yaml`` (or a YAML path); unknown keys are errors."""
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = SLURM_DIR / "clusters" / f"{name_or_path}.yaml"
    if not p.is_file():
        raise MegadiffError(
            f"unknown cluster profile {name_or_path!r}; available: {', '.join(profile_names()) or 'none'} "
            f"(in {SLURM_DIR / 'clusters'}), or pass the path of a profile YAML"
        )
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise MegadiffError(f"cluster profile {str(p)!r} is not valid YAML: {e}") from None
    known = {f.name for f in dataclasses.fields(ClusterProfile)}
    bad = sorted(set(data) - known)
    if bad:
        raise MegadiffError(f"cluster profile {str(p)!r}: unknown keys {bad}; allowed: {', '.join(sorted(known))}")
    data.setdefault("name", p.stem)
    prof = ClusterProfile(**data)
    if prof.requeue not in REQUEUE_MODES:
        raise MegadiffError(f"cluster profile {p.stem!r}: requeue must be one of {REQUEUE_MODES}, got {prof.requeue!r}")
    return prof


# ----------------------------------------------------------------------------- the request


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
    gpus = [_gres_gpus(n.get("Gres", "")) for n in nodes]
    cpus = [int(n.get("CPUTot", 0) or 0) for n in nodes]
    if req.gpus_per_node > max(gpus, default=0):
        raise MegadiffError(
            f"--gpus-per-node {req.gpus_per_node} is impossible: the largest node has {max(gpus, default=0)} GPU(s) "
            f"(scontrol show node)"
        )
    need_cpus = req.ntasks_per_node * _cpus_per_task(req, prof)
    fit = [c for c, g in zip(cpus, gpus) if g >= req.gpus_per_node and c >= need_cpus]
    if not fit:
        raise MegadiffError(
            f"{req.ntasks_per_node} task(s) per node x {need_cpus // req.ntasks_per_node} CPU(s) = {need_cpus} CPUs "
            f"is impossible: no node with {req.gpus_per_node} GPU(s) has that many (largest: {max(cpus, default=0)}); "
            f"lower cpus_per_gpu/cpus_per_task in the profile or --tasks-per-node"
        )
    if req.nodes > len(fit):
        raise MegadiffError(f"--nodes {req.nodes} is impossible: only {len(fit)} node(s) fit the per-node request")


def _cpus_per_task(req: JobRequest, prof: ClusterProfile) -> int:
    if req.cpus_per_task:
        return req.cpus_per_task
    return prof.cpus_per_gpu if req.gpus_per_node else prof.cpus_per_task


def _gres_gpus(gres: str) -> int:
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
    return [_parse_kv(line) for line in out.stdout.splitlines() if line.strip()]


def _parse_kv(line: str) -> dict:
    d = {}
    for tok in line.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            d[k] = v
    return d


# ----------------------------------------------------------------------------- rendering


def _job_name(run_dir: Path) -> str:
    h = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:6]
    return f"md-{run_dir.name[:40]}-{h}"


def _sbatch_lines(req: JobRequest, prof: ClusterProfile, log_dir: Path) -> list[str]:
    mode = req.requeue or prof.requeue
    lines = [
        f"--job-name={req.name}",
        f"--nodes={req.nodes}",
        f"--ntasks-per-node={req.ntasks_per_node}",
        f"--time={req.time or prof.time}",
        f"--chdir={os.getcwd()}",
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
    if req.gpus_per_node:
        lines.append(f"--gpus-per-node={req.gpus_per_node}")
        lines.append(f"--cpus-per-task={_cpus_per_task(req, prof)}")
        if prof.mem_per_gpu:
            lines.append(f"--mem-per-gpu={prof.mem_per_gpu}")
    else:
        lines.append(f"--cpus-per-task={_cpus_per_task(req, prof)}")
        if prof.mem_per_cpu:
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
    env = "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in prof.env.items())
    values = {
        "RENDERED_AT": _dt.datetime.now().isoformat(timespec="seconds"),
        "SBATCH_LINES": "\n".join(_sbatch_lines(req, prof, log_dir)),
        "RUN_DIR": shlex.quote(str(log_dir.parent)),
        "SETUP": "\n".join(prof.setup),
        "ENV": env,
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


# ----------------------------------------------------------------------------- submission


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
    script_dir.mkdir(parents=True, exist_ok=True)
    (script_dir.parent / "logs").mkdir(parents=True, exist_ok=True)  # sbatch cannot create the --output dir
    for rd in req.run_dirs:
        (rd / "logs").mkdir(parents=True, exist_ok=True)
        (rd / "slurm").mkdir(parents=True, exist_ok=True)
        for marker in ("CANCELLED", "DONE"):  # a new submission means: run (again)
            (rd / "slurm" / marker).unlink(missing_ok=True)
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
    for rd in {script_dir.parent, *req.run_dirs}:
        with open(rd / "slurm" / "jobs.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    return Submission(ids, script, req.run_dirs, text)


# ----------------------------------------------------------------------------- megadiff jobs


@dataclass
class RunSpec:
    """One training run of a sweep: a recipe plus ``key=value`` overrides."""

    config: str
    overrides: list[str] = field(default_factory=list)


def prepare_run(spec: RunSpec, *, write: bool = True) -> tuple[Path, Path, Any]:
    """Resolve a run's config (no torch), make ``trainer.run_dir`` absolute, write it into the run dir.

    Returns ``(run_dir, resolved_config_path, cfg)``; the job trains from that resolved copy, so later
    edits to the recipe do not change a queued or requeued job.
    """
    from megadiff.config import load_config, to_yaml

    cfg = load_config(spec.config, list(spec.overrides))
    run_dir = Path(cfg.trainer.run_dir).expanduser().absolute()
    cfg.trainer.run_dir = str(run_dir)
    resolved = run_dir / "slurm" / "config.yaml"
    if write:
        atomic_write_text(resolved, to_yaml(cfg))
    return run_dir, resolved, cfg


def train_command(prof: ClusterProfile, resolved_config: Path) -> list[str]:
    return [prof.interpreter, "-m", "megadiff.cli", "train", str(resolved_config)]


def _check_layout(cfg: Any, world_size: int) -> None:
    from megadiff.config import check_batch_layout

    mp = cfg.parallel.tp * cfg.parallel.pp
    if world_size % mp:
        raise MegadiffError(
            f"{world_size} ranks (nodes x tasks per node) is not a multiple of parallel.tp x parallel.pp = {mp}"
        )
    check_batch_layout(cfg, world_size // mp)


def submit_train(
    spec: RunSpec,
    cluster: str | ClusterProfile,
    *,
    nodes: int = 1,
    gpus_per_node: Optional[int] = None,
    tasks_per_node: Optional[int] = None,
    time: Optional[str] = None,
    requeue: Optional[str] = None,
    chain: int = 1,
    dependency: Optional[str] = None,
    sbatch_extra: Sequence[str] = (),
    dry_run: bool = False,
) -> Submission:
    """Submit ``megadiff train`` for one run (what `megadiff slurm submit` calls)."""
    prof = cluster if isinstance(cluster, ClusterProfile) else load_profile(cluster)
    if not dry_run:
        require_sbatch()
    g = prof.gpus_per_node if gpus_per_node is None else gpus_per_node
    run_dir, resolved, cfg = prepare_run(spec, write=False)
    req = JobRequest(
        name=_job_name(run_dir), run_dirs=[run_dir], commands=[train_command(prof, resolved)], nodes=nodes,
        gpus_per_node=g, tasks_per_node=tasks_per_node, time=time, requeue=requeue, chain=chain,
        dependency=dependency, sbatch_extra=list(sbatch_extra),
    )
    check_request(req, prof, query_nodes() if prof.check_nodes else None)
    _check_layout(cfg, req.world_size)
    if not dry_run:
        prepare_run(spec, write=True)
    return submit(req, prof, dry_run=dry_run)


def submit_array(
    run_specs: Sequence[RunSpec | tuple[str, Sequence[str]]],
    cluster: str | ClusterProfile,
    *,
    sweep_dir: str | Path,
    nodes: int = 1,
    gpus_per_node: Optional[int] = None,
    tasks_per_node: Optional[int] = None,
    time: Optional[str] = None,
    max_parallel: int = 0,
    requeue: Optional[str] = None,
    dependency: Optional[str] = None,
    sbatch_extra: Sequence[str] = (),
    dry_run: bool = False,
) -> Submission:
    """Submit a sweep as ONE Slurm job array: member i runs ``megadiff train`` on ``run_specs[i]``.

    Each spec is a :class:`RunSpec` or ``(config_path, [overrides])``; give each member its own
    ``trainer.run_dir`` (two members with one run dir is an error). Every member gets the same
    resources; its resolved config, markers and per-node logs go to its own run dir; the array
    script, ``jobs.jsonl`` and the batch logs go to ``sweep_dir``. Members requeue individually.
    Returns a :class:`Submission`: ``job_id`` is the array id, member i is ``f"{job_id}_{i}"``.
    """
    prof = cluster if isinstance(cluster, ClusterProfile) else load_profile(cluster)
    if not run_specs:
        raise MegadiffError("submit_array: no runs given")
    if not dry_run:
        require_sbatch()
    specs = [s if isinstance(s, RunSpec) else RunSpec(s[0], list(s[1])) for s in run_specs]
    prepared = [prepare_run(s, write=False) for s in specs]
    run_dirs = [p[0] for p in prepared]
    dup = {str(d) for d in run_dirs if run_dirs.count(d) > 1}
    if dup:
        raise MegadiffError(f"submit_array: several runs share trainer.run_dir {sorted(dup)}; give each its own")
    sweep = Path(sweep_dir).expanduser().absolute()
    g = prof.gpus_per_node if gpus_per_node is None else gpus_per_node
    req = JobRequest(
        name=_job_name(sweep), run_dirs=run_dirs, commands=[train_command(prof, p[1]) for p in prepared],
        nodes=nodes, gpus_per_node=g, tasks_per_node=tasks_per_node, time=time, requeue=requeue,
        array_parallel=max_parallel, dependency=dependency, sbatch_extra=list(sbatch_extra),
        script_dir=sweep / "slurm",
    )
    check_request(req, prof, query_nodes() if prof.check_nodes else None)
    if (req.requeue or prof.requeue) == "chain":
        raise MegadiffError("job arrays cannot use requeue mode 'chain'; use 'requeue' or 'none'")
    for _, _, cfg in prepared:
        _check_layout(cfg, req.world_size)
    if not dry_run:
        (sweep / "slurm").mkdir(parents=True, exist_ok=True)
        (sweep / "logs").mkdir(parents=True, exist_ok=True)
        for s in specs:
            prepare_run(s, write=True)
    return submit(req, prof, dry_run=dry_run)


def submit_data_pipeline(
    config: str,
    overrides: Sequence[str],
    cluster: str | ClusterProfile,
    *,
    nodes: int = 1,
    cpus_per_node: Optional[int] = None,
    time: Optional[str] = None,
    dry_run: bool = False,
) -> Submission:
    """Submit `megadiff data tokenize` on a Ray cluster spanning ``nodes`` nodes of one allocation.

    ``cpus_per_node`` (Ray CPUs per node) defaults to the CPUs of the profile's GPUs
    (``gpus_per_node x cpus_per_gpu``), or ``cpus_per_task`` on CPU-only clusters.
    """
    from megadiff.config import load_config, to_yaml

    prof = cluster if isinstance(cluster, ClusterProfile) else load_profile(cluster)
    if not dry_run:
        require_sbatch()
    cfg = load_config(config, list(overrides))
    out_dir = Path(cfg.data.out_dir).expanduser().absolute()
    cfg.data.out_dir = str(out_dir)
    resolved = out_dir / "slurm" / "config.yaml"
    cmd = [prof.interpreter, "-m", "megadiff.cli", "data", "tokenize", str(resolved)]
    req = JobRequest(
        name=_job_name(out_dir), run_dirs=[out_dir], commands=[cmd], nodes=nodes, gpus_per_node=0,
        tasks_per_node=1, cpus_per_task=cpus_per_node or max(prof.gpus_per_node * prof.cpus_per_gpu, prof.cpus_per_task),
        time=time, requeue="none", template="data_pipeline",
    )
    check_request(req, prof, query_nodes() if prof.check_nodes else None)
    if not dry_run:
        atomic_write_text(resolved, to_yaml(cfg))
    return submit(req, prof, dry_run=dry_run)


# ----------------------------------------------------------------------------- status, logs, cancel


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
            rows = [_parse_kv(line) for line in out.stdout.splitlines() if line.strip()]
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
