"""Core-attention backends, picked by name from a registry (``model.attention_backend``).

megatron-core's stock ``DotProductAttention`` materialises the [b, n, s, s] score matrix and calls
CUDA directly (RNG tracker, ``torch.cuda.current_device``); we replace it with modules that keep
its constructor and ``forward`` signature (query/key/value are [s, b, heads, head_dim], the output
is [s, b, heads*head_dim] of this TP rank) and call a fused kernel:

* ``sdpa``  — ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient
  kernels on GPU, the math kernel on CPU). Always available; the only backend on CPU.
* ``flash`` — ``flash_attn.flash_attn_func`` (``causal=False`` for diffusion), if installed.
* ``te``    — transformer-engine's ``TEDotProductAttention`` (mask type ``no_mask``), if installed
  (registered by ``megadiff/model/te_attention.py``, imported only when chosen).

Names and traits (package, CUDA only, preference of ``auto``) are declared in ``megadiff/model/catalog.py``:
``auto`` picks te > flash > sdpa on CUDA among the installed ones, and sdpa elsewhere. Whether attention is bidirectional
is the spec's ``attn_mask_type`` parameter (``AttnMaskType.no_mask`` vs ``causal``), which these
modules honour; the mask tensor itself is never built.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megadiff import MegadiffError
from megadiff.model.catalog import ATTENTION_BACKENDS


class _CoreAttentionBase(MegatronModule):
    """Shared constructor: the same arguments megatron passes to DotProductAttention."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise MegadiffError("context parallelism needs the te attention backend")
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    @property
    def causal(self) -> bool:
        return self.attn_mask_type == AttnMaskType.causal


@ATTENTION_BACKENDS.register("sdpa")
class SDPACoreAttention(_CoreAttentionBase):
    """Core attention through torch SDPA; bidirectional unless the spec says causal."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise MegadiffError("packed sequences / attention bias need the te attention backend")
        s, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if self.groups != self.heads:
            rep = self.heads // self.groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        causal = self.causal if attn_mask_type is None else attn_mask_type == AttnMaskType.causal
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal, scale=self.softmax_scale,
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)


@ATTENTION_BACKENDS.register("flash")
class FlashCoreAttention(_CoreAttentionBase):
    """Core attention through flash-attn 2/3 (``causal=False`` for the diffusion objectives)."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]

        s, b = query.shape[0], query.shape[1]
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [b, s, heads, d]; GQA native
        out = flash_attn_func(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                              softmax_scale=self.softmax_scale, causal=self.causal)
        return out.transpose(0, 1).reshape(s, b, self.heads * self.head_dim)


def usable(name: str, device: str) -> bool:
    """``name`` is installed and runs on ``device``."""
    tr = ATTENTION_BACKENDS.traits(name)
    return (not tr.cuda_only or device == "cuda") and (tr.package is None or importlib.util.find_spec(tr.package)
                                                      is not None)


def resolve_backend(name: str, device: str) -> str:
    """Map ``auto`` to the best backend usable on ``device``; check that an explicit choice is usable."""
    if name == "auto":
        ok = [n for n in ATTENTION_BACKENDS.names() if usable(n, device)]
        return max(ok, key=lambda n: ATTENTION_BACKENDS.traits(n).auto_rank)
    tr = ATTENTION_BACKENDS.traits(name)  # unknown name -> error listing the allowed ones
    if tr.package is not None and importlib.util.find_spec(tr.package) is None:
        raise MegadiffError(f"model.attention_backend={name} but {tr.package} is not installed; use sdpa or auto")
    if tr.cuda_only and device != "cuda":
        raise MegadiffError(f"model.attention_backend={name} needs a CUDA device; use sdpa on CPU")
    return name
