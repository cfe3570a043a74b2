"""`megadiff sweep plan|launch|status|fit`: IsoFLOP scaling-law sweeps (see docs/sweeps.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megadiff import MegadiffError


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="IsoFLOP scaling-law sweeps: plan, launch, status, fit",
                              description=__doc__)
    sub = p.add_subparsers(dest="sweep_command", metavar="SUBCOMMAND")

    pp = sub.add_parser("plan", help="print the IsoFLOP grid of a sweep file (refused runs with the reason)")
    pp.add_argument("sweep", help="sweep YAML (configs/sweeps/*.yaml)")
    pp.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file")
    pp.add_argument("--json", help="also write the plan as JSON here")
    pp.add_argument("--commands", action="store_true", help="print each run's `megadiff train` command")
    pp.set_defaults(func=cmd_plan)

    pl = sub.add_parser("launch", help="run the sweep's unfinished runs (local processes or a Slurm job array)")
    pl.add_argument("sweep")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--executor", default="local",
                    help="local (built in: processes on this machine), or an executor registered in the entry-point "
                         "group megadiff.sweep_executors (slurm: one job array, from the repository's launch/)")
    pl.add_argument("--parallel", type=int, default=None, help="local: runs at a time (default launch.parallel)")
    pl.add_argument("--cluster", help="slurm: cluster profile (default launch.slurm.cluster)")
    pl.add_argument("--skip-refused", action="store_true", help="launch the feasible runs even if some are refused")
    pl.add_argument("--force", action="store_true", help="resume started runs even if their overrides changed")
    pl.add_argument("--only", default=None, metavar="NAMES",
                    help="launch only these runs: comma-separated run names or glob patterns (e.g. 'mdlm-c1e18-*')")
    pl.add_argument("--dry-run", action="store_true", help="print what would run; start nothing")
    pl.set_defaults(func=cmd_launch)

    ps = sub.add_parser("status", help="state of every planned run (done, partial, new, refused)")
    ps.add_argument("sweep")
    ps.add_argument("overrides", nargs="*")
    ps.set_defaults(func=cmd_status)

    pf = sub.add_parser("fit", help="fit scaling laws to the finished runs (Approaches 2 and 3, MDM vs AR)")
    pf.add_argument("sweep", nargs="?", help="sweep YAML, or a sweep id (then --tracking-uri or $MLFLOW_TRACKING_URI)")
    pf.add_argument("--csv", metavar="FILE", help="fit runs from a table instead (columns N, D, loss; optionally "
                    "objective, budget, C, unique_tokens, epochs, name); needs --out")
    pf.add_argument("--exclude", metavar="NAMES", help="leave these runs out: comma-separated names or globs "
                    "(shown as crosses on residuals.png)")
    pf.add_argument("--exclude-top", type=int, default=0, metavar="K",
                    help="leave out the K highest-loss runs of each objective (diverged or unconverged runs)")
    pf.add_argument("--flops", choices=("kernel", "6nd"), default=None,
                    help="FLOPs convention for allocations and the MDM-vs-AR multiplier (default: the sweep's "
                         "`flops`); the other is reported beside it when the runs carry both")
    pf.add_argument("--tracking-uri", help="MLflow store (default: the sweep's)")
    pf.add_argument("--allow-partial", action="store_true", help="fit the finished runs even if some are missing")
    pf.add_argument("--out", help="output directory (default <sweep out_dir>/fit)")
    pf.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates (default fit.bootstrap)")
    pf.add_argument("--tail", type=int, default=None, help="average the last K logged values (default fit.tail)")
    pf.add_argument("--metric", default=None, help="MLflow metric (default fit.metric = val/nelbo)")
    pf.add_argument("--no-log", action="store_true", help="do not log the outputs to the parent MLflow run")
    pf.set_defaults(func=cmd_fit)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _plan(args):
    from megadiff.sweeps.plan import plan_sweep
    from megadiff.sweeps.spec import load_sweep

    spec = load_sweep(args.sweep, args.overrides)
    return spec, plan_sweep(spec)


def cmd_plan(args) -> int:
    from megadiff.sweeps.launch import train_argv
    from megadiff.sweeps.plan import check_overrides, format_table
    from megadiff.utils.io import atomic_write_json

    spec, plan = _plan(args)
    print(format_table(plan))
    check_overrides(plan)
    if args.commands:
        for r in plan.feasible:
            print(" ".join(train_argv(plan, r, "<parent-run-id>", list(spec.launch.train_command) or None)))
    if args.json:
        atomic_write_json(args.json, plan.to_json())
    return 1 if plan.refused else 0


def cmd_launch(args) -> int:
    from megadiff.sweeps import launch as L
    from megadiff.sweeps.plan import check_overrides, format_table
    from megadiff.tracking import sweep_runs as T

    spec, plan = _plan(args)
    print(format_table(plan))
    if plan.refused and not args.skip_refused:
        raise MegadiffError(f"{len(plan.refused)} planned runs are refused (reasons above); change the sweep "
                            "file or pass --skip-refused to launch the others")
    if not plan.feasible:
        raise MegadiffError("no feasible runs to launch")
    check_overrides(plan)
    L.check_relaunch(plan, force=args.force)
    command = list(spec.launch.train_command) or None
    if args.dry_run:
        for r in plan.feasible:
            print(f"{L.run_state(r)}: {' '.join(L.train_argv(plan, r, '<parent-run-id>', command))}")
        return 0
    if args.executor != "local":
        run_external = L.external_executor(args.executor)  # before anything is written: a clear error if missing
    parent = T.ensure_parent(plan)
    L.write_state(plan, parent)
    done, todo = L.pending_runs(plan)
    print(f"sweep {plan.sweep_id}: parent MLflow run {parent} in {plan.tracking_uri} (experiment {plan.experiment})")
    print(f"{len(done)} runs finished (skipped), {len(todo)} to run"
          + (f": {sum(1 for r in todo if L.run_state(r) == 'partial')} resume from a checkpoint" if todo else ""))
    if not todo:
        T.finish_parent(plan, parent)
        return 0
    left_out = []
    if args.only:
        todo, left_out = _select(todo, plan, args.only)
        print(f"--only {args.only}: launching {len(todo)} of them ({', '.join(r.name for r in todo)})")
        if not todo:
            return 0
    if args.executor != "local":
        from omegaconf import OmegaConf

        opts = dict(OmegaConf.select(spec.launch, args.executor, default=None) or {})  # launch.<executor>: options
        if args.cluster:
            opts["cluster"] = args.cluster
        sub = run_external(plan, todo, parent, opts)
        print(f"submitted job array {sub.job_id} ({len(todo)} members; script {sub.script}); "
              f"member i is {sub.job_id}_i in the order: {', '.join(r.name for r in todo)}")
        print(f"when they finish: megadiff sweep fit {args.sweep}")
        return 0
    codes = L.launch_local(plan, todo, parent, parallel=args.parallel or spec.launch.parallel, command=command)
    failed = sorted(n for n, rc in codes.items() if rc != 0)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}; relaunch to resume them")
        return 1
    if left_out:
        print(f"{len(left_out)} runs not launched (--only); launch them later, then: megadiff sweep fit {args.sweep}")
        return 0
    T.finish_parent(plan, parent)
    print(f"all {len(plan.feasible)} runs finished; next: megadiff sweep fit {args.sweep}")
    return 0


def _select(todo: list, plan, only: str) -> tuple[list, list]:
    """Split the runs to launch by --only patterns; a pattern that matches no planned run is an error."""
    import fnmatch

    pats = [p.strip() for p in only.split(",") if p.strip()]
    names = [r.name for r in plan.feasible]
    unknown = [p for p in pats if not fnmatch.filter(names, p)]
    if unknown:
        raise MegadiffError(f"--only: {', '.join(unknown)} matches no planned run; the runs are: {', '.join(names)}")
    keep = [r for r in todo if any(fnmatch.fnmatch(r.name, p) for p in pats)]
    return keep, [r for r in todo if r not in keep]


def cmd_status(args) -> int:
    from megadiff.sweeps import launch as L
    from megadiff.tracking import sweep_runs as T

    _, plan = _plan(args)
    try:
        finished = T.finished_runs(plan)
    except Exception as e:  # no store yet
        print(f"(MLflow store not readable: {type(e).__name__})")
        finished = set()
    counts: dict[str, int] = {}
    for r in plan.runs:
        st = L.run_state(r, finished)
        counts[st] = counts.get(st, 0) + 1
        print(f"{st:>8}  {r.name}" + (f"  ({r.reason})" if not r.ok else ""))
    print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


def _sweep_observations(args):
    """(observations, missing, fit spec, sweep id, out dir, tracking uri, parent run id, FLOPs convention)."""
    from megadiff.sweeps import results as R
    from megadiff.sweeps.plan import Plan
    from megadiff.sweeps.spec import FitSpec, load_sweep
    from megadiff.tracking import sweep_runs as T

    if Path(args.sweep).is_file():
        spec = load_sweep(args.sweep)
        fit_spec, convention = spec.fit, spec.flops
        plan_file = Path(spec.out_dir) / "plan.json"
        if not plan_file.exists():
            raise MegadiffError(f"{plan_file} not found: the sweep was never launched "
                                f"(megadiff sweep launch {args.sweep})")
        plan = Plan.from_json(json.loads(plan_file.read_text()))
        if args.tracking_uri:
            plan.tracking_uri = args.tracking_uri
        state = Path(spec.out_dir) / "sweep_state.json"
        parent_id = json.loads(state.read_text())["parent_run_id"] if state.exists() else None
        out = Path(args.out or Path(spec.out_dir) / "fit")
    else:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise MegadiffError(f"{args.sweep!r} is not a file; to fit by sweep id pass --tracking-uri "
                                "(or set $MLFLOW_TRACKING_URI) to the store the sweep used")
        from omegaconf import OmegaConf

        fit_spec = OmegaConf.structured(FitSpec)
        plan_json, parent_id = T.plan_from_mlflow(args.sweep, uri)
        plan = Plan.from_json(plan_json)
        plan.tracking_uri = uri
        convention = plan.runs[0].flops_convention if plan.runs else "kernel"
        out = Path(args.out or Path(plan.out_dir) / "fit")
    if parent_id is None:
        parent_id = T.parent_id(plan.tracking_uri, plan.sweep_id)
    metric = args.metric or fit_spec.metric
    obs, missing = R.collect(plan, metric, args.tail or fit_spec.tail, fit_spec.n_kind)
    if missing:
        print(f"{len(missing)} of {len(plan.feasible)} planned runs have no final {metric}:")
        for name, why in missing:
            print(f"  {name}: {why}")
    if not obs:
        raise MegadiffError(f"sweep {plan.sweep_id}: no finished run with {metric} in {plan.tracking_uri}; "
                            "launch it first (megadiff sweep launch SWEEP.yaml)")
    if missing and not args.allow_partial:
        raise MegadiffError(f"{len(missing)} runs are missing (listed above); relaunch the sweep to finish them, "
                            "or pass --allow-partial to fit the finished ones only")
    return obs, missing, fit_spec, plan.sweep_id, out, plan.tracking_uri, parent_id, convention


def cmd_fit(args) -> int:
    from megadiff.sweeps import results as R
    from megadiff.sweeps.external import exclude, read_csv
    from megadiff.sweeps.spec import FitSpec

    if args.csv:
        if args.sweep:
            raise MegadiffError("give either a sweep (YAML or id) or --csv FILE, not both")
        if not args.out:
            raise MegadiffError("--csv needs --out DIR (where fit.json, fit.txt and the plots go)")
        from omegaconf import OmegaConf

        obs, missing, fit_spec = read_csv(args.csv), [], OmegaConf.structured(FitSpec)
        sweep_id, out, uri, parent_id, convention = Path(args.csv).stem, Path(args.out), None, None, "kernel"
    elif args.sweep:
        obs, missing, fit_spec, sweep_id, out, uri, parent_id, convention = _sweep_observations(args)
    else:
        raise MegadiffError("megadiff sweep fit needs a sweep YAML, a sweep id, or --csv FILE")
    convention = args.flops or convention
    patterns = [p.strip() for p in (args.exclude or "").split(",") if p.strip()]
    obs, excluded = exclude(obs, patterns, args.exclude_top)
    n_boot = fit_spec.bootstrap if args.bootstrap is None else args.bootstrap
    res = R.run_fits(obs, n_boot=n_boot, seed=fit_spec.seed, ci_level=fit_spec.ci_level,
                     compare_at=list(fit_spec.compare_at), convention=convention)
    report = R.format_report(res, missing, len(obs), excluded)
    print(report)
    files = R.write_outputs(res, obs, missing, sweep_id, out, report, excluded)
    print(f"wrote {', '.join(str(f) for f in files)}")
    if parent_id and not args.no_log:
        from megadiff.tracking import sweep_runs as T

        T.log_fit(uri, parent_id, files, res)
        print(f"logged to the parent MLflow run {parent_id} (artifacts under fit/)")
    return 0
