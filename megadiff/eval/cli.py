"""`megadiff sample`, `megadiff eval` and `megadiff lm-eval`: generate from a checkpoint; zero-shot likelihood and sample quality.

    megadiff sample runs/tiny --prompt "ROMEO:" --num 2 --sampler first_hitting --out samples.jsonl
    megadiff sample runs/tiny --infill "To be, or [MASK:6] to be" --num 3
    megadiff eval runs/tiny --data runs/data/wiki:valid --text notes.txt --n-t 8 --out eval.json --mlflow
    megadiff eval runs/tiny --gen-quality --scorer runs/ar --samplers ancestral,first_hitting --steps 16,64
    megadiff lm-eval runs/tiny --tasks my_task --include-path tasks/ --mc-samples 64

CKPT is a run directory (its checkpoints/latest) or a checkpoints/step_XXXXXX directory.
Heavy imports stay inside the handlers (fast --help).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from megadiff import MegadiffError

INFILL_RE = re.compile(r"\[MASK(?:[:*](\d+))?\]")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="run directory (uses checkpoints/latest) or a step directory")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data-dir", default=None,
                   help="dataset directory holding the run's tokenizer (default: the run's data.train[0].path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _sampling_opts(p: argparse.ArgumentParser, multi: bool = False) -> None:
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--block-length", type=int, default=None,
                   help="block length for llada (default: one block) and block (default: min(32, length))")


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate text from a checkpoint",
        description="Generate samples (unconditional, after a prompt, or infilling [MASK] spans) and print them; "
                    "also written as JSONL records {prompt, sample, steps, nfe, seconds, ...}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt prefix (repeatable; default: unconditional)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line (\\n escapes allowed)")
    p.add_argument("--infill", action="append", default=[],
                   help="text with [MASK] spans to fill (repeatable); [MASK] = --span-length tokens, [MASK:n] = n")
    p.add_argument("--span-length", type=int, default=8, help="tokens generated for each bare [MASK] of --infill")
    p.add_argument("--num", type=int, default=1, help="samples per prompt / infill text")
    p.add_argument("--length", type=int, default=None,
                   help="tokens to generate after the prompt (default: fill the model's context)")
    p.add_argument("--sampler", default="ancestral", help="ancestral | first_hitting | llada | block")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps: total for ancestral (default: length), per block for llada/block")
    p.add_argument("--no-cache", action="store_true", help="ancestral/block: call the network every step")
    p.add_argument("--remasking", default="low_confidence", help="llada: low_confidence | random")
    _sampling_opts(p)
    p.add_argument("--out", default="samples.jsonl", help="JSONL output ('' = do not write)")
    p.add_argument("--quiet", action="store_true", help="do not print the samples")
    p.set_defaults(func=run_sample)

    e = sub.add_parser(
        "eval", help="zero-shot NELBO perplexity bound; generation quality",
        description="Zero-shot likelihood of a checkpoint on held-out shard sets (--data) and raw text files "
                    "(--text, tokenized with the run's tokenizer, packed into seq_len windows): the NELBO in "
                    "nats/token and its perplexity bound exp(NELBO) for diffusion objectives, the exact NLL for "
                    "`ar`. With --gen-quality: generative perplexity under --scorer and unigram entropy of "
                    "unconditional samples per sampler and step count, plus a PNG of quality vs NFE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(e)
    e.add_argument("--data", action="append", default=[], metavar="DIR[:split]",
                   help="tokenized dataset split (repeatable; split default 'valid'); with neither --data nor --text: "
                        "the run's data.valid")
    e.add_argument("--text", action="append", default=[], metavar="FILE", help="raw UTF-8 text file (repeatable)")
    e.add_argument("--n-t", type=int, default=8, help="time points per sequence for the NELBO")
    e.add_argument("--t-mode", default="antithetic", choices=("antithetic", "grid"),
                   help="antithetic: unbiased; grid: midpoint rule (same t for every sequence)")
    e.add_argument("--batches", type=int, default=16, help="batches of --batch-size sequences per dataset (0 = all)")
    e.add_argument("--out", default=None, help="JSON result (default: <run_dir>/eval/eval-step<N>.json)")
    e.add_argument("--mlflow", action="store_true", help="log the results to the run's MLflow run")
    g = e.add_argument_group("generation quality")
    g.add_argument("--gen-quality", action="store_true", help="score samples instead of held-out likelihood")
    g.add_argument("--scorer", default=None,
                   help="megadiff checkpoint trained with diffusion.objective=ar, or a local HF causal LM directory")
    g.add_argument("--samplers", default="ancestral,first_hitting", help="comma-separated sampler names")
    g.add_argument("--steps", default="16,64,256", help="comma-separated step counts (first_hitting runs once)")
    g.add_argument("--num", type=int, default=16, help="samples per (sampler, steps)")
    g.add_argument("--length", type=int, default=None, help="sample length (default: the run's seq_len)")
    g.add_argument("--plot", default=None, help="PNG (default: next to the JSON, .png)")
    _sampling_opts(g)
    e.set_defaults(func=run_eval)

    h = sub.add_parser(
        "lm-eval", help="run EleutherAI lm-evaluation-harness tasks on a checkpoint",
        description="Run lm-evaluation-harness tasks (pip install lm-eval, or the `lmeval` extra) through "
                    "megadiff's adapter: loglikelihood = Monte Carlo ELBO of the continuation (LLaDA/SMDM), "
                    "generate_until through a sampler. Tasks come from the harness or from YAML files in "
                    "--include-path (a local task over a JSONL file needs no network).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    h.add_argument("checkpoint", metavar="CKPT", help="run directory (uses checkpoints/latest) or a step directory")
    h.add_argument("--tasks", required=True, help="comma-separated task names")
    h.add_argument("--include-path", default=None, help="folder of extra task YAML files")
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction if < 1)")
    h.add_argument("--mc-samples", type=int, default=32, help="Monte Carlo draws per loglikelihood request")
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--sampler", default="ancestral", help="sampler for generate_until")
    h.add_argument("--steps", type=int, default=None, help="sampler steps for generate_until (default: length)")
    h.add_argument("--max-gen-toks", type=int, default=64)
    h.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--out", default=None, help="JSON result (default: <run_dir>/eval/lm-eval-step<N>.json)")
    h.set_defaults(func=run_lm_eval)


# ----------------------------------------------------------------------------- helpers


def _light(args) -> Any:
    """Tokenizer, dataset info and config of CKPT without building the model (input checks fail fast)."""
    from types import SimpleNamespace

    from megadiff.config import from_yaml_text, train_data_dir
    from megadiff.data.tokenizer import load_from_dir
    from megadiff.eval.runtime import check_data_tokenizer, resolve_checkpoint

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
    from megadiff.eval.runtime import load_for_inference, resolve_checkpoint

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
                            remasking=args.remasking)
        if args.no_cache and "schedule" in kw and args.sampler in ("ancestral", "block"):
            kw["cache"] = False
        if kind == "infill" and args.sampler == "block":
            kw.pop("eos_id")  # no EOS early stop when fixed text follows the spans
        toks, stats = run_sampler(im, canvas.expand(args.num, -1), args.sampler, kw, seed=args.seed,
                                  batch_size=args.batch_size, progress=not args.no_progress,
                                  desc=f"{args.sampler} ({kind} {len(records) // args.num + 1}/{len(jobs)})")
        for r in range(args.num):
            row = toks[r]
            if not torch.equal(row[fixed], canvas[0][fixed]):
                raise MegadiffError("the sampler changed conditioning tokens (a sampler bug)")
            rec = {"prompt": text, "kind": kind, "sampler": args.sampler, **stats[r], "seed": args.seed,
                   "length": n_gen}
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


def _esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)


# ----------------------------------------------------------------------------- eval


def _default_out(im: Any, name: str) -> Path:
    return _run_dir(im) / "eval" / f"{name}-step{im.step:06d}.json"


def run_eval(args) -> int:
    if args.gen_quality:
        return _run_gen_quality(args)
    import math

    from megadiff.eval.zeroshot import evaluate_sets, parse_data_arg, shard_set, text_set
    from megadiff.utils.io import atomic_write_json

    if args.n_t < 1 or args.batches < 0 or args.batch_size < 1:
        raise MegadiffError("--n-t and --batch-size must be >= 1, --batches >= 0")
    for t in args.text:  # fail on a missing or binary file before loading the model
        if not Path(t).is_file():
            raise MegadiffError(f"--text {t}: no such file")
        try:
            Path(t).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise MegadiffError(f"--text {t}: not UTF-8 text ({e}); pass a plain text file (for pre-tokenized "
                                f"data use `megadiff data tokenize` and --data)") from None
    im = _light(args)  # read and check all the data before loading the model
    max_seqs = args.batches * args.batch_size
    data = list(args.data)
    if not data and not args.text:
        data = [f"{ref.path}:{ref.split}" for ref in im.cfg.data.valid]
        if not data:
            raise MegadiffError("the run has no data.valid; pass --data DIR[:split] or --text FILE")
    sets = [shard_set(im, *parse_data_arg(d), max_seqs=max_seqs, seed=args.seed) for d in data]
    sets += [text_set(im, t, max_seqs=max_seqs) for t in args.text]
    names = [s.name for s in sets]
    for i, s in enumerate(sets):  # distinct names (JSON keys, MLflow metric names)
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{i}"
    im = _load(args)
    objective = im.cfg.diffusion.objective
    results = evaluate_sets(im, sets, n_t=args.n_t, batch_size=args.batch_size, seed=args.seed,
                            t_mode=args.t_mode, progress=not args.no_progress)
    out = {"checkpoint": str(im.ckpt_dir), "step": im.step, "objective": objective,
           "schedule": im.cfg.diffusion.schedule, "vocab_size": im.info.vocab_size,
           "log_vocab": math.log(im.info.vocab_size), "bound": objective != "ar",
           "n_t": args.n_t if objective != "ar" else None, "t_mode": args.t_mode if objective != "ar" else None,
           "seed": args.seed, "results": results}
    path = Path(args.out) if args.out else _default_out(im, "eval")
    atomic_write_json(path, out)
    _print_eval_table(out)
    print(f"result -> {path}")
    if args.mlflow:
        metrics = {}
        for r in results:
            key = r["name"].replace(":", "/")
            if objective == "ar":
                metrics.update({f"eval/{key}/nll": r["nll"], f"eval/{key}/ppl": r["ppl"]})
            else:
                metrics.update({f"eval/{key}/nelbo": r["nelbo"], f"eval/{key}/ppl_bound": r["ppl_bound"]})
        _log_mlflow(im, metrics, [path])
    return 0


def _print_eval_table(out: dict) -> None:
    from rich.table import Table

    ar = out["objective"] == "ar"
    what = "exact NLL" if ar else f"NELBO bound, n_t={out['n_t']} ({out['t_mode']})"
    t = Table(title=f"step {out['step']} · {out['objective']} · {what} · nats/token")
    for c in ("dataset", "kind", "sequences", "tokens", "NLL" if ar else "NELBO", "± sem", "bits/tok",
              "PPL" if ar else "PPL ≤", "s"):
        t.add_column(c, justify="left" if c in ("dataset", "kind") else "right")
    for r in out["results"]:
        v, sem = (r["nll"], r["nll_sem"]) if ar else (r["nelbo"], r["nelbo_sem"])
        t.add_row(r["name"], r["kind"], f"{r['sequences']:,}", f"{r['tokens']:,}", f"{v:.4f}", f"{sem:.4f}",
                  f"{r['bits_per_token']:.3f}", f"{r['ppl' if ar else 'ppl_bound']:.2f}", f"{r['seconds']:.1f}")
    _console().print(t)


def _log_mlflow(im: Any, metrics: dict, artifacts: list[Path]) -> None:
    """Log to the run's own MLflow run (<run_dir>/mlflow_run_id; tracking URI as in training)."""
    import os

    from megadiff.tracking.mlflow_cb import sanitize, tracking_uri

    run_dir = _run_dir(im)
    id_file = run_dir / "mlflow_run_id"
    if not id_file.is_file():
        raise MegadiffError(f"--mlflow: {id_file} not found (the run was trained with tracking.enabled=false or "
                            f"elsewhere); results are in the JSON file only")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(im.cfg, run_dir)
    run_id = id_file.read_text().strip()
    try:
        client = MlflowClient(tracking_uri=uri)
        ts = int(time.time() * 1000)
        items = [Metric(sanitize(k)[:250], float(v), ts, int(im.step)) for k, v in metrics.items()
                 if v == v and abs(float(v)) != float("inf")]
        client.log_batch(run_id, metrics=items)
        for a in artifacts:
            client.log_artifact(run_id, str(a), artifact_path="eval")
    except Exception as e:
        raise MegadiffError(f"--mlflow: logging to run {run_id} at {uri} failed ({type(e).__name__}: {str(e)[:200]}); "
                            f"the results are in the JSON file") from None
    print(f"logged {len(items)} metrics to MLflow run {run_id} ({uri})")


