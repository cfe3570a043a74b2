"""Hugging Face export (``to-hf``) and import (``from-hf``) through the key maps in ``keymap.py``.

Export targets standard ``transformers`` classes (``LlamaForCausalLM``, ``GPT2LMHeadModel``) with
``is_causal: false`` in ``config.json``: transformers >= 5 then builds a bidirectional attention
mask for these decoder-only models, so no custom modeling code ships with the weights. The exported
vocabulary keeps megatron's padding rows (``vocab_size`` = padded size), so logits match megadiff's
column for column and an import gives back the bit-identical checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from megadiff import MegadiffError
from megadiff.convert.keymap import Heads, arch_map, hf_to_megatron, megatron_to_hf
from megadiff.diffusion.catalog import OBJECTIVES
from megadiff.diffusion.curricula import annealing_readme, annealing_record
from megadiff.diffusion.shift import parameterisation_readme, parameterisation_record

MASK_TOKEN = "[MASK]"
DEFAULT_SHARD_BYTES = 5 * 1024**3


# ---------------------------------------------------------------------------------------- export
def hf_config(shape: Any, model_cfg: Any, padded_vocab: int, vocab: dict[str, Any], causal: bool) -> Any:
    import transformers

    ids = {"bos_token_id": vocab["bos_id"], "eos_token_id": vocab["eos_id"], "pad_token_id": vocab["pad_id"]}
    common = dict(vocab_size=padded_vocab, tie_word_embeddings=shape.tie_embeddings, is_causal=causal,
                  mask_token_id=vocab["mask_id"], torch_dtype="float32", **ids)
    if shape.arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_query_groups, head_dim=shape.head_dim,
            max_position_embeddings=shape.max_seq_len, rms_norm_eps=float(model_cfg.norm_eps),
            rope_parameters={"rope_type": "default", "rope_theta": float(model_cfg.rope_theta)},
            attention_bias=False, mlp_bias=False, hidden_act="silu", architectures=["LlamaForCausalLM"], **common)
    return transformers.GPT2Config(
        n_embd=shape.hidden_size, n_inner=shape.ffn_hidden_size, n_layer=shape.num_layers,
        n_head=shape.num_attention_heads, n_positions=shape.max_seq_len,
        layer_norm_epsilon=float(model_cfg.norm_eps), activation_function="gelu_new", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, architectures=["GPT2LMHeadModel"], **common)


def save_safetensors(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index above max_shard_bytes."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k].contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, sh in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sh})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


MODEL_CARD = """---
library_name: transformers
tags: [masked-diffusion, megadiff]
---
# {name}

A **{objective_name}** language model trained with megadiff ({arch} architecture, {params:,} parameters,
step {step}). Attention is **{attention}** (`is_causal: {is_causal}` in `config.json`).

- Objective: `{objective}` ({objective_name}); noise schedule `{schedule}`.
- Mask token: `{mask_token}` = id **{mask_id}**; real vocabulary {vocab_size} tokens, embedding rows
  padded to {padded_vocab} (logits of ids >= {vocab_size} are padding: ignore them).
- Special ids: eos {eos_id}, pad {pad_id}, bos {bos_id}.

## One denoising step

```python
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

model = AutoModelForCausalLM.from_pretrained("PATH").eval()
tok = PreTrainedTokenizerFast(tokenizer_file="PATH/tokenizer.json")
ids = torch.tensor([tok.encode("To be or not to be")])
x = ids.clone(); x[:, 2:] = {mask_id}                       # mask a suffix
logits = model(x).logits[..., :{vocab_size}]
logits[..., {mask_id}] = -float("inf")                      # never predict [MASK]
pred = logits.argmax(-1)
masked = x == {mask_id}
i = torch.where(masked[0])[0][0]                             # unmask one position (greedy)
x[0, i] = pred[0, i]
print(tok.decode(x[0]))
```

Converted with `megadiff convert to-hf`; `megadiff convert from-hf` imports it back.
"""

BLOCK_CARD = """
## Block diffusion: how to sample

