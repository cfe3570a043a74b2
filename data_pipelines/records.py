"""Completion records of the pipeline's tasks: a task writes its outputs atomically, then a small
JSON record naming the fingerprint of everything its output depends on and its outputs' sizes; a
record verifies when the fingerprint is the expected one and every output is there with its size."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megadiff.utils.io import atomic_write_json

WORK = ".work"  # the records' and intermediates' directory inside the output directory


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def record_path(work: Path, stage: str, i: int) -> Path:
    return work / f"{stage}-{i:06d}.json"


def write_record(path: Path, fingerprint: str, outputs: dict[str, Path], **body: Any) -> dict[str, Any]:
    """The completion marker: written last, after the outputs it names (relative to ``path``'s parent's parent)."""
    root = path.parent.parent
    rec = {"fingerprint": fingerprint, "outputs": {str(p.relative_to(root)): p.stat().st_size for p in outputs.values()},
           **body}
    atomic_write_json(path, rec)
    return rec


def read_record(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record if it exists, is for ``fingerprint`` and every output it names is there with its size."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint:
        return None
    root = path.parent.parent
    for rel, size in rec.get("outputs", {}).items():
        f = root / rel
        if not f.is_file() or f.stat().st_size != size:
            return None
    return rec