def _run_gen_quality(args) -> int:
    from megadiff.eval.genquality import gen_quality, load_scorer, plot_gen_quality
    from megadiff.eval.zeroshot import parse_data_arg, shard_set
    from megadiff.utils.io import atomic_write_json

    if not args.scorer:
        raise MegadiffError("--gen-quality needs --scorer AR_CHECKPOINT_OR_HF_DIR")
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        raise MegadiffError(f"--steps {args.steps!r}: expected comma-separated integers, e.g. 16,64,256") from None
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if not samplers or not steps or min(steps) < 1 or args.num < 1:
        raise MegadiffError("--samplers and --steps need at least one entry, steps and --num >= 1")
    if not Path(args.scorer).exists():
        raise MegadiffError(f"--scorer {args.scorer}: no such file or directory")
    from megadiff.eval.genquality import check_scorer

    check_scorer(args.scorer)  # before loading anything
    im = _load(args)
    from megadiff.diffusion.samplers import SAMPLERS

    for s in samplers:
        SAMPLERS.get(s)
    scorer = load_scorer(args.scorer, im)
    reference = None
    data = list(args.data) or [f"{ref.path}:{ref.split}" for ref in im.cfg.data.valid]
    for d in data[:1]:
        try:
            reference = shard_set(im, *parse_data_arg(d), max_seqs=args.num, seed=args.seed).seqs
        except MegadiffError as e:
            if args.data:
                raise
            print(f"note: no held-out reference ({e})", file=sys.stderr)
    res = gen_quality(im, scorer, samplers, steps, num=args.num, length=args.length, batch_size=args.batch_size,
                      seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      block_length=args.block_length, reference=reference, progress=not args.no_progress)
    path = Path(args.out) if args.out else _default_out(im, "gen_quality")
    png = Path(args.plot) if args.plot else path.with_suffix(".png")
    res["plot"] = str(png)
    atomic_write_json(path, res)
    plot_gen_quality(res, png)
    _print_gq_table(res)
    print(f"result -> {path}\nplot   -> {png}")
    if args.mlflow:
        metrics = {}
        for r in res["results"]:
            k = f"genq/{r['sampler']}" + (f"_T{r['steps']}" if r["steps"] else "")
            metrics.update({f"{k}/gen_ppl": r["gen_ppl"], f"{k}/entropy": r["entropy"], f"{k}/nfe": r["nfe"]})
        _log_mlflow(im, metrics, [path, png])
    return 0


