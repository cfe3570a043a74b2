"""Shared pieces of the `sample`, `eval` and `lm-eval` commands: checkpoint resolution before the model
loads, model loading, output paths, console."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _light(args) -> Any:
    """Tokenizer, dataset info and config of CKPT without building the model (input checks fail fast)."""
    from types import SimpleNamespace

    from megadiff.checkpoint.inference import check_data_tokenizer, resolve_checkpoint
    from megadiff.config import from_yaml_text, train_data_dir
    from megadiff.data.tokenizer import load_from_dir

    ckpt = resolve_checkpoint(args.checkpoint)
    cfg = from_yaml_text((ckpt / "config.yaml").read_text())
    data = args.data_dir or train_data_dir(cfg)
    check_data_tokenizer(ckpt, data)
    tokenizer, info = load_from_dir(data)
    return SimpleNamespace(tokenizer=tokenizer, info=info, cfg=cfg, ckpt_dir=ckpt)


def _quiet_warnings() -> None:
    """megatron/torch import-time notices (no Apex/TE, deprecations) are noise for a user of these commands."""
    import warnings

    for mod in ("megatron", "torch.distributed", "torch.distributed.checkpoint"):
        warnings.filterwarnings("ignore", category=UserWarning, module=mod)
        warnings.filterwarnings("ignore", category=FutureWarning, module=mod)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=mod)


def _load(args) -> Any:
    _quiet_warnings()
    from megadiff.checkpoint.inference import load_for_inference, resolve_checkpoint

    resolve_checkpoint(args.checkpoint)  # a wrong path fails in a second, before torch/megatron load
    return load_for_inference(args.checkpoint, device=args.device, data_dir=args.data_dir)


def _run_dir(im: Any) -> Path:
    ckpt = Path(im.ckpt_dir).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _console():
    from rich.console import Console

    con = Console(highlight=False, soft_wrap=True)
    if not con.is_terminal:  # logs and pipes: wide enough that the tables do not wrap
        con = Console(highlight=False, soft_wrap=True, width=max(con.width, 132))
    return con


def _default_out(im: Any, name: str) -> Path:
    return _run_dir(im) / "eval" / f"{name}-step{im.step:06d}.json"


def _esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)
