"""Build megatron-core's GPTModel with a bidirectional layer spec.

Bidirectional attention is a *spec parameter*: we take megatron's own GPT layer spec (local or
transformer-engine), set ``self_attention.params["attn_mask_type"]`` to ``AttnMaskType.no_mask``
(``causal`` for the autoregressive baseline) and swap in the chosen core-attention backend. The
transformer layer itself is megatron's, unforked.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megadiff.model.attention import resolve_backend
from megadiff.model.catalog import ATTENTION_BACKENDS
from megadiff.model.positions import install as install_positions
from megadiff.model.presets import ModelShape, padded_vocab_size, resolve_shape


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def layer_spec(arch: str, backend: str, causal: bool = False) -> ModuleSpec:
    """megatron's GPT layer spec with the attention mask type and core attention set by us."""
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    norm = "RMSNorm" if arch == "llama" else "LayerNorm"
    if ATTENTION_BACKENDS.traits(backend).te_layers:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    else:
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=norm))
    spec.submodules.self_attention.submodules.core_attention = ATTENTION_BACKENDS.get(backend)
    spec.submodules.self_attention.params = dict(spec.submodules.self_attention.params, attn_mask_type=mask)
    return spec


# model.recompute -> megatron-core TransformerConfig recompute options
#   selective: re-run core attention and the dense MLP in backward (megatron `recompute_modules`);
#              the layer's inputs, norms and projections stay saved
#   full:      keep only each recomputed layer's input and re-run the whole layer in backward
#              (`recompute_method="block"`: the first `recompute_num_layers` layers of every pipeline
#              stage; all of them when unset)
SELECTIVE_MODULES = ["core_attn", "mlp"]


def recompute_options(model_cfg: Any, num_layers_per_stage: int) -> dict[str, Any]:
    mode, n = model_cfg.recompute, model_cfg.recompute_num_layers
    if mode == "none":
        return {}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(SELECTIVE_MODULES)}
    return {"recompute_granularity": "full", "recompute_method": "block",
            "recompute_num_layers": min(int(n), num_layers_per_stage) if n else num_layers_per_stage}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fusion_settings(device: str) -> dict[str, bool]:
    """megatron-core fusions to switch on: only on CUDA, and only those whose kernels are installed.

    bias_activation / bias_dropout: megatron's own jit-fused kernels (GELU-tanh with bias for gpt2,
    SwiGLU for llama); apply_rope: Transformer Engine's fused RoPE; persist_layer_norm and
    gradient_accumulation: apex (fused layer norm, fused weight-gradient accumulation into the fp32
    main grad) or TE. masked_softmax is megatron's DotProductAttention kernel, which our SDPA/flash
    core attention does not use: it stays off. On CPU every fusion is off (the kernels are CUDA only).
    """
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    te = cuda and _importable("transformer_engine")
    apex_ln = cuda and _importable("fused_layer_norm_cuda")
    wgrad = cuda and (_importable("fused_weight_gradient_mlp_cuda") or te)
    return {"bias_activation_fusion": cuda, "bias_dropout_fusion": cuda, "apply_rope_fusion": te,
            "persist_layer_norm": apex_ln, "gradient_accumulation_fusion": wgrad, "masked_softmax_fusion": False}


def describe_fusions(fusions: dict[str, bool]) -> str:
    on = [k.replace("_fusion", "") for k, v in fusions.items() if v]
    return "fusions: " + (", ".join(on) if on else "none (no CUDA kernels on this device)")


def transformer_config(shape: ModelShape, model_cfg: Any, *, tp: int = 1, pp: int = 1,
                       sequence_parallel: bool = False, dtype: torch.dtype = torch.float32,
                       cpu_init: bool = True, fusions: Optional[dict[str, bool]] = None,
                       init_weights: bool = True) -> TransformerConfig:
    llama = shape.arch == "llama"
    fusions = fusions or fusion_settings("cpu")
    # megatron's fused bias-GELU is the tanh approximation: with the fusion on, F.gelu selects it
    act = F.silu if llama else (F.gelu if fusions["bias_activation_fusion"] else gelu_tanh)
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        kv_channels=shape.head_dim,
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=model_cfg.norm_eps,
        gated_linear_unit=llama,
        activation_func=act,
        add_bias_linear=not llama,
        add_qkv_bias=not llama,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # CPU initialisation builds each full weight from the seed and then slices it, so every
        # TP/PP layout starts from the same weights (tests compare layouts on that basis).
        use_cpu_initialization=cpu_init,
        perform_initialization=init_weights,
        **fusions,
        **recompute_options(model_cfg, -(-shape.num_layers // pp)),
        moe_token_dispatcher_type="alltoall",  # unused (dense); megatron requires it with variable_seq_lengths
        variable_seq_lengths=True,
    )


@dataclass
class BuiltModel:
    model: GPTModel
    shape: ModelShape
    vocab_size: int  # real vocab (incl. [MASK])
    padded_vocab_size: int
    backend: str
    config: TransformerConfig
    fusions: dict[str, bool] = field(default_factory=dict)  # megatron fusions switched on (logged)


def build_model(model_cfg: Any, vocab_size: int, *, causal: bool = False, tp: int = 1, pp: int = 1, pg_collection=None,
                pre_process: bool = True, post_process: bool = True, device: str = "cpu",
                dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                vp_stage: Optional[int] = None, masked: bool = False, init_weights: bool = True) -> BuiltModel:
    """Build this rank's part of the model (all of it when tp = pp = 1); ``causal`` for an autoregressive
    objective (``config.is_causal``), bidirectional otherwise. ``masked``: the run feeds document / block
    masks (``auto`` then picks a backend that applies them).

    ``init_weights=False`` with ``device="meta"`` builds the partition without allocating weights
    (the dry run)."""
    shape = resolve_shape(model_cfg)
    backend = resolve_backend(model_cfg.attention_backend, "cpu" if device == "meta" else device, masked=masked)
    fusions = fusion_settings(device)
    config = transformer_config(shape, model_cfg, tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                                dtype=dtype, cpu_init=True, fusions=fusions,
                                init_weights=init_weights)
    vpad = padded_vocab_size(vocab_size, tp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(shape.arch, backend, causal=causal),
        vocab_size=vpad,
        max_sequence_length=shape.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=False,  # full-vocab logits on every TP rank: the diffusion losses are plain torch
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope" if shape.arch == "llama" else "learned_absolute",
        rotary_base=int(model_cfg.rope_theta),
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    install_positions(model)  # RoPE follows position_ids (packed documents, BD3-LM, KV-cached sampling)
    if device not in ("cpu", "meta"):
        model = model.to(device)
    return BuiltModel(model, shape, vocab_size, vpad, backend, config, fusions)


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """[B, L] token ids -> [B, L, V_padded] logits (last pipeline stage)."""
    return model(tokens, position_ids_for(tokens), None)
