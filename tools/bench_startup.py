"""Start-up times of the `megadiff` command line and of a training process's imports, side by side.

Each case runs in a fresh interpreter, cases alternate within each round (so load changes hit all of
them alike), and the median over rounds is reported. The trainer's imports are timed twice: as
megatron-core imports itself (baseline: its ``jit_fuser`` wraps ~20 fused kernels in ``torch.compile``
at import, which imports torch._dynamo and torch._inductor) and with megadiff's lazy-compile hook
(``megadiff/dist/lazy_compile.py``, what `megadiff train` does).

    python tools/bench_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINER_IMPORTS = ("import megadiff.train.trainer, megadiff.model.build, megadiff.checkpoint.manager, "
                   "megatron.core.models.gpt, megatron.core.optimizer, megatron.core.dist_checkpointing")
CASES = {
    "python -c pass (interpreter)": [sys.executable, "-c", "pass"],
    "megadiff --help": [sys.executable, "-m", "megadiff.cli", "--help"],
    "megadiff train --help": [sys.executable, "-m", "megadiff.cli", "train", "--help"],
    "megadiff sweep plan (tiny_cpu)": [sys.executable, "-m", "megadiff.cli", "sweep", "plan",
                                       "configs/sweeps/tiny_cpu.yaml"],
    "megadiff checkpoint verify (no run)": [sys.executable, "-m", "megadiff.cli", "checkpoint", "verify", "/nonexistent"],
    "trainer imports, baseline": [sys.executable, "-c", TRAINER_IMPORTS],
    "trainer imports, lazy compile": [sys.executable, "-c",
                                      "from megadiff.dist import lazy_compile; lazy_compile.install(); " + TRAINER_IMPORTS],
}


def run_once(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.rounds):
        for name, cmd in CASES.items():
            times[name].append(run_once(cmd))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.node()} · {os.cpu_count()} CPUs · load {load:.1f} · {time.strftime('%Y-%m-%d %H:%M')} · "
          f"{args.rounds} rounds, median (min-max) seconds")
    print("| case | median s | min s | max s |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |")
    base, lazy = (statistics.median(times[k]) for k in ("trainer imports, baseline", "trainer imports, lazy compile"))
    print(f"\ntrainer imports: lazy compile {lazy:.2f} s vs baseline {base:.2f} s ({lazy / base:.2f}x)")


if __name__ == "__main__":
    main()
