"""`megadiff train`: train (or resume) a model from a YAML recipe.

Multi-process: `--nproc-per-node N` (and `--nnodes/--node-rank/--master-addr/--master-port`)
starts one process per rank on this node (static env:// rendezvous); each joins the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train or resume a model from a config",
        description="Train a masked-diffusion LM. Resumes from <trainer.run_dir>/checkpoints/latest when present. "
                    "Exit codes: 0 done, 75 preempted/time budget (checkpoint saved, requeue), 2 bad input.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", help="YAML recipe, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.max_steps=100")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes on this node (GPUs, or CPU ranks)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=None, help="default: a free port (single node)")
    p.add_argument("--dry-run", action="store_true",
                   help="build every pipeline stage's partition on the meta device under a fake process group of "
                        "--world-size ranks (no weights allocated, no GPU needed), print per-rank parameters and "
                        "the memory forecast, then exit")
    p.add_argument("--world-size", type=int, default=None, help="--dry-run: total ranks (GPUs) of the layout")
    p.add_argument("--gpu-mem-gib", type=float, default=None,
                   help="--dry-run: fail (exit 2) when a rank's forecast peak exceeds this many GiB")
    p.set_defaults(func=run)


def spawn_workers(args) -> int:
    """Start this node's ranks (static env:// rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE).

    We launch the ranks ourselves instead of through torchrun so that their exit codes reach the
    caller unchanged (torchrun turns a rank's 75 "preempted, requeue me" into a generic failure)
    and SIGTERM/SIGUSR1 reach every rank. Exit code: the first crash's code, else 75 if any rank
    was preempted, else 0. A crashed rank makes the others stop (SIGTERM, then SIGKILL).
    """
    import signal
    import time

    from megadiff import EXIT_REQUEUE

    world = args.nproc_per_node * args.nnodes
    if args.master_port is None:
        from megadiff.utils.net import free_port

        args.master_port = 29500 if args.nnodes > 1 else free_port()
    procs = []
    for local in range(args.nproc_per_node):
        rank = args.node_rank * args.nproc_per_node + local
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(args.nproc_per_node), MASTER_ADDR=args.master_addr,
                   MASTER_PORT=str(args.master_port), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        procs.append(subprocess.Popen([sys.executable, "-m", "megadiff.cli", "train", args.config, *args.overrides],
                                      env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode
                if p.returncode not in (0, EXIT_REQUEUE):
                    for q in procs:
                        if q.poll() is None:
                            q.terminate()
                    deadline = time.time() + 30
                    for q in procs:
                        try:
                            q.wait(timeout=max(0.1, deadline - time.time()))
                        except subprocess.TimeoutExpired:
                            q.kill()
        time.sleep(0.2)
    crashes = [c for c in codes.values() if c not in (0, EXIT_REQUEUE)]
    if crashes:
        return crashes[0]
    return EXIT_REQUEUE if EXIT_REQUEUE in codes.values() else 0


def build_callbacks(cfg) -> list:
    """The callbacks of `megadiff train`, in the order they run each step (see train/callbacks.py)."""
    from pathlib import Path

    from megadiff.eval.callbacks import EndOfRunSamples
    from megadiff.train import callbacks as cb

    tc, run_dir = cfg.trainer, Path(cfg.trainer.run_dir)
    cbs = [cb.MetricsFile(run_dir), cb.ProgressBar(tc.progress, tc.log_interval), cb.NaNGuard(tc.nan_max_consecutive),
           cb.Checkpointing(tc.save_interval), cb.EvalCadence(tc.eval_interval),
           cb.ChunkedStop(tc.stop_after, tc.steps_per_invocation)]
    if cfg.tracking.enabled:
        from megadiff.tracking.mlflow_cb import MLflowCallback

        cbs.append(MLflowCallback(cfg, run_dir))
    cbs.append(EndOfRunSamples(tc.num_samples, tc.sample_steps, tc.seed))
    return cbs


def run(args) -> int:
    from megadiff.config import load_config

    cfg = load_config(args.config, args.overrides)  # fail fast, before spawning anything
    if args.dry_run:
        from megadiff.train.dryrun import dry_run

        return dry_run(cfg, args.world_size or args.nproc_per_node * args.nnodes, args.gpu_mem_gib)
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not under_launcher and args.nproc_per_node * args.nnodes > 1:
        return spawn_workers(args)
    from megadiff.train.callbacks import install_early_signal_handlers

    install_early_signal_handlers()
    from megadiff.train.trainer import run_training

    return run_training(cfg, build_callbacks(cfg))
