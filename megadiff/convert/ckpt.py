"""Read and write megadiff dist checkpoints as *global* tensors, in one process.

A torch_dist checkpoint stores every tensor under its global key and global shape (TP shards and
pipeline stages are chunks of it), so a single process can read all of it (after checking that
every shard file the metadata names is present) and write it back as one chunk per tensor: megatron
``dist_checkpointing`` loads that under any TP/PP/DP layout. The only layout-dependent shape is the
vocabulary padding (a multiple of 128 x TP), handled by :func:`repad_vocab`.

Reads use ``torch.load(weights_only=True)`` (``common.pt``) and torch's checkpoint reader; the
pickled per-layer ``_extra_state`` objects of the source are never read (fresh ones are written).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megadiff import MegadiffError

OPT_PREFIX = "optimizer.state."
OPT_SLOTS = ("param", "exp_avg", "exp_avg_sq")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class Checkpoint:
    path: Path  # the step directory
    model: dict[str, torch.Tensor]  # global model tensors (layers stacked)
    optimizer: dict[str, torch.Tensor]  # "optimizer.state.<slot>.<model key>" -> tensor (may be empty)
    common: dict[str, Any]  # common.pt
    cfg: Any  # resolved MegadiffConfig
    meta: dict[str, Any]  # megadiff.json


def _init_process() -> None:
    from megadiff.dist.parallel import init_parallel

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    init_parallel(1, 1, "cpu", "gloo", seed=0)


def check_shards(d: Path) -> None:
    """Every file the checkpoint's metadata names must exist and be long enough."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in (".metadata", "metadata.json", "common.pt", "config.yaml", "megadiff.json"):
        if not (d / name).is_file():
            raise MegadiffError(f"{d} is not a complete megadiff checkpoint: {name} is missing")
    try:
        md = FileSystemReader(str(d)).read_metadata()
    except Exception as e:
        raise MegadiffError(f"{d}/.metadata is unreadable ({type(e).__name__}: {e})") from e
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    bad = [f"{f} ({'missing' if not (d / f).exists() else 'truncated'})" for f, n in sorted(need.items())
           if not (d / f).is_file() or (d / f).stat().st_size < n]
    if bad:
        raise MegadiffError(f"checkpoint {d} is missing shards: {', '.join(bad)}; copy the complete step directory "
                            f"or use an older checkpoint")


def _load_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint at its global shape, with torch's reader (no megatron
    load path, so no ``torch.load`` of pickled objects beyond torch's own ``.metadata``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(d))
    md = reader.read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata)}
    try:
        dcp.load(sd, storage_reader=reader, no_dist=True)
    except Exception as e:
        raise MegadiffError(f"could not read the tensors of {d}: {type(e).__name__}: {str(e)[:300]}") from e
    return sd


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A run dir / checkpoints dir / step dir -> all global tensors, common state, config, metadata."""
    from megadiff.checkpoint.inference import resolve_checkpoint
    from megadiff.config import from_yaml_text

    d = resolve_checkpoint(path)
    check_shards(d)
    cfg = from_yaml_text((d / "config.yaml").read_text())
    meta = json.loads((d / "megadiff.json").read_text())
    common = torch.load(d / "common.pt", map_location="cpu", weights_only=True)
    tensors = _load_tensors(d)
    model = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return Checkpoint(d, model, opt, common, cfg, meta)


def repad_vocab(tensors: dict[str, torch.Tensor], rows: int, real_vocab: int) -> dict[str, torch.Tensor]:
    """Trim or zero-pad the vocabulary rows of the embedding / output layer (and their optimizer
    state) to ``rows``; never cuts into the real vocabulary."""
    if rows < real_vocab:
        raise MegadiffError(f"cannot pad the vocabulary to {rows} rows: the real vocabulary has {real_vocab}")
    out = {}
    for k, t in tensors.items():
        if k.endswith(VOCAB_KEYS) and t.shape[0] != rows:
            if t.shape[0] < rows:
                t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], 0)
            else:
                t = t[:rows].clone()
        out[k] = t
    return out


def fresh_optimizer(model: dict[str, torch.Tensor], optim_cfg: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam state of a run that has not stepped yet, in the checkpoint's fully-reshardable layout:
    fp32 master copy of each weight, zero moments, step 0; param groups as ``megadiff.train.optim``
    builds them (decay, no-decay)."""
    opt = {}
    for k, t in model.items():
        opt[f"{OPT_PREFIX}param.{k}"] = t.detach().float().clone()
        opt[f"{OPT_PREFIX}exp_avg.{k}"] = torch.zeros_like(t, dtype=torch.float32)
        opt[f"{OPT_PREFIX}exp_avg_sq.{k}"] = torch.zeros_like(t, dtype=torch.float32)
    base = {"is_expert_parallel": False, "default_config": True, "lr_mult": 1.0, "is_decoupled_lr": False,
            "max_lr": float(optim_cfg.lr), "min_lr": float(optim_cfg.min_lr), "lr": float(optim_cfg.lr),
            "betas": (float(optim_cfg.beta1), float(optim_cfg.beta2)), "eps": float(optim_cfg.adam_eps),
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
            "fused": None, "decoupled_weight_decay": True, "step": 0.0}
    groups = [dict(base, wd_mult=1.0, weight_decay=float(optim_cfg.weight_decay))]
    if not optim_cfg.decay_norms_and_embeddings:
        groups.append(dict(base, wd_mult=0.0, weight_decay=0.0))
    common = {"optimizer": {"param_groups": groups}, "param_state_sharding_type": "fully_reshardable"}
    return opt, common


