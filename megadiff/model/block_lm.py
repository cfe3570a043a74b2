"""megatron GPTModel adapters for block diffusion: the BD3-LM training/eval forward and the KV-cached
denoiser the block sampler calls (``megadiff.diffusion.block_sampler``).

The KV cache lives in the core-attention backends (sdpa, flex): each layer's keys and values, after RoPE
at their absolute positions, are stored per layer number; a call with ``AttentionMask(kv_cache=...)``
attends to the cached prefix plus its own tokens, and ``commit=True`` appends its keys/values. The clean
prefix's keys/values depend only on the prefix (clean blocks attend block-causally), so the cache is exact.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megadiff.model.masks import AttentionMask, attention_inputs


class KVCache:
    """Per-layer keys/values [b, groups, s, d] of the committed clean prefix."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, commit: bool):
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        if commit:
            self.k[layer], self.v[layer] = k, v
        return k, v

    def __len__(self) -> int:
        return next(iter(self.k.values())).shape[2] if self.k else 0


class MegatronDenoiser:
    """The denoiser contract of ``block_diffusion_sample`` over a (whole, TP=PP=1) GPTModel."""

    def __init__(self, model, block_size: int):
        self.model, self.block_size = model, int(block_size)

    def new_state(self) -> KVCache:
        return KVCache()

    def __call__(self, tokens: torch.Tensor, start: int, state: Optional[KVCache], commit: bool) -> torch.Tensor:
        B, n = tokens.shape
        if start % self.block_size:
            raise ValueError(f"block sampling call at position {start}: not a multiple of block size {self.block_size}")
        if state is not None and len(state) != start:
            raise ValueError(f"KV cache holds {len(state)} positions, the call starts at {start}")
        pos = torch.arange(start, start + n, device=tokens.device).expand(B, n)
        mask = AttentionMask(n, block_causal=self.block_size, kv_cache=state, commit=commit)
        return self.model(tokens, pos, mask)


def bd3lm_model_fn(model, block_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, 2L] ([x_t ‖ x_0]) -> logits`` through the BD3-LM mask (for ``evaluate_block_nelbo``)."""

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        B, S = tokens.shape
        pos, mask = attention_inputs(S // 2, B, tokens.device, block_size=block_size)
        return model(tokens, pos, mask)

    return fn
