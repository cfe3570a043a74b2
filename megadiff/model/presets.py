"""Model size presets and resolution of a `ModelConfig` into concrete shapes (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megadiff import MegadiffError

# name: (num_layers, hidden_size, num_attention_heads, num_query_groups or None, ffn_hidden_size or None)
PRESETS: dict[str, tuple[int, int, int, int | None, int | None]] = {
    "tiny": (2, 64, 4, None, None),
    "10m": (6, 256, 4, None, None),
    "25m": (8, 384, 6, None, None),
    "50m": (8, 512, 8, None, None),
    "85m": (12, 640, 10, None, None),
    "125m": (12, 768, 12, None, None),
    "350m": (24, 1024, 16, None, None),
    "760m": (24, 1536, 16, None, None),
    "1.1b": (22, 2048, 32, 4, 5632),  # TinyLlama-1.1B shape (SMDM-style 1.1B)
    "1.3b": (24, 2048, 16, None, None),
    "3b": (32, 2560, 32, 8, None),
    "8b": (32, 4096, 32, 8, 14336),  # Llama-3-8B shape
    "70b": (80, 8192, 64, 8, 28672),  # Llama-3-70B shape
}


@dataclass(frozen=True)
class ModelShape:
    """Concrete shapes of a model: what the FLOPs/parameter formulas and the builder use."""

    arch: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    tie_embeddings: bool
    max_seq_len: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.head_dim


def default_ffn(arch: str, hidden: int) -> int:
    if arch == "gpt2":
        return 4 * hidden
    # SwiGLU with the same parameter count as a 4h GELU MLP, rounded up to a multiple of 64
    f = int(8 * hidden / 3)
    return (f + 63) // 64 * 64


def resolve_shape(model_cfg: Any) -> ModelShape:
    """Apply the preset (if any) to the config's fields and fill derived sizes."""
    L, h, a, g, f = (model_cfg.num_layers, model_cfg.hidden_size, model_cfg.num_attention_heads,
                     model_cfg.num_query_groups, model_cfg.ffn_hidden_size)
    if model_cfg.preset:
        if model_cfg.preset not in PRESETS:
            raise MegadiffError(f"unknown model.preset {model_cfg.preset!r}; allowed: {', '.join(PRESETS)}")
        L, h, a, g, f = PRESETS[model_cfg.preset]
        g = g if model_cfg.num_query_groups is None else model_cfg.num_query_groups
        f = f if model_cfg.ffn_hidden_size is None else model_cfg.ffn_hidden_size
    if h % a:
        raise MegadiffError(f"model.hidden_size={h} must be divisible by model.num_attention_heads={a}")
    g = g or a
    if a % g:
        raise MegadiffError(f"model.num_attention_heads={a} must be divisible by model.num_query_groups={g}")
    if model_cfg.arch == "gpt2" and g != a:
        raise MegadiffError("model.arch=gpt2 uses multi-head attention; leave model.num_query_groups unset")
    return ModelShape(model_cfg.arch, L, h, a, g, f or default_ffn(model_cfg.arch, h),
                      bool(model_cfg.tie_embeddings), int(model_cfg.max_seq_len))


def padded_vocab_size(vocab_size: int, tp: int = 1, multiple: int = 128) -> int:
    """Vocab (incl. [MASK]) padded to a multiple of `multiple` x TP, as megatron does."""
    m = multiple * tp
    return (vocab_size + m - 1) // m * m
