"""Interpolating mask + uniform noise (GIDD family; uniform_fraction = 1 is uniform diffusion as in
SEDD-uniform / Duo, 0 is MDLM) with its continuous-time NELBO. Maths in docs/diffusion.md ("Uniform and
mask + uniform noise").

Per token, independently: q_t(z | x) = alpha(t) [z = x] + (1 - alpha(t)) pi_z with the mixing
distribution pi = (1 - f) [MASK] + f * Uniform(N real non-mask tokens), f = ``uniform_fraction``. The
forward process is the CTMC that at rate beta(t) = -alpha'(t)/alpha(t) resamples a token from pi. The
model's denoiser xhat(. | z_t) (softmax over the real vocab, mask column excluded) defines the reverse
rates through qhat_t(v) = alpha xhat(v) + (1 - alpha) pi_v, and the continuous-time NELBO is

    NELBO(x) = int_0^1 E_{z_t ~ q_t(.|x)} sum_l beta(t) pi_{z_l} S_l dt,
    S = sum_{y != z} [ rhat_y - r_y + r_y log(r_y / rhat_y) ],  r_y = q_t(y|x)/q_t(z|x), rhat_y = qhat_t(y)/qhat_t(z)

(the generalised KL between the true-conditional and the model reverse rates out of z). With f = 0 it
reduces to MDLM's -alpha'/(1 - alpha) * CE on the masked tokens. ``loss`` evaluates S in closed form
(one O(V) reduction per position: sum_{y != MASK} log qhat(y)); per-position algebra in float64.

Uniform replacements come from the same counter-based noise as the masks: position l of sample b is
corrupted iff u < 1 - alpha(t); it becomes [MASK] iff u < (1 - alpha)(1 - f), otherwise the token whose
index is a 32-bit hash of (u, t, l) modulo N (skipping the mask id). Deterministic in (seed, step, sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megadiff.diffusion.catalog import OBJECTIVES
from megadiff.diffusion.noise import Noise, mix32
from megadiff.diffusion.objectives import LossOut, Objective, restrict_logits
from megadiff.diffusion.schedules import Schedule


@dataclass
class UniformAux:
    z: torch.Tensor  # [B, L] the corrupted tokens (the model input)
    corrupted: torch.Tensor  # [B, L] bool: resampled from pi (a mask, or a uniform token that may equal x0)
    t: torch.Tensor  # [B] float32


def uniform_tokens(noise: Noise, L: int, n_real: int, mask_id: int) -> torch.Tensor:
    """[B, L] int64 token ids uniform over the real non-mask tokens, a hash of (u, t, position)."""
    ub = (noise.u[:, :L].to(torch.float64) * 2.0**25).to(torch.int64)  # exact: u = (k + 1/2) 2^-24
    tb = (noise.t.to(torch.float64) * 2.0**24).to(torch.int64)[:, None]
    pos = torch.arange(L, dtype=torch.int64, device=ub.device)[None, :]
    h = mix32(mix32(ub ^ 0x5BD1E995) ^ mix32(tb + 0x68E31DA4) ^ mix32(pos * 2 + 0x1B56C4E9))
    k = h % n_real
    return k + (k >= mask_id).to(torch.int64)


def corrupt_interpolating(x0: torch.Tensor, noise: Noise, schedule: Schedule, mask_id: int, vocab_size: int,
                          uniform_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t ~ q_t(. | x0) per token: (z, corrupted) — corrupted = resampled from pi (possibly to x0 itself)."""
    L = x0.shape[1]
    p = (1.0 - schedule.alpha(noise.t.to(torch.float64)))[:, None]
    u = noise.u[:, :L].to(torch.float64)
    corrupted = u < p
    to_mask = u < p * (1.0 - uniform_fraction)
    z = torch.where(corrupted, uniform_tokens(noise, L, vocab_size - 1, mask_id), x0)
    return torch.where(to_mask, torch.full_like(x0, mask_id), z), corrupted


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * torch.log(y.clamp_min(1e-300)), torch.zeros_like(x))


