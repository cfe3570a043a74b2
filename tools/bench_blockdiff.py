"""Packed-document masks and block diffusion, side by side in one run (issue 16 benchmarks).

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_blockdiff.py            # prints a markdown table

1. Training step (forward + backward + loss) of a megatron GPTModel on CPU at one shape, default
   backend (sdpa): no mask vs packed-document mask (dense boolean, positions restarted).
2. bd3lm step (model input [x_t ‖ x_0], 2L tokens, BD3-LM mask) vs an MDLM step at the same data
   tokens (B x L).
3. Block sampling at L = 1024, block 32: KV cache of the clean prefix vs recomputing the prefix at
   every call; full-sequence-equivalent FLOPs (each call: 2 x linear params x queries + 4 x layers x
   hidden x queries x keys, over the cost of one bidirectional forward of L tokens), wall time, and
   whether the outputs are identical (same seed).
Timings interleave the variants (A B A B ...) and report medians.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from omegaconf import OmegaConf


def _model(seq: int, layers: int, hidden: int, heads: int, vocab: int):
    from megadiff.config import ModelConfig
    from megadiff.model.build import build_model

    cfg = OmegaConf.structured(ModelConfig(arch="llama", num_layers=layers, hidden_size=hidden,
                                           num_attention_heads=heads, max_seq_len=seq, attention_backend="auto"))
    torch.manual_seed(0)
    return build_model(cfg, vocab, masked=True)


def _segments(B: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """Documents of random lengths (mean L/4) packed into each row."""
    seg = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        cuts = sorted(torch.randint(1, L, (3,), generator=gen).tolist())
        for c in cuts:
            seg[b, c:] += 1
    return seg


def _time(fns: dict, reps: int) -> dict:
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in out.items()}  # first rep is warm-up


def bench_train(a) -> list[str]:
    from megadiff.diffusion.block import BD3LM
    from megadiff.diffusion.noise import make_noise
    from megadiff.diffusion.objectives import OBJECTIVES
    from megadiff.diffusion.schedules import LogLinear
    from megadiff.model.masks import attention_inputs

    B, L, V = a.batch, a.seq, a.vocab
    built = _model(2 * L, a.layers, a.hidden, a.heads, V)
    m = built.model.train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V - 1, (B, L), generator=g)
    seg = _segments(B, L, g)
    noise = make_noise(0, 0, torch.arange(B), L, eps=1e-3, antithetic=True, global_batch=B)
    mdlm = OBJECTIVES.get("mdlm")(LogLinear(), mask_id=V - 1, vocab_size=V)
    bd = BD3LM(LogLinear(), V - 1, V, block_size=a.block)

    def step(obj, segments, block):
        def run():
            m.zero_grad(set_to_none=True)
            inp, aux = obj.prepare(x0, noise)
            pos, mask = attention_inputs(L, B, x0.device, segment_ids=segments, block_size=block,
                                         reset_position_ids=segments is not None)
            obj.loss(m(inp, pos, mask), x0, aux).loss_sum.backward()
        return run

    t = _time({"mdlm": step(mdlm, None, 0), "mdlm_doc": step(mdlm, seg, 0), "bd3lm": step(bd, None, a.block)},
              a.reps)
    return [
        f"| training step, no mask (B={B}, L={L}) | {t['mdlm'] * 1e3:.0f} ms | 1.00x | |",
        f"| training step, packed-document mask (sdpa, dense) | {t['mdlm_doc'] * 1e3:.0f} ms | "
        f"{t['mdlm_doc'] / t['mdlm']:.2f}x | ≤ 1.25x |",
        f"| bd3lm step (block {a.block}, input 2L = {2 * L}) vs MDLM at equal tokens | {t['bd3lm'] * 1e3:.0f} ms | "
        f"{t['bd3lm'] / t['mdlm']:.2f}x | ≤ 2.3x |",
    ]


def bench_sampling(a) -> list[str]:
    from megadiff.diffusion.block_sampler import block_diffusion_sample, full_sequence_flops
    from megadiff.model.block_lm import MegatronDenoiser
    from megadiff.model.flops import count_params

    L, bs, V = a.sample_len, a.sample_block, a.vocab
    built = _model(L, a.layers, a.hidden, a.heads, V)
    den = MegatronDenoiser(built.model.eval(), bs)
    prompt = torch.randint(0, V - 1, (a.sample_batch, bs), generator=torch.Generator().manual_seed(1))
    kw = {"block_size": bs, "mask_id": V - 1, "vocab_size": V, "seed": 0, "steps_per_block": a.steps}
    res, wall = {}, {}
    for cache in (True, False):
        t0 = time.perf_counter()
        res[cache] = block_diffusion_sample(den, prompt, L - bs, cache=cache, **kw)
        wall[cache] = time.perf_counter() - t0
    pc = count_params(built.shape, built.padded_vocab_size)
    lin = 2.0 * (built.shape.num_layers * pc.linear_per_layer + built.padded_vocab_size * built.shape.hidden_size)
    att = 4.0 * built.shape.num_layers * built.shape.hidden_size
    f = {c: full_sequence_flops(res[c].calls, L, lin, att) for c in (True, False)}
    same = torch.equal(res[True].tokens, res[False].tokens)
    return [
        f"| block sampling L={L}, block {bs}, {a.steps} steps/block, recompute prefix | "
        f"{f[False]:.1f} full-seq fwd ({res[False].nfe} calls, {wall[False]:.1f} s) | 1.00x | |",
        f"| block sampling, exact KV cache of the clean prefix | {f[True]:.1f} full-seq fwd "
        f"({res[True].nfe} calls, {wall[True]:.1f} s) | **{f[False] / f[True]:.1f}x fewer FLOPs**, "
        f"{wall[False] / wall[True]:.1f}x faster; outputs identical: {same} | ≥ 3x, identical |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--sample-len", type=int, default=1024)
    ap.add_argument("--sample-block", type=int, default=32)
    ap.add_argument("--sample-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="denoising calls per block")
    a = ap.parse_args()
    from megadiff.dist.parallel import destroy_parallel, init_parallel

    init_parallel(device="cpu")
    rows = bench_train(a) + bench_sampling(a)
    destroy_parallel()
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; model: llama, "
          f"{a.layers} layers, hidden {a.hidden}, {a.heads} heads, vocab {a.vocab}, fp32")
    print("| measurement | value | ratio | target |\n|---|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
