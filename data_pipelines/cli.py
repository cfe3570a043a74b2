"""`megadiff data ...`: train-tokenizer, tokenize, inspect.

Heavy imports (ray, tokenizers) stay inside the handlers. Also runnable as
``python -m data_pipelines.cli tokenize CONFIG key=value ...`` (no other command group needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from megadiff import MegadiffError


def _config(args: argparse.Namespace) -> Any:
    from megadiff.config import load_config

    items = list(args.items)
    path = items.pop(0) if items and "=" not in items[0] else None
    return load_config(path, items)


def _train_tokenizer(args: argparse.Namespace) -> int:
    from data_pipelines.tokenizer import build_tokenizer, tokenizer_payload
    from megadiff.data.tokenizer import tokenizer_file_name
    from megadiff.utils.io import atomic_write_bytes

    cfg = _config(args)
    d = cfg.data
    if d.tokenizer.kind == "file":
        raise MegadiffError("data.tokenizer.kind=file: nothing to train; use kind=bpe (or gpt2)")
    tok = build_tokenizer(d) if d.tokenizer.kind == "gpt2" else _train(d)
    data, ids = tokenizer_payload(tok)
    target = Path(d.tokenizer.path) if d.tokenizer.path else Path(d.out_dir)
    if target.suffix != ".json":
        target = target / tokenizer_file_name(data)
    atomic_write_bytes(target, data)
    print(f"wrote {target} (vocab {tok.get_vocab_size(with_added_tokens=True):,}, special ids {ids})")
    print(f"use it with: data.tokenizer.kind=file data.tokenizer.path={target}")
    return 0


def _train(d: Any) -> Any:
    from data_pipelines.tokenizer import train_bpe

    return train_bpe(d)


def _tokenize(args: argparse.Namespace) -> int:
    from data_pipelines.pipeline import print_summary, run_pipeline

    cfg = _config(args)
    res = run_pipeline(cfg, progress=not args.no_progress)
    print_summary(res)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from megadiff.data.format import describe, verify_dir

    print(describe(args.dir))
    rc = 0
    if args.verify:
        problems = verify_dir(args.dir)
        for p in problems:
            print(f"FAIL {p}")
        print("checksums: OK" if not problems else f"checksums: {len(problems)} problem(s); re-run "
              f"`megadiff data tokenize` with the dataset's config to rewrite them")
        rc = 1 if problems else 0
    if args.decode:
        from megadiff.data.loader import ShardDataset
        from megadiff.data.tokenizer import load_from_dir

        tok, _ = load_from_dir(args.dir)
        ds = ShardDataset(args.dir, split=args.split)
        for i in range(min(args.decode, len(ds))):
            print(f"--- {args.split}[{i}] ---")
            print(tok.decode(ds[i].tolist(), skip_special_tokens=False))
    return rc


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="data pipeline: tokenizer training, tokenization into shards, inspection")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    conf_help = "[CONFIG.yaml] [key=value ...]: a recipe (e.g. configs/data_shakespeare.yaml) and dotlist overrides"

    t = dsub.add_parser("train-tokenizer", help="train a byte-level BPE with [MASK] [PAD] [EOS] [BOS] reserved")
    t.add_argument("items", nargs="*", help=conf_help)
    t.set_defaults(func=_train_tokenizer)

    k = dsub.add_parser("tokenize", help="raw text -> packed webdataset shards + manifest.json (Ray)")
    k.add_argument("items", nargs="*", help=conf_help)
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(func=_tokenize)

    i = dsub.add_parser("inspect", help="print a dataset's manifest summary, verify checksums, decode samples")
    i.add_argument("dir", help="dataset directory (holds manifest.json)")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest")
    i.add_argument("--decode", type=int, default=0, metavar="N", help="decode the first N samples to text")
    i.add_argument("--split", default="train", help="split to decode (default: train)")
    i.set_defaults(func=_inspect)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.cli")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except MegadiffError as e:
        print(f"megadiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
