"""Block-diffusion sampling (BD3-LM): blocks left to right, masked diffusion inside each block, with an
exact KV cache of the clean prefix, stop at EOS, and Fast-dLLM confidence-threshold parallel decoding.

The network is reached through a *denoiser* (``megadiff.model.block_lm.MegatronDenoiser`` for megatron
models, a table in the tests):

    state = denoiser.new_state()                       # empty KV cache
    logits = denoiser(tokens, start, state, commit)    # tokens: [B, n] at positions start..start+n-1

* cached (``state`` given): the n tokens attend to the whole cached prefix and block-causally to each
  other (blocks of ``block_size``); ``commit=True`` appends their keys/values to the cache.
* uncached (``state`` None): ``tokens`` is the whole sequence [0, start + n) with a block-causal mask,
  recomputed from scratch (the reference the cache must reproduce exactly).

Both give the logits the model was trained for: a noisy block attends to itself and to the clean
blocks before it (the BD3-LM mask), clean blocks attend block-causally.

Inside a block of n masked tokens, each network call reveals some masked positions, each drawn from
the model's conditional at that position:
* ``threshold=None``: ``steps_per_block`` calls (default n), revealing ceil(remaining / calls left)
  positions chosen uniformly at random. With ``steps_per_block = n`` (one token per call) this is the
  exact reverse process of a time-agnostic model (random-order reveal), checked against enumeration.
* ``threshold=τ`` (Fast-dLLM): every call samples all masked positions and keeps those whose sampled
  token has model probability >= τ, and at least the most confident one.

Randomness is counter-based, keyed on (``seed``, the row's ``row_seed``, block, call, position): a row's
output depends on its prompt and row seed only, not on the rest of its batch (batch invariance). With
``eos_id``, a row whose finished block contains EOS is done: later positions get ``pad_id`` (default
eos_id); decoding stops when every row is done.

``SAMPLERS.get("bd3lm")`` wraps it in the common sampler contract (canvas in, ``SampleOut`` out) with the
denoiser passed as ``denoiser=`` (``eval.genquality.sampler_kwargs`` builds it for block-diffusion runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megadiff.diffusion.catalog import SAMPLERS
from megadiff.diffusion.noise import uniform_from_key
from megadiff.diffusion.samplers import SampleOut, sampling_logprobs

Denoiser = Callable[..., torch.Tensor]
_S_TOKEN, _S_ORDER = 0x3C6EF372, 0xA54FF53A


@dataclass
class BlockSampleOut:
    tokens: torch.Tensor  # [B, P + gen_length] (prompt, generated tokens, pad after EOS)
    nfe: int  # network calls (commit calls included)
    calls: list = field(default_factory=list)  # (query tokens, key tokens) per call, for FLOP accounting
    row_calls: Optional[torch.Tensor] = None  # [B] denoising calls in which the row still had masked tokens
    commits: int = 0  # KV-cache commit calls (included in nfe)


def _uniforms(seed: int, row_seeds: torch.Tensor, stream: int, block: int, call: int, n: int) -> torch.Tensor:
    """[B, n] float64 uniforms, a function of (seed, row seed, stream, block, call, position in block)."""
    ids = row_seeds.to(torch.int64)[:, None] * 1_000_003 + torch.arange(n, device=row_seeds.device)[None, :]
    return uniform_from_key((seed, stream, block, call), ids, torch.float64)


def _inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw from normalised log-probabilities [..., V] with the given uniforms [...] (float64)."""
    p = logp.exp()
    cdf = p.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True).squeeze(-1)
    last = (p.shape[-1] - 1) - (p > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(idx, last)


class _Net:
    """Counts calls and the (query, key) tokens of each for the FLOP accounting."""

    def __init__(self, denoiser: Denoiser, cache: bool):
        self.fn, self.cache, self.nfe, self.calls, self.commits = denoiser, cache, 0, [], 0
        self.state = denoiser.new_state() if cache else None

    def block_logits(self, x: torch.Tensor, start: int, n: int) -> torch.Tensor:
        self.nfe += 1
        if self.cache:
            self.calls.append((n, start + n))
            return self.fn(x[:, start:start + n], start, self.state, False)
        self.calls.append((start + n, start + n))
        return self.fn(x[:, :start + n], 0, None, False)[:, start:start + n]

    def commit(self, x: torch.Tensor, start: int, n: int) -> None:
        if self.cache:
            self.nfe += 1
            self.commits += 1
            self.calls.append((n, start + n))
            self.fn(x[:, start:start + n], start, self.state, True)


@torch.no_grad()
def block_diffusion_sample(denoiser: Denoiser, prompt: torch.Tensor, gen_length: int, *, block_size: int,
                           mask_id: int, vocab_size: int, steps_per_block: Optional[int] = None,
                           threshold: Optional[float] = None, eos_id: Optional[int] = None,
                           pad_id: Optional[int] = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                           seed: int = 0, row_seeds: Optional[torch.Tensor] = None, cache: bool = True) -> BlockSampleOut:
    """Generate ``gen_length`` tokens after ``prompt`` [B, P] block by block (see the module docstring).

    Blocks sit at multiples of ``block_size`` as in training: the prompt's full blocks are the clean prefix
    (one commit call); a block the prompt ends inside is generated with the prompt's tokens in it already
    revealed; the last block may be shorter.
    """
    B, P = prompt.shape
    if gen_length <= 0:
        raise ValueError(f"gen_length must be > 0, got {gen_length}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    steps = block_size if steps_per_block is None else int(steps_per_block)
    if steps < 1:
        raise ValueError(f"steps_per_block must be >= 1, got {steps}")
    dev = prompt.device
    rs = (torch.arange(B, device=dev) if row_seeds is None else row_seeds.to(dev)).to(torch.int64)
    x = torch.cat([prompt.to(torch.int64), torch.full((B, gen_length), mask_id, dtype=torch.int64, device=dev)], 1)
    T = x.shape[1]
    net = _Net(denoiser, cache)
    first = P // block_size
    if first:
        net.commit(x, 0, first * block_size)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    row_calls = torch.zeros(B, dtype=torch.int64, device=dev)
    draw = (temperature, top_k, top_p)
    for blk in range(first, -(-T // block_size)):
        start = blk * block_size
        n = min(block_size, T - start)
        _denoise_block(net, x, start, n, blk, steps, threshold, mask_id, vocab_size, draw, seed, rs, row_calls)
        if eos_id is not None:
            done |= (x[:, P:start + n] == eos_id).any(-1)
            if bool(done.all()):
                break
        if start + n < T:
            net.commit(x, start, n)
    if eos_id is not None:
        gen = x[:, P:]
        is_eos = gen == eos_id
        first_eos = torch.where(is_eos.any(-1), is_eos.to(torch.int8).argmax(-1), gen.shape[1])
        after = torch.arange(gen.shape[1], device=dev)[None, :] > first_eos[:, None]
        gen[after] = eos_id if pad_id is None else pad_id
    return BlockSampleOut(x, net.nfe, net.calls, row_calls, net.commits)


def _denoise_block(net: _Net, x: torch.Tensor, start: int, n: int, blk: int, steps: int,
                   threshold: Optional[float], mask_id: int, vocab_size: int, draw: tuple, seed: int,
                   rs: torch.Tensor, row_calls: torch.Tensor) -> None:
    cols = slice(start, start + n)
    call = 0
    while bool((x[:, cols] == mask_id).any()):
        masked = x[:, cols] == mask_id  # [B, n]
        logits = net.block_logits(x, start, n)
        row_calls += masked.any(-1)
        logp = sampling_logprobs(logits, mask_id, vocab_size, *draw)  # [B, n, V] (temperature, top_k, top_p)
        tok = _inverse_cdf(logp, _uniforms(seed, rs, _S_TOKEN, blk, call, n))
        if threshold is None:
            left = max(steps - call, 1)
            quota = (masked.sum(-1) + left - 1) // left  # ceil(remaining / calls left)
            score = _uniforms(seed, rs, _S_ORDER, blk, call, n)  # random order
        else:
            conf = sampling_logprobs(logits, mask_id, vocab_size).gather(-1, tok[..., None]).squeeze(-1).exp()
            quota = torch.maximum((masked & (conf >= threshold)).sum(-1), masked.any(-1).to(torch.int64))
            score = conf
        score = torch.where(masked, score, torch.full_like(score, -1.0))
        order = torch.argsort(score, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=x.device).expand_as(order))
        reveal = masked & (rank < quota[:, None])
        x[:, cols] = torch.where(reveal, tok, x[:, cols])
        call += 1


def full_sequence_flops(calls: list, L: int, linear_per_token: float, attn_per_pair: float) -> float:
    """Sampling cost in units of one full-sequence forward pass over L tokens (bidirectional):
    each call costs linear_per_token * queries + attn_per_pair * queries * keys."""
    def cost(q: int, k: int) -> float:
        return linear_per_token * q + attn_per_pair * q * k

    return sum(cost(q, k) for q, k in calls) / cost(L, L)



@SAMPLERS.register("bd3lm")
@torch.no_grad()
def bd3lm(model_fn, x: torch.Tensor, *, mask_id: int, vocab_size: int, denoiser: Denoiser, block_length: int,
          steps: Optional[int] = None, threshold: Optional[float] = None, cache: bool = True,
          eos_id: Optional[int] = None, pad_id: Optional[int] = None, temperature: float = 1.0, top_k: int = 0,
          top_p: float = 1.0, generator: Optional[torch.Generator] = None,
          active: Optional[torch.Tensor] = None) -> SampleOut:
    """The ``SAMPLERS`` entry: ``block_diffusion_sample`` on a canvas (prompt, then [MASK] to the end).

    ``model_fn`` is unused (the network is reached through ``denoiser``, which applies the BD3-LM layout and
    the KV cache); the seed is drawn from ``generator``; ``steps`` is per block.
    """
    if active is not None:
        raise ValueError("the bd3lm sampler generates after a prompt; it takes no `active` restriction")
    is_mask = x == mask_id
    P = int((~is_mask[0]).sum())
    if not (bool((~is_mask[:, :P]).all()) and bool(is_mask[:, P:].all())) or P == x.shape[1]:
        raise ValueError("the bd3lm sampler needs canvases of one prompt length followed only by [MASK] "
                         "(no infilling); use another sampler for infilling")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device if generator else "cpu"))
    out = block_diffusion_sample(denoiser, x[:, :P], x.shape[1] - P, block_size=block_length, mask_id=mask_id,
                                 vocab_size=vocab_size, steps_per_block=steps, threshold=threshold, eos_id=eos_id,
                                 pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 cache=cache)
    return SampleOut(out.tokens, out.nfe, out.nfe, out.row_calls + out.commits)  # rows: denoising + commit calls
