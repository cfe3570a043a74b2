"""AR -> diffusion adaptation vs a masked-diffusion model trained from scratch, side by side in one run (issue 13).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_adapt.py [--ar-steps 400] [--steps 200] [--workdir DIR]

1. tokenize the demo corpus (configs/demo.yaml: BPE 2048, seq_len 128);
2. train the demo-shaped model as an autoregressive LM (`diffusion.objective=ar`) for --ar-steps;
3. `megadiff convert to-hf` it, then `megadiff convert from-hf` the export: a run dir at step 0 holding the AR
   weights (+ a [MASK] row) and a fresh optimizer; re-tokenize the corpus with that run's tokenizer;
4. from that run dir, --steps of each variant, all with the same recipe, data order and seed:
   * adapt: `mdlm_adapt` with shift (position i predicts token i+1) and attention-mask annealing over the
     first half of the steps (`diffusion.anneal_steps`),
   * adapt, no annealing (bidirectional from step 0), * adapt, no shift, * adapt, neither,
   * scratch: the same config from a random initialisation, plain `mdlm`;
5. prints the trainer's validation NELBO (nats/token) at equal steps, and `megadiff eval`'s NELBO of every final
   model on the same held-out shards (one estimator for all rows: a shifted model's outputs are realigned, so
   every row bounds -log p of the same L tokens).

Everything runs through the CLI on 2 CPU processes (DP=2), like `make demo`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEGADIFF = [str(Path(sys.executable).with_name("megadiff"))]


def cli(*args: str, log: Path) -> None:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ megadiff {' '.join(args)}\n")
        f.flush()
        p = subprocess.run(MEGADIFF + list(args), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"megadiff {' '.join(args)} failed (rc {p.returncode}); see {log}")
    print(f"  {time.perf_counter() - t0:6.1f} s  megadiff {' '.join(args[:2])} ...", flush=True)


def val_curve(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val/nelbo" in r:
            out[int(r["step"])] = float(r["val/nelbo"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ar-steps", type=int, default=400, help="steps of the AR model (the demo's length)")
    ap.add_argument("--steps", type=int, default=200, help="steps of every adaptation / scratch run")
    ap.add_argument("--evals", type=int, default=4, help="validations per run (equal steps for every row)")
    ap.add_argument("--workdir", default=None, help="keep everything here (default: a temporary directory); "
                    "finished steps and runs found there are reused")
    ap.add_argument("--rows", default="shift_anneal,shift,anneal,plain,scratch",
                    help="comma-separated variants to run and print")
    a = ap.parse_args()
    if a.steps % a.evals:
        raise SystemExit(f"--steps {a.steps} must be a multiple of --evals {a.evals}")
    w = Path(a.workdir or tempfile.mkdtemp(prefix="mdadapt-")).resolve()
    w.mkdir(parents=True, exist_ok=True)
    log = w / "bench_adapt.log"
    load0, t_start = os.getloadavg(), time.time()
    print(f"work dir {w}; log {log}; load average {load0}", flush=True)
    nproc = ["--nproc-per-node", "2"]
    demo = "configs/demo.yaml"
    data1, ar, hf, base, data2 = w / "data", w / "ar", w / "ar-hf", w / "adapt-base", w / "data-adapt"
    quiet = ["trainer.num_samples=0", "trainer.progress=false", "tracking.enabled=false"]

    if not (data1 / "manifest.json").is_file():
        cli("data", "tokenize", demo, f"data.out_dir={data1}", "--no-progress", log=log)
    if not (ar / "metrics.jsonl").is_file():
        cli("train", demo, "diffusion.objective=ar", f"data.out_dir={data1}", f"trainer.run_dir={ar}",
            f"trainer.max_steps={a.ar_steps}", f"trainer.eval_interval={a.ar_steps}", *quiet, *nproc, log=log)
    if not hf.is_dir():
        cli("convert", "to-hf", str(ar), str(hf), log=log)
    if not base.is_dir():
        cli("convert", "from-hf", str(hf), str(base), log=log)
    if not (data2 / "manifest.json").is_file():
        cli("data", "tokenize", demo, "data.tokenizer.kind=file", f"data.tokenizer.path={base / 'tokenizer.json'}",
            f"data.out_dir={data2}", "--no-progress", log=log)

    every = a.steps // a.evals
    common = [f"data.out_dir={data2}", f"trainer.max_steps={a.steps}", f"trainer.eval_interval={every}",
              f"trainer.save_interval={a.steps}", *quiet]
    # the demo's optimisation recipe for every row (from-hf's config carries the model shape and tokenizer)
    recipe = ["optim.lr=3.0e-3", "optim.min_lr=3.0e-4", "optim.warmup_steps=20", "optim.lr_schedule=cosine",
              "optim.weight_decay=0.01", "trainer.micro_batch=16", "trainer.global_batch=32", "trainer.eval_batches=8",
              "trainer.eval_n_t=4", "diffusion.schedule=loglinear"]
    anneal = f"diffusion.anneal_steps={a.steps // 2}"
    variants = {  # key: (table row, from the AR weights?, overrides)
        "shift_anneal": ("adapt: shift + annealing", True,
                         ["diffusion.objective=mdlm_adapt", "diffusion.shift=true", anneal]),
        "shift": ("adapt: shift, no annealing", True, ["diffusion.objective=mdlm_adapt", "diffusion.shift=true"]),
        "anneal": ("adapt: annealing, no shift", True,
                   ["diffusion.objective=mdlm_adapt", "diffusion.shift=false", anneal]),
        "plain": ("adapt: no shift, no annealing", True, ["diffusion.objective=mdlm_adapt", "diffusion.shift=false"]),
        "scratch": ("scratch: mdlm, random init", False, ["diffusion.objective=mdlm"]),
    }
    unknown = set(a.rows.split(",")) - set(variants)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {list(variants)}")
    rows = {}
    for key, (name, from_ar, keys) in variants.items():
        if key not in a.rows.split(","):
            continue
        run = w / key
        if not (run / "metrics.jsonl").is_file() or a.steps not in val_curve(run):
            shutil.rmtree(run, ignore_errors=True)
            if from_ar:
                shutil.copytree(base, run)
            else:
                run.mkdir()
            print(f"{name}:", flush=True)
            cli("train", str(base / "config.yaml"), *common, *recipe, *keys, f"trainer.run_dir={run}", *nproc, log=log)
        out = run / "eval.json"
        if not out.is_file():
            cli("eval", str(run), "--data", f"{data2}:valid", "--batches", "8", "--batch-size", "16", "--n-t", "8",
                "--out", str(out), "--no-progress", log=log)
        rows[name] = (val_curve(run), json.loads(out.read_text())["results"][0])
    ar_val = val_curve(ar)

    steps = sorted(next(iter(rows.values()))[0])
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average before {load0}, "
          f"after {os.getloadavg()}; {(time.time() - t_start) / 60:.1f} min")
    print(f"AR model: {a.ar_steps} steps, validation NLL {ar_val[max(ar_val)]:.4f} nats/token (exact)")
    print("| run | " + " | ".join(f"val NELBO @ {s}" for s in steps) + " | `megadiff eval` NELBO ± s.e. |")
    print("|---|" + "---:|" * (len(steps) + 1))
    for name, (curve, ev) in rows.items():
        cells = " | ".join(f"{curve[s]:.4f}" for s in steps)
        print(f"| {name} | {cells} | {ev['nelbo']:.4f} ± {ev.get('nelbo_sem', float('nan')):.4f} |")


if __name__ == "__main__":
    main()
