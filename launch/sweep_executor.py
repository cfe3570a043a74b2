"""The sweep launcher's Slurm executor (entry point ``megadiff.sweep_executors: slurm``).

``megadiff/sweeps/launch.py`` finds it through the entry-point group and calls it with a planned
sweep; it submits the runs as one job array (``launch.arrays.submit_array``).
"""

from __future__ import annotations

from typing import Any

from launch.arrays import submit_array
from launch.jobs import RunSpec
from launch.profiles import profile_names
from launch.submit import Submission
from megadiff import MegadiffError

ALLOWED = ("nodes", "gpus_per_node", "tasks_per_node", "time", "max_parallel", "requeue", "dependency",
           "sbatch_extra")


def launch_slurm(plan: Any, runs: list, parent_id: str, slurm_opts: dict[str, Any],
                 dry_run: bool = False) -> Submission:
    """Submit ``runs`` of ``plan`` (``megadiff.sweeps.plan``) as one job array; ``slurm_opts`` from the sweep file."""
    opts = dict(slurm_opts)
    cluster = opts.pop("cluster", None)
    if not cluster:
        raise MegadiffError(
            "set launch.slurm.cluster in the sweep file (or --cluster): a profile from slurm/clusters/ "
            f"({', '.join(profile_names()) or 'none found'}) or a profile YAML path"
        )
    bad = sorted(set(opts) - set(ALLOWED))
    if bad:
        raise MegadiffError(f"launch.slurm: unknown keys {bad}; allowed: cluster, {', '.join(sorted(ALLOWED))}")
    specs = [RunSpec(plan.base_config, r.train_overrides(parent_id)) for r in runs]
    return submit_array(specs, cluster, sweep_dir=plan.out_dir, dry_run=dry_run, **opts)
