"""`megadiff demo`: the whole system on the bundled corpus, on CPU, in a few minutes.

tokenize (Ray) -> train on 2 processes (DP=2), stop half-way and resume from the checkpoint ->
eval (NELBO perplexity bound, compared with the corpus's unigram perplexity) -> samples -> MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from megadiff import EXIT_REQUEUE


def register(sub) -> None:
    p = sub.add_parser("demo", help="tokenize -> train -> eval -> sample -> MLflow on the bundled corpus (CPU)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="demo recipe")
    p.add_argument("--nproc", type=int, default=2, help="training processes (data parallel)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=200")
    p.set_defaults(func=run)


def _step(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def _megadiff(*args: str) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    return subprocess.call([sys.executable, "-m", "megadiff.cli", *args], env=env)


def unigram_perplexity(data_dir: Path, split: str = "valid", train_split: str = "train") -> float:
    """Perplexity of the validation tokens under the train split's unigram distribution (add-one)."""
    import numpy as np

    from megadiff.data.loader import ShardDataset

    tr = ShardDataset(data_dir, train_split)
    va = ShardDataset(data_dir, split)
    v = tr.info.vocab_size
    counts = np.ones(v, dtype=np.float64)
    for i in range(len(tr)):
        counts += np.bincount(tr[i], minlength=v)[:v]
    logp = np.log(counts / counts.sum())
    nll, n = 0.0, 0
    for i in range(len(va)):
        x = va[i]
        nll -= float(logp[x].sum())
        n += len(x)
    return math.exp(nll / max(n, 1))


def run(args) -> int:
    from megadiff.config import load_config

    t0 = time.time()
    cfg = load_config(args.config, args.overrides)
    data_dir, run_dir = Path(cfg.data.out_dir), Path(cfg.trainer.run_dir)
    ov = list(args.overrides)

    _step("1/5 tokenize the bundled corpus (Ray pipeline -> webdataset shards)")
    if _megadiff("data", "tokenize", args.config, *ov) != 0:
        return 1
    _megadiff("data", "inspect", str(data_dir), "--verify", "--decode", "1")

    half = cfg.trainer.max_steps // 2
    _step(f"2/5 train on {args.nproc} CPU processes: steps 1-{half}, then stop (as if preempted)")
    rc = _megadiff("train", args.config, *ov, f"trainer.stop_after={half}", "--nproc-per-node", str(args.nproc))
    if rc not in (0, EXIT_REQUEUE):
        return rc
    _step(f"3/5 resume from {run_dir}/checkpoints/latest and finish ({cfg.trainer.max_steps} steps), then sample")
    rc = _megadiff("train", args.config, *ov, "trainer.stop_after=0", "--nproc-per-node", str(args.nproc))
    if rc != 0:
        return rc

    _step("4/5 validation perplexity bound vs the corpus's unigram perplexity")
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val/nelbo" in line]
    for e in evals:
        print(f"  step {e['step']:>5}: val NELBO {e['val/nelbo']:.4f} nats/token -> perplexity <= {e['val/ppl_bound']:.1f}")
    uni = unigram_perplexity(data_dir)
    final = evals[-1]["val/ppl_bound"] if evals else float("nan")
    verdict = "below" if final < uni else "NOT below"
    print(f"  unigram perplexity of the validation text: {uni:.1f}; final bound {final:.1f} is {verdict} it")
    summary = {"unigram_ppl": uni, "final_ppl_bound": final, "evals": evals, "minutes": (time.time() - t0) / 60}
    from megadiff.utils.io import atomic_write_json

    atomic_write_json(run_dir / "demo_summary.json", summary)

    _step("5/5 MLflow")
    _megadiff("runs", "ls", str(run_dir))
    print(f"\n  open the UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{(run_dir / 'mlflow.db').resolve()} "
          f"--host 127.0.0.1 --port 5000")
    print(f"  samples: {run_dir / 'samples.jsonl'}   loss curve: {run_dir / 'loss_curve.png'}")
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min")
    return 0 if final < uni else 1
