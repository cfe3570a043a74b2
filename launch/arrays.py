"""A sweep as ONE Slurm job array: member i runs `megadiff train` on its own run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from launch.jobs import RunSpec, check_layout, prepare_run, train_command
from launch.profiles import ClusterProfile, resolve_profile
from launch.render import job_name
from launch.request import JobRequest, check_request
from launch.submit import Submission, nodes_for, require_sbatch, submit
from megadiff import MegadiffError


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
    prof = resolve_profile(cluster, dry_run=dry_run, gpus_per_node=gpus_per_node)
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
        name=job_name(sweep), run_dirs=run_dirs, commands=[train_command(prof, p[1]) for p in prepared],
        nodes=nodes, gpus_per_node=g, tasks_per_node=tasks_per_node, time=time, requeue=requeue,
        array_parallel=max_parallel, dependency=dependency, sbatch_extra=list(sbatch_extra),
        script_dir=sweep / "slurm",
    )
    check_request(req, prof, nodes_for(prof))
    if (req.requeue or prof.requeue) == "chain":
        raise MegadiffError("job arrays cannot use requeue mode 'chain'; use 'requeue' or 'none'")
    for _, _, cfg in prepared:
        check_layout(cfg, req.world_size)
    if not dry_run:
        (sweep / "slurm").mkdir(parents=True, exist_ok=True)
        (sweep / "logs").mkdir(parents=True, exist_ok=True)
        for s in specs:
            prepare_run(s, write=True)
    return submit(req, prof, dry_run=dry_run)
