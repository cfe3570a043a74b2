"""The `megadiff` command line.

Each command group lives in its own module exposing ``register(subparsers)``; that module keeps
heavy imports (torch, megatron, ray, mlflow) inside its handlers so `--help` and config checks
stay fast on a login node. The library's own groups are listed here; groups that live outside the
library (the Ray data pipeline, the Slurm launcher) plug in through the entry-point group
``megadiff.commands`` (pyproject.toml), so ``megadiff`` never imports them by name.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megadiff import MegadiffError, __version__
from megadiff.dist import lazy_compile
from megadiff.utils import quiet

# modules with register(subparsers), in --help order; plug-in groups (entry points) follow, by name
COMMAND_MODULES = [
    "megadiff.commands.demo",
    "megadiff.model.cli",
    "megadiff.train.cli",
    "megadiff.eval.cli",
    "megadiff.tracking.cli",
    "megadiff.sweeps.cli",
    "megadiff.convert.cli",
    "megadiff.checkpoint.cli",
    "megadiff.commands.doctor",
]
PLUGIN_GROUP = "megadiff.commands"


def _registrars():
    for mod in COMMAND_MODULES:
        yield importlib.import_module(mod).register
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            yield ep.load()
        except ModuleNotFoundError as e:  # a plug-in package not present in this checkout
            if e.name != ep.value.split(":")[0]:
                raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megadiff",
        description="Distributed pretraining of masked-diffusion language models on megatron-core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `megadiff COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"megadiff {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show every warning of megatron/torch/Ray, also the known-harmless ones filtered by "
                        "default (megadiff/utils/quiet.py; MEGADIFF_VERBOSE=1 does the same)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for register in _registrars():
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet.install(force_verbose=args.verbose)
    lazy_compile.install()  # megatron's jit_fuser compiles at first call, not at import (start-up)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except MegadiffError as e:
        print(f"megadiff: error: {e}", file=sys.stderr)
        return e.exit_code  # EXIT_BAD_INPUT unless the error names another documented code
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __name__ == "__main__":
    sys.exit(main())
