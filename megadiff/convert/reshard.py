"""Offline resharding and consolidated (unsharded) export of a megadiff checkpoint."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

from megadiff import MegadiffError
from megadiff.config import train_data_dir
from megadiff.convert.ckpt import Checkpoint, read_checkpoint, repad_vocab, replace_layout, write_checkpoint
from megadiff.convert.keymap import MEGATRON_LAYERS


def vocab_info(ck: Checkpoint, data_dir: str | None = None) -> dict[str, Any]:
    """Real vocab size, special ids and tokenizer file of a checkpoint (from its data manifest, or
    from ``megadiff.json`` for a checkpoint imported with ``convert from-hf``)."""
    if "vocab" in ck.meta and data_dir is None:
        return dict(ck.meta["vocab"], tokenizer_path=ck.cfg.data.tokenizer.path)
    from megadiff.data.tokenizer import load_from_dir

    data = data_dir or train_data_dir(ck.cfg)
    if not Path(data, "manifest.json").is_file():
        raise MegadiffError(f"the data directory {data} named by {ck.path}/config.yaml (it holds the tokenizer and "
                            f"vocab) is not here; pass --data-dir")
    _, info = load_from_dir(data)
    return {"vocab_size": info.vocab_size, "mask_id": info.mask_id, "pad_id": info.pad_id, "eos_id": info.eos_id,
            "bos_id": info.bos_id, "tokenizer_path": info.tokenizer_path}


def check_layout(cfg: Any, tp: int, pp: int) -> None:
    from megadiff.model.presets import resolve_shape

    s = resolve_shape(cfg.model)
    for what, n, d in (("num_layers", s.num_layers, pp), ("num_attention_heads", s.num_attention_heads, tp),
                       ("num_query_groups", s.num_query_groups, tp), ("ffn_hidden_size", s.ffn_hidden_size, tp)):
        if tp < 1 or pp < 1 or n % d:
            raise MegadiffError(f"layout tp={tp} pp={pp} does not fit the model: {what}={n} is not divisible by {d}")


def write_run_dir(out: Path, cfg: Any, vocab_size: int, model, optimizer, opt_common, meta, tp: int, pp: int,
                  overwrite: bool = False, extra_files: dict[str, Path] | None = None) -> Path:
    """Write ``out/checkpoints/step_XXXXXX`` + ``latest`` + ``out/config.yaml`` via a temp dir."""
    from megadiff.checkpoint.manager import step_dir_name
    from megadiff.config import to_yaml
    from megadiff.model.presets import padded_vocab_size
    from megadiff.utils.io import atomic_output_dir, atomic_write_text

    check_layout(cfg, tp, pp)
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    rows = padded_vocab_size(vocab_size, tp)
    model = repad_vocab(model, rows, vocab_size)
    optimizer = repad_vocab(optimizer, rows, vocab_size)
    step = int(meta.get("step", 0))
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            write_checkpoint(tmp / "checkpoints" / step_dir_name(step), cfg, rows, model, optimizer, opt_common,
                             replace_layout(meta, tp, pp))
            atomic_write_text(tmp / "checkpoints" / "latest", step_dir_name(step) + "\n")
            atomic_write_text(tmp / "config.yaml", to_yaml(cfg))
            for name, src in (extra_files or {}).items():
                shutil.copyfile(src, tmp / name)
    except FileExistsError as e:
        raise MegadiffError(f"{e} (or pass --overwrite)") from None
    return out / "checkpoints" / step_dir_name(step)


def reshard(src: str | os.PathLike, out: str | os.PathLike, tp: int, pp: int, data_dir: str | None = None,
            overwrite: bool = False) -> Path:
    """Any layout -> a run dir whose checkpoint is laid out (and vocab-padded) for TP=tp, PP=pp,
    with the optimizer state, loader state and step kept: `megadiff train CONFIG trainer.run_dir=OUT
    parallel.tp=tp parallel.pp=pp` resumes from it."""
    ck = read_checkpoint(src)
    v = vocab_info(ck, data_dir)["vocab_size"]
    opt_common = ck.common.get("optimizer", {})
    return write_run_dir(Path(out), ck.cfg, v, ck.model, ck.optimizer, opt_common, ck.meta, tp, pp, overwrite)


def unstack_layers(model: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, t in model.items():
        if k.startswith(MEGATRON_LAYERS):
            sub = k[len(MEGATRON_LAYERS):]
            out.update({f"{MEGATRON_LAYERS}{i}.{sub}": t[i].clone() for i in range(t.shape[0])})
        else:
            out[k] = t
    return out


def to_torch(src: str | os.PathLike, out: str | os.PathLike, data_dir: str | None = None,
             overwrite: bool = False) -> Path:
    """One consolidated safetensors file: megatron names, one tensor per layer, vocab padding kept;
    the resolved config and vocab facts go into the file's metadata."""
    import json

    from safetensors.torch import save

    from megadiff.config import to_yaml
    from megadiff.utils.io import atomic_write_bytes

    out = Path(out)
    if out.exists() and not overwrite:
        raise MegadiffError(f"{out} already exists; remove it, choose another path or pass --overwrite")
    ck = read_checkpoint(src)
    vocab = vocab_info(ck, data_dir)
    sd = {k: t.contiguous() for k, t in unstack_layers(ck.model).items()}
    meta = {"format": "megadiff-consolidated-v1", "config_yaml": to_yaml(ck.cfg), "step": str(ck.meta.get("step")),
            "vocab": json.dumps({k: v for k, v in vocab.items() if k != "tokenizer_path"})}
    atomic_write_bytes(out, save(sd, metadata=meta))
    return out
