"""Sampler benchmark: wall time, network calls, and sample quality, side by side in one run.

    # untrained tiny model, 1024 tokens (calls and wall time only):
    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_sampling.py --length 1024 --batch 1
    # a trained checkpoint, scored by an AR checkpoint (or a local HF causal LM) -> matched-quality table:
    .venv/bin/python tools/bench_sampling.py --checkpoint runs/demo/train --scorer runs/demo/ar --num 64

Untrained mode: a tiny randomly initialised bidirectional transformer (2 layers, d=64, vocab 257 incl.
[MASK]); its samples are not meaningful text, so the entropy column only shows that the samplers
produce the same kind of output. Checkpoint mode: unconditional samples of the model's full context from
each sampler, their generative perplexity under --scorer and unigram entropy, next to the same figures
for held-out real text.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time

import torch

from megadiff.diffusion.samplers import SAMPLERS

V, MASK = 257, 256


class Tiny(torch.nn.Module):
    def __init__(self, L: int, d: int = 64, layers: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, d)
        self.pos = torch.nn.Parameter(torch.randn(L, d) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = torch.nn.Linear(d, 384)  # padded vocab, as megatron does

    def forward(self, x):
        return self.out(self.enc(self.emb(x) + self.pos[: x.shape[1]])) * 4


def entropy(tokens: torch.Tensor) -> float:
    """Mean over samples of the unigram entropy (nats) of each sample's tokens."""
    hs = []
    for row in tokens:
        p = torch.bincount(row, minlength=V).double()
        p = p[p > 0] / p.sum()
        hs.append(float(-(p * p.log()).sum()))
    return sum(hs) / len(hs)


def bench_checkpoint(args) -> None:
    """Matched-quality comparison on a trained checkpoint (every sampler draws from the same canvas)."""
    import numpy as np

    from megadiff.checkpoint.inference import load_for_inference
    from megadiff.eval.genquality import load_scorer, run_sampler, sampler_kwargs, score_samples
    from megadiff.eval.zeroshot import model_seq_len, shard_set

    im = load_for_inference(args.checkpoint, device=args.device)
    scorer = load_scorer(args.scorer, im)
    L = args.length or model_seq_len(im)
    canvas = torch.full((args.num, L), im.info.mask_id, dtype=torch.int64)
    bl = args.block if args.block < L else L // 4
    runs = [
        ("ancestral, no cache, T=L", "ancestral", {"steps": L}, {"cache": False}),
        ("ancestral, cache, T=L", "ancestral", {"steps": L}, {"cache": True}),
        ("ancestral, no cache, T=4L", "ancestral", {"steps": 4 * L}, {"cache": False}),
        ("ancestral, cache, T=4L", "ancestral", {"steps": 4 * L}, {"cache": True}),
        ("first-hitting (exact)", "first_hitting", {}, {}),
        ("first-hitting, group 4 (approx.)", "first_hitting", {}, {"group": 4}),
        (f"block {bl}, cache, {bl} steps/block", "block", {"steps": bl, "block_length": bl}, {"cache": True}),
        (f"llada low-conf, block {bl}, {bl // 4} steps/block", "llada", {"steps": bl // 4, "block_length": bl}, {}),
        ("ancestral, cache, T=L/4 (approx.)", "ancestral", {"steps": L // 4}, {"cache": True}),
    ]
    ref = shard_set(im, im.cfg.data.valid[0].path, im.cfg.data.valid[0].split, max_seqs=args.num, seed=0).seqs
    rq = score_samples(scorer, im, ref[:, :L].tolist())
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, {datetime.date.today()}; checkpoint {args.checkpoint} (step {im.step}), "
          f"scorer {args.scorer}; {args.num} samples x {L} tokens, batch {args.batch}, temperature 1")
    print("| sampler | wall s | evals/seq | vs plain T=L | gen PPL | gen NLL ± sem | entropy ± sem |")
    print("|---|---|---|---|---|---|---|")
    print(f"| held-out text (reference) | - | - | - | {rq['gen_ppl']:.1f} | {rq['gen_nll']:.3f} ± "
          f"{rq['gen_nll_sem']:.3f} | {rq['entropy']:.3f} ± {rq['entropy_sem']:.3f} |", flush=True)
    base = None
    for label, name, skw, extra in runs:
        kw = sampler_kwargs(im, name, length=L, **skw)
        kw.update(extra)
        t0 = time.perf_counter()
        with torch.no_grad():
            toks, st = run_sampler(im, canvas, name, kw, seed=args.seed, batch_size=args.batch, progress=False)
        dt = time.perf_counter() - t0
        evals = float(np.mean([s["nfe"] for s in st]))
        base = base or evals
        q = score_samples(scorer, im, toks.tolist())
        print(f"| {label} | {dt:.1f} | {evals:.0f} | {base / evals:.2f}x | {q['gen_ppl']:.1f} | "
              f"{q['gen_nll']:.3f} ± {q['gen_nll_sem']:.3f} | {q['entropy']:.3f} ± {q['entropy_sem']:.3f} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=None, help="tokens to generate (default 1024; checkpoint: its context)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per sampler call")
    ap.add_argument("--block", type=int, default=128, help="block length of the block and llada rows")
    ap.add_argument("--checkpoint", default=None, help="a trained run directory (checkpoint mode)")
    ap.add_argument("--scorer", default=None, help="checkpoint mode: AR checkpoint or local HF causal LM directory")
    ap.add_argument("--num", type=int, default=32, help="checkpoint mode: samples per sampler")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.checkpoint:
        if not args.scorer:
            ap.error("--checkpoint needs --scorer")
        return bench_checkpoint(args)
    L, B = args.length or 1024, args.batch
    model = Tiny(L).eval()
    x = torch.full((B, L), MASK)
    runs = [
        ("ancestral, no cache, T=L", "ancestral", {"steps": L, "cache": False}),
        ("ancestral, cache, T=L", "ancestral", {"steps": L, "cache": True}),
        ("ancestral, no cache, T=4L", "ancestral", {"steps": 4 * L, "cache": False}),
        ("ancestral, cache, T=4L", "ancestral", {"steps": 4 * L, "cache": True}),
        ("first-hitting (exact, T=inf)", "first_hitting", {}),
        ("first-hitting, group 4", "first_hitting", {"group": 4}),
        (f"block {args.block}, cache, T=L total", "block",
         {"steps": args.block, "block_length": args.block, "cache": True}),
        (f"llada low-conf, block {args.block}, L/4 steps", "llada",
         {"steps": args.block // 4, "block_length": args.block}),
    ]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {datetime.date.today()}; L={L}, batch={B}")
    print("| sampler | wall s | calls | evals/seq | vs plain T=L | entropy (nats) |")
    print("|---|---|---|---|---|---|")
    base = None
    for label, name, kw in runs:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = SAMPLERS.get(name)(model, x, mask_id=MASK, vocab_size=V,
                                     generator=torch.Generator().manual_seed(0), **kw)
        dt = time.perf_counter() - t0
        assert not bool((out.tokens == MASK).any())
        evals = float(out.nfe_rows.double().mean())
        base = base or evals
        print(f"| {label} | {dt:.1f} | {out.nfe} | {evals:.0f} | {base / evals:.2f}x | {entropy(out.tokens):.3f} |",
              flush=True)
    print(f"(uniform over 256 tokens: {math.log(256):.3f} nats; max possible for L={L}: {math.log(min(L, 256)):.3f})")


if __name__ == "__main__":
    main()
