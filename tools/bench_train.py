"""Training-step throughput: megadiff's real training step vs the plain-PyTorch baseline, side by side.

    python tools/bench_train.py --preset 350m --seq 2048 --micro-batch 8 [--steps 10 --warmup 3]
        [--ref ../shared/bench/ref_mdm_train.py] [--ref-compile] [--peak-tflops 989.5] [--out results.jsonl]

megadiff side: `megadiff train` (model, objective, DDP + distributed optimizer, the trainer's step) on a
synthetic dataset of random tokens (GPT-2 vocab 50304 incl. [MASK]) with the GPT-2-shaped model the
baseline uses (`model.arch=gpt2`, tied embeddings), bf16 on GPU; tokens/s and MFU are read from its
metrics.jsonl (our FLOPs formula, `megadiff/model/flops.py`), averaged over the steps after warm-up.
Baseline side: the reference script at the same preset, seq and micro batch. Prints one JSON line per
side and the ratio; appends them to --out. Runs on CPU too (use --preset tiny) to check the tool itself.
Both sides run with the same ``--threads`` (OMP_NUM_THREADS and torch threads).

    python tools/bench_train.py --step-suite [--threads 2] [--out results.jsonl]

The training-step suite (issue 18), each comparison side by side in one run, every side a fresh process
of tools/mem_probe.py (megadiff's own step; peak memory = VmHWM with malloc returning freed blocks):
  * large vocab (128,256, hidden 256, 2 layers, seq 512, micro batch 4, fp32): peak memory and step
    time of trainer.loss_path=fused vs logits (the path before issue 18)
  * TP=2 vs TP=1 per-rank peak of the fused path on that model (and of the forecast's loss buffers)
  * framework overhead: preset tiny, seq 256, micro batch 8 beside the plain-PyTorch baseline, with a
    per-phase breakdown (forward, loss, backward, DDP + optimizer) of both loss paths
  * recompute: activation memory (peak - static) at full vs none on a 4-layer model
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
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
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
    p = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    if p.returncode != 0:
        raise SystemExit(f"baseline failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def probe(spec: dict, threads: int, nproc: int = 1) -> list[dict]:
    script = str(ROOT / "tools" / "mem_probe.py")
    with tempfile.TemporaryDirectory(prefix="mdprobe-") as tmp:
        out = Path(tmp) / "o.json"
        cmd = [sys.executable, script, json.dumps(spec), str(out)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29731",
                   *cmd[1:]]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"probe {spec} failed ({p.returncode}):\n{p.stderr[-5000:]}")
        return json.loads(out.read_text())


def forecast_loss_gib(spec: dict) -> float:
    from omegaconf import OmegaConf

    from megadiff.config import ModelConfig
    from megadiff.model.memory import GIB, Layout, loss_bytes
    from megadiff.model.presets import padded_vocab_size, resolve_shape

    mc = OmegaConf.structured(ModelConfig(arch=spec.get("arch", "llama"), num_layers=spec["num_layers"],
                                          hidden_size=spec["hidden_size"], max_seq_len=spec["seq"]))
    tp = spec.get("tp", 1)
    lay = Layout(tp=tp, micro_batch=spec["micro_batch"], seq=spec["seq"], bf16=False, loss_path=spec["loss_path"])
    return loss_bytes(resolve_shape(mc), padded_vocab_size(spec["vocab"], tp), lay) / GIB


def bench_large_vocab(a) -> list[dict]:
    gib = 2**30
    big = {"num_layers": 2, "hidden_size": 256, "vocab": 128256, "seq": 512, "micro_batch": 4, "steps": 3}
    fused = probe(dict(big, loss_path="fused"), a.threads)[0]
    logits = probe(dict(big, loss_path="logits"), a.threads)[0]
    tp2 = probe(dict(big, loss_path="fused", tp=2), 1, nproc=2)
    return [
        {"bench": "large_vocab", "threads": a.threads, **{f"{k}_{n}": v for n, r in
         (("fused", fused), ("logits", logits)) for k, v in
         (("peak_GiB", round(r["peak"] / gib, 3)), ("step_s", round(r["step_s"], 3)))},
         "peak_ratio": round(fused["peak"] / logits["peak"], 3),
         "step_time_ratio": round(fused["step_s"] / logits["step_s"], 3)},
        {"bench": "tp2_vs_tp1_fused", "peak_GiB_tp1": round(fused["peak"] / gib, 3),
         "peak_GiB_tp2_per_rank": round(max(r["peak"] for r in tp2) / gib, 3),
         "peak_ratio": round(max(r["peak"] for r in tp2) / fused["peak"], 3),
         "forecast_loss_GiB_tp1": round(forecast_loss_gib(dict(big, loss_path="fused")), 3),
         "forecast_loss_GiB_tp2": round(forecast_loss_gib(dict(big, loss_path="fused", tp=2)), 3)}]


def bench_overhead(a) -> list[dict]:
    """Alternate baseline and megadiff runs (``--reps`` rounds) so that both see the same machine load;
    medians of the step times."""
    tiny = {"arch": "gpt2", "num_layers": 2, "hidden_size": 64, "heads": 4, "vocab": VOCAB, "seq": 256,
            "micro_batch": 8, "steps": 4, "phases": True}
    b = argparse.Namespace(**dict(vars(a), preset="tiny", seq=256, micro_batch=8, steps=5, warmup=2))
    times: dict[str, list[float]] = {"ref": [], "fused": [], "logits": []}
    phases: dict[str, dict] = {}
    for _ in range(a.reps):
        times["ref"].append(run_ref(b)["step_ms"] / 1e3)
        for lp in ("fused", "logits"):
            r = probe(dict(tiny, loss_path=lp), a.threads)[0]
            times[lp].append(r["step_s"])
            phases[lp] = {k: round(v, 4) for k, v in r["phases"].items()}
    med = {k: float(np.median(v)) for k, v in times.items()}
    return [{"bench": "overhead_vs_ref", "threads": a.threads, "reps": a.reps,
             **{f"{k}_step_s": [round(x, 4) for x in v] for k, v in times.items()},
             **{f"tokens_per_s_ratio_{lp}": round(med["ref"] / med[lp], 3) for lp in ("fused", "logits")},
             **{f"phases_{lp}": p for lp, p in phases.items()}}]


def bench_recompute(a) -> list[dict]:
    gib = 2**30
    four = {"num_layers": 4, "hidden_size": 256, "vocab": 4000, "seq": 512, "micro_batch": 4, "steps": 2}
    act = {m: probe(dict(four, recompute=m), a.threads)[0] for m in ("none", "full")}
    return [{"bench": "recompute_activation", **{f"act_GiB_{m}": round((r["peak"] - r["static"]) / gib, 3)
                                                 for m, r in act.items()},
             "ratio_full_over_none": round((act["full"]["peak"] - act["full"]["static"]) /
                                           (act["none"]["peak"] - act["none"]["static"]), 3)}]


SECTIONS = {"large_vocab": bench_large_vocab, "overhead": bench_overhead, "recompute": bench_recompute}


def step_suite(a) -> list[dict]:
    rows = []
    for name in a.sections.split(","):
        rows += SECTIONS[name](a)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


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
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="CPU threads of BOTH sides (OMP_NUM_THREADS of every process)")
    ap.add_argument("--step-suite", action="store_true", help="run the training-step suite (see above)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="step suite: which comparisons")
    ap.add_argument("--reps", type=int, default=2, help="step suite overhead: alternating rounds")
    a = ap.parse_args()
    if a.step_suite:
        lines = [json.dumps(r) for r in step_suite(a)]
        print("\n".join(lines), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write("\n".join(lines) + "\n")
        return 0
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