This model was trained with block diffusion (BD3-LM) over blocks of **{block_size}** tokens
(`megadiff_block_size` in `config.json`). Generate left to right, one block at a time, blocks at multiples
of {block_size} positions: the tokens of block k see the clean blocks before it and their own block
(bidirectionally), never later blocks; clean blocks see each other block-causally. Inside a block, start
from [MASK] and unmask positions over several calls (as in the one-step example, but the model must only
see the prefix and the current block). The exact KV-cached sampler is megadiff's `bd3lm` sampler
(`megadiff sample CKPT --sampler bd3lm` on the megadiff checkpoint). The single-step example above
runs the model over the whole sequence without the block layout, which is not how it was trained.
"""

def export_hf(src: str | os.PathLike, out: str | os.PathLike, data_dir: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    from megadiff.convert.ckpt import read_checkpoint
    from megadiff.convert.reshard import vocab_info
    from megadiff.model.presets import resolve_shape
    from megadiff.utils.io import atomic_output_dir

    ck = read_checkpoint(src)
    shape = resolve_shape(ck.cfg.model)
    arch_map(shape.arch)
    vocab = vocab_info(ck, data_dir)
    hd = Heads(shape.num_attention_heads, shape.num_query_groups, shape.head_dim)
    sd = megatron_to_hf(ck.model, shape.arch, shape.num_layers, hd)
    padded = ck.model["embedding.word_embeddings.weight"].shape[0]
    objective = ck.meta.get("objective", ck.cfg.diffusion.objective)
    traits = OBJECTIVES.traits(objective)
    conf = hf_config(shape, ck.cfg.model, padded, vocab, causal=traits.needs_causal_mask)
    if traits.block_diffusion:
        conf.megadiff_block_size = int(ck.cfg.diffusion.block_size)
    conf.megadiff_parameterisation = parameterisation_record(ck.cfg.diffusion)  # objective, shift, options
    annealing = annealing_record(ck.cfg.diffusion, int(ck.meta.get("step") or 0)) \
        if "anneal_steps" in traits.options else None
    if annealing is not None:
        conf.megadiff_annealing = annealing  # anneal_steps, steps trained, fraction of the upper triangle open
    tok_path = Path(vocab["tokenizer_path"] or "")
    if not tok_path.is_file():
        raise MegadiffError(f"tokenizer {tok_path} of {ck.path} not found; pass --data-dir")
    out = Path(out)
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            conf.to_json_file(str(tmp / "config.json"))
            save_safetensors(sd, tmp, max_shard_bytes)
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
            tok = json.loads(tok_path.read_text())
            names = {int(t["id"]): t["content"] for t in tok.get("added_tokens", [])}
            tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "mask_token": MASK_TOKEN,
                    "model_max_length": shape.max_seq_len}
            for role in ("eos", "pad", "bos"):
                if vocab[f"{role}_id"] in names:
                    tcfg[f"{role}_token"] = names[vocab[f"{role}_id"]]
            (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
            params = sum(t.numel() for t in sd.values())
            (tmp / "README.md").write_text(MODEL_CARD.format(
                name=out.name, objective=objective, objective_name=traits.description,
                arch=shape.arch, params=params, step=ck.meta.get("step"), schedule=ck.cfg.diffusion.schedule,
                attention="causal" if traits.needs_causal_mask else "bidirectional",
                is_causal=str(traits.needs_causal_mask).lower(), mask_token=MASK_TOKEN, padded_vocab=padded,
                **{k: vocab[k] for k in ("mask_id", "vocab_size", "eos_id", "pad_id", "bos_id")})
                + "\n## Parameterisation (`megadiff_parameterisation` in `config.json`)\n\n"
                + parameterisation_readme(ck.cfg.diffusion)
                + (annealing_readme(annealing) if annealing is not None else "")
                + (BLOCK_CARD.format(block_size=conf.megadiff_block_size) if traits.block_diffusion else ""))
    except FileExistsError as e:
        raise MegadiffError(f"{e} (or pass --overwrite)") from None
    return out


# ---------------------------------------------------------------------------------------- import
def read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    """safetensors (single or sharded), else pytorch_model.bin with ``weights_only=True``."""
    from safetensors.torch import load_file

    if (d / "model.safetensors.index.json").is_file():
        files = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            if not (d / f).is_file():
                raise MegadiffError(f"{d}: shard {f} named by model.safetensors.index.json is missing")
            sd.update(load_file(str(d / f)))
        return sd
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise MegadiffError(f"{d} holds no model.safetensors(.index.json) or pytorch_model.bin")


def _hf_shape(c: dict[str, Any]) -> dict[str, Any]:
    """HF config.json -> megadiff model fields; refuses variants the key maps do not cover."""
    mt = c.get("model_type")
    unsupported = []
    if mt == "llama":
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            unsupported.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
        if c.get("attention_bias") or c.get("mlp_bias"):
            unsupported.append("attention/MLP biases")
        if c.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={c.get('hidden_act')}")
        h, a = c["hidden_size"], c["num_attention_heads"]
        if c.get("head_dim") not in (None, h // a):
            unsupported.append(f"head_dim={c['head_dim']} != hidden_size / heads")
        fields = dict(arch="llama", num_layers=c["num_hidden_layers"], hidden_size=h, num_attention_heads=a,
                      num_query_groups=c.get("num_key_value_heads") or a, ffn_hidden_size=c["intermediate_size"],
                      max_seq_len=c.get("max_position_embeddings", 2048),
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                      rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                      norm_eps=float(c.get("rms_norm_eps", 1e-6)))
    elif mt == "gpt2":
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            unsupported.append(f"activation_function={c.get('activation_function')}")
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("scale_attn_weights") is False:
            unsupported.append("non-standard attention scaling")
        h = c["n_embd"]
        fields = dict(arch="gpt2", num_layers=c["n_layer"], hidden_size=h, num_attention_heads=c["n_head"],
                      num_query_groups=None, ffn_hidden_size=c.get("n_inner") or 4 * h,
                      max_seq_len=c["n_positions"], tie_embeddings=bool(c.get("tie_word_embeddings", True)),
                      norm_eps=float(c.get("layer_norm_epsilon", 1e-5)))
    else:
        raise MegadiffError(f"unsupported architecture model_type={mt!r} ({c.get('architectures')}); from-hf imports "
                            f"Llama-family (model_type llama) and GPT-2 causal LMs")
    if unsupported:
        raise MegadiffError(f"unsupported {mt} variant: {'; '.join(unsupported)}")
    return fields


def _normalise_keys(sd: dict[str, torch.Tensor], base: str, tied: bool) -> dict[str, torch.Tensor]:
    """Bare base-model keys get the *ForCausalLM prefix; GPT-2's mask buffers and a tied lm_head go."""
    if not any(k.startswith(base) for k in sd):
        sd = {(k if k.startswith("lm_head.") else base + k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if tied:
        sd.pop("lm_head.weight", None)
    return sd


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int = 1, pp: int = 1,
              grow_vocab: bool = True, overwrite: bool = False) -> Path:
    """A local HF causal LM -> a megadiff run dir (``config.yaml``, ``tokenizer.json`` with ``[MASK]``,
    ``checkpoints/step_000000`` with fresh optimizer state) ready for ``megadiff train``."""
    from tokenizers import AddedToken

    from megadiff.config import load_config
    from megadiff.convert.ckpt import fresh_optimizer
    from megadiff.convert.reshard import write_run_dir
    from megadiff.data.tokenizer import load_tokenizer

    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise MegadiffError(f"{d} has no config.json: pass a local Hugging Face model directory")
    c = json.loads((d / "config.json").read_text())
    fields = _hf_shape(c)
    if not (d / "tokenizer.json").is_file():
        raise MegadiffError(f"{d} has no tokenizer.json (a fast tokenizer is needed to add {MASK_TOKEN})")
    tok = load_tokenizer(d / "tokenizer.json")
    am = arch_map(fields["arch"])
    sd = _normalise_keys(read_hf_weights(d), am.hf_base_prefix, fields["tie_embeddings"])
    emb_key = am.global_rules[0].hf[0]
    if emb_key not in sd:
        raise MegadiffError(f"{d}: no {emb_key} in the weights")
    rows = sd[emb_key].shape[0]
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if n_tok > rows:
        raise MegadiffError(f"{d}: the tokenizer has {n_tok} tokens but the embedding only {rows} rows")
    mask_id = tok.token_to_id(MASK_TOKEN)
    if mask_id is None:
        tok.add_special_tokens([AddedToken(MASK_TOKEN, special=True)])
        mask_id = tok.token_to_id(MASK_TOKEN)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if mask_id >= rows and not grow_vocab:
        raise MegadiffError(f"no room for {MASK_TOKEN} in the vocabulary of {d}: the embedding has {rows} rows, all "
                            f"used by the tokenizer, and --no-grow-vocab forbids adding a row; drop the flag")
    fields["vocab_size"] = vocab_size
    cfg = load_config(None, [f"model.{k}={'null' if v is None else v}" for k, v in fields.items()]
                      + ["model.preset=null", f"parallel.tp={tp}", f"parallel.pp={pp}", "data.tokenizer.kind=file",
                         f"data.tokenizer.path={Path(out).resolve() / 'tokenizer.json'}"])
    hd = Heads(cfg.model.num_attention_heads, cfg.model.num_query_groups or cfg.model.num_attention_heads,
               cfg.model.hidden_size // cfg.model.num_attention_heads)
    model = hf_to_megatron(sd, fields["arch"], fields["num_layers"], hd)
    if mask_id >= rows:  # a new row for [MASK]: the mean input embedding (output row stays zero)
        emb = model["embedding.word_embeddings.weight"]
        extra = emb.new_zeros(mask_id + 1 - rows, emb.shape[1])
        extra[-1] = emb[:n_tok].float().mean(0).to(emb.dtype)
        model["embedding.word_embeddings.weight"] = torch.cat([emb, extra], 0)
        if "output_layer.weight" in model:
            out_w = model["output_layer.weight"]
            model["output_layer.weight"] = torch.cat([out_w, out_w.new_zeros(extra.shape)], 0)
    model = {k: v.float() if v.is_floating_point() else v for k, v in model.items()}
    opt, opt_common = fresh_optimizer(model, cfg.optim)
    ids = {"eos_id": c.get("eos_token_id"), "bos_id": c.get("bos_token_id"), "pad_id": c.get("pad_token_id")}
    ids = {k: (v[0] if isinstance(v, list) else v) for k, v in ids.items()}
    meta = {"step": 0, "tokens": 0, "loader": {"global_step": 0}, "objective": cfg.diffusion.objective,
            "source": {"hf_dir": str(d.resolve()), "model_type": c.get("model_type")},
            "vocab": {"vocab_size": vocab_size, "mask_id": mask_id, **ids}}
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer is written with the run dir below
        tok_file = Path(scratch) / "tokenizer.json"
        tok_file.write_text(tok.to_str(pretty=False))
        step_dir = write_run_dir(Path(out), cfg, vocab_size, model, opt, opt_common, meta, tp, pp, overwrite,
                                 extra_files={"tokenizer.json": tok_file})
    return step_dir
