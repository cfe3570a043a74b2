"""`megadiff convert`: Hugging Face export/import, offline resharding, consolidated weights."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("convert", help="checkpoints <-> Hugging Face, reshard, consolidated weights")
    csub = p.add_subparsers(dest="convert_cmd", metavar="SUBCOMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    h = csub.add_parser("to-hf", formatter_class=fmt,
                        help="checkpoint (any TP/PP) -> Hugging Face dir (config.json, safetensors, tokenizer, README)")
    h.add_argument("ckpt", help="run dir (uses checkpoints/latest) or checkpoints/step_XXXXXX dir")
    h.add_argument("out", help="output directory (written via a temp dir, renamed at the end)")
    h.add_argument("--data-dir", help="dataset dir holding the tokenizer (default: the one in the checkpoint config)")
    h.add_argument("--max-shard-gb", type=float, default=5.0, help="split model.safetensors above this size")
    h.set_defaults(func=_to_hf)

    f = csub.add_parser("from-hf", formatter_class=fmt,
                        help="local Llama-family / GPT-2 causal LM -> megadiff run dir ready to train")
    f.add_argument("hf_dir")
    f.add_argument("out", help="run directory: train with `megadiff train OUT/config.yaml data.out_dir=... "
                               "trainer.run_dir=OUT`")
    f.add_argument("--tp", type=int, default=1)
    f.add_argument("--pp", type=int, default=1)
    f.add_argument("--no-grow-vocab", action="store_true",
                   help="fail instead of adding an embedding row when the vocab has no free row for [MASK]")
    f.set_defaults(func=_from_hf)

    r = csub.add_parser("reshard", formatter_class=fmt, help="offline change of TP/PP layout (optimizer state kept)")
    r.add_argument("ckpt")
    r.add_argument("out", help="output run directory")
    r.add_argument("--tp", type=int, required=True)
    r.add_argument("--pp", type=int, required=True)
    r.add_argument("--data-dir")
    r.set_defaults(func=_reshard)

    t = csub.add_parser("to-torch", formatter_class=fmt, help="one consolidated, unsharded safetensors file")
    t.add_argument("ckpt")
    t.add_argument("out", help="OUT.safetensors")
    t.add_argument("--data-dir")
    t.set_defaults(func=_to_torch)
    for q in (h, f, r, t):
        q.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _to_hf(a) -> int:
    from megadiff.convert.hf import export_hf

    out = export_hf(a.ckpt, a.out, a.data_dir, int(a.max_shard_gb * 1024**3), a.overwrite)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _from_hf(a) -> int:
    from megadiff.convert.hf import import_hf

    step = import_hf(a.hf_dir, a.out, a.tp, a.pp, grow_vocab=not a.no_grow_vocab, overwrite=a.overwrite)
    print(f"wrote {step}\ntokenize data with data.tokenizer.kind=file data.tokenizer.path={a.out}/tokenizer.json, "
          f"then: megadiff train {a.out}/config.yaml data.out_dir=DATA trainer.run_dir={a.out}")
    return 0


def _reshard(a) -> int:
    from megadiff.convert.reshard import reshard

    step = reshard(a.ckpt, a.out, a.tp, a.pp, a.data_dir, a.overwrite)
    print(f"wrote {step} (layout tp{a.tp}-pp{a.pp}); resume with trainer.run_dir={a.out} "
          f"parallel.tp={a.tp} parallel.pp={a.pp}")
    return 0


def _to_torch(a) -> int:
    from megadiff.convert.reshard import to_torch

    print(f"wrote {to_torch(a.ckpt, a.out, a.data_dir, a.overwrite)}")
    return 0
