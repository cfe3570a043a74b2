"""Deterministic corruption noise keyed on (seed, step, global sample index) — never on the rank.

Every random number of the forward process comes from a counter-based hash evaluated with
int64 torch ops on the target device (no host RNG, no host sync, same bits on CPU and CUDA).
A sample's time t and per-position uniforms u therefore depend only on
(seed, step, sample_id[, position]): tensor/pipeline peers corrupt identically, and results do
not change with the data-parallel size or with how rows are grouped into micro batches.

    noise = make_noise(seed, step, sample_ids, seq_len, eps, antithetic, global_batch, device)
    xt, masked = corrupt(x0, noise, schedule, mask_id)
    L_eff = random_length(seed, step, seq_len, prob)   # LLaDA random-length crop, same on all ranks

Time sampling (t in [eps, 1]):
* ``antithetic=False``: t_k = eps + (1 - eps) * U(seed, step, k), independent per sample.
* ``antithetic=True`` (low discrepancy across the GLOBAL batch): one offset u0 = U(seed, step),
  then t_k = eps + (1 - eps) * frac(u0 + (k mod G) / G) with G = global_batch. Since
  sample_id = step * G + row, (k mod G) is the row in the global batch: the G times of a step
  form a shifted regular grid, each t_k still marginally U(eps, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
# stream tags, so that t, u and the crop decision never share hash inputs
_S_T, _S_U, _S_OFFSET, _S_CROP, _S_CROPLEN = 0x1B873593, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow (c split in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (Wellons' 'lowbias32'); input and output in [0, 2**32) as int64."""
    x = x & M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix_int(h: int) -> int:
    """Host-side twin of ``mix32`` for Python ints (seed/step keys)."""
    h &= M32
    h ^= h >> 16
    h = (h * 0x7FEB352D) & M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & M32
    return h ^ (h >> 16)


def _key(*parts: int) -> int:
    """Hash a tuple of non-negative Python ints (each up to 64 bits) to 32 bits."""
    h = 0x2545F491
    for p in parts:
        p = int(p)
        if p < 0:
            raise ValueError(f"noise keys must be non-negative, got {p}")
        h = _mix_int(h ^ _mix_int((p & M32) + _GOLDEN))
        h = _mix_int(h ^ _mix_int((p >> 32) + 2 * _GOLDEN))
    return h


def _hash_ids(key: int, ids: torch.Tensor) -> torch.Tensor:
    """Hash int64 ids (any shape, >= 0) with a 32-bit key, on the ids' device."""
    ids = ids.to(torch.int64)
    h = mix32(torch.full_like(ids, key) ^ mix32((ids & M32) + _GOLDEN))
    return mix32(h ^ mix32((ids >> 32) + 2 * _GOLDEN))


def _to_unit(h: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """32-bit hash -> uniform in (0, 1): top 24 bits, centred in their bin (exact in float32)."""
    return ((h >> 8).to(torch.float64) * 2.0**-24 + 2.0**-25).to(dtype)


def uniform_from_key(key_parts: tuple[int, ...], ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Deterministic U(0,1) for each id, a function of (key_parts, id) only."""
    return _to_unit(_hash_ids(_key(*key_parts), ids), dtype)


@dataclass
class Noise:
    """Corruption noise of one micro batch.

    t: [B] float32 diffusion time in [eps, 1]; u: [B, L] float32 uniforms in (0, 1):
    position l of sample b is masked iff u[b, l] < 1 - alpha(t[b]).
    """

    t: torch.Tensor
    u: torch.Tensor


def sample_times(seed: int, step: int, sample_ids: torch.Tensor, eps: float, antithetic: bool,
                 global_batch: int) -> torch.Tensor:
    """t for each sample id ([B] float32 in [eps, 1]); see the module docstring."""
    ids = sample_ids.to(torch.int64)
    if antithetic:
        if global_batch <= 0:
            raise ValueError("antithetic time sampling needs global_batch > 0")
        u0 = uniform_from_key((seed, step, _S_OFFSET), torch.zeros(1, dtype=torch.int64, device=ids.device),
                              torch.float64)
        v = torch.frac(u0 + (ids % global_batch).to(torch.float64) / global_batch)
    else:
        v = uniform_from_key((seed, step, _S_T), ids, torch.float64)
    return (eps + (1.0 - eps) * v).to(torch.float32)


def position_uniforms(seed: int, step: int, sample_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, L] float32 uniforms; entry (b, l) depends on (seed, step, sample_ids[b], l) only."""
    ids = sample_ids.to(torch.int64)
    row = _hash_ids(_key(seed, step, _S_U), ids)  # [B] 32-bit row keys
    pos = torch.arange(seq_len, dtype=torch.int64, device=ids.device)
    h = mix32(row[:, None] ^ mix32(pos[None, :] * 2 + 1 + _GOLDEN))
    return _to_unit(mix32(h + _GOLDEN))


def make_noise(seed: int, step: int, sample_ids: torch.Tensor, seq_len: int, eps: float = 1e-3,
               antithetic: bool = True, global_batch: int = 0, device: torch.device | str | None = None) -> Noise:
    """Noise(t, u) for a micro batch; a pure function of (seed, step, sample_ids, seq_len, eps, G).

    sample_ids: LongTensor[B] of global sample indices (the loader's ``step * G + row``).
    global_batch (G) is only used when ``antithetic``. Computed on ``device`` (default: the ids').
    """
    ids = sample_ids.to(device) if device is not None else sample_ids
    t = sample_times(seed, step, ids, eps, antithetic, global_batch)
    return Noise(t=t, u=position_uniforms(seed, step, ids, seq_len))


def corrupt(x0: torch.Tensor, noise: Noise, schedule, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbing corruption: returns (xt, masked) with masked = u < 1 - alpha(t), xt = mask_id there.

    ``noise.u`` may be longer than x0 (a random-length crop uses its first L columns).
    """
    L = x0.shape[1]
    p = (1.0 - schedule.alpha(noise.t.to(torch.float64))).to(torch.float32)
    masked = noise.u[:, :L] < p[:, None]
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def random_length(seed: int, step: int, seq_len: int, prob: float) -> int:
    """LLaDA random-length trick: with probability ``prob`` return a length ~ U{1..seq_len}, else seq_len.

    A host-side pure function of (seed, step): every rank takes the same decision with no
    communication. The trainer crops the whole micro batch (tokens[:, :L]) for that step.
    """
    if prob <= 0.0:
        return seq_len
    if _key(seed, step, _S_CROP) * 2.0**-32 >= prob:
        return seq_len
    return 1 + _key(seed, step, _S_CROPLEN) % seq_len
