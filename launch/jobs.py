"""megadiff's own jobs: `megadiff train` on one run, `megadiff data tokenize` on a Ray cluster.

Every path a job reads or writes is made absolute here (``trainer.run_dir``, ``data.out_dir``,
``data.train/valid`` paths, local ``data.sources`` paths): the job may start on another node, in
another directory, and must mean the same files on the shared filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from launch.profiles import ClusterProfile, resolve_profile
from launch.render import job_name
from launch.request import JobRequest, check_request
from launch.submit import Submission, nodes_for, require_sbatch, submit
from megadiff import MegadiffError
from megadiff.utils.io import atomic_write_text


@dataclass
class RunSpec:
    """One training run of a sweep: a recipe plus ``key=value`` overrides."""

    config: str
    overrides: list[str] = field(default_factory=list)


def _abs(path: str) -> str:
    """A local path made absolute; URLs (``pkg://``, ``s3://``) are left as they are."""
    return path if "://" in path else str(Path(path).expanduser().absolute())


def absolute_data_paths(cfg: Any) -> None:
    d = cfg.data
    d.out_dir = _abs(d.out_dir)
    for ref in list(d.train) + list(d.valid):
        ref.path = _abs(ref.path)
    for src in d.sources:
        src.paths = [_abs(p) for p in src.paths]
    if d.tokenizer.path:
        d.tokenizer.path = _abs(d.tokenizer.path)


def prepare_run(spec: RunSpec, *, write: bool = True) -> tuple[Path, Path, Any]:
    """Resolve a run's config (no torch), make its paths absolute, write it into the run dir.

    Returns ``(run_dir, resolved_config_path, cfg)``; the job trains from that resolved copy, so later
    edits to the recipe do not change a queued or requeued job.
    """
    from megadiff.config import load_config, to_yaml

    cfg = load_config(spec.config, list(spec.overrides))
    run_dir = Path(cfg.trainer.run_dir).expanduser().absolute()
    cfg.trainer.run_dir = str(run_dir)
    absolute_data_paths(cfg)
    resolved = run_dir / "slurm" / "config.yaml"
    if write:
        atomic_write_text(resolved, to_yaml(cfg))
    return run_dir, resolved, cfg


def train_command(prof: ClusterProfile, resolved_config: Path) -> list[str]:
    return [prof.interpreter, "-m", "megadiff.cli", "train", str(resolved_config)]


def check_layout(cfg: Any, world_size: int) -> None:
    from megadiff.config import check_batch_layout

    mp = cfg.parallel.tp * cfg.parallel.pp
    if world_size % mp:
        raise MegadiffError(
            f"{world_size} ranks (nodes x tasks per node) is not a multiple of parallel.tp x parallel.pp = {mp}"
        )
    check_batch_layout(cfg, world_size // mp)


def submit_train(
    spec: RunSpec,
    cluster: str | ClusterProfile | None,
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
    prof = resolve_profile(cluster, dry_run=dry_run, gpus_per_node=gpus_per_node)
    if not dry_run:
        require_sbatch()
    g = prof.gpus_per_node if gpus_per_node is None else gpus_per_node
    run_dir, resolved, cfg = prepare_run(spec, write=False)
    req = JobRequest(
        name=job_name(run_dir), run_dirs=[run_dir], commands=[train_command(prof, resolved)], nodes=nodes,
        gpus_per_node=g, tasks_per_node=tasks_per_node, time=time, requeue=requeue, chain=chain,
        dependency=dependency, sbatch_extra=list(sbatch_extra),
    )
    check_request(req, prof, nodes_for(prof))
    check_layout(cfg, req.world_size)
    if not dry_run:
        prepare_run(spec, write=True)
    return submit(req, prof, dry_run=dry_run)


def submit_data_pipeline(
    config: str,
    overrides: Sequence[str],
    cluster: str | ClusterProfile | None,
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

    prof = resolve_profile(cluster, dry_run=dry_run)
    if not dry_run:
        require_sbatch()
    cfg = load_config(config, list(overrides))
    absolute_data_paths(cfg)
    out_dir = Path(cfg.data.out_dir)
    resolved = out_dir / "slurm" / "config.yaml"
    cmd = [prof.interpreter, "-m", "megadiff.cli", "data", "tokenize", str(resolved)]
    req = JobRequest(
        name=job_name(out_dir), run_dirs=[out_dir], commands=[cmd], nodes=nodes, gpus_per_node=0,
        tasks_per_node=1, cpus_per_task=cpus_per_node or max(prof.gpus_per_node * prof.cpus_per_gpu, prof.cpus_per_task),
        time=time, requeue="none", template="data_pipeline",
    )
    check_request(req, prof, nodes_for(prof))
    if not dry_run:
        atomic_write_text(resolved, to_yaml(cfg))
    return submit(req, prof, dry_run=dry_run)