def _model_objects(cfg: Any, padded_vocab: int) -> tuple[dict[str, Any], dict[str, tuple]]:
    """ShardedObjects (per-layer ``_extra_state``) and {key: global shape} of a fresh model."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from megadiff.checkpoint.manager import CKPT_METADATA
    from megadiff.model.build import build_model

    built = build_model(cfg.model, padded_vocab, tp=1, pp=1)
    sd = built.model.sharded_state_dict(prefix="", metadata=CKPT_METADATA)
    objects = {k: v for k, v in sd.items() if isinstance(v, ShardedObject)}
    shapes: dict[str, tuple | None] = {v.key: tuple(v.global_shape) for v in sd.values() if isinstance(v, ShardedTensor)}
    # SwiGLU fc1 is a factory (saved as [gate; up] chunks of one global tensor): key checked, shape not
    shapes.update({v.key: None for v in sd.values() if isinstance(v, ShardedTensorFactory)})
    return objects, shapes


def write_checkpoint(out_step_dir: Path, cfg: Any, padded_vocab: int, model: dict[str, torch.Tensor],
                     optimizer: dict[str, torch.Tensor], opt_common: dict, meta: dict[str, Any]) -> None:
    """Write a dist checkpoint (model + optimizer state) that ``CheckpointManager.load`` accepts.

    ``out_step_dir`` must not exist yet; the caller renames the surrounding temp dir into place."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megadiff.checkpoint.manager import CKPT_METADATA
    from megadiff.config import to_yaml
    from megadiff.utils.io import atomic_write_json, atomic_write_text

    _init_process()
    objects, shapes = _model_objects(cfg, padded_vocab)
    got = {k: None if shapes.get(k, ()) is None else tuple(v.shape) for k, v in model.items()}
    if got != shapes:
        diff = sorted(set(got.items()) ^ set(shapes.items()), key=str)[:6]
        raise MegadiffError(f"converted tensors do not match the megadiff model's layout (key, shape): {diff}")
    for k in optimizer:
        slot_key = k[len(OPT_PREFIX):].split(".", 1)
        if len(slot_key) != 2 or slot_key[1] not in model or optimizer[k].shape != model[slot_key[1]].shape:
            raise MegadiffError(f"optimizer tensor {k} {tuple(optimizer[k].shape)} does not match the model")

    def st(key: str, t: torch.Tensor) -> Any:
        return ShardedTensor.from_rank_offsets(key, t.detach().contiguous(), replica_id=0)

    sd = {
        "model": {**{k: st(k, v) for k, v in model.items()}, **objects},
        "optimizer": {**opt_common, "state": {k: st(k, v) for k, v in optimizer.items()}},
    }
    out_step_dir.mkdir(parents=True)
    dist_checkpointing.save(sd, str(out_step_dir), content_metadata=CKPT_METADATA)
    atomic_write_text(out_step_dir / "config.yaml", to_yaml(cfg))
    atomic_write_json(out_step_dir / "megadiff.json", {**meta, "padded_vocab_size": int(padded_vocab)})


def replace_layout(meta: dict[str, Any], tp: int, pp: int) -> dict[str, Any]:
    return {**meta, "layout": f"tp{tp}-pp{pp}-dp1"}

