"""Per-rank peak memory of a training step: weights, grads, optimizer shards, activations, loss buffers.

No torch import (the dry run and `megadiff model info` use it on a login node). Every term is a count
of the tensors megadiff's step keeps alive, in elements, times their width in bytes:

static (per rank, N = this rank's parameters, see ``params_per_rank``)
    weights     N x (2 bf16 | 4 fp32)
    grads       N x 4                megatron DDP grad buffer (grad_reduce_in_fp32)
    optimizer   N x (12 bf16 | 8 fp32) / DP   Adam m, v (+ fp32 main params under bf16), sharded
                over DP by the distributed optimizer (not divided without it)

activations (per micro batch in flight; s = seq, b = micro batch, elements saved for backward)
    per layer   (c_h x h + c_kv x kv + c_f x f) x s x b       ``ACT_PER_TOKEN`` below; the h terms of
                the norms/residual stream are replicated over TP, the attention and MLP terms split
    outside     c_out x h x s x b (embedding output, final norm)
    recompute   selective: megatron re-runs core attention + MLP (their inputs stay saved)
                full: only each recomputed layer's input (1 x h) is kept; backward re-materialises
                one layer at a time, which is added once
    in flight   1F1B: stage 0 holds min(PP, micro batches) micro batches' activations

    The coefficients were counted with autograd's saved-tensor hooks on megatron's local layer spec
    with SDPA core attention (tests/test_model_memory.py re-counts them): llama saves 8.5 h + 4 kv +
    5 ffn elements per token and layer, gpt2 8 h + 2 ffn. GPU kernels (TE fused norms, flash
    attention) save at most as much, so on GPU the activation term is an upper bound.

loss buffers (last pipeline stage; rows = s x b scored positions, V = padded vocab)
    logits path ("logits": full-vocab logits gathered on every TP rank, float32 loss over them):
        the gathered logits held by the schedule, their float32 restricted copy, and in backward the
        softmax, the index_fill and the padding gradients: 5 x rows x V, + rows x V / TP local shard
        when TP > 1
    fused path ("fused": masked rows only, vocab-parallel chunked linear + CE, loss_head.py):
        one float32 logits chunk (<= 32 Mi / TP elements, reused in place for exp and gradient; + its 16-bit
        copies under bf16), the output weight's float32 gradient shard (V/TP x h), and the scored rows'
        hidden states and their gradient (2 x rows_scored x h)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megadiff import MegadiffError
from megadiff.model.flops import count_params
from megadiff.model.presets import ModelShape

GIB = 2**30

# elements saved per token per layer: (h replicated over TP, h split over TP, kv, ffn)
ACT_PER_TOKEN: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("llama", "none"): (4.0, 4.5, 4.0, 5.0),
    ("llama", "selective"): (4.0, 5.5, 3.0, 0.0),
    ("gpt2", "none"): (4.0, 4.0, 0.0, 2.0),
    ("gpt2", "selective"): (4.0, 4.0, 0.0, 0.0),
}
OUTSIDE_PER_TOKEN = {"llama": 3.0, "gpt2": 2.0}  # embedding output, final norm (x h)
LOSS_PATHS = ("logits", "fused")
RUNTIME_BYTES = 24 * 2**20  # allocator/autograd/process-group workspace, measured on CPU (constant in N)
LOSS_CHUNK_ELEMS = 32 * 2**20  # float32 logits per chunk of the fused head (megadiff/model/loss_head.py)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch: int = 1
    seq: int = 2048
    num_micro: int = 1  # micro batches per step on a DP rank (gradient accumulation)
    recompute: str = "none"  # none | selective | full
    recompute_num_layers: int | None = None  # full: layers per stage (None: all)
    bf16: bool = True
    distributed_optimizer: bool = True
    loss_path: str = "fused"  # logits | fused
    scored_fraction: float = 0.5  # fraction of positions carrying loss (masked diffusion: E[t] = 0.5)


@dataclass
class StageMemory:
    pp_rank: int
    params: int
    parts: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def layer_params_split(shape: ModelShape) -> tuple[int, int]:
    """(parameters of one layer split over TP, parameters replicated on every TP rank)."""
    d = shape.hidden_size
    pc = count_params(shape, 0)
    if shape.arch == "gpt2":  # row-parallel output biases (proj, fc2) and the LayerNorms are replicated
        replicated = 2 * d + 2 * 2 * d
    else:
        replicated = 2 * d  # two RMSNorm weights
    return pc.per_layer - replicated, replicated


def params_per_rank(shape: ModelShape, vocab_padded: int, tp: int, pp: int, pp_rank: int) -> int:
    """Parameters held by one rank of stage ``pp_rank`` (embedding/output split over TP, layers over PP)."""
    pc = count_params(shape, vocab_padded)
    tok_emb = vocab_padded * shape.hidden_size
    split, replicated = layer_params_split(shape)
    n = layers_on_stage(shape.num_layers, pp, pp_rank) * (split // tp + replicated)
    if pp_rank == 0:
        n += tok_emb // tp + (pc.embedding - tok_emb)  # learned positions are replicated
    if pp_rank == pp - 1:
        n += pc.final_norm
        if pc.output or pp > 1:  # untied output, or the last stage's copy of the tied embedding
            n += tok_emb // tp
    return n


def layers_on_stage(num_layers: int, pp: int, pp_rank: int) -> int:
    base, extra = divmod(num_layers, pp)
    return base + (1 if pp_rank < extra else 0)


def layer_activation_elems(shape: ModelShape, layout: Layout, mode: str) -> float:
    """Elements one layer saves for backward for one micro batch on one TP rank."""
    tokens = layout.seq * layout.micro_batch
    if mode == "full":
        return tokens * shape.hidden_size
    rep, split, kv, ffn = ACT_PER_TOKEN[(shape.arch, mode)]
    h, t = shape.hidden_size, layout.tp
    return tokens * (rep * h + (split * h + kv * shape.kv_dim + ffn * shape.ffn_hidden_size) / t)


def activation_bytes(shape: ModelShape, layout: Layout, pp_rank: int) -> tuple[float, float]:
    """(saved activations of the micro batches in flight, transient re-materialised layer under full)."""
    width = 2 if layout.bf16 else 4
    layers = layers_on_stage(shape.num_layers, layout.pp, pp_rank)
    mode = layout.recompute
    if mode == "full":
        n_rc = min(layout.recompute_num_layers or layers, layers)
        per_mb = n_rc * layer_activation_elems(shape, layout, "full") + \
            (layers - n_rc) * layer_activation_elems(shape, layout, "none")
        transient = layer_activation_elems(shape, layout, "none") if n_rc else 0.0
    else:
        per_mb = layers * layer_activation_elems(shape, layout, mode)
        transient = 0.0
    per_mb += OUTSIDE_PER_TOKEN[shape.arch] * layout.seq * layout.micro_batch * shape.hidden_size
    in_flight = min(layout.pp - pp_rank, layout.num_micro) if layout.pp > 1 else 1
    return per_mb * in_flight * width, transient * width


def loss_bytes(shape: ModelShape, vocab_padded: int, layout: Layout) -> float:
    rows = layout.seq * layout.micro_batch
    if layout.loss_path == "logits":
        shard = rows * vocab_padded / layout.tp if layout.tp > 1 else 0.0  # pre-gather local logits
        return 4.0 * (5 * rows * vocab_padded + shard)
    if layout.loss_path == "fused":
        width = 2 if layout.bf16 else 4
        v_local = vocab_padded / layout.tp
        scored = rows * layout.scored_fraction
        chunk = min(LOSS_CHUNK_ELEMS, scored * vocab_padded) / layout.tp * (4 + (2 * width if layout.bf16 else 0))
        grad_w = v_local * shape.hidden_size * (4 + (2 if layout.bf16 else 0))
        row_tensors = 2 * scored * shape.hidden_size * width  # gathered rows + their gradient
        return chunk + grad_w + row_tensors
    raise MegadiffError(f"unknown loss path {layout.loss_path!r}; allowed: {', '.join(LOSS_PATHS)}")


def forecast(shape: ModelShape, vocab_padded: int, layout: Layout) -> list[StageMemory]:
    """Per-rank peak memory of every pipeline stage (ranks of one stage are alike)."""
    if layout.recompute not in ("none", "selective", "full"):
        raise MegadiffError(f"recompute={layout.recompute!r}; allowed: none, selective, full")
    out = []
    for r in range(layout.pp):
        n = params_per_rank(shape, vocab_padded, layout.tp, layout.pp, r)
        opt_per_param = 12 if layout.bf16 else 8
        parts = {
            "weights": n * (2 if layout.bf16 else 4),
            "grads": n * 4.0,
            "optimizer": n * opt_per_param / (layout.dp if layout.distributed_optimizer else 1),
        }
        parts["activations"], transient = activation_bytes(shape, layout, r)
        loss = loss_bytes(shape, vocab_padded, layout) if r == layout.pp - 1 else 0.0
        # the loss buffers die before the first layer's backward (where full recompute re-materialises)
        parts["loss_or_recompute"] = max(loss, transient)
        parts["runtime"] = RUNTIME_BYTES
        out.append(StageMemory(r, n, parts))
    return out


def worst_stage(stages: list[StageMemory]) -> StageMemory:
    return max(stages, key=lambda s: s.total)


def format_forecast(stages: list[StageMemory]) -> str:
    lines = [f"{'stage':>5} {'params/rank':>14} " + " ".join(f"{k:>11}" for k in stages[0].parts) +
             f" {'total':>9}   (GiB per rank)"]
    for s in stages:
        lines.append(f"{s.pp_rank:>5} {s.params:>14,} " + " ".join(f"{v / GIB:>11.2f}" for v in s.parts.values()) +
                     f" {s.total / GIB:>9.2f}")
    return "\n".join(lines)
