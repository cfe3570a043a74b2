"""Attention masks as a backend-neutral description, and the position ids that go with them.

megatron's ``GPTModel.forward(tokens, position_ids, attention_mask)`` hands ``attention_mask``
unchanged to every layer's core attention. We pass an :class:`AttentionMask` there; each backend in
``megadiff.model.attention`` materialises what it needs from it (SDPA: a dense boolean mask, flex:
a block mask, the KV-cached sampler: nothing). One rule, one place:

    allowed(b, q, k) = layout(q, k) & causal(q, k) & same_document(b, q, k) & allow[q, k]

* ``layout``: everything (plain sequences) or, with ``block_size > 0``, the BD3-LM layout over the
  doubled sequence ``[x_t ‖ x_0]`` of length 2L (Arriola et al. 2025): a noisy token attends to its
  own noisy block (block diagonal) and to the clean blocks strictly before it (offset block causal);
  a clean token attends to the clean blocks up to its own (block causal).
* ``block_causal``: q // n >= k // n for blocks of n tokens (KV-cached and uncached block sampling).
* ``causal``: q >= k, when the layer spec is causal (the autoregressive baseline).
* ``same_document``: ``segment_ids[b, q] == segment_ids[b, k]`` (packed documents,
  ``data.document_mask``).
* ``allow``: an arbitrary [S, S] permission shared by the batch (attention-mask annealing,
  ``diffusion.anneal_steps``: ``megadiff.diffusion.curricula.annealed_attention`` of the step).

Position ids: ``0..S-1`` by default, restarting at every document start with
``model.reset_position_ids`` (RoPE and learned positions alike, see ``megadiff.model.positions``);
the two halves of a BD3-LM sequence carry the same positions.

Pure torch (no megatron import), so the diffusion side and the tests can build masks cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megadiff import MegadiffError


def bd3lm_allowed(q: torch.Tensor, k: torch.Tensor, half: int, block_size: int) -> torch.Tensor:
    """The BD3-LM mask over ``[x_t ‖ x_0]`` (indices < half are noisy, >= half clean), broadcasting."""
    q_clean, k_clean = q >= half, k >= half
    bq = torch.where(q_clean, q - half, q) // block_size
    bk = torch.where(k_clean, k - half, k) // block_size
    block_diagonal = (bq == bk) & (q_clean == k_clean)
    offset_block_causal = (bq > bk) & k_clean & ~q_clean
    block_causal = (bq >= bk) & k_clean & q_clean
    return block_diagonal | offset_block_causal | block_causal


@dataclass(eq=False)
class AttentionMask:
    """What a core-attention backend may attend to in one forward pass (self-attention, S tokens).

    segment_ids: [B, S] document index of every token (None: one document per row).
    block_size: > 0 selects the BD3-LM layout (S = 2L, the first half noisy).
    block_causal: > 0 makes attention block causal over blocks of that many tokens.
    allow: [S, S] bool permission ANDed into the rule (None: everything), shared by the batch.
    kv_cache / commit: sampling only (see ``megadiff.model.block_lm``): the queries attend to the
    whole cached clean prefix and, by the rule above, to the tokens of the current call; ``commit``
    appends this call's keys and values to the cache.
    """

    seq_len: int
    segment_ids: Optional[torch.Tensor] = None
    block_size: int = 0
    block_causal: int = 0
    kv_cache: Any = None
    commit: bool = False
    allow: Optional[torch.Tensor] = None
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.allow is not None and tuple(self.allow.shape) != (self.seq_len, self.seq_len):
            raise MegadiffError(f"AttentionMask.allow has shape {tuple(self.allow.shape)}, expected "
                                f"{(self.seq_len, self.seq_len)} (one permission per query/key pair)")

    def allowed(self, b: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
        """Elementwise rule on broadcastable index tensors (also a flex ``mask_mod`` body)."""
        ok = torch.ones_like(q == k)
        if self.block_size > 0:
            ok = ok & bd3lm_allowed(q, k, self.seq_len // 2, self.block_size)
        if self.block_causal > 0:
            ok = ok & (q // self.block_causal >= k // self.block_causal)
        if causal:
            ok = ok & (q >= k)
        if self.segment_ids is not None:
            seg = self.segment_ids
            ok = ok & (seg[b, q] == seg[b, k])
        if self.allow is not None:
            ok = ok & self.allow[q, k]
        return ok

    def dense(self, causal: bool, device: torch.device, prefix: int = 0) -> torch.Tensor:
        """[B or 1, 1, S, prefix + S] bool, True = may attend (SDPA's convention); the first ``prefix``
        keys (a KV cache) are always allowed. Built once per forward pass, shared by the layers."""
        key = ("dense", causal, str(device), prefix)
        if key not in self._memo:
            S = self.seq_len
            idx = torch.arange(S, device=device)
            q, k = idx[:, None], idx[None, :]
            if self.segment_ids is not None:
                B = self.segment_ids.shape[0]
                b = torch.arange(B, device=device)[:, None, None]
                self.segment_ids = self.segment_ids.to(device)
                self._to(device)
                m = self.allowed(b, q[None], k[None], causal)
            else:
                self._to(device)
                m = self.allowed(None, q, k, causal)[None]
            m = m[:, None]
            if prefix:
                m = torch.cat([torch.ones(m.shape[:-1] + (prefix,), dtype=torch.bool, device=device), m], dim=-1)
            self._memo[key] = m
        return self._memo[key]

    def _to(self, device) -> None:
        if self.allow is not None:
            self.allow = self.allow.to(device)

    @property
    def trivial(self) -> bool:
        """True when the mask allows what the layer spec alone allows (no documents, no blocks, no cache,
        no ``allow`` permission)."""
        return (self.segment_ids is None and self.block_size == 0 and self.kv_cache is None and self.allow is None
                and (self.block_causal == 0 or self.block_causal >= self.seq_len))


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] positions restarting at 0 at every document start (a change of segment id)."""
    B, S = segment_ids.shape
    idx = torch.arange(S, device=segment_ids.device).expand(B, S)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def attention_inputs(seq_len_in: int, batch: int, device: torch.device, *,
                     segment_ids: Optional[torch.Tensor] = None, block_size: int = 0,
                     reset_position_ids: bool = False,
                     allow: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[AttentionMask]]:
    """(position_ids [B, S], attention mask or None) for a model input of S tokens.

    ``seq_len_in`` is the length of the data (L); with ``block_size > 0`` the model input is the
    BD3-LM concatenation of length 2L and both halves share positions and documents. ``allow``: an
    [L, L] permission (attention-mask annealing) combined with the documents; not with the BD3-LM layout.
    """
    L = seq_len_in
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (batch, L):
            raise MegadiffError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected {(batch, L)} "
                                "(one document index per token of the micro batch)")
        segment_ids = segment_ids.to(device)
        pos = document_positions(segment_ids) if reset_position_ids else \
            torch.arange(L, device=device).expand(batch, L)
    else:
        if reset_position_ids:
            raise MegadiffError("model.reset_position_ids=true needs document boundaries: set "
                                "data.document_mask=true on shards that record document starts")
        pos = torch.arange(L, device=device).expand(batch, L)
    if allow is not None and block_size > 0:
        raise MegadiffError("attention-mask annealing (diffusion.anneal_steps) does not combine with the BD3-LM "
                            "layout (diffusion.objective=bd3lm); set diffusion.anneal_steps=0")
    if block_size > 0:
        if L % block_size:
            raise MegadiffError(f"diffusion.block_size={block_size} must divide the sequence length {L}")
        pos = torch.cat([pos, pos], dim=1)
        segment_ids = torch.cat([segment_ids, segment_ids], dim=1) if segment_ids is not None else None
    if segment_ids is None and block_size == 0 and allow is None:
        return pos, None
    return pos, AttentionMask(pos.shape[1], segment_ids=segment_ids, block_size=block_size,
                              allow=None if allow is None else allow.to(device))


