"""Slurm submission for megadiff: the public API, gathered from the modules that implement it.

    launch/profiles.py   cluster profiles (slurm/clusters/*.yaml) through a typed omegaconf schema
    launch/request.py    JobRequest and the checks against a profile and `scontrol show node`
    launch/render.py     the sbatch script (slurm/templates/*.sbatch), a pure function
    launch/submit.py     write the script into the run dir, sbatch it, record the job ids
    launch/jobs.py       `megadiff train` and `megadiff data tokenize` jobs (absolute paths, resolved config)
    launch/arrays.py     a sweep as one job array
    launch/status.py     status, logs, cancel, wait

Imports no torch, megatron or ray (a test checks it), so `megadiff slurm submit` runs on a login
node in a second. Everything a submission produces lives in the run directory:

    RUN_DIR/slurm/config.yaml        resolved config the job trains with (overrides applied, absolute paths)
    RUN_DIR/slurm/job-<n>.sbatch     each rendered script
    RUN_DIR/slurm/jobs.jsonl         one line per submission: job id, script, time, kind
    RUN_DIR/slurm/DONE | CANCELLED   markers read by the batch script (finished / do not requeue)
    RUN_DIR/logs/slurm-<job>.out     batch script output (appended across requeues)
    RUN_DIR/logs/job<job>-r<restart>-<node>.log   per node, per restart; lines prefixed by rank
"""

from launch.arrays import submit_array
from launch.jobs import RunSpec, absolute_data_paths, prepare_run, submit_data_pipeline, submit_train, train_command
from launch.profiles import (
    REQUEUE_MODES,
    SLURM_DIR,
    ClusterProfile,
    generic_profile,
    load_profile,
    profile_names,
    resolve_profile,
)
from launch.render import job_name, render
from launch.request import JobRequest, check_request, gres_gpus, query_nodes
from launch.status import TERMINAL_STATES, cancel, job_records, job_state, log_files, run_progress, status, wait
from launch.submit import Submission, require_sbatch, submit

__all__ = [
    "REQUEUE_MODES", "SLURM_DIR", "TERMINAL_STATES", "ClusterProfile", "JobRequest", "RunSpec",
    "Submission", "absolute_data_paths", "cancel", "check_request", "generic_profile", "gres_gpus", "job_name",
    "job_records", "job_state", "load_profile", "log_files", "prepare_run", "profile_names", "query_nodes", "render",
    "require_sbatch", "resolve_profile", "run_progress", "status", "submit", "submit_array", "submit_data_pipeline",
    "submit_train", "train_command", "wait",
]
