"""What a checkpoint must contain, recorded when it is saved, so it can be verified without loading it.

Every step directory gets ``contents.json`` as the last file written before it is renamed into place::

    {"format": "megadiff-checkpoint-contents/1", "step": 280, "total_bytes": 8074321,
     "files": {"__0_0.distcp": 4012345, "__0_1.distcp": 4012345, ".metadata": 40210,
               "common.pt": 1460, "metadata.json": 96, "config.yaml": 2312, "megadiff.json": 830}}

:func:`verify_step_dir` checks that every listed file is there, readable and of the recorded size.
It reads no tensor and imports no torch, so ``megadiff checkpoint verify`` and the resume-time check
cost milliseconds even for a 70B checkpoint. A checkpoint saved before this file existed is checked
for the files every megatron ``torch_dist`` checkpoint has (``megadiff.json``, ``metadata.json``,
``.metadata``, ``common.pt``, at least one ``.distcp``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from megadiff import MegadiffError
from megadiff.utils.io import atomic_write_json

STEP_RE = re.compile(r"^step_(\d{6,})$")

CONTENTS = "contents.json"
FORMAT = "megadiff-checkpoint-contents/1"
REQUIRED_LEGACY = ("megadiff.json", "metadata.json", ".metadata", "common.pt")


def list_files(step_dir: Path) -> dict[str, int]:
    """Every file under ``step_dir`` (relative POSIX path -> size in bytes), ``contents.json`` excluded."""
    out: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(step_dir):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(step_dir).as_posix()
            if rel != CONTENTS and not name.endswith(".tmp"):
                out[rel] = p.stat().st_size
    return dict(sorted(out.items()))


def write_contents(step_dir: Path, step: int) -> dict:
    files = list_files(step_dir)
    doc = {"format": FORMAT, "step": step, "total_bytes": sum(files.values()), "files": files}
    atomic_write_json(step_dir / CONTENTS, doc)
    return doc


def read_contents(step_dir: Path) -> dict | None:
    p = step_dir / CONTENTS
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def checkpoint_bytes(step_dir: Path) -> int | None:
    """Recorded size of a checkpoint (None when it records none)."""
    doc = read_contents(step_dir)
    return int(doc["total_bytes"]) if doc else None


def _readable(p: Path) -> str | None:
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"{p} is unreadable ({e.strerror or e})"
    return None


def verify_step_dir(step_dir: Path) -> list[str]:
    """Problems found in one step directory (empty: it verifies). Each names the file concerned."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir} does not exist"]
    if (step_dir / CONTENTS).exists() and read_contents(step_dir) is None:
        return [f"{step_dir / CONTENTS} is unreadable or not a megadiff contents record"]
    doc = read_contents(step_dir)
    problems: list[str] = []
    if doc is None:  # saved before contents.json existed
        problems += [f"{step_dir / name} is missing" for name in REQUIRED_LEGACY if not (step_dir / name).exists()]
        if not any(step_dir.glob("*.distcp")):
            problems.append(f"{step_dir} holds no .distcp shard file")
        return problems + [m for p in step_dir.iterdir() if p.is_file() and (m := _readable(p))]
    for rel, size in doc["files"].items():
        p = step_dir / rel
        if not p.exists():
            problems.append(f"{p} is missing")
            continue
        actual = p.stat().st_size
        if actual != size:
            problems.append(f"{p} has {actual:,} bytes, {size:,} were written")
            continue
        msg = _readable(p)
        if msg:
            problems.append(msg)
    return problems


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class RunCheckpoints:
    """The checkpoints of one run directory, found and verified without torch (``run_dir/checkpoints``)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir) / "checkpoints"

    def latest_name(self) -> Optional[str]:
        """The step directory ``latest`` points at (None: no pointer)."""
        p = self.root / "latest"
        if not p.exists():
            return None
        name = p.read_text().strip()
        if not STEP_RE.match(name):
            raise MegadiffError(f"checkpoint pointer {p} is corrupt (holds {name!r}); delete it to restart from "
                                f"scratch or write the name of a good step directory into it")
        return name

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(m.group(1)) for d in self.root.iterdir() if (m := STEP_RE.match(d.name)) and d.is_dir())

    def verify(self, step: int) -> list[str]:
        """Problems of one checkpoint (empty: it verifies), read without loading it."""
        return verify_step_dir(self.root / step_dir_name(step))

    def newest_valid(self, below: Optional[int] = None) -> Optional[int]:
        for s in reversed(self.steps()):
            if (below is None or s < below) and not self.verify(s):
                return s
        return None
