"""Declarative key maps: megatron checkpoint names <-> Hugging Face names, one table per architecture.

A megadiff checkpoint stores *global* tensors (the TP=1 shapes) under megatron's sharded keys; the
decoder's tensors are stacked over layers (``decoder.layers.<sub>`` of shape ``[L, ...]``). A rule
maps one per-layer (or global) megatron tensor to one or more HF tensors through a named, invertible
transform:

=============  ===========================================================================
``copy``       same tensor
``t``          transpose (GPT-2's ``Conv1D`` stores ``[in, out]``)
``qkv``        megatron's fused QKV ``[ng, (np/ng + 2) * hn, h]`` (per query group: its np/ng
               query heads, then one key head, then one value head) <-> separate q, k, v
``qkv_t``      ``qkv`` then concatenated ``[q; k; v]`` and transposed (GPT-2 ``c_attn.weight``)
``qkv_cat``    ``qkv`` on a bias, concatenated ``[q; k; v]`` (GPT-2 ``c_attn.bias``)
``gate_up``    SwiGLU ``linear_fc1 = [gate; up]`` <-> ``gate_proj``, ``up_proj``
=============  ===========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megadiff import MegadiffError


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_groups: int
    head_dim: int


def _qkv_split(w: torch.Tensor, hd: Heads) -> list[torch.Tensor]:
    qpg = hd.num_heads // hd.num_groups
    rest = w.shape[1:]
    g = w.reshape(hd.num_groups, qpg + 2, hd.head_dim, *rest)
    q = g[:, :qpg].reshape(hd.num_heads * hd.head_dim, *rest)
    k = g[:, qpg].reshape(hd.num_groups * hd.head_dim, *rest)
    v = g[:, qpg + 1].reshape(hd.num_groups * hd.head_dim, *rest)
    return [q.clone(), k.clone(), v.clone()]


def _qkv_fuse(ts: list[torch.Tensor], hd: Heads) -> torch.Tensor:
    q, k, v = ts
    qpg = hd.num_heads // hd.num_groups
    rest = q.shape[1:]
    parts = [q.reshape(hd.num_groups, qpg, hd.head_dim, *rest), k.reshape(hd.num_groups, 1, hd.head_dim, *rest),
             v.reshape(hd.num_groups, 1, hd.head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest).clone()


def _split_sizes(hd: Heads) -> list[int]:
    return [hd.num_heads * hd.head_dim, hd.num_groups * hd.head_dim, hd.num_groups * hd.head_dim]


# name -> (megatron tensor -> HF tensors, HF tensors -> megatron tensor)
Transform = tuple[Callable[[torch.Tensor, Heads], list[torch.Tensor]], Callable[[list[torch.Tensor], Heads], torch.Tensor]]
TRANSFORMS: dict[str, Transform] = {
    "copy": (lambda w, hd: [w.clone()], lambda ts, hd: ts[0].clone()),
    "t": (lambda w, hd: [w.t().contiguous()], lambda ts, hd: ts[0].t().contiguous()),
    "qkv": (_qkv_split, _qkv_fuse),
    "qkv_t": (lambda w, hd: [torch.cat(_qkv_split(w, hd), 0).t().contiguous()],
              lambda ts, hd: _qkv_fuse(list(ts[0].t().split(_split_sizes(hd), 0)), hd)),
    "qkv_cat": (lambda w, hd: [torch.cat(_qkv_split(w, hd), 0)],
                lambda ts, hd: _qkv_fuse(list(ts[0].split(_split_sizes(hd), 0)), hd)),
    "gate_up": (lambda w, hd: [c.clone() for c in w.chunk(2, 0)], lambda ts, hd: torch.cat(ts, 0).clone()),
}


@dataclass(frozen=True)
class Rule:
    megatron: str  # name under the layer prefix (layer rules) or the full key (global rules)
    hf: tuple[str, ...]
    op: str = "copy"
    optional: bool = False  # e.g. output_layer.weight exists only with untied embeddings


@dataclass(frozen=True)
class ArchMap:
    hf_model_type: str
    hf_architecture: str
    hf_layer_prefix: str  # format string with {i}
    global_rules: tuple[Rule, ...]
    layer_rules: tuple[Rule, ...]
    hf_base_prefix: str  # prefix of the base model's keys inside the *ForCausalLM model


MEGATRON_LAYERS = "decoder.layers."

LLAMA = ArchMap(
    hf_model_type="llama", hf_architecture="LlamaForCausalLM", hf_layer_prefix="model.layers.{i}.",
    hf_base_prefix="model.",
    global_rules=(
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
        Rule("output_layer.weight", ("lm_head.weight",), optional=True),
    ),
    layer_rules=(
        Rule("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
        Rule("self_attention.linear_qkv.weight",
             ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
        Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        Rule("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
        Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
        Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ),
)

GPT2 = ArchMap(
    hf_model_type="gpt2", hf_architecture="GPT2LMHeadModel", hf_layer_prefix="transformer.h.{i}.",
    hf_base_prefix="transformer.",
    global_rules=(
        Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",)),
        Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
        Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
        Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
        Rule("output_layer.weight", ("lm_head.weight",), optional=True),
    ),
    layer_rules=(
        Rule("self_attention.linear_qkv.layer_norm_weight", ("ln_1.weight",)),
        Rule("self_attention.linear_qkv.layer_norm_bias", ("ln_1.bias",)),
        Rule("self_attention.linear_qkv.weight", ("attn.c_attn.weight",), "qkv_t"),
        Rule("self_attention.linear_qkv.bias", ("attn.c_attn.bias",), "qkv_cat"),
        Rule("self_attention.linear_proj.weight", ("attn.c_proj.weight",), "t"),
        Rule("self_attention.linear_proj.bias", ("attn.c_proj.bias",)),
        Rule("mlp.linear_fc1.layer_norm_weight", ("ln_2.weight",)),
        Rule("mlp.linear_fc1.layer_norm_bias", ("ln_2.bias",)),
        Rule("mlp.linear_fc1.weight", ("mlp.c_fc.weight",), "t"),
        Rule("mlp.linear_fc1.bias", ("mlp.c_fc.bias",)),
        Rule("mlp.linear_fc2.weight", ("mlp.c_proj.weight",), "t"),
        Rule("mlp.linear_fc2.bias", ("mlp.c_proj.bias",)),
    ),
)

ARCH_MAPS: dict[str, ArchMap] = {"llama": LLAMA, "gpt2": GPT2}


def arch_map(arch: str) -> ArchMap:
    if arch not in ARCH_MAPS:
        raise MegadiffError(f"no conversion key map for architecture {arch!r}; supported: {', '.join(ARCH_MAPS)}")
    return ARCH_MAPS[arch]


def megatron_to_hf(tensors: dict[str, torch.Tensor], arch: str, num_layers: int, hd: Heads) -> dict[str, torch.Tensor]:
    """Global megatron model tensors (layers stacked) -> HF state dict."""
    am = arch_map(arch)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for r in am.global_rules:
        if r.megatron not in tensors:
            if r.optional:
                continue
            raise MegadiffError(f"checkpoint has no tensor {r.megatron!r} (needed by the {arch} key map)")
        out.update(zip(r.hf, TRANSFORMS[r.op][0](tensors[r.megatron], hd)))
        used.add(r.megatron)
    for r in am.layer_rules:
        key = MEGATRON_LAYERS + r.megatron
        if key not in tensors:
            raise MegadiffError(f"checkpoint has no tensor {key!r} (needed by the {arch} key map)")
        stacked = tensors[key]
        if stacked.shape[0] != num_layers:
            raise MegadiffError(f"{key} holds {stacked.shape[0]} layers, the config says {num_layers}")
        for i in range(num_layers):
            prefix = am.hf_layer_prefix.format(i=i)
            out.update({prefix + n: t for n, t in zip(r.hf, TRANSFORMS[r.op][0](stacked[i], hd))})
        used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise MegadiffError(f"checkpoint tensors not covered by the {arch} key map: {', '.join(extra[:8])}")
    return out


def hf_to_megatron(sd: dict[str, torch.Tensor], arch: str, num_layers: int, hd: Heads) -> dict[str, torch.Tensor]:
    """HF state dict -> global megatron model tensors (layers stacked). Unmapped HF keys are errors."""
    am = arch_map(arch)
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(names: list[str]) -> list[torch.Tensor]:
        missing = [n for n in names if n not in sd]
        if missing:
            raise MegadiffError(f"Hugging Face weights lack {', '.join(missing[:4])} (needed by the {arch} key map)")
        used.update(names)
        return [sd[n] for n in names]

    for r in am.global_rules:
        if r.optional and not all(n in sd for n in r.hf):
            continue
        out[r.megatron] = TRANSFORMS[r.op][1](take(list(r.hf)), hd)
    for r in am.layer_rules:
        per_layer = [TRANSFORMS[r.op][1](take([am.hf_layer_prefix.format(i=i) + n for n in r.hf]), hd)
                     for i in range(num_layers)]
        out[MEGATRON_LAYERS + r.megatron] = torch.stack(per_layer, 0)
    extra = sorted(set(sd) - used)
    if extra:
        raise MegadiffError(f"Hugging Face tensors not covered by the {arch} key map (unsupported variant?): "
                            f"{', '.join(extra[:8])}")
    return out
