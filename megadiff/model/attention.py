"""Core-attention backends, picked by name from a registry (``model.attention_backend``).

megatron-core's stock ``DotProductAttention`` materialises the [b, n, s, s] score matrix and calls
CUDA directly (RNG tracker, ``torch.cuda.current_device``); we replace it with modules that keep
its constructor and ``forward`` signature (query/key/value are [s, b, heads, head_dim], the output
is [s, b, heads*head_dim] of this TP rank) and call a fused kernel:

* ``sdpa``  — ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient
  kernels on GPU, the math kernel on CPU), GQA native (``enable_gqa``). Always available; masks
  (packed documents, BD3-LM) go in as a dense boolean mask. The training backend on CPU.
* ``flex``  — ``torch.nn.attention.flex_attention`` with a block mask built from the same rule
  (``mask_mod``), compiled on CUDA; unmasked calls go through SDPA. Its forward also runs on CPU
  (unfused), but torch has no flex backward on CPU: training with it needs a GPU.
* ``flash`` — ``flash_attn.flash_attn_func`` (``causal=False`` for diffusion), if installed; no masks.
* ``te``    — transformer-engine's ``TEDotProductAttention`` (mask type ``no_mask``), if installed
  (registered by ``megadiff/model/te_attention.py``, imported only when chosen).
  Document masks on this path are megatron's packed THD format (``masks.packed_seq_params``: the
  batch flattened to one row with ``cu_seqlens``); BD3-LM masks and annealed masks (an arbitrary
  [S, S] permission) are not expressible there: such runs refuse te (``resolve_backend``).

Names and traits (package, CUDA only, masks, CPU backward, preference of ``auto``) are declared in
``megadiff/model/catalog.py``. ``auto`` picks the usable backend with the highest preference: te > flash >
sdpa on CUDA without masks; flex > sdpa on CUDA when the run uses masks (``data.document_mask`` or a block
objective); sdpa on CPU (flex has no CPU backward). Whether attention is bidirectional
is the spec's ``attn_mask_type`` parameter (``AttnMaskType.no_mask`` vs ``causal``). Extra masks
arrive as the ``attention_mask`` argument megatron passes down unchanged: a
``megadiff.model.masks.AttentionMask`` (rule, documents, BD3-LM layout, sampling KV cache).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megadiff import MegadiffError
from megadiff.model.catalog import ATTENTION_BACKENDS
from megadiff.model.masks import AttentionMask

# torch >= 2.5: SDPA broadcasts key/value groups itself (no repeat_interleave copies)
_NATIVE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


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
        self.layer_number = layer_number
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    @property
    def causal(self) -> bool:
        return self.attn_mask_type == AttnMaskType.causal


def _check_mask(attention_mask, packed_seq_params, attention_bias, backend: str) -> Optional[AttentionMask]:
    if packed_seq_params is not None or attention_bias is not None:
        raise MegadiffError(f"packed sequences / attention bias need the te attention backend, not {backend}")
    if attention_mask is None or isinstance(attention_mask, AttentionMask):
        return attention_mask
    raise MegadiffError(f"the {backend} attention backend takes a megadiff AttentionMask, got "
                        f"{type(attention_mask).__name__}; build masks with megadiff.model.masks")


def _with_cache(mask: Optional[AttentionMask], layer: int, k, v):
    """Prefix the cached keys/values ([b, groups, s, d]) of this layer; append them when committing."""
    if mask is None or mask.kv_cache is None:
        return k, v
    return mask.kv_cache.extend(layer, k, v, commit=mask.commit)


def _sdpa(q, k, v, mask: Optional[AttentionMask], causal: bool, dropout: float, scale, gqa: bool):
    if mask is not None and mask.kv_cache is not None:
        # the current tokens see the whole cached prefix, and each other by the mask's rule
        prefix = k.shape[2] - q.shape[2]
        inner = AttentionMask(mask.seq_len, mask.segment_ids, mask.block_size, mask.block_causal, allow=mask.allow)
        attn = None if inner.trivial and not causal else mask.dense(causal, q.device, prefix)
        is_causal = False
    elif mask is not None and not mask.trivial:
        attn, is_causal = mask.dense(causal, q.device), False
    else:
        attn, is_causal = None, causal
    if gqa and _NATIVE_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, dropout_p=dropout, is_causal=is_causal,
                                              scale=scale, enable_gqa=True)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, dropout_p=dropout, is_causal=is_causal,
                                          scale=scale)


@ATTENTION_BACKENDS.register("sdpa")
class SDPACoreAttention(_CoreAttentionBase):
    """Core attention through torch SDPA; bidirectional unless the spec says causal; masks dense."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask = _check_mask(attention_mask, packed_seq_params, attention_bias, "sdpa")
        s, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        k, v = _with_cache(mask, self.layer_number, k, v)
        causal = self.causal if attn_mask_type is None else attn_mask_type == AttnMaskType.causal
        out = _sdpa(q, k, v, mask, causal, self.dropout if self.training else 0.0, self.softmax_scale,
                    self.groups != self.heads)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)


