"""Objectives for adapting AR models and hybrid losses: shifted masked diffusion, complementary masks,
joint autoregressive + diffusion loss. Maths in docs/diffusion.md ("AR adaptation and hybrid losses").

    obj = OBJECTIVES.get("mdlm_adapt")(schedule, mask_id=m, vocab_size=V, cfg=cfg.diffusion)
    obj = OBJECTIVES.get("ar_mdlm")(schedule, mask_id=m, vocab_size=V, ar_weight=1.0, diffusion_weight=0.3)

Options come from ``cfg`` (a DiffusionConfig: ``shift``, ``complementary``, ``ar_weight``,
``diffusion_weight``), keyword arguments override them.

* ``shift``: output i predicts token i + 1 (megadiff/diffusion/shift.py). Token 0 is never masked; the
  loss is over the L - 1 predicted positions (``tokens = B * (L - 1)``), a bound on the NLL of
  x_1..x_{L-1} given x_0, comparable with the AR NLL.
* ``complementary``: the model input stacks [x_t ; x_t'] where x_t' masks exactly the positions x_t keeps.
  With p = 1 - alpha(t), x_t' is a mask draw at mask probability 1 - p; writing the NELBO over the mask
  probability, NELBO = int_0^1 (1/p) E_p[sum_masked CE] dp, the complement is an unbiased estimate of it
  with weight -alpha'(t) / alpha(t) (the density of 1 - p under t ~ U is that of p). The loss is the mean
  of the two estimates: every token receives a gradient at every step.
* ``ar_mdlm``: a causal model; input stacks [x_0 ; x_t (; x_t')]: loss = ar_weight * (next-token CE on x_0)
  + diffusion_weight * (shifted MDLM NELBO estimate on x_t), both normalised by B * (L - 1). Its
  validation metric is the exact next-token NLL (the AR part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megadiff.diffusion.catalog import OBJECTIVES
from megadiff.diffusion.noise import Noise, corrupt
from megadiff.diffusion.objectives import Autoregressive, LossOut, Objective, next_token_ce, token_ce
from megadiff.diffusion.schedules import Schedule


def _opt(cfg: Any, value: Any, key: str, default: Any) -> Any:
    if value is not None:
        return value
    return getattr(cfg, key, default) if cfg is not None else default


def complement_weight(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """-alpha'(t) / alpha(t): NELBO weight of the complementary mask (mask probability alpha(t))."""
    a = schedule.alpha(t)
    return -schedule.dalpha(t) / a.clamp_min(torch.finfo(a.dtype).tiny)


@dataclass
class MaskedRows:
    """The diffusion rows of a stacked input: which positions are masked and their per-row weights."""

    masked: torch.Tensor  # [R, L] bool (R = B, or 2B with complementary masks)
    weight: torch.Tensor  # [R] float32 NELBO weight of each row
    t: torch.Tensor  # [B] float32
    copies: int  # 1, or 2 with complementary masks (the loss averages them)


def masked_rows(x0: torch.Tensor, noise: Noise, schedule: Schedule, mask_id: int, shift: bool,
                complementary: bool) -> tuple[torch.Tensor, MaskedRows]:
    """Corrupted rows [R, L] and their MaskedRows (token 0 is never masked when ``shift``)."""
    _, masked = corrupt(x0, noise, schedule, mask_id)
    t64 = noise.t.to(torch.float64)
    weights = [schedule.nelbo_weight(t64)]
    rows = [masked]
    if complementary:
        rows.append(~masked)
        weights.append(complement_weight(schedule, t64))
    masked = torch.cat(rows)
    if shift:
        masked[:, 0] = False
    x = x0.repeat(len(rows), 1)
    xt = torch.where(masked, torch.full_like(x, mask_id), x)
    return xt, MaskedRows(masked, torch.cat(weights).to(torch.float32), noise.t, len(rows))


