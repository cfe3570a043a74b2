"""Per-token RoPE positions for megatron's GPTModel.

megatron-core 0.16's ``GPTModel`` uses ``position_ids`` only for learned absolute positions: its rotary
embedding is the table for positions ``0..S-1`` whatever ``position_ids`` says. Packed documents with
``model.reset_position_ids``, the two halves of a BD3-LM sequence and KV-cached block sampling all need
other positions, so :func:`install` makes the model's ``RotaryEmbedding`` return the table rows at the
``position_ids`` of the current forward call ([S, B, 1, dim], which megatron's RoPE broadcasts over heads).
For ``position_ids = 0..S-1`` the values are the same rows, bit for bit. ``inv_freq`` is a plain attribute,
so checkpoints are unchanged.
"""

from __future__ import annotations

import types

import torch


def _positional_forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
    pos = self._megadiff_position_ids
    if pos is None or packed_seq:
        return self._megadiff_orig_forward(max_seq_len, offset, packed_seq, cp_group)
    table = self._megadiff_orig_forward(int(pos.max()) + 1, 0, False, cp_group)  # [P, 1, 1, d]
    return table[:, 0][pos.t().to(table.device)]  # [S, B, 1, d]


def install(model) -> None:
    """Make a GPTModel's RoPE follow ``position_ids`` (no-op for learned absolute positions)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or hasattr(rope, "_megadiff_orig_forward"):
        return
    rope._megadiff_orig_forward = rope.forward
    rope._megadiff_position_ids = None
    rope.forward = types.MethodType(_positional_forward, rope)

    def pre_hook(module, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        rope._megadiff_position_ids = pos if torch.is_tensor(pos) else None

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