def _print_gq_table(res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"step {res['step']} · generation quality · scorer {res['scorer']}")
    for c in ("sampler", "steps", "NFE", "gen PPL", "entropy", "s"):
        t.add_column(c, justify="left" if c == "sampler" else "right")
    for r in res["results"]:
        t.add_row(r["sampler"], str(r["steps"] or "-"), f"{r['nfe']:.1f}", f"{r['gen_ppl']:.2f}",
                  f"{r['entropy']:.3f}", f"{r['seconds']:.1f}")
    ref = res.get("reference")
    if ref:
        t.add_row("[dim]held-out data[/dim]", "", "", f"{ref['gen_ppl']:.2f}", f"{ref['entropy']:.3f}", "")
    _console().print(t)


def run_lm_eval(args) -> int:
    from megadiff.eval.runtime import resolve_checkpoint
    from megadiff.utils.io import atomic_write_json

    resolve_checkpoint(args.checkpoint)  # a wrong path fails before the harness and the model load
    if args.include_path and not Path(args.include_path).is_dir():
        raise MegadiffError(f"--include-path {args.include_path}: no such folder of task YAML files")
    if args.mc_samples < 1 or args.batch_size < 1:
        raise MegadiffError("--mc-samples and --batch-size must be >= 1")
    _quiet_warnings()
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        from megadiff.eval.lm_eval_adapter import MegadiffLM
    except ImportError as e:
        raise MegadiffError(f"lm-evaluation-harness is not installed ({e}): pip install lm-eval "
                            "(or pip install -e '.[lmeval]')") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tm = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise MegadiffError(f"--tasks: unknown task(s) {', '.join(unknown)}; "
                            + ("check the names in --include-path's YAML files (`task:` keys)" if args.include_path
                               else "pass --include-path for local task YAML files, or see `lm_eval --tasks list`"))
    lm = MegadiffLM(pretrained=args.checkpoint, mc_samples=args.mc_samples, batch_size=args.batch_size,
                    sampler=args.sampler, steps=args.steps, max_gen_toks=args.max_gen_toks, device=args.device,
                    seed=args.seed)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, num_fewshot=args.num_fewshot,
                          limit=args.limit, random_seed=args.seed, numpy_random_seed=args.seed,
                          torch_random_seed=args.seed, log_samples=False)
    print(make_table(out))
    record = {"checkpoint": str(lm.im.ckpt_dir), "step": lm.im.step, "tasks": tasks, "mc_samples": args.mc_samples,
              "sampler": args.sampler, "steps": args.steps, "results": out["results"],
              "n_samples": out.get("n-samples"), "versions": out.get("versions")}
    path = Path(args.out) if args.out else _default_out(lm.im, "lm-eval")
    atomic_write_json(path, json.loads(json.dumps(record, default=str)))
    print(f"result -> {path}")
    return 0
