"""Cluster profiles (``slurm/clusters/<name>.yaml``): a typed omegaconf schema, like the run configs.

A profile loads through ``OmegaConf.structured(ClusterProfile)``: an unknown key or a value of the
wrong type is an error naming the file and the key. ``generic_profile()`` stands in for a missing
``--cluster`` on ``--dry-run`` (nothing is checked against a cluster then).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from megadiff import MegadiffError

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("MEGADIFF_SLURM_DIR", REPO_ROOT / "slurm"))
REQUEUE_MODES = ("requeue", "chain", "none")


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
    container_mounts: List[str] = field(default_factory=list)  # pyxis --container-mounts entries
    container_workdir: Optional[str] = None  # pyxis --container-workdir (default: submit dir)
    setup: List[str] = field(default_factory=list)  # shell lines run first (module load, venv activate)
    env: Dict[str, Any] = field(default_factory=dict)  # exported in the job (NCCL_*, network vars)
    sbatch_extra: List[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. --exclusive
    srun_extra: List[str] = field(default_factory=list)  # extra srun options for the training step
    check_nodes: bool = True  # also check requests against `scontrol show node` when reachable

    @property
    def interpreter(self) -> str:
        return sys.executable if self.python == "auto" else self.python


def profile_names() -> list[str]:
    return sorted(p.stem for p in (SLURM_DIR / "clusters").glob("*.yaml"))


def _profile_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = SLURM_DIR / "clusters" / f"{name_or_path}.yaml"
    if not p.is_file():
        raise MegadiffError(
            f"unknown cluster profile {name_or_path!r}; available: {', '.join(profile_names()) or 'none'} "
            f"(in {SLURM_DIR / 'clusters'}), or pass the path of a profile YAML"
        )
    return p


def _explain(err: OmegaConfBaseException, path: Path, top_key: str) -> MegadiffError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or top_key
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        allowed = ", ".join(f.name for f in fields(ClusterProfile))
        return MegadiffError(f"cluster profile {str(path)!r}: unknown key {key!r}; allowed keys: {allowed}")
    msg = str(err).splitlines()[0]
    return MegadiffError(f"cluster profile {str(path)!r}: bad value for key {key!r}: {msg}")


def load_profile(name_or_path: str) -> ClusterProfile:
    """Load ``slurm/clusters/<name>.yaml`` (or a YAML path) through the typed schema."""
    p = _profile_path(name_or_path)
    try:
        loaded = OmegaConf.load(p)
    except Exception as e:  # yaml syntax errors
        raise MegadiffError(f"cluster profile {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict) and not OmegaConf.is_dict(loaded):
        raise MegadiffError(f"cluster profile {str(p)!r} must be a mapping of keys to values")
    cfg = OmegaConf.structured(ClusterProfile(name=p.stem))
    for key in loaded:  # one key at a time: every error names its key
        try:
            cfg = OmegaConf.merge(cfg, {key: loaded[key]})
        except OmegaConfBaseException as e:
            raise _explain(e, p, str(key)) from None
    prof: ClusterProfile = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if prof.requeue not in REQUEUE_MODES:
        raise MegadiffError(
            f"cluster profile {str(p)!r}: key 'requeue' must be one of {', '.join(REQUEUE_MODES)}, got {prof.requeue!r}"
        )
    return prof


def generic_profile(gpus_per_node: Optional[int] = None) -> ClusterProfile:
    """The profile of a ``--dry-run`` without ``--cluster``: Slurm's defaults, no partition, no checks."""
    return ClusterProfile(name="generic", description="no --cluster given: generic defaults (dry run only)",
                          gpus_per_node=gpus_per_node or 0, check_nodes=False)


def resolve_profile(cluster: str | ClusterProfile | None, *, dry_run: bool,
                    gpus_per_node: Optional[int] = None) -> ClusterProfile:
    """A profile object from a name, a path, an object, or nothing (only allowed on a dry run)."""
    if isinstance(cluster, ClusterProfile):
        return cluster
    if cluster:
        return load_profile(cluster)
    if dry_run:
        return generic_profile(gpus_per_node)
    raise MegadiffError(
        f"--cluster is required to submit: one of {', '.join(profile_names()) or 'none'} (slurm/clusters/) or a "
        "profile YAML path; `--dry-run` without --cluster renders with generic defaults"
    )
