"""Noise schedules of the absorbing (masking) forward process.

A schedule gives alpha(t), the probability that a token is still clean at time t in [0, 1]
(alpha(0) = 1, alpha(1) ~ 0, decreasing), its derivative alpha'(t), and the inverse
t(alpha) used by the first-hitting sampler. All methods are elementwise on tensors and keep
the input dtype (pass float64 for references).

    sched = SCHEDULES.get("loglinear")();  sched.alpha(t); sched.dalpha(t); sched.t_of_alpha(a)
    sched = make_schedule(cfg.diffusion)   # from a DiffusionConfig (uses schedule_power)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megadiff.diffusion.catalog import SCHEDULES


class Schedule:
    """Base class: subclasses define ``alpha``, ``dalpha`` and ``t_of_alpha``."""

    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_of_alpha(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_at_mask_prob(self, p: float) -> float:
        """The time at which a token is masked with probability ``p`` (the eps cut of a bound)."""
        return float(self.t_of_alpha(torch.tensor(1.0 - p, dtype=torch.float64)))

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha(t): probability that a token is masked at time t."""
        return 1.0 - self.alpha(t)

    def nelbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)): the continuous-time NELBO weight (1/t for loglinear)."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@SCHEDULES.register("loglinear")
class LogLinear(Schedule):
    """alpha(t) = 1 - t (MDLM's log-linear schedule: total noise sigma(t) = -log(1 - t))."""

    name = "loglinear"

    def alpha(self, t):
        return 1.0 - t

    def dalpha(self, t):
        return -torch.ones_like(t)

    def t_of_alpha(self, a):
        return 1.0 - a


@SCHEDULES.register("linear")
class LinearSigma(Schedule):
    """alpha(t) = exp(-sigma(t)), sigma(t) = sigma_max * t linear in t (SEDD/MDLM 'linear').

    alpha(0) = 1 and alpha(1) = exp(-sigma_max) (2e-9 for the default 20); samplers start
    from the fully masked sequence and treat the leftover as 0.
    """

    name = "linear"

    def __init__(self, sigma_max: float = 20.0):
        self.sigma_max = float(sigma_max)

    def alpha(self, t):
        return torch.exp(-self.sigma_max * t)

    def dalpha(self, t):
        return -self.sigma_max * torch.exp(-self.sigma_max * t)

    def t_of_alpha(self, a):
        return (-torch.log(a) / self.sigma_max).clamp(0.0, 1.0)


@SCHEDULES.register("cosine")
class Cosine(Schedule):
    """alpha(t) = 1 - cos(pi/2 * (1 - t)) (MD4's cosine schedule)."""

    name = "cosine"

    def alpha(self, t):
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))

    def dalpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))

    def t_of_alpha(self, a):
        return 1.0 - torch.acos((1.0 - a).clamp(-1.0, 1.0)) * (2.0 / math.pi)


@SCHEDULES.register("poly")
class Polynomial(Schedule):
    """alpha(t) = 1 - t**power (MD4's polynomial schedule; power=1 is loglinear)."""

    name = "poly"

    def __init__(self, power: float = 1.0):
        if power <= 0:
            raise ValueError(f"poly schedule power must be > 0, got {power}")
        self.power = float(power)

    def alpha(self, t):
        return 1.0 - t**self.power

    def dalpha(self, t):
        return -self.power * t ** (self.power - 1.0)

    def t_of_alpha(self, a):
        return (1.0 - a).clamp_min(0.0) ** (1.0 / self.power)

    def __repr__(self) -> str:
        return f"Polynomial(power={self.power})"


def make_schedule(name_or_cfg: Any, power: float = 1.0) -> Schedule:
    """Build a schedule from a name or a ``DiffusionConfig`` (which carries ``schedule_power``)."""
    if isinstance(name_or_cfg, str):
        name = name_or_cfg
    else:
        name, power = name_or_cfg.schedule, float(getattr(name_or_cfg, "schedule_power", power))
    cls = SCHEDULES.get(name)
    return cls(power=power) if cls is Polynomial else cls()
