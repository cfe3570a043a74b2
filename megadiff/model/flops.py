"""Parameter counts and training FLOPs per token — the one formula behind MFU and the scaling laws.

Training FLOPs per token = 3 x forward (backward = 2 x forward), forward counted as 2 FLOPs per
multiply-accumulate:

    matmul part   : 6 * (N_linear + V * d)          N_linear = non-embedding weight-matrix params
    attention part: 12 * L * d * S * c              c = 1 bidirectional (MDM), 1/2 causal (AR)

Bidirectional attention scores every key for every query, so it is counted in full; megatron's
own counter halves it (it assumes causal masks) and would under-report MDM training by up to
~20% at long sequence length. For the AR baseline a causal kernel computes only half, so c = 1/2.
Norms, biases, softmax and the loss are ignored (< 1%).
No torch import: the sweep planner uses this on a login node.
"""

from __future__ import annotations

from dataclasses import dataclass

from megadiff.model.presets import ModelShape


@dataclass(frozen=True)
class ParamCount:
    embedding: int  # token embedding (+ learned positions)
    output: int  # untied output layer (0 when tied)
    per_layer: int  # weights + norms + biases of one transformer layer
    final_norm: int
    linear_per_layer: int  # weight-matrix params of one layer (what the matmul FLOPs see)

    def total(self, num_layers: int) -> int:
        return self.embedding + self.output + self.final_norm + num_layers * self.per_layer

    def non_embedding(self, num_layers: int) -> int:
        return num_layers * self.per_layer + self.final_norm


def count_params(shape: ModelShape, vocab_size: int) -> ParamCount:
    d, f, kv = shape.hidden_size, shape.ffn_hidden_size, shape.kv_dim
    attn = d * (d + 2 * kv) + d * d  # qkv + output projection
    if shape.arch == "gpt2":
        mlp = 2 * d * f
        biases = (d + 2 * kv) + d + f + d
        norms = 2 * 2 * d  # two LayerNorms, weight + bias
        emb = vocab_size * d + shape.max_seq_len * d
        final = 2 * d
    else:
        mlp = 3 * d * f  # SwiGLU: gate, up, down
        biases = 0
        norms = 2 * d  # two RMSNorms
        emb = vocab_size * d
        final = d
    out = 0 if shape.tie_embeddings else vocab_size * d
    return ParamCount(emb, out, attn + mlp + biases + norms, final, attn + mlp)


def flops_per_token(shape: ModelShape, vocab_size: int, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs (forward + backward) per token; see the module docstring."""
    pc = count_params(shape, vocab_size)
    matmul = 6 * (shape.num_layers * pc.linear_per_layer + vocab_size * shape.hidden_size)
    attn = 12 * shape.num_layers * shape.hidden_size * seq_len * (0.5 if causal else 1.0)
    return float(matmul + attn)


# dense bf16 datasheet peaks (TFLOP/s) used for MFU when trainer.peak_tflops is 0
PEAK_TFLOPS = {"H100": 989.5, "H200": 989.5, "H800": 989.5, "A100": 312.0, "GH200": 989.5, "B200": 2250.0, "L40S": 362.0}


def peak_tflops_for(device_name: str) -> float | None:
    for key, val in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return val
    return None


def mfu(tokens_per_s: float, flops_tok: float, peak_tflops: float) -> float:
    return tokens_per_s * flops_tok / (peak_tflops * 1e12) if peak_tflops > 0 else 0.0
