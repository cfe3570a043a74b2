"""`megadiff lm-eval`: lm-evaluation-harness tasks through the Monte Carlo ELBO adapter."""

from __future__ import annotations

import json
from pathlib import Path

from megadiff import MegadiffError
from megadiff.eval.cli_common import _default_out, _quiet_warnings


def run_lm_eval(args) -> int:
    from megadiff.checkpoint.inference import resolve_checkpoint
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
