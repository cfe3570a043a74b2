"""A run directory created by a training launch that fails during set-up is removed again.

A typo in a data path or a vocab mismatch is found after the trainer has created ``trainer.run_dir``;
without this the user is left with an empty (or MLflow-only) directory that later looks like a run.
Only a directory that did not exist before this launch is removed, and only by rank 0.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def remove_if_setup_fails(run_dir: str | os.PathLike) -> Iterator[None]:
    path = Path(run_dir)
    created_here = not path.exists() and os.environ.get("RANK", "0") == "0"
    try:
        yield
    except BaseException:
        if created_here and path.exists() and not (path / "checkpoints").exists():
            shutil.rmtree(path, ignore_errors=True)
        raise