def masked_nelbo_sum(logits: torch.Tensor, x0: torch.Tensor, mr: MaskedRows, vocab_size: int, mask_id: int,
                     shift: bool) -> torch.Tensor:
    """Weighted masked-CE sum of the diffusion rows, averaged over the copies (scalar float32)."""
    x = x0.repeat(mr.copies, 1)
    if shift:
        ce = token_ce(logits[:, :-1], x[:, 1:], vocab_size, mask_id)
        m = mr.masked[:, 1:]
    else:
        ce = token_ce(logits, x, vocab_size, mask_id)
        m = mr.masked
    ce_m = torch.where(m, ce, torch.zeros_like(ce))
    return (ce_m * mr.weight[:, None]).sum() / mr.copies


@OBJECTIVES.register("mdlm_adapt")
class MDLMAdapt(Objective):
    """MDLM's NELBO with the AR-adaptation options ``shift`` and ``complementary`` (module docstring)."""

    name = "mdlm_adapt"

    def __init__(self, schedule: Schedule, mask_id: int, vocab_size: int, cfg: Any = None, *,
                 shift: Optional[bool] = None, complementary: Optional[bool] = None, **_: Any):
        super().__init__(schedule, mask_id, vocab_size)
        self.shift = bool(_opt(cfg, shift, "shift", False))
        self.complementary = bool(_opt(cfg, complementary, "complementary", False))

    @property
    def rows_per_sample(self) -> int:
        return 2 if self.complementary else 1

    def for_validation(self) -> Objective:
        """The same bound with one mask per sequence (the complement only reduces training variance)."""
        if not self.complementary:
            return self
        return MDLMAdapt(self.schedule, self.mask_id, self.vocab_size, shift=self.shift, complementary=False)

    def prepare(self, x0, noise):
        return masked_rows(x0, noise, self.schedule, self.mask_id, self.shift, self.complementary)

    def loss(self, logits, x0, aux: MaskedRows):
        loss_sum = masked_nelbo_sum(logits, x0, aux, self.vocab_size, self.mask_id, self.shift)
        B, L = x0.shape
        return LossOut(loss_sum, torch.tensor(B * (L - int(self.shift)), device=x0.device))


@OBJECTIVES.register("ar_mdlm")
class ARMDLM(Objective):
    """ar_weight * next-token CE + diffusion_weight * shifted MDLM NELBO, one causal model (module docstring)."""

    name = "ar_mdlm"

    def __init__(self, schedule: Schedule, mask_id: int, vocab_size: int, cfg: Any = None, *,
                 ar_weight: Optional[float] = None, diffusion_weight: Optional[float] = None,
                 complementary: Optional[bool] = None, **_: Any):
        super().__init__(schedule, mask_id, vocab_size)
        self.ar_weight = float(_opt(cfg, ar_weight, "ar_weight", 1.0))
        self.diffusion_weight = float(_opt(cfg, diffusion_weight, "diffusion_weight", 0.3))
        self.complementary = bool(_opt(cfg, complementary, "complementary", False))
        if self.ar_weight < 0 or self.diffusion_weight < 0 or self.ar_weight + self.diffusion_weight <= 0:
            raise ValueError(f"ar_mdlm weights must be >= 0 and not both 0, got ar_weight={self.ar_weight}, "
                             f"diffusion_weight={self.diffusion_weight}")

    @property
    def rows_per_sample(self) -> int:
        return 3 if self.complementary else 2

    def for_validation(self) -> Objective:
        """The exact next-token NLL of the (causal) model."""
        return Autoregressive(self.schedule, mask_id=self.mask_id, vocab_size=self.vocab_size)

    def prepare(self, x0, noise):
        xt, mr = masked_rows(x0, noise, self.schedule, self.mask_id, True, self.complementary)
        return torch.cat([x0, xt]), mr

    def loss(self, logits, x0, aux: MaskedRows):
        B, L = x0.shape
        ar = next_token_ce(logits[:B], x0, self.vocab_size, self.mask_id)
        diff = masked_nelbo_sum(logits[B:], x0, aux, self.vocab_size, self.mask_id, True)
        loss_sum = self.ar_weight * ar.sum() + self.diffusion_weight * diff
        return LossOut(loss_sum, torch.tensor(B * (L - 1), device=x0.device))
