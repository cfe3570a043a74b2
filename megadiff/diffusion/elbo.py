"""NELBO evaluation (nats/token) and the perplexity upper bound.

    evaluate_nelbo(model_fn, batches, schedule, mask_id, vocab_size, n_t=8, seed=0,
                   mode="antithetic", eps=0.0)
      -> {"nelbo", "ppl_bound", "tokens", "sequences", "nelbo_sem"}

The model sees only x_t (it is not told t), so with m = 1 - alpha(t) the mask probability the
continuous-time NELBO of a sequence x of length L is the same for every schedule:

    NELBO(x) = int_0^1 w(t) E[sum_{l masked} CE_l] dt = int_0^1 (1/m) E_{M ~ Bern(m)^L}[S(M)] dm
             = sum_{k=1}^{L} E_{M uniform, |M| = k}[S(M) / k]          (S(M) = sum_{l in M} CE_l)

(the last line integrates m^(k-1) (1-m)^(L-k) over m; it is the any-order autoregressive NLL).

**eps cut in mask probability.** With ``eps > 0`` the chain stops at mask probability eps and
decodes the tokens still masked there in one step (MDLM's reconstruction term):

    NELBO_eps(x) = int_eps^1 (1/m) E[S(M)] dm + E_{M ~ Bern(eps)^L}[S(M)]
                 = sum_k a_k E_{|M| = k}[S(M) / k],   a_k = P(Bin(L, eps) <= k - 1) + k P(Bin(L, eps) = k)

This is the exact NELBO of a valid generative model (the eps-truncated chain), so it remains an
upper bound on a model's NLL for every schedule; cutting at t = eps instead drops the mass below
mask probability 1 - alpha(eps), which for ``linear`` or ``poly(p<1)`` is large, and the
value then falls below the NELBO (no longer a bound).

Estimators (``mode``):
  * ``"antithetic"`` (default, unbiased): per sequence, ``n_t`` mask counts
    k_j = 1 + floor(L frac(u0 + j / n_t)) (u0 hashed from (seed, sequence index): a shifted grid over
    k, each k_j marginally uniform on 1..L); the masked set is the k_j positions with the smallest
    counter-based uniforms. Each draw L a_k S(M)/k is bounded (a mean of k cross-entropies), so the
    per-sequence variance is finite and ``nelbo_sem`` (the standard error over sequences) is a
    valid standard error. Uniform draws of t have infinite variance instead (the 1/t weight near 0).
    ``schedule`` is not needed by this mode (pass ``None`` or the run's; the value is the same).
  * ``"grid"`` (a quadrature, not an unbiased estimate): midpoints t_j of the schedule's time over
    [t(eps), 1] with weight w(t) = -alpha'/(1 - alpha), one mask draw per t_j, plus the eps term.

Accumulation is in float64; the result is a pure function of (model_fn, batches, seed, n_t, mode, eps).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

from megadiff.diffusion.catalog import OBJECTIVES, ObjectiveTraits
from megadiff.diffusion.noise import _S_OFFSET, position_uniforms, uniform_from_key
from megadiff.diffusion.objectives import DiffusionAux, Objective, _MaskedDiffusion, token_ce
from megadiff.diffusion.schedules import Schedule

MODES = ("antithetic", "grid")


def count_weights(L: int, eps: float) -> torch.Tensor:
    """a_k for k = 1..L (float64 [L]): all ones at eps = 0 (see the module docstring)."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"evaluate_nelbo eps is a mask probability in [0, 1), got {eps}")
    pmf = [math.comb(L, j) * eps**j * (1.0 - eps) ** (L - j) for j in range(L + 1)]
    cdf = [sum(pmf[: j + 1]) for j in range(L + 1)]
    return torch.tensor([cdf[k - 1] + k * pmf[k] for k in range(1, L + 1)], dtype=torch.float64)


class CountNELBO(_MaskedDiffusion):
    """The validation objective of the absorbing diffusion objectives (``for_validation``): the count
    estimator of NELBO_eps above, fed by the trainer's validation noise. A row with time t (uniform on
    [t_min, 1], t_min = the schedule's time at mask probability eps) masks the k = 1 + floor(L v) positions
    with the smallest uniforms, v = (t - t_min) / (1 - t_min), with per-row weight L a_k / k, so
    loss_sum / (B L) is an unbiased per-token estimate of NELBO_eps with bounded draws."""

    name = "mdlm"  # traits only: its value is the NELBO, as mdlm's

    def __init__(self, schedule: Schedule, mask_id: int, vocab_size: int, eps: float = 0.0):
        super().__init__(schedule, mask_id=mask_id, vocab_size=vocab_size)
        self.eps = float(eps)
        self.t_min = schedule.t_at_mask_prob(self.eps) if self.eps > 0 else 0.0

    @property
    def traits(self) -> ObjectiveTraits:
        return OBJECTIVES.traits(self.name)

    def for_validation(self) -> Objective:
        return self

    def prepare(self, x0, noise):
        B, L = x0.shape
        v = ((noise.t.to(torch.float64) - self.t_min) / (1.0 - self.t_min)).clamp(0.0, 1.0)
        k = (torch.floor(v * L).long() + 1).clamp(1, L)
        rank = noise.u[:, :L].argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
        masked = rank < k[:, None]
        a = count_weights(L, self.eps).to(x0.device)[k - 1]
        w = (L * a / k.to(torch.float64)).to(torch.float32)
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0), DiffusionAux(masked, noise.t, w)


