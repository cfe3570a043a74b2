"""Models for inference: load a trained checkpoint into one process (TP=1, PP=1).

    im = load_for_inference("runs/demo/train")          # a run dir (uses checkpoints/latest) or a step dir
    logits = im.model_fn(tokens)                        # [B, L] -> [B, L, V_padded], no grad, eval mode
                                                        # (diffusion runs trained shifted: realigned, so that
                                                        # logits[:, i] predicts token i; megadiff/diffusion/shift.py)
    im.tokenizer, im.info (ManifestInfo), im.cfg (resolved config), im.step

Any TP/PP layout loads into TP=1/PP=1 (dist_checkpointing reshards on load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from megadiff import MegadiffError
from megadiff.checkpoint.manager import CKPT_METADATA, CheckpointManager, step_dir_name


@dataclass
class InferenceModel:
    model: Any
    model_fn: Callable[[torch.Tensor], torch.Tensor]
    tokenizer: Any
    info: Any
    cfg: Any
    step: int
    ckpt_dir: Path
    device: torch.device

    @property
    def traits(self) -> Any:
        """The objective's traits (megadiff/diffusion/catalog.py): autoregressive or not, bound or exact."""
        from megadiff.diffusion.catalog import OBJECTIVES

        return OBJECTIVES.traits(self.cfg.diffusion.objective)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, a checkpoints dir, or a step dir -> the step dir to load."""
    p = Path(path)
    if (p / "megadiff.json").exists():
        return p
    for run_dir in (p, p.parent):
        if (run_dir / "checkpoints").is_dir():
            step = CheckpointManager(run_dir).latest_step()
            if step is not None:
                return run_dir / "checkpoints" / step_dir_name(step)
    raise MegadiffError(f"no checkpoint found at {p}: pass a run directory holding checkpoints/latest, or a "
                        f"checkpoints/step_XXXXXX directory (train one with `megadiff train CONFIG`)")


def model_fn_of(model) -> Callable[[torch.Tensor], torch.Tensor]:
    from megadiff.model.build import forward_logits

    @torch.no_grad()
    def fn(tokens: torch.Tensor) -> torch.Tensor:
        return forward_logits(model, tokens)

    return fn


def check_data_tokenizer(ckpt: Path, data_dir: str | Path) -> None:
    """``data_dir`` must hold the tokenizer ``ckpt`` was trained with: the sha256 and vocab size its
    megadiff.json records, or (older checkpoints) those of the run's own dataset while it exists."""
    from megadiff.config import from_yaml_text, train_data_dir
    from megadiff.data.format import manifest_info, read_manifest

    given = manifest_info(read_manifest(data_dir), data_dir)
    meta = json.loads((ckpt / "megadiff.json").read_text())
    if meta.get("tokenizer_sha256"):
        want = (meta["tokenizer_sha256"], int(meta["vocab_size"]), str(ckpt))
    else:
        orig_dir = train_data_dir(from_yaml_text((ckpt / "config.yaml").read_text()))
        if not (Path(orig_dir) / "manifest.json").is_file() or Path(orig_dir).resolve() == Path(data_dir).resolve():
            return
        orig = manifest_info(read_manifest(orig_dir), orig_dir)
        want = (orig.tokenizer_sha256, orig.vocab_size, orig.tokenizer_path)
    if (given.tokenizer_sha256, given.vocab_size) != want[:2]:
        raise MegadiffError(
            f"{data_dir}: its tokenizer ({Path(given.tokenizer_path).name}, sha256 {given.tokenizer_sha256[:12]}…, "
            f"vocab {given.vocab_size}) is not the one the model was trained with ({want[2]}: sha256 "
            f"{want[0][:12]}…, vocab {want[1]}); text would be tokenized with the wrong vocabulary. Omit "
            f"--data-dir or point it at a dataset made with the run's tokenizer")


def load_for_inference(path: str | Path, device: str = "auto", data_dir: str | None = None) -> InferenceModel:
    from megadiff.config import from_yaml_text, is_causal, train_data_dir
    from megadiff.data.tokenizer import load_from_dir

    ckpt = resolve_checkpoint(path)
    cfg = from_yaml_text((ckpt / "config.yaml").read_text())
    meta = json.loads((ckpt / "megadiff.json").read_text())
    data = Path(data_dir or train_data_dir(cfg))
    check_data_tokenizer(ckpt, data)  # before megatron is imported: a wrong dataset fails fast
    tokenizer, info = load_from_dir(data)

    from megatron.core import dist_checkpointing

    from megadiff.dist.parallel import init_parallel
    from megadiff.model.build import build_model

    ctx = init_parallel(1, 1, device, "auto", seed=0)
    built = build_model(cfg.model, info.vocab_size, causal=is_causal(cfg), pg_collection=ctx.pg, device=ctx.device.type)
    model = built.model
    sd = model.sharded_state_dict(prefix="", metadata=CKPT_METADATA)
    try:
        state = dist_checkpointing.load({"model": sd}, str(ckpt))
    except Exception as e:
        raise MegadiffError(f"could not load the model weights of {ckpt}: {type(e).__name__}: {str(e)[:300]}") from e
    model.load_state_dict(state["model"], strict=False)
    model.eval()
    from megadiff.diffusion.shift import aligned_model_fn

    fn = aligned_model_fn(model_fn_of(model), cfg.diffusion)
    return InferenceModel(model, fn, tokenizer, info, cfg, int(meta["step"]), ckpt, ctx.device)
