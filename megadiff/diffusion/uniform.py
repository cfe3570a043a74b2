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
reduces to MDLM's -alpha'/(1 - alpha) * CE on the masked tokens. ``loss`` evaluates S in closed form (one
O(V) float32 reduction per position, per-position algebra in float64), arranged so that its first-order
terms cancel analytically: S = O(rho^2) as alpha -> 0 (rho = alpha/(1-alpha)) while beta ~ 1/alpha, and a
float32 difference of O(rho) terms would be off by percents there (see ``interpolating_nelbo_terms``).

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


def _h(w: torch.Tensor) -> torch.Tensor:
    """log1p(w) - w without cancellation for small |w| (series below 0.1; w > -1)."""
    series = w * w * (-0.5 + w * (1.0 / 3.0 + w * (-0.25 + w * 0.2)))
    return torch.where(w.abs() < 0.1, series, torch.log1p(w) - w)


def interpolating_nelbo_terms(logits: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor,
                              beta: torch.Tensor, mask_id: int, vocab_size: int,
                              uniform_fraction: float) -> torch.Tensor:
    """[B, L] float64: beta * pi_z * S at each position (module docstring); alpha, beta: [B] float64.

    S is evaluated in a form whose first-order terms cancel analytically (docs/diffusion.md): with
    rho = alpha/(1-alpha), pi_u = f/N, v = rho/pi_u, w_y = v xhat(y) and h(w) = log1p(w) - w,
      Q = sum_{y != MASK} h(w_y) - h(v) - v log1p(d_x),  d_y = ([y = x] v - w_y) / (1 + w_y),
      S = -[(1 + rho) h(d_z) + pi_u Q] / (pi_u (1 + [z = x] v))   (z a real token),
      S = -pi_u Q / (1 - f)                                          (z = MASK),
    so S = O(rho^2) as alpha -> 0 is not computed as a difference of O(rho) terms. When v >= 1 the
    vocabulary sum uses sum log1p(w_y) - log1p(v) (the same quantity; no O(v) cancellation).
    """
    f, N = float(uniform_fraction), vocab_size - 1
    a = alpha.to(torch.float64)[:, None]
    rho = a / (1.0 - a).clamp_min(1e-300)
    lg = restrict_logits(logits, vocab_size, mask_id)  # float32, mask column -inf
    logx = torch.log_softmax(lg, dim=-1)
    zm = z == mask_id
    lx_x = logx.gather(-1, x0.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    if f == 0.0:  # absorbing: only z = MASK moves (pi_MASK = 1): S = -rho log xhat(x)
        S = -rho * lx_x
        return torch.where(zm, beta.to(torch.float64)[:, None] * S, torch.zeros_like(S))
    pi_u = f / N
    v = rho / pi_u  # [B, 1] float64
    small = v < 1.0
    w = torch.exp(torch.log(v).to(logx.dtype)[..., None] + logx)  # [B, L, V] float32 (0 at the mask column)
    terms = torch.where(small[..., None], _h(w), torch.log1p(w))
    not_mask = torch.ones(vocab_size, dtype=torch.bool, device=lg.device)
    not_mask[mask_id] = False
    T = torch.where(not_mask, terms, torch.zeros_like(terms)).sum(-1).to(torch.float64)
    w_x = v * lx_x.exp()
    d_x = (v - w_x) / (1.0 + w_x)
    Q = T - torch.where(small, _h(v), torch.log1p(v)) - v * torch.log1p(d_x)
    lx_z = logx.gather(-1, z.clamp(max=vocab_size - 1).unsqueeze(-1)).squeeze(-1).to(torch.float64)
    is_x = (z == x0).to(torch.float64)
    w_z = v * lx_z.exp()
    d_z = (is_x * v - w_z) / (1.0 + w_z)
    log1p_dz = torch.where(is_x > 0, torch.log1p(d_z), -torch.log1p(w_z))  # z != x: 1 + d_z = 1 / (1 + w_z)
    h_dz = torch.where(d_z.abs() < 0.1, _h(d_z), log1p_dz - d_z)
    S_real = -((1.0 + rho) * h_dz + pi_u * Q) / (pi_u * (1.0 + is_x * v))
    if f < 1.0:
        S = torch.where(zm, -pi_u * Q / (1.0 - f), S_real)
        pi_z = torch.where(zm, torch.full_like(S, 1.0 - f), torch.full_like(S, pi_u))
    else:
        S, pi_z = S_real, torch.full_like(S_real, pi_u)
    return beta.to(torch.float64)[:, None] * pi_z * S


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
        z, _ = corrupt_interpolating(x0, noise, self.schedule, self.mask_id, self.vocab_size, self.uniform_fraction)
        return z, UniformAux(z=z, t=noise.t)

    def loss(self, logits, x0, aux: UniformAux):
        t = aux.t.to(torch.float64)
        alpha = self.schedule.alpha(t)
        beta = -self.schedule.dalpha(t) / alpha.clamp_min(1e-300)
        terms = interpolating_nelbo_terms(logits, x0, aux.z, alpha, beta, self.mask_id, self.vocab_size,
                                          self.uniform_fraction)
        return LossOut(terms.sum().to(torch.float32), torch.tensor(x0.numel(), device=x0.device))