def step_attention(objective: Any, x0: torch.Tensor, model_input: torch.Tensor,
                   segment_ids: Optional[torch.Tensor], document_mask: bool,
                   reset_position_ids: bool,
                   allow: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[AttentionMask]]:
    """Position ids and mask for one training/eval micro batch (called by ``train.step``).

    The objective declares its layout through ``block_size`` (BD3-LM; absent or 0 otherwise).
    ``allow``: the step's [L, L] annealed attention (None: no annealing, or annealing complete).
    """
    if document_mask and segment_ids is None:
        raise MegadiffError("data.document_mask=true but the micro batch carries no document boundaries "
                            "(segment_ids): the shards predate document-start records; re-run "
                            "`megadiff data tokenize` or set data.document_mask=false")
    block_size = int(getattr(objective, "block_size", 0) or 0)
    rows = model_input.shape[0]  # objectives may stack copies of the batch along it (trait stacks_rows)
    if segment_ids is not None and rows != segment_ids.shape[0]:
        segment_ids = segment_ids.repeat(rows // segment_ids.shape[0], 1)
    pos, mask = attention_inputs(x0.shape[1], rows, x0.device,
                                 segment_ids=segment_ids if document_mask else None,
                                 block_size=block_size, reset_position_ids=reset_position_ids, allow=allow)
    if pos.shape[1] != model_input.shape[1]:
        raise MegadiffError(f"model input has {model_input.shape[1]} tokens, the attention layout {pos.shape[1]}")
    return pos, mask


def packed_seq_params(segment_ids: torch.Tensor):
    """megatron ``PackedSeqParams`` (THD, ``cu_seqlens``) for the documents of a [B, S] batch flattened
    to one row of B*S tokens: the transformer-engine path for document masks on GPU."""
    from megatron.core.packed_seq_params import PackedSeqParams

    B, S = segment_ids.shape
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.nonzero(start.reshape(-1)).squeeze(-1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([B * S], dtype=torch.int32, device=starts.device)])
    mx = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=mx, max_seqlen_kv=mx)
