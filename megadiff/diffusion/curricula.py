"""Schedules over training steps for adapting AR models (issue 13 items 1 and 3): pure functions of the
step (and a seed), so a resumed run sees exactly what an uninterrupted one saw. Not wired into the
model yet: they wait for mask-aware attention and block diffusion.

* Attention-mask annealing (DiffuLLaMA): at 0-based step s the causal mask opens a fraction
  ``anneal_ratio(s, anneal_steps) = min(1, (s + 1) / anneal_steps)`` of the upper triangle; each
  upper-triangle entry (i, j), j > i, is opened independently with that probability, redrawn every step
  from the counter-based hash of (seed, step, i, j) and shared by the whole batch. anneal_steps = 0:
  bidirectional from the start.

      allowed = annealed_attention(seed, step, L, anneal_steps)   # [L, L] bool, True = may attend

* Block-size curriculum (LLaDA 2.0's warmup-stable-decay over the block size): during ``warmup_steps``
  the block grows geometrically start, 2 start, 4 start, ... < L (equal steps per stage); then
  full-sequence MDLM (block = L) until the decay; during the last ``decay_steps`` it takes L/2, L/4, ...
  down to ``end`` (equal steps per stage). Every size divides L (L / start and L / end are powers of 2).

      B = block_size_at(step, total_steps, L, start=1, end=32, warmup_steps=..., decay_steps=...)
"""

from __future__ import annotations

import torch

from megadiff.diffusion.noise import _key, _to_unit, mix32

_S_ANNEAL = 0x2F9BE6CD


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Fraction of the upper triangle open at 0-based ``step``: min(1, (step + 1) / anneal_steps)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / anneal_steps)


def annealed_attention(seed: int, step: int, seq_len: int, anneal_steps: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """[L, L] bool attention permission: causal part always, each upper entry with prob anneal_ratio."""
    ratio = anneal_ratio(step, anneal_steps)
    i = torch.arange(seq_len, dtype=torch.int64, device=device)
    causal = i[None, :] <= i[:, None]
    if ratio >= 1.0:
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    key = _key(seed, step, _S_ANNEAL)
    h = mix32(torch.full((seq_len, seq_len), key, dtype=torch.int64, device=device) ^ mix32(i[:, None] * 2 + 1))
    u = _to_unit(mix32(h ^ mix32(i[None, :] * 2 + 0x9E3779B9)), torch.float64)
    return causal | (u < ratio)


def _stages_below(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... below hi; [hi] when lo == hi."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out or [hi]


def _stage(sizes: list[int], k: int, n: int) -> int:
    """Size of stage at step k of n steps split equally among the stages."""
    return sizes[min(len(sizes) - 1, k * len(sizes) // n)]


def block_size_at(step: int, total_steps: int, seq_len: int, *, start: int, end: int, warmup_steps: int,
                  decay_steps: int) -> int:
    """Block size at 0-based ``step`` of a warmup-stable-decay block curriculum (module docstring)."""
    for name, b in (("start", start), ("end", end)):
        if b <= 0 or seq_len % b:
            raise ValueError(f"block curriculum {name}={b} must be > 0 and divide seq_len={seq_len}")
    for name, b in (("start", start), ("end", end)):
        k = seq_len // b
        if k & (k - 1):
            raise ValueError(f"block curriculum {name}={b}: seq_len / {name} = {k} must be a power of two so that "
                             f"every stage (doubling or halving) divides seq_len={seq_len}")
    if warmup_steps < 0 or decay_steps < 0 or warmup_steps + decay_steps > total_steps:
        raise ValueError(f"block curriculum: warmup_steps={warmup_steps} + decay_steps={decay_steps} must fit in "
                         f"total_steps={total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")
    if step < warmup_steps:
        return _stage(_stages_below(start, seq_len), step, warmup_steps)
    decay_from = total_steps - decay_steps
    if step < decay_from:
        return seq_len
    return _stage(_stages_below(end, seq_len)[::-1], step - decay_from, decay_steps)
