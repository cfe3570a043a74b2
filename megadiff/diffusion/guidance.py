"""Unsupervised classifier-free guidance for masked-diffusion sampling (SMDM, Nie et al. 2024).

The conditional model sees the prompt; the "unconditional" one is the same network with every prompt
position replaced by [MASK] (no separately trained unconditional model is needed: a masked-diffusion
model already models the fully masked prompt). At each call the guided per-position distribution is

    log p_w(. | x) = (1 + w) log p(. | x) - w log p(. | x with the prompt masked)   (renormalised)

so w = 0 is plain conditional sampling and w > 0 sharpens towards what the prompt adds. The wrapper
is a ``model_fn`` like any other: every sampler takes it unchanged (one network call per call, on a
batch of 2B rows: conditional and unconditional stacked).

    fn = guided_model_fn(model_fn, prompt=prompt_positions, w=1.5, mask_id=m, vocab_size=V)
    out = SAMPLERS.get("first_hitting")(fn, canvas, mask_id=m, vocab_size=V)
"""

from __future__ import annotations

from typing import Callable

import torch

from megadiff.diffusion.objectives import restrict_logits

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def guided_logprobs(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, w: float, mask_id: int,
                    vocab_size: int) -> torch.Tensor:
    """[.., vocab_size] float32 normalised log-probabilities of the guided distribution (mask column -inf)."""
    lc = torch.log_softmax(restrict_logits(cond_logits, vocab_size, mask_id), dim=-1)
    lu = torch.log_softmax(restrict_logits(uncond_logits, vocab_size, mask_id), dim=-1)
    finite = torch.isfinite(lc) & torch.isfinite(lu)
    g = torch.where(finite, (1.0 + w) * lc - w * torch.where(finite, lu, torch.zeros_like(lu)),
                    torch.full_like(lc, float("-inf")))
    return torch.log_softmax(g, dim=-1)


def prompt_positions(prompt_len: int, length: int, device=None) -> torch.Tensor:
    """[length] bool: the first ``prompt_len`` positions (a prompt prefix)."""
    if not 0 <= prompt_len <= length:
        raise ValueError(f"prompt_len {prompt_len} must be in [0, {length}]")
    return torch.arange(length, device=device) < prompt_len


def guided_model_fn(model_fn: ModelFn, *, prompt: torch.Tensor, w: float, mask_id: int,
                    vocab_size: int) -> ModelFn:
    """``model_fn`` with classifier-free guidance of weight ``w`` (module docstring).

    prompt: [L] bool, True at the conditioning positions (the same for every row, so samplers may call
    the wrapper on any subset of rows); see ``prompt_positions`` for a prefix.
    """
    prompt = prompt.to(torch.bool)
    if prompt.dim() != 1:
        raise ValueError(f"guidance prompt must be an [L] bool vector of conditioning positions, got shape "
                         f"{tuple(prompt.shape)}")
    if w == 0.0:
        return model_fn

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != prompt.shape[0]:
            raise ValueError(f"guidance prompt covers {prompt.shape[0]} positions, the canvas has {x.shape[-1]}")
        uncond = torch.where(prompt.to(x.device)[None, :], torch.full_like(x, mask_id), x)
        out = model_fn(torch.cat([x, uncond]))
        B = x.shape[0]
        return guided_logprobs(out[:B], out[B:], w, mask_id, vocab_size)

    return fn