def _masked_ce(model_fn, x0, masked, mask_id, vocab_size) -> torch.Tensor:
    """Sum over masked positions of -log p(x0_l | x_t) per row (float64 [B])."""
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    ce = token_ce(model_fn(xt), x0, vocab_size, mask_id).to(torch.float64)
    return torch.where(masked, ce, torch.zeros_like(ce)).sum(-1)


def _antithetic_seq(model_fn, x0, seq_ids, a, n_t, seed, mask_id, vocab_size) -> torch.Tensor:
    """Per-sequence unbiased NELBO_eps (nats/sequence, float64 [B]) from n_t mask counts."""
    B, L = x0.shape
    j = torch.arange(n_t, dtype=torch.float64, device=x0.device)
    u0 = uniform_from_key((seed, 0x7FFFFFFF, _S_OFFSET), seq_ids, torch.float64)
    k = (torch.floor(torch.frac(u0[:, None] + j[None, :] / n_t) * L).long() + 1).clamp(1, L)  # [B, n_t]
    aw = a.to(x0.device)
    acc = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for i in range(n_t):
        u = position_uniforms(seed, i, seq_ids, L)
        rank = u.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
        kk = k[:, i]
        s = _masked_ce(model_fn, x0, rank < kk[:, None], mask_id, vocab_size)
        acc += L * aw[kk - 1] * s / kk.to(torch.float64)
    return acc / n_t


def _grid_seq(model_fn, x0, seq_ids, schedule, n_t, seed, eps, mask_id, vocab_size) -> torch.Tensor:
    """Per-sequence midpoint quadrature of NELBO_eps over the schedule's time (float64 [B])."""
    B, L = x0.shape
    t_lo = float(schedule.t_of_alpha(torch.tensor(1.0 - eps, dtype=torch.float64))) if eps > 0 else 0.0
    acc = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for i in range(n_t):
        t = torch.full((B,), t_lo + (1.0 - t_lo) * (i + 0.5) / n_t, dtype=torch.float64, device=x0.device)
        u = position_uniforms(seed, i, seq_ids, L).to(torch.float64)
        s = _masked_ce(model_fn, x0, u < schedule.mask_prob(t)[:, None], mask_id, vocab_size)
        acc += (1.0 - t_lo) * schedule.nelbo_weight(t) * s
    acc /= n_t
    if eps > 0:  # the reconstruction term at mask probability eps (its own noise stream)
        u = position_uniforms(seed, n_t, seq_ids, L).to(torch.float64)
        acc += _masked_ce(model_fn, x0, u < eps, mask_id, vocab_size)
    return acc


@torch.no_grad()
def evaluate_nelbo(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    schedule: Optional[Schedule],
    mask_id: int,
    vocab_size: int,
    n_t: int = 8,
    seed: int = 0,
    mode: str = "antithetic",
    eps: float = 0.0,
) -> dict:
    """NELBO in nats/token over all sequences of ``batches`` (each a LongTensor[B, L] or a dict with 'tokens').

    Returns {"nelbo", "ppl_bound" = exp(nelbo), "tokens", "sequences", "nelbo_sem"}: nelbo_sem is the
    standard error of the per-sequence estimates (per token), finite in the default mode.
    """
    if mode not in MODES:
        raise ValueError(f"evaluate_nelbo mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "grid" and schedule is None:
        raise ValueError("evaluate_nelbo mode='grid' integrates over the schedule's time: pass the run's schedule")
    if n_t < 1:
        raise ValueError(f"evaluate_nelbo n_t must be >= 1, got {n_t}")
    total, tokens, seqs = 0.0, 0, 0
    per_seq: list[torch.Tensor] = []
    weights: dict[int, torch.Tensor] = {}
    for batch in batches:
        x0 = batch["tokens"] if isinstance(batch, dict) else batch
        B, L = x0.shape
        seq_ids = torch.arange(seqs, seqs + B, dtype=torch.int64, device=x0.device)
        if mode == "antithetic":
            a = weights.setdefault(L, count_weights(L, eps))
            acc = _antithetic_seq(model_fn, x0, seq_ids, a, n_t, seed, mask_id, vocab_size)
        else:
            count_weights(1, eps)  # validates eps
            acc = _grid_seq(model_fn, x0, seq_ids, schedule, n_t, seed, eps, mask_id, vocab_size)
        per_seq.append((acc / L).cpu())
        total += float(acc.sum())
        tokens += B * L
        seqs += B
    return nelbo_summary(total, tokens, seqs, per_seq, "evaluate_nelbo")


def nelbo_summary(total: float, tokens: int, seqs: int, per_seq: list[torch.Tensor], what: str) -> dict:
    """{"nelbo", "ppl_bound", "tokens", "sequences", "nelbo_sem"} from summed nats and per-sequence estimates."""
    if tokens == 0:
        raise ValueError(f"{what} got no batches")
    nelbo = total / tokens
    ps = torch.cat(per_seq)
    sem = float(ps.std() / math.sqrt(len(ps))) if len(ps) > 1 else float("nan")
    return {"nelbo": nelbo, "ppl_bound": math.exp(min(nelbo, 700.0)), "tokens": tokens, "sequences": seqs,
            "nelbo_sem": sem}
