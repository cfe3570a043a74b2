"""The fused loss head: output projection + restricted-vocab cross-entropy on the scored rows only.

Training does not need logits, only the loss and its gradient. ``hidden_states_out`` makes megatron's
GPTModel return its final hidden states instead of logits (the output layer passes its input through;
under sequence parallelism it gathers the sequence as the layer would), and
``linear_cross_entropy`` scores the rows that carry loss (the masked positions for the diffusion
objectives) against this rank's vocab shard of the output weight:

    ce_i = logsumexp_{v allowed} (h_i . w_v)  -  h_i . w_{target_i}      (float32)
    allowed = real vocab minus ``mask_id`` (SUBS) minus megatron's padded rows

The logsumexp is vocab-parallel (max and sum all-reduced over the TP group, as megatron's
vocab_parallel_cross_entropy does) and chunked over rows so that no rank holds more than
``CHUNK_ELEMS / TP`` float32 logits at once, never ``[rows, V]``. Because the loss is a weighted SUM of the
per-row CE with weights known in forward, the gradients for a unit upstream gradient are computed in
the same pass (the logits chunk is reused: 3 matmuls per chunk in all, like an unfused linear + CE)
and backward only scales them (the fused linear + CE scheme of Liger-Kernel / Apple's cut-CE).
megatron's vocab_parallel_cross_entropy itself needs the full ``[rows, V/TP]`` logits tensor, which
is what this head avoids, so only its collectives pattern is reused.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megadiff.model.memory import LOSS_CHUNK_ELEMS

# rows per chunk = CHUNK_ELEMS // V (the whole padded vocab): a chunk's float32 logits take at most
# 128 MiB / TP on each rank, so the head's memory shrinks with TP like the weight shard does
CHUNK_ELEMS = LOSS_CHUNK_ELEMS


def unwrap(model: Any) -> Any:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def hidden_states_out(model: Any) -> Iterator[dict]:
    """Within the block, the last stage's GPTModel returns ``[B, L, h]`` final hidden states (after the
    final norm) instead of logits; the yielded dict receives the output weight it would have used."""
    gpt = unwrap(model)
    holder: dict = {}
    if not getattr(gpt, "post_process", False):
        yield holder
        return
    layer = gpt.output_layer

    def passthrough(input_, weight=None, runtime_gather_output=None, **_):
        holder["weight"] = layer.weight if weight is None else weight
        if layer.sequence_parallel:  # all-gather the sequence; backward keeps this rank's slice of the
            # (already TP-reduced, see _LinearCE) gradient
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            return gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                        group=layer.tp_group), None
        return input_, None

    layer.forward = passthrough
    try:
        yield holder
    finally:
        del layer.forward  # back to the class's forward


def tp_info(weight: torch.Tensor) -> tuple[Any, int, int]:
    """(TP group or None, this rank's first vocab row, TP size) for the output weight's vocab shard."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None, 0, 1
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return ps.get_tensor_model_parallel_group(), rank * weight.shape[0], size


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, target, row_weight, vocab_start, vocab_size, mask_id, group, chunk, need_grad):
        n, v_local = h.shape[0], w.shape[0]
        cols = torch.arange(vocab_start, vocab_start + v_local, device=h.device)
        bias = torch.zeros(v_local, dtype=torch.float32, device=h.device)
        bias.masked_fill_((cols >= vocab_size) | (cols == mask_id), float("-inf"))
        local_t = target - vocab_start
        inside = (local_t >= 0) & (local_t < v_local)
        local_t = torch.where(inside, local_t, torch.zeros_like(local_t))
        ce = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = torch.matmul(h[s:e], w.t()).float().add_(bias)  # [c, V/TP] float32
            m = logits.max(dim=-1).values
            if group is not None:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(m[:, None])
            tgt = logits.gather(1, local_t[s:e, None]).squeeze(1)
            tgt = torch.where(inside[s:e], tgt, torch.zeros_like(tgt))  # not x 0: column 0 may be -inf
            probs = logits.exp_()
            sumexp = probs.sum(dim=-1)
            if group is not None:
                stats = torch.stack([sumexp, tgt])
                dist.all_reduce(stats, group=group)
                sumexp, tgt = stats[0], stats[1]
            ce[s:e] = sumexp.log() - tgt
            if need_grad:  # d(sum_i w_i ce_i)/d logits = w_i (softmax_i - onehot(target_i))
                wr = row_weight[s:e]
                probs.mul_((wr / sumexp)[:, None])
                rows = torch.nonzero(inside[s:e]).squeeze(1)
                probs[rows, local_t[s:e][rows]] -= wr[rows]
                g = probs.to(h.dtype)
                grad_h[s:e] = g @ w
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h[s:e])
                else:  # bf16 matmul, float32 accumulation across chunks
                    grad_w.add_((g.t() @ h[s:e]).float())
        if need_grad and group is not None:  # each rank scored its vocab shard: sum the input gradient
            dist.all_reduce(grad_h, group=group)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return (ce * row_weight).sum(), ce

    @staticmethod
    def backward(ctx, g_loss, _g_ce):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("linear_cross_entropy was called without gradients enabled; cannot backpropagate")
        return (grad_h * g_loss.to(grad_h.dtype), (grad_w * g_loss).to(ctx.w_dtype), None, None, None, None, None,
                None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor,
                         vocab_size: int, mask_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i row_weight_i * ce_i, ce.detach())`` for hidden rows ``h [N, d]`` against this rank's output
    weight shard ``[V/TP, d]``; ``target [N]`` holds global token ids, ``row_weight [N]`` float32."""
    group, start, tp = tp_info(weight)
    chunk = max(1, CHUNK_ELEMS // max(1, weight.shape[0] * tp))
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    mask = -1 if mask_id is None else int(mask_id)
    loss, ce = _LinearCE.apply(h, weight, target, row_weight.float(), start, int(vocab_size), mask, group, chunk,
                               need_grad)
    return loss, ce.detach()
