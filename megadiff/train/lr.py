"""Learning-rate schedules (registry ``LR_SCHEDULES``): lr(step) for step in [0, max_steps)."""

from __future__ import annotations

import math
from typing import Callable

from megadiff.registry import Registry

LR_SCHEDULES: Registry[Callable[..., float]] = Registry("learning-rate schedule")


def _warmup(step: int, warmup: int, lr: float) -> float | None:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    return None


@LR_SCHEDULES.register("cosine")
def cosine(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int, **_) -> float:
    """Linear warmup, then cosine decay from lr to min_lr, reaching min_lr at the last step."""
    w = _warmup(step, warmup, lr)
    if w is not None:
        return w
    span = max(1, max_steps - 1 - warmup)
    frac = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


@LR_SCHEDULES.register("wsd")
def wsd(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int, decay_fraction: float = 0.2, **_) -> float:
    """Warmup-stable-decay: warmup, constant lr, then linear decay to min_lr over the last fraction."""
    w = _warmup(step, warmup, lr)
    if w is not None:
        return w
    decay_steps = max(1, int(round(decay_fraction * max_steps)))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return lr
    frac = min(1.0, (step - decay_start + 1) / decay_steps)
    return lr + (min_lr - lr) * frac


@LR_SCHEDULES.register("constant")
def constant(step: int, *, lr: float, warmup: int, **_) -> float:
    w = _warmup(step, warmup, lr)
    return lr if w is None else w


def lr_at(step: int, optim_cfg, max_steps: int) -> float:
    fn = LR_SCHEDULES.get(optim_cfg.lr_schedule)
    return fn(step, lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, warmup=optim_cfg.warmup_steps,
              max_steps=max_steps, decay_fraction=optim_cfg.decay_fraction)
