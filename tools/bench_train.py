"""Training-step throughput: megadiff's real training step vs the plain-PyTorch baseline, side by side.

    python tools/bench_train.py --preset 350m --seq 2048 --micro-batch 8 [--steps 10 --warmup 3]
        [--ref ../shared/bench/ref_mdm_train.py] [--ref-compile] [--peak-tflops 989.5] [--out results.jsonl]

megadiff side: `megadiff train` (model, objective, DDP + distributed optimizer, the trainer's step) on a
synthetic dataset of random tokens (GPT-2 vocab 50304 incl. [MASK]) with the GPT-2-shaped model the
baseline uses (`model.arch=gpt2`, tied embeddings), bf16 on GPU; tokens/s and MFU are read from its
metrics.jsonl (our FLOPs formula, `megadiff/model/flops.py`), averaged over the steps after warm-up.
Baseline side: the reference script at the same preset, seq and micro batch. Prints one JSON line per
side and the ratio; appends them to --out. Runs on CPU too (use --preset tiny) to check the tool itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50304


def make_data(d: Path, n: int, seq: int) -> None:
    from megadiff.data.format import write_dataset
    from megadiff.data.tokenizer import special_ids, to_bytes, toy_tokenizer

    tok = toy_tokenizer(64)
    rng = np.random.default_rng(0)
    samples = {"train": rng.integers(4, VOCAB, size=(n, seq)), "valid": rng.integers(4, VOCAB, size=(4, seq))}
    write_dataset(d, samples, to_bytes(tok), special_ids(tok), VOCAB, samples_per_shard=256)


def run_megadiff(a, work: Path) -> dict:
    data, run = work / "data", work / "run"
    make_data(data, (a.steps + a.warmup + 1) * a.micro_batch, a.seq)
    peak = a.peak_tflops
    args = [sys.executable, "-m", "megadiff.cli", "train", str(ROOT / "configs/tiny_cpu.yaml"),
            f"data.out_dir={data}", f"trainer.run_dir={run}", f"model.preset={a.preset}", "model.arch=gpt2",
            f"model.max_seq_len={a.seq}", "model.tie_embeddings=true", f"model.attention_backend={a.attention}",
            f"trainer.micro_batch={a.micro_batch}", f"trainer.global_batch={a.micro_batch}",
            f"trainer.max_steps={a.steps + a.warmup}", "trainer.eval_interval=0", "trainer.save_interval=0",
            "trainer.num_samples=0", "trainer.progress=false", "tracking.enabled=false", "optim.lr=1e-4",
            "optim.warmup_steps=0", "optim.lr_schedule=constant", f"trainer.peak_tflops={peak}",
            f"trainer.log_interval={a.steps + a.warmup}", "trainer.keep_last=1"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"megadiff train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if "loss" in r and r["step"] > a.warmup]
    step_s = sum(r["step_s"] for r in timed) / len(timed)
    tps = a.micro_batch * a.seq / step_s
    mfu = sum(r["mfu"] for r in timed) / len(timed)
    return {"bench": "megadiff", "preset": a.preset, "seq": a.seq, "micro_batch": a.micro_batch,
            "step_ms": round(step_s * 1e3, 2), "tokens_per_s": round(tps), "mfu": round(mfu, 4),
            "tflops_per_gpu": round(sum(r["tflops"] for r in timed) / len(timed), 1),
            "peak_mem_GiB": round(max(r["mem_gib"] for r in timed), 2), "loss": round(timed[-1]["loss"], 3),
            "finite": all(r["loss"] == r["loss"] for r in timed)}


def run_ref(a) -> dict:
    args = [sys.executable, str(a.ref), "--preset", a.preset, "--seq", str(a.seq), "--micro-batch",
            str(a.micro_batch), "--steps", str(a.steps), "--warmup", str(a.warmup), "--peak-tflops", str(a.peak_tflops)]
    if a.ref_compile:
        args.append("--compile")
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"baseline failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attention", default="auto", help="model.attention_backend for megadiff")
    ap.add_argument("--ref", type=Path, default=ROOT.parent / "shared/bench/ref_mdm_train.py")
    ap.add_argument("--ref-compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.5, help="dense bf16 peak used for MFU (both sides)")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    a = ap.parse_args()
    if not a.ref.exists():
        raise SystemExit(f"baseline script {a.ref} not found; pass --ref PATH")
    with tempfile.TemporaryDirectory(prefix="mdbench-") as tmp:
        ours = run_megadiff(a, Path(tmp))
    ref = run_ref(a)
    ratio = {"bench": "ratio", "preset": a.preset, "seq": a.seq,
             "tokens_per_s_megadiff_over_ref": round(ours["tokens_per_s"] / ref["tokens_per_s"], 3)}
    lines = [json.dumps(x) for x in (ref, ours, ratio)]
    print("\n".join(lines), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
