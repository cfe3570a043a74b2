"""`megadiff checkpoint verify RUN_DIR`: check every checkpoint of a run without loading it.

Reads each step directory's ``contents.json`` (written at save time: every file and its size) and
checks the files are there, readable and of that size; no torch or megatron import, so it runs on a
login node in well under a second. Exit codes: 0 every checkpoint verifies, 1 at least one does not
(each problem names its file), 2 no checkpoints found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect a run's checkpoints (verify)",
                       description="Inspect the checkpoints of a run directory.")
    csub = p.add_subparsers(dest="checkpoint_command", metavar="SUBCOMMAND")
    v = csub.add_parser(
        "verify", help="check every checkpoint of a run without loading it",
        description="Check each checkpoints/step_XXXXXX of RUN_DIR against the contents.json recorded when it was "
                    "saved (files present, readable, of the recorded size); say which one `latest` names and which "
                    "is the newest that verifies. Exit codes: 0 all verify, 1 some do not, 2 no checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holding checkpoints/) or its checkpoints/")
    v.set_defaults(func=run_verify)
    p.set_defaults(func=lambda _a: p.print_help() or 2)


def _run_dir(path: str) -> Path:
    from megadiff import MegadiffError

    p = Path(path)
    if p.name == "checkpoints" and not (p / "checkpoints").is_dir():
        p = p.parent
    if not (p / "checkpoints").is_dir():
        raise MegadiffError(f"{path} holds no checkpoints/ directory; pass a run directory (trainer.run_dir)")
    return p


def run_verify(args) -> int:
    from megadiff import MegadiffError
    from megadiff.checkpoint.contents import RunCheckpoints, checkpoint_bytes, human_bytes, read_contents, step_dir_name

    mgr = RunCheckpoints(_run_dir(args.run_dir))
    steps = mgr.steps()
    if not steps:
        print(f"no checkpoints in {mgr.root}", file=sys.stderr)
        return 2
    try:
        latest = mgr.latest_name()
    except MegadiffError as e:
        print(f"warning: {e}", file=sys.stderr)
        latest = None
    bad = 0
    newest_ok = None
    for s in steps:
        name = step_dir_name(s)
        problems = mgr.verify(s)
        tag = " (latest)" if name == latest else ""
        recorded = "" if read_contents(mgr.root / name) else " [no contents.json: saved by an older megadiff]"
        if problems:
            bad += 1
            print(f"{name}{tag}: DAMAGED{recorded}")
            for msg in problems:
                print(f"    {msg}")
        else:
            newest_ok = name
            print(f"{name}{tag}: ok, {human_bytes(checkpoint_bytes(mgr.root / name))}{recorded}")
    partial = sorted(d.name for d in mgr.root.glob("step_*.tmp"))
    if partial:
        print(f"partial saves (removed by the next save): {', '.join(partial)}")
    if latest is None:
        print(f"no 'latest' pointer in {mgr.root}: training starts from scratch")
    if bad:
        hint = (f"resume from {newest_ok} with trainer.resume={newest_ok} or trainer.resume=latest_valid"
                if newest_ok else "no checkpoint verifies")
        print(f"{bad} of {len(steps)} checkpoint(s) damaged; {hint}")
        return 1
    print(f"all {len(steps)} checkpoint(s) verify")
    return 0
