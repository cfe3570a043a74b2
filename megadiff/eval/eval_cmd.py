"""`megadiff eval`: zero-shot NELBO (or exact NLL) on shard splits and raw text; generation quality."""

from __future__ import annotations

import sys
from pathlib import Path

from megadiff import MegadiffError
from megadiff.eval.cli_common import _console, _default_out, _light, _load, _run_dir
from megadiff.tracking.run_log import log_to_training_run


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
    objective, tr = im.cfg.diffusion.objective, im.traits
    results = evaluate_sets(im, sets, n_t=args.n_t, batch_size=args.batch_size, seed=args.seed,
                            t_mode=args.t_mode, progress=not args.no_progress)
    out = {"checkpoint": str(im.ckpt_dir), "step": im.step, "objective": objective,
           "schedule": im.cfg.diffusion.schedule, "vocab_size": im.info.vocab_size,
           "log_vocab": math.log(im.info.vocab_size), "bound": tr.val_is_bound,
           "n_t": None if tr.is_autoregressive else args.n_t, "t_mode": None if tr.is_autoregressive else args.t_mode,
           "seed": args.seed, "results": results}
    path = Path(args.out) if args.out else _default_out(im, "eval")
    atomic_write_json(path, out)
    _print_eval_table(out)
    print(f"result -> {path}")
    if args.mlflow:
        metrics = {}
        for r in results:
            key = r["name"].replace(":", "/")
            if not out["bound"]:
                metrics.update({f"eval/{key}/nll": r["nll"], f"eval/{key}/ppl": r["ppl"]})
            else:
                metrics.update({f"eval/{key}/nelbo": r["nelbo"], f"eval/{key}/ppl_bound": r["ppl_bound"]})
        log_to_training_run(im.cfg, _run_dir(im), im.step, metrics, [path])
    return 0


def _print_eval_table(out: dict) -> None:
    from rich.table import Table

    ar = not out["bound"]  # an exact NLL (autoregressive), not a bound
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
        log_to_training_run(im.cfg, _run_dir(im), im.step, metrics, [path, png])
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
