"""Sampler benchmark on CPU: wall time, network calls and unigram entropy, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_sampling.py --length 1024 --batch 1

Model: a tiny randomly initialised bidirectional transformer (2 layers, d=64, vocab 257 incl.
[MASK]); its samples are not meaningful text, so the entropy column only shows that the samplers
produce the same kind of output (a trained checkpoint is needed for generative perplexity).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args()
    L, B = args.length, args.batch
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