@ATTENTION_BACKENDS.register("flex")
class FlexCoreAttention(_CoreAttentionBase):
    """Core attention through torch flex_attention with a block mask from the AttentionMask rule.

    Calls without a (non-trivial) mask, and KV-cached sampling calls, go through SDPA.
    """

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask = _check_mask(attention_mask, packed_seq_params, attention_bias, "flex")
        s, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        k, v = _with_cache(mask, self.layer_number, k, v)
        causal = self.causal if attn_mask_type is None else attn_mask_type == AttnMaskType.causal
        dropout = self.dropout if self.training else 0.0
        if mask is None or mask.trivial or mask.kv_cache is not None:
            out = _sdpa(q, k, v, mask, causal, dropout, self.softmax_scale, self.groups != self.heads)
        else:
            if dropout > 0.0:
                raise MegadiffError("the flex attention backend has no attention dropout; use sdpa")
            if not q.is_cuda and q.requires_grad and torch.is_grad_enabled():
                raise MegadiffError("torch's flex_attention has no backward on CPU: train with "
                                    "model.attention_backend=sdpa (or auto) on CPU; flex is for GPUs")
            out = flex_attention_call(q, k, v, flex_block_mask(mask, causal, q.device), self.softmax_scale,
                                      gqa=self.groups != self.heads)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)


def flex_block_mask(mask: AttentionMask, causal: bool, device):
    """The flex BlockMask of ``mask`` (built once per forward pass, shared by all layers)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex", causal, str(device))
    if key not in mask._memo:
        if mask.segment_ids is not None:
            mask.segment_ids = mask.segment_ids.to(device)
        mask._to(device)
        B = mask.segment_ids.shape[0] if mask.segment_ids is not None else None

        def mask_mod(b, h, q_idx, kv_idx):
            return mask.allowed(b, q_idx, kv_idx, causal)

        mask._memo[key] = create_block_mask(mask_mod, B, None, mask.seq_len, mask.seq_len, device=str(device))
    return mask._memo[key]


_FLEX_COMPILED = None


def flex_attention_call(q, k, v, block_mask, scale, gqa: bool):
    """flex_attention, compiled once per process on CUDA (eager and unfused elsewhere)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        fn = _FLEX_COMPILED
    else:
        import warnings

        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


@ATTENTION_BACKENDS.register("flash")
class FlashCoreAttention(_CoreAttentionBase):
    """Core attention through flash-attn 2/3 (``causal=False`` for the diffusion objectives)."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]

        if attention_mask is not None and not (isinstance(attention_mask, AttentionMask) and attention_mask.trivial):
            raise MegadiffError("the flash attention backend takes no masks (documents, blocks, KV cache); "
                                "use model.attention_backend=flex or sdpa")

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


def resolve_backend(name: str, device: str, masked: bool = False) -> str:
    """Map ``auto`` to the best backend usable on ``device`` (for a run with document / block masks when
    ``masked``); check that an explicit choice is usable and, if ``masked``, applies masks."""
    if name == "auto":
        ok = [n for n in ATTENTION_BACKENDS.names() if usable(n, device)
              and (not masked or ATTENTION_BACKENDS.traits(n).masks)
              and (device == "cuda" or ATTENTION_BACKENDS.traits(n).cpu_backward)]
        return max(ok, key=lambda n: ATTENTION_BACKENDS.traits(n).auto_rank)
    tr = ATTENTION_BACKENDS.traits(name)  # unknown name -> error listing the allowed ones
    if masked and not tr.masks:
        raise MegadiffError(f"model.attention_backend={name} cannot apply attention masks (document masks, "
                            "block diffusion, attention-mask annealing); use flex (GPU), sdpa or auto")
    if tr.package is not None and importlib.util.find_spec(tr.package) is None:
        raise MegadiffError(f"model.attention_backend={name} but {tr.package} is not installed; use sdpa or auto")
    if tr.cuda_only and device != "cuda":
        raise MegadiffError(f"model.attention_backend={name} needs a CUDA device; use sdpa on CPU")
    return name
