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
from pathlib import Path

from megadiff.utils.io import atomic_write_json

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