def interpolating_nelbo_terms(logits: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor,
                              beta: torch.Tensor, mask_id: int, vocab_size: int,
                              uniform_fraction: float) -> torch.Tensor:
    """[B, L] float64: beta * pi_z * S at each position (module docstring); alpha, beta: [B] float64."""
    f, N = float(uniform_fraction), vocab_size - 1
    a = alpha.to(torch.float64)[:, None]
    b = 1.0 - a
    c = b * (f / N)  # q_t(y | x) of each non-mask y != x
    lg = restrict_logits(logits, vocab_size, mask_id)  # float32, mask column -inf
    logx = torch.log_softmax(lg, dim=-1)
    log_a = torch.log(a.clamp_min(1e-300)).to(logx.dtype)[..., None]
    log_c = torch.log(c.clamp_min(1e-300)).to(logx.dtype)[..., None] if f > 0 else None
    log_qh = logx + log_a if log_c is None else torch.logaddexp(logx + log_a, log_c)  # log qhat(y), y != mask
    not_mask = torch.ones(vocab_size, dtype=torch.bool, device=lg.device)
    not_mask[mask_id] = False
    sum_nm = torch.where(not_mask, log_qh, torch.zeros_like(log_qh)).sum(-1).to(torch.float64)
    log_qh_x = log_qh.gather(-1, x0.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    zm = z == mask_id
    log_qh_m = torch.log((b * (1.0 - f)).clamp_min(1e-300)).expand_as(sum_nm)
    log_qh_z = torch.where(zm, log_qh_m,
                           log_qh.gather(-1, z.clamp(max=vocab_size - 1).unsqueeze(-1)).squeeze(-1).to(torch.float64))
    qh_z = log_qh_z.exp()
    qx, qm = a + c, b * (1.0 - f)
    pi_z = torch.where(zm, torch.full_like(sum_nm, 1.0 - f), torch.full_like(sum_nm, f / N))
    qz = torch.where(z == x0, a, torch.zeros_like(a)) + b * pi_z
    ent = _xlogy(qx, qx) + _xlogy(qm, qm) + (N - 1) * _xlogy(c, c)  # sum_y q log q
    cross = torch.where(c > 0, c * sum_nm, torch.zeros_like(sum_nm)) + a * log_qh_x \
        + torch.where(qm > 0, qm * log_qh_m, torch.zeros_like(sum_nm))  # sum_y q log qhat
    qz_safe = qz.clamp_min(1e-300)
    log_qz = torch.log(qz_safe)
    r_log_r = (ent - qz * log_qz) / qz_safe - (1.0 / qz_safe - 1.0) * log_qz
    r_log_rh = (cross - qz * log_qh_z) / qz_safe - (1.0 / qz_safe - 1.0) * log_qh_z
    S = (1.0 / qh_z.clamp_min(1e-300) - 1.0) - (1.0 / qz_safe - 1.0) + r_log_r - r_log_rh
    live = (pi_z > 0) & (qz > 0)
    return torch.where(live, beta.to(torch.float64)[:, None] * pi_z * S, torch.zeros_like(S))


@OBJECTIVES.register("gidd")
class InterpolatingNoise(Objective):
    """Mask + uniform interpolating diffusion; loss_sum / tokens estimates its NELBO in nats/token."""

    name = "gidd"

    def __init__(self, schedule: Schedule, mask_id: int, vocab_size: int, cfg: Any = None, *,
                 uniform_fraction: Optional[float] = None, **_: Any):
        super().__init__(schedule, mask_id, vocab_size)
        f = uniform_fraction if uniform_fraction is not None else getattr(cfg, "uniform_fraction", 0.1)
        self.uniform_fraction = float(f if f is not None else 0.1)
        if not 0.0 <= self.uniform_fraction <= 1.0:
            raise ValueError(f"uniform_fraction must be in [0, 1], got {self.uniform_fraction}")
        if vocab_size < 3:
            raise ValueError(f"uniform noise needs at least 2 real non-mask tokens, vocab_size={vocab_size}")

    def prepare(self, x0, noise):
        z, corrupted = corrupt_interpolating(x0, noise, self.schedule, self.mask_id, self.vocab_size,
                                             self.uniform_fraction)
        return z, UniformAux(z=z, corrupted=corrupted, t=noise.t)

    def loss(self, logits, x0, aux: UniformAux):
        t = aux.t.to(torch.float64)
        alpha = self.schedule.alpha(t)
        beta = -self.schedule.dalpha(t) / alpha.clamp_min(1e-300)
        terms = interpolating_nelbo_terms(logits, x0, aux.z, alpha, beta, self.mask_id, self.vocab_size,
                                          self.uniform_fraction)
        metrics = {"masked": aux.corrupted.sum().detach(), "ce_sum": terms.detach().sum().float(),
                   "t_sum": aux.t.float().sum().detach()}
        return LossOut(terms.sum().to(torch.float32), torch.tensor(x0.numel(), device=x0.device), metrics)
