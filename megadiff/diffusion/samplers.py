"""Samplers for masked-diffusion LMs, over the contract ``model_fn(tokens[B, L]) -> logits[B, L, V>=vocab]``.

The model is time-agnostic (no t input): its output depends only on the current tokens. The
canvas ``x`` holds ``mask_id`` at the positions to generate; every other token is conditioning
(a prompt prefix, or infilling context anywhere) and is never changed. ``active`` (optional
[B, L] bool) further restricts which masked positions may be filled.

    out = SAMPLERS.get("ancestral")(model_fn, x, mask_id=m, vocab_size=V, steps=T, cache=True)
    out.tokens, out.nfe, out.steps, out.nfe_rows

Registry (all return ``SampleOut``):
* ``ancestral``     MDLM ancestral sampling over ``steps`` uniform time steps of any schedule;
                    a masked token is revealed in step t -> s with prob (alpha_s - alpha_t)/(1 - alpha_t)
                    (all remaining ones at the last step). ``cache=True`` reuses the previous logits
                    for rows in which no token changed (exact: same outputs, same random stream).
* ``first_hitting`` exact simulation of the continuous-time reverse process: reveal one uniformly
                    chosen masked token per network call (``group`` > 1 reveals that many at once,
                    an approximation). The reveal times (schedule) do not affect the output of a
                    time-agnostic model, so the schedule is not needed.
* ``llada``         LLaDA: per block, ``steps`` steps each committing a fixed number of tokens,
                    chosen by ``remasking="low_confidence"`` (highest model probability of the
                    sampled token) or ``"random"``.
* ``block``         semi-autoregressive: blocks of ``block_length`` left to right, cached ancestral
                    with ``steps`` steps inside each block; optional ``eos_id`` stops early
                    (variable-length output; positions after the first EOS are filled with ``pad_id``).

Token sampling: logits are restricted to the real vocab with the mask id at -inf, divided by
``temperature`` (0 = greedy), filtered by ``top_k`` / ``top_p``, normalised and sampled by
inverse CDF in float64 (float32 Gumbel-max truncates the noise at ~16.6 and under-samples the
low-probability tail, i.e. lowers the effective temperature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megadiff.diffusion.catalog import SAMPLERS
from megadiff.diffusion.schedules import LogLinear, Schedule

ModelFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SampleOut:
    tokens: torch.Tensor  # [B, L] int64, no mask left at the generated positions
    nfe: int  # number of model_fn calls
    steps: int  # sampler iterations (cached ones included)
    nfe_rows: torch.Tensor  # [B] int64: network evaluations of each sequence (rows in the calls)


# ----------------------------------------------------------------------------- token sampling


def sampling_logprobs(logits: torch.Tensor, mask_id: int, vocab_size: int, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Normalised float64 log-probabilities [..., vocab_size]; excluded tokens are -inf.

    Padded columns (>= vocab_size) and the mask id are excluded; temperature <= 0 keeps only the argmax.
    """
    lg = logits[..., :vocab_size].to(torch.float64)
    lg = lg.index_fill(-1, torch.tensor([mask_id], device=lg.device), float("-inf"))
    if temperature <= 0:
        keep = torch.zeros_like(lg, dtype=torch.bool).scatter_(-1, lg.argmax(-1, keepdim=True), True)
        return torch.where(keep, torch.zeros_like(lg), torch.full_like(lg, float("-inf")))
    lg = lg / temperature
    if top_k and top_k < vocab_size:
        kth = torch.topk(lg, top_k, dim=-1).values[..., -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    logp = torch.log_softmax(lg, dim=-1)
    if top_p < 1.0:
        srt, order = torch.sort(logp, dim=-1, descending=True)
        p = srt.exp()
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # keep the smallest prefix with mass >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def sample_categorical(logp: torch.Tensor, generator: Optional[torch.Generator] = None,
                       num_samples: Optional[int] = None) -> torch.Tensor:
    """Inverse-CDF sampling in float64 from log-probabilities (-inf allowed).

    ``logp`` [N, V] -> one draw per row [N]; or ``logp`` [V] with ``num_samples`` -> [num_samples]
    iid draws from the one distribution (O(log V) each).
    """
    p = logp.to(torch.float64).exp()
    cdf = p.cumsum(-1)
    shape = (num_samples,) if num_samples is not None else p.shape[:-1] + (1,)
    if num_samples is not None and p.dim() != 1:
        raise ValueError("num_samples needs a 1-D logp")
    u = torch.rand(shape, dtype=torch.float64, device=p.device, generator=generator)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    idx = idx if num_samples is not None else idx.squeeze(-1)
    # guard the u * total == total rounding case: never return past the last positive-probability token
    V = p.shape[-1]
    last = (V - 1) - (p > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(idx, last)


def _draw(logits: torch.Tensor, mask_id: int, vocab_size: int, temperature: float, top_k: int, top_p: float,
          generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample tokens for logits [N, V]; returns (tokens [N], their model probability at temperature 1)."""
    logp = sampling_logprobs(logits, mask_id, vocab_size, temperature, top_k, top_p)
    tok = sample_categorical(logp, generator)
    conf = sampling_logprobs(logits, mask_id, vocab_size).gather(-1, tok[:, None]).squeeze(-1).exp()
    return tok, conf


# ----------------------------------------------------------------------------- helpers


def _setup(x: torch.Tensor, mask_id: int, active: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone()
    act = x == mask_id
    if active is not None:
        act &= active.to(torch.bool)
    return x, act


class _Model:
    """Wraps model_fn to count calls and per-row evaluations."""

    def __init__(self, model_fn: ModelFn, B: int, device):
        self.fn, self.nfe, self.rows = model_fn, 0, torch.zeros(B, dtype=torch.int64, device=device)

    def __call__(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.nfe += 1
        if rows is None:
            self.rows += 1
            return self.fn(x)
        self.rows[rows] += 1
        return self.fn(x[rows])


def _ancestral_core(model: _Model, x: torch.Tensor, act: torch.Tensor, mask_id: int, vocab_size: int,
                    steps: int, schedule: Schedule, cache: bool, tkw: dict, generator) -> int:
    """Fill the active masked positions of x in place; returns the number of iterations run."""
    B = x.shape[0]
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    alphas = schedule.alpha(ts).tolist()
    logits, owned = None, False
    need = torch.ones(B, dtype=torch.bool, device=x.device)
    it = 0
    for i in range(steps):
        remaining = act & (x == mask_id)
        has = remaining.any(-1)
        if not bool(has.any()):
            break
        it += 1
        a_t, a_s = alphas[i], alphas[i + 1]
        p = 1.0 if i == steps - 1 else min(1.0, max(0.0, (a_s - a_t) / max(1.0 - a_t, 1e-300)))
        rows = torch.nonzero(need & has).squeeze(-1) if cache else None
        if rows is None or rows.numel() == B:
            logits, owned = model(x), False
        elif rows.numel() > 0:
            out = model(x, rows)
            if logits is None:
                logits, owned = out.new_zeros((B,) + tuple(out.shape[1:])), True
            elif not owned:  # never write into a tensor model_fn returned
                logits, owned = logits.clone(), True
            logits[rows] = out.to(logits.dtype)
        r = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
        reveal = remaining & (r < p)
        if bool(reveal.any()):
            tok, _ = _draw(logits[reveal], mask_id, vocab_size, generator=generator, **tkw)
            x[reveal] = tok
        need = reveal.any(-1)
    return it


def _tkw(temperature: float, top_k: int, top_p: float) -> dict:
    return {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)}


# ----------------------------------------------------------------------------- samplers


@SAMPLERS.register("ancestral")
@torch.no_grad()
def ancestral(model_fn: ModelFn, x: torch.Tensor, *, mask_id: int, vocab_size: int, steps: int,
              schedule: Optional[Schedule] = None, cache: bool = True, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, generator: Optional[torch.Generator] = None,
              active: Optional[torch.Tensor] = None) -> SampleOut:
    """MDLM ancestral sampling with ``steps`` uniform time steps from t=1 to 0 (schedule default loglinear).

    nfe <= steps; with ``cache`` a call is made only for rows in which a token changed in the
    previous step (or on the first step). Given the same generator state, ``cache=True`` and
    ``cache=False`` return identical tokens.
    """
    x, act = _setup(x, mask_id, active)
    model = _Model(model_fn, x.shape[0], x.device)
    it = _ancestral_core(model, x, act, mask_id, vocab_size, steps, schedule or LogLinear(), cache,
                         _tkw(temperature, top_k, top_p), generator)
    return SampleOut(x, model.nfe, it, model.rows)


@SAMPLERS.register("first_hitting")
@torch.no_grad()
def first_hitting(model_fn: ModelFn, x: torch.Tensor, *, mask_id: int, vocab_size: int, group: int = 1,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None, active: Optional[torch.Tensor] = None,
                  schedule: Optional[Schedule] = None, steps: Optional[int] = None) -> SampleOut:
    """First-hitting sampler: each call reveals ``group`` uniformly chosen masked tokens per row.

    With group=1 this is exact for the continuous-time process (T -> infinity ancestral): the
    next masked token to be revealed is uniform among the masked ones, whatever the schedule.
    nfe = max over rows of ceil(masked / group); rows already complete are not evaluated.
    ``schedule`` and ``steps`` are accepted for a uniform sampler signature and ignored.
    """
    x, act = _setup(x, mask_id, active)
    B, L = x.shape
    model = _Model(model_fn, B, x.device)
    tkw = _tkw(temperature, top_k, top_p)
    it = 0
    while True:
        remaining = act & (x == mask_id)
        n = remaining.sum(-1)
        if not bool((n > 0).any()):
            break
        it += 1
        rows = torch.nonzero(n > 0).squeeze(-1)
        if rows.numel() == B:
            logits = model(x)
        else:
            sub = model(x, rows)
            logits = sub.new_zeros((B,) + tuple(sub.shape[1:]))
            logits[rows] = sub
        score = torch.rand((B, L), dtype=torch.float64, device=x.device, generator=generator)
        score = score.masked_fill(~remaining, -1.0)
        k = min(group, L)
        top = torch.topk(score, k, dim=-1).indices  # [B, k] random masked positions first
        take = torch.arange(k, device=x.device)[None, :] < n[:, None].clamp(max=k)
        pick = torch.zeros_like(remaining).scatter_(-1, top, take)
        tok, _ = _draw(logits[pick], mask_id, vocab_size, generator=generator, **tkw)
        x[pick] = tok
    return SampleOut(x, model.nfe, it, model.rows)


def _blocks(act: torch.Tensor, block_length: Optional[int]) -> list[torch.Tensor]:
    """Column masks of consecutive blocks covering all active positions (from the first active column)."""
    L = act.shape[1]
    cols = torch.nonzero(act.any(0)).squeeze(-1)
    if cols.numel() == 0:
        return []
    start, end = int(cols[0]), int(cols[-1]) + 1
    bl = block_length or (end - start)
    out = []
    for b0 in range(start, end, bl):
        m = torch.zeros(L, dtype=torch.bool, device=act.device)
        m[b0:min(b0 + bl, end)] = True
        out.append(m)
    return out


@SAMPLERS.register("llada")
@torch.no_grad()
def llada(model_fn: ModelFn, x: torch.Tensor, *, mask_id: int, vocab_size: int, steps: int,
          block_length: Optional[int] = None, remasking: str = "low_confidence", temperature: float = 1.0,
          top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
          active: Optional[torch.Tensor] = None, schedule: Optional[Schedule] = None) -> SampleOut:
    """LLaDA sampling: ``steps`` steps per block (one block = everything when block_length is None).

    In a block with n masked tokens (per row), step k commits n // steps (+1 for the first n % steps
    steps) tokens: all masked positions of the block get a sampled candidate, and the ones with the
    highest confidence (model probability of the candidate for ``low_confidence``, a uniform draw for
    ``random``) are kept; the others stay masked ("remasked"). nfe <= steps x blocks (steps that
    commit nothing in any row are skipped).
    """
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    x, act = _setup(x, mask_id, active)
    B, L = x.shape
    model = _Model(model_fn, B, x.device)
    tkw = _tkw(temperature, top_k, top_p)
    it = 0
    for cols in _blocks(act, block_length):
        blk = act & cols[None, :] & (x == mask_id)
        n = blk.sum(-1)
        base, rem = n // steps, n % steps
        for k in range(steps):
            quota = base + (k < rem).to(torch.int64)
            if not bool((quota > 0).any()):
                continue
            it += 1
            logits = model(x)
            remaining = blk & (x == mask_id)
            tok, conf = _draw(logits[remaining], mask_id, vocab_size, generator=generator, **tkw)
            cand = torch.full((B, L), -1, dtype=torch.int64, device=x.device)
            cand[remaining] = tok
            score = torch.full((B, L), -1.0, dtype=torch.float64, device=x.device)
            if remasking == "low_confidence":
                score[remaining] = conf
            else:
                score[remaining] = torch.rand(int(remaining.sum()), dtype=torch.float64, device=x.device,
                                              generator=generator)
            order = torch.argsort(score, dim=-1, descending=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=x.device).expand(B, L))
            commit = remaining & (rank < quota[:, None])
            x[commit] = cand[commit]
    return SampleOut(x, model.nfe, it, model.rows)


@SAMPLERS.register("block")
@torch.no_grad()
def block(model_fn: ModelFn, x: torch.Tensor, *, mask_id: int, vocab_size: int, steps: int, block_length: int,
          schedule: Optional[Schedule] = None, cache: bool = True, eos_id: Optional[int] = None,
          pad_id: Optional[int] = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          generator: Optional[torch.Generator] = None, active: Optional[torch.Tensor] = None) -> SampleOut:
    """Semi-autoregressive block decoding: cached ancestral with ``steps`` steps inside each block.

    Later blocks stay masked (the bidirectional model sees them as [MASK]). With ``eos_id``, a row
    whose generated text contains EOS after a block is finished: its later active positions are set
    to ``pad_id`` (default eos_id) without network calls; decoding stops when all rows are finished.
    """
    x, act = _setup(x, mask_id, active)
    B = x.shape[0]
    model = _Model(model_fn, B, x.device)
    tkw = _tkw(temperature, top_k, top_p)
    sched = schedule or LogLinear()
    it = 0
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    seen = torch.zeros_like(act)
    for cols in _blocks(act, block_length):
        cur = act & cols[None, :] & ~done[:, None]
        it += _ancestral_core(model, x, cur, mask_id, vocab_size, steps, sched, cache, tkw, generator)
        seen |= act & cols[None, :]
        if eos_id is not None:
            is_eos = seen & (x == eos_id)
            done |= is_eos.any(-1)
            if bool(done.any()):
                first = torch.where(is_eos.any(-1), is_eos.to(torch.int8).argmax(-1), x.shape[1])
                after = torch.arange(x.shape[1], device=x.device)[None, :] > first[:, None]
                fill = act & after & done[:, None]
                x[fill] = eos_id if pad_id is None else pad_id
            if bool(done.all()):
                break
    return SampleOut(x, model.nfe, it, model.rows)


def make_canvas(prompt: torch.Tensor, gen_length: int, mask_id: int) -> torch.Tensor:
    """[B, P] prompt ids -> [B, P + gen_length] canvas with the generated part masked."""
    pad = torch.full((prompt.shape[0], gen_length), mask_id, dtype=torch.int64, device=prompt.device)
    return torch.cat([prompt.to(torch.int64), pad], dim=1)


def make_infill_canvas(tokens: torch.Tensor, fixed: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Keep ``tokens`` where ``fixed`` [B, L] is True and mask everything else (infilling)."""
    return torch.where(fixed.to(torch.bool), tokens.to(torch.int64), torch.full_like(tokens, mask_id))
