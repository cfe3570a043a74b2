"""`megadiff slurm submit|status|logs|cancel|data-pipeline`: run megadiff on a Slurm cluster.

No torch/megatron/ray import here or in launch/: submission takes a second on a login node.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def register(sub) -> None:
    p = sub.add_parser("slurm", help="submit, follow and cancel Slurm jobs (training, data pipeline)",
                       description="Run megadiff on a Slurm cluster; see docs/slurm.md.")
    ssub = p.add_subparsers(dest="slurm_cmd", metavar="SUBCOMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    s = ssub.add_parser("submit", help="render an sbatch script for `megadiff train` and submit it", formatter_class=fmt,
                        description="Resolve CONFIG + overrides, write the config and the sbatch script into "
                                    "trainer.run_dir/slurm/, submit with sbatch and record the job id. Preemption: "
                                    "the job gets SIGUSR1 before its time limit, the trainer saves and exits 75, and "
                                    "the job is requeued (or the next job of a --chain resumes).")
    s.add_argument("config", help="YAML recipe, e.g. configs/tiny_cpu.yaml")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    _resources(s)
    s.add_argument("--tasks-per-node", type=int, default=None,
                   help="ranks per node on CPU-only nodes (with GPUs: one per GPU)")
    s.add_argument("--requeue-mode", choices=["requeue", "chain", "none"], default=None,
                   help="on exit 75: scontrol requeue | next job of a --dependency=singleton chain | stop "
                        "(default: the profile's)")
    s.add_argument("--chain", type=int, default=1, help="requeue-mode chain: number of jobs to queue")
    s.add_argument("--dependency", default=None, help="extra sbatch --dependency, e.g. afterok:1234")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option, repeatable (e.g. --sbatch=--exclusive)")
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    s.set_defaults(func=cmd_submit)

    d = ssub.add_parser("data-pipeline", help="run `megadiff data tokenize` on a Ray cluster inside one allocation",
                        formatter_class=fmt)
    d.add_argument("config")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--cluster", default=None,
                   help="profile name in slurm/clusters/ or a YAML path (optional with --dry-run)")
    d.add_argument("--nodes", type=int, default=1)
    d.add_argument("--cpus-per-node", type=int, default=None,
                   help="CPUs per node for Ray (default: the profile's gpus_per_node x cpus_per_gpu)")
    d.add_argument("--time", default=None, help="HH:MM:SS (default: the profile's)")
    d.add_argument("--dry-run", action="store_true")
    d.set_defaults(func=cmd_data_pipeline)

    st = ssub.add_parser("status", help="state of a run's jobs and its training progress")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    lg = ssub.add_parser("logs", help="print (or follow) the logs of a run's latest job", formatter_class=fmt)
    lg.add_argument("run_dir")
    lg.add_argument("--job", default=None, help="job id (default: the latest)")
    lg.add_argument("-n", "--lines", type=int, default=40, help="last lines of each file")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.set_defaults(func=cmd_logs)

    c = ssub.add_parser("cancel", help="cancel a run's jobs (or --requeue-now: checkpoint and requeue)")
    c.add_argument("run_dir")
    c.add_argument("--requeue-now", action="store_true",
                   help="send SIGUSR1: the trainer saves a checkpoint, exits 75 and the job is requeued")
    c.set_defaults(func=cmd_cancel)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _resources(s) -> None:
    s.add_argument("--cluster", default=None,
                   help="profile name in slurm/clusters/ or a YAML path (optional with --dry-run: generic defaults)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=None, help="default: the profile's gpus_per_node")
    s.add_argument("--time", default=None, help="HH:MM:SS (default: the profile's)")


def _report(sub, what: str, dry_run: bool) -> int:
    """--dry-run: the rendered script; else the job ids and how to follow, stop or requeue the job."""
    if dry_run:
        sys.stdout.write(sub.script_text)
        return 0
    rd = sub.run_dirs[0]
    print(f"submitted {what}: job {', '.join(sub.job_ids)}; script {sub.script}")
    print(f"  follow:  megadiff slurm status {rd}   |   megadiff slurm logs {rd} -f")
    print(f"  stop:    megadiff slurm cancel {rd}   (--requeue-now: checkpoint and requeue)")
    return 0


def cmd_submit(args) -> int:
    from launch.slurm import RunSpec, submit_train

    sub = submit_train(
        RunSpec(args.config, args.overrides), args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node, time=args.time, requeue=args.requeue_mode, chain=args.chain,
        dependency=args.dependency, sbatch_extra=args.sbatch, dry_run=args.dry_run,
    )
    return _report(sub, "training", args.dry_run)


def cmd_data_pipeline(args) -> int:
    from launch.slurm import submit_data_pipeline

    sub = submit_data_pipeline(args.config, args.overrides, args.cluster, nodes=args.nodes,
                               cpus_per_node=args.cpus_per_node, time=args.time,
                               dry_run=args.dry_run)
    return _report(sub, "data pipeline", args.dry_run)


def cmd_status(args) -> int:
    from launch.slurm import status

    st = status(args.run_dir)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"run {st['run_dir']}")
    for job in st["jobs"]:
        if not job["members"]:
            print(f"  job {job['job_id']}: unknown to Slurm (finished long ago?)")
        for m in job["members"]:
            extra = f" ({m['Reason']})" if m.get("Reason") not in (None, "", "None") else ""
            print(f"  job {m.get('JobId', job['job_id'])}: {m.get('JobState', '?')}{extra} exit {m.get('ExitCode', '?')} "
                  f"restarts {m.get('Restarts', '?')} runtime {m.get('RunTime', '?')} nodes {m.get('NodeList', '?')}")
    if "last_step" in st:
        print(f"  training: step {st['last_step'].get('step')} loss {st['last_step'].get('loss')}")
    if "latest_checkpoint" in st:
        print(f"  latest checkpoint: {st['latest_checkpoint']}")
    if "marker" in st:
        print(f"  marker: {st['marker']}")
    return 0


def cmd_logs(args) -> int:
    from launch.slurm import log_files
    from megadiff import MegadiffError

    files = log_files(args.run_dir, args.job)
    if not files:
        raise MegadiffError(f"no log files yet for that job in {args.run_dir}/logs (is it still pending?)")
    if args.follow:
        os.execvp("tail", ["tail", "-n", str(args.lines), "-F", *map(str, files)])
    for f in files:
        print(f"==> {f} <==")
        sys.stdout.flush()
        subprocess.run(["tail", "-n", str(args.lines), str(f)], check=False)
    return 0


def cmd_cancel(args) -> int:
    from launch.slurm import cancel

    ids = cancel(args.run_dir, requeue_now=args.requeue_now)
    if not ids:
        print("no queued or running jobs")
    elif args.requeue_now:
        print(f"sent SIGUSR1 to job(s) {', '.join(ids)}: they checkpoint and requeue")
    else:
        print(f"cancelled job(s) {', '.join(ids)}")
    return 0
