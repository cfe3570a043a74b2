"""Schedules over training steps for adapting AR models (issue 13 items 1 and 3): pure functions of the
step (and a seed), so a resumed run sees exactly what an uninterrupted one saw. Wired into training by
``megadiff.train.step`` (config keys ``diffusion.anneal_steps`` and ``diffusion.block_curriculum_*``, see
docs/diffusion.md); validation and sampling use neither (full bidirectional attention, the run's
``diffusion.block_size``).

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
      cur = block_curriculum(cfg.diffusion, cfg.trainer.max_steps, L)   # None when off; B = cur.size_at(step, L)

* What an export states (``annealing_record``): anneal_steps, the steps trained and the fraction of the
  upper triangle open in the last of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megadiff import MegadiffError
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


@dataclass(frozen=True)
class BlockCurriculum:
    """The block curriculum of a run: ``diffusion.block_curriculum_*``, ending at ``diffusion.block_size``
    after ``trainer.max_steps`` steps."""

    start: int
    end: int
    warmup_steps: int
    decay_steps: int
    total_steps: int

    def size_at(self, step: int, seq_len: int) -> int:
        return block_size_at(step, self.total_steps, seq_len, start=self.start, end=self.end,
                             warmup_steps=self.warmup_steps, decay_steps=self.decay_steps)


def block_curriculum(cfg_diffusion: Any, total_steps: int, seq_len: int) -> Optional[BlockCurriculum]:
    """The run's curriculum (None when ``diffusion.block_curriculum_start`` is 0), checked against the
    training sequence length: a bad value is a MegadiffError naming the config keys."""
    d = cfg_diffusion
    start = int(getattr(d, "block_curriculum_start", 0) or 0)
    if start == 0:
        return None
    cur = BlockCurriculum(start, int(d.block_size), int(d.block_curriculum_warmup_steps),
                          int(d.block_curriculum_decay_steps), int(total_steps))
    try:
        cur.size_at(0, seq_len)
    except ValueError as e:
        raise MegadiffError(
            f"block curriculum: {e} (start = diffusion.block_curriculum_start={cur.start}, end = "
            f"diffusion.block_size={cur.end}, warmup_steps = diffusion.block_curriculum_warmup_steps="
            f"{cur.warmup_steps}, decay_steps = diffusion.block_curriculum_decay_steps={cur.decay_steps}, "
            f"total_steps = trainer.max_steps={cur.total_steps}, seq_len = the training data's {seq_len}); "
            f"pick start and block_size with seq_len / size a power of two (e.g. 4 and 16 for seq_len 64) and "
            f"warmup + decay <= max_steps") from None
    return cur


def annealing_record(cfg_diffusion: Any, steps_done: int) -> Optional[dict]:
    """What an export states about attention-mask annealing after ``steps_done`` training steps (None when
    the run does not anneal): the last step trained (0-based steps_done - 1) had a fraction
    min(1, steps_done / anneal_steps) of the upper triangle open; 0 before any step (the causal start)."""
    n = int(getattr(cfg_diffusion, "anneal_steps", 0) or 0)
    if n <= 0:
        return None
    done = max(0, int(steps_done))
    return {"anneal_steps": n, "steps_trained": done, "fraction_open": min(1.0, done / n), "complete": done >= n}


def annealing_readme(rec: dict) -> str:
    """Markdown lines for an exported model's README stating its annealing state."""
    state = ("complete: the last steps trained with full bidirectional attention" if rec["complete"] else
             f"**incomplete**: the last step trained with the causal mask plus {rec['fraction_open']:.1%} of "
             f"the upper triangle (a random share, redrawn each step); full bidirectional attention, as "
             f"`config.json` states, is what it is being adapted toward")
    return (f"- Attention-mask annealing (DiffuLLaMA): `diffusion.anneal_steps={rec['anneal_steps']}`, "
            f"{rec['steps_trained']} steps trained; {state} (`megadiff_annealing` in `config.json`)\n")
