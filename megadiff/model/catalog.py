"""The core-attention backends and their traits, without importing torch or megatron.

``auto`` picks, among the backends usable on the device, the one with the highest ``auto_rank``.
A backend is usable when its ``package`` is installed and, if ``cuda_only``, the device is CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megadiff.registry import Registry


@dataclass(frozen=True)
class AttentionTraits:
    description: str
    package: Optional[str] = None  # import name that must be installed (None: always there)
    cuda_only: bool = False
    te_layers: bool = False  # build the layer from megatron's transformer-engine spec (TE norms/linears)
    auto_rank: int = 0  # preference of `auto` among usable backends (higher first)
    masks: bool = False  # applies megadiff AttentionMasks (packed documents, BD3-LM, KV-cached block sampling)
    cpu_backward: bool = True  # trains on CPU (`auto` on CPU only picks these)


ATTENTION_BACKENDS: Registry = Registry("attention backend")
ATTENTION_BACKENDS.declare("sdpa", "megadiff.model.attention", AttentionTraits(
    "torch scaled_dot_product_attention (flash/cuDNN/efficient kernels on GPU, math kernel on CPU)", masks=True))
ATTENTION_BACKENDS.declare("flex", "megadiff.model.attention", AttentionTraits(
    "torch flex_attention with block masks (compiled on GPU; forward only on CPU)",
    package="torch.nn.attention.flex_attention", masks=True, cpu_backward=False, auto_rank=1))
ATTENTION_BACKENDS.declare("flash", "megadiff.model.attention", AttentionTraits(
    "flash-attn 2/3", package="flash_attn", cuda_only=True, auto_rank=1))
ATTENTION_BACKENDS.declare("te", "megadiff.model.te_attention", AttentionTraits(
    "transformer-engine DotProductAttention in megatron's TE layer spec", package="transformer_engine",
    cuda_only=True, te_layers=True, auto_rank=2))
