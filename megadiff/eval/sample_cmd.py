"""`megadiff sample`: prompt and [MASK] infill sampling from a checkpoint, printed and written as JSONL."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from megadiff import MegadiffError
from megadiff.eval.cli_common import _console, _esc, _light, _load

INFILL_RE = re.compile(r"\[MASK(?:[:*](\d+))?\]")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise MegadiffError(f"--prompts-file {f}: no such file")
        prompts += [ln.replace("\\n", "\n") for ln in f.read_text().splitlines() if ln.strip()]
    return prompts


def parse_infill(text: str, tokenizer: Any, span_length: int) -> tuple[list[int], list[bool]]:
    """'a [MASK] b [MASK:3] c' -> (ids with mask placeholders, fixed flags); segments are tokenized separately."""
    ids: list[int] = []
    fixed: list[bool] = []
    pos = 0
    n_spans = 0
    for m in INFILL_RE.finditer(text):
        seg = text[pos : m.start()]
        if seg:
            t = tokenizer.encode(seg).ids
            ids += t
            fixed += [True] * len(t)
        n = int(m.group(1)) if m.group(1) else span_length
        if n <= 0:
            raise MegadiffError(f"--infill: span {m.group(0)!r} must have a positive length")
        ids += [-1] * n
        fixed += [False] * n
        n_spans += 1
        pos = m.end()
    seg = text[pos:]
    if seg:
        t = tokenizer.encode(seg).ids
        ids += t
        fixed += [True] * len(t)
    if n_spans == 0:
        raise MegadiffError(f"--infill {text!r}: no [MASK] span to fill; write e.g. 'To be, or [MASK] to be' "
                            f"([MASK:n] for n tokens)")
    return ids, fixed


# ----------------------------------------------------------------------------- sample


def run_sample(args) -> int:
    import torch

    from megadiff.eval.genquality import decode, run_sampler, sampler_kwargs
    from megadiff.utils.io import atomic_write_text

    if args.num < 1:
        raise MegadiffError("--num must be >= 1")
    prompts = _read_prompts(args)
    if not prompts and not args.infill:
        prompts = [""]
    im = _light(args)
    mid, max_len = im.info.mask_id, int(im.cfg.model.max_seq_len)
    tok = im.tokenizer
    jobs = []  # (kind, text, canvas [1, L], fixed [L] bool)
    for pr in prompts:
        pids = tok.encode(pr).ids if pr else []
        L = args.length if args.length is not None else max_len - len(pids)
        if L < 1 or len(pids) + L > max_len:
            raise MegadiffError(f"prompt {pr[:40]!r} ({len(pids)} tokens) + --length {L} must fit the model's context "
                                f"of {max_len} tokens and generate at least one")
        canvas = torch.tensor([pids + [mid] * L], dtype=torch.int64)
        jobs.append(("prompt", pr, canvas, torch.tensor([True] * len(pids) + [False] * L)))
    for text in args.infill:
        ids, fixed = parse_infill(text, tok, args.span_length)
        if len(ids) > max_len:
            raise MegadiffError(f"--infill {text[:40]!r}: {len(ids)} tokens exceed the model's context of {max_len}")
        canvas = torch.tensor([[i if f else mid for i, f in zip(ids, fixed)]], dtype=torch.int64)
        jobs.append(("infill", text, canvas, torch.tensor(fixed)))
    im = _load(args)
    con = _console()
    records = []
    for kind, text, canvas, fixed in jobs:
        n_gen = int((~fixed).sum())
        kw = sampler_kwargs(im, args.sampler, steps=args.steps, block_length=args.block_length,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, length=n_gen,
                            remasking=args.remasking, cache=not args.no_cache, threshold=args.threshold,
                            stop_at_eos=kind == "prompt")  # no EOS early stop when fixed text follows the spans
        toks, stats = run_sampler(im, canvas.expand(args.num, -1), args.sampler, kw, seed=args.seed,
                                  batch_size=args.batch_size, progress=not args.no_progress,
                                  desc=f"{args.sampler} ({kind} {len(records) // args.num + 1}/{len(jobs)})",
                                  cfg_weight=args.cfg_weight, cond=fixed)
        for r in range(args.num):
            row = toks[r]
            if not torch.equal(row[fixed], canvas[0][fixed]):
                raise MegadiffError("the sampler changed conditioning tokens (a sampler bug)")
            rec = {"prompt": text, "kind": kind, "sampler": args.sampler, **stats[r], "seed": args.seed,
                   "length": n_gen, "cfg_weight": args.cfg_weight}
            if kind == "prompt":
                rec["sample"] = decode(tok, row[len(canvas[0]) - n_gen:].tolist())
            else:
                rec["sample"] = decode(tok, row.tolist())
                spans, cur = [], []
                for t, f in zip(row.tolist(), fixed.tolist()):
                    if not f:
                        cur.append(t)
                    elif cur:
                        spans.append(decode(tok, cur))
                        cur = []
                if cur:
                    spans.append(decode(tok, cur))
                rec["fills"] = spans
            records = records + [rec]
    if not args.quiet:
        for i, rec in enumerate(records):
            con.rule(f"sample {i} · {rec['sampler']} · {rec['steps']} steps · {rec['nfe']} network calls · "
                     f"{rec['seconds']:.2f} s", style="dim")
            if rec["kind"] == "prompt":
                con.print(f"[bold]{_esc(rec['prompt'])}[/bold]{_esc(rec['sample'])}")
            else:
                con.print(_esc(rec["sample"]))
                con.print(f"[dim]fills: {_esc(json.dumps(rec['fills']))}[/dim]")
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
        print(f"{len(records)} samples from step {im.step} -> {args.out}", file=sys.stderr)
    return 0
