"""The on-disk shard format: the only contract between `data_pipelines/` (Ray) and the loader.

A dataset directory holds ``manifest.json``, a copy of the tokenizer (``tokenizer-<sha8>.json``)
and webdataset-compatible tar shards ``<split>-<NNNNNN>.tar``. Each tar member is one packed
sample ``<split>-<NNNNNN>-<MMMMMM>.npy``: a 1-D token array of ``seq_len`` entries (uint16 when
the vocab has < 65536 entries, else uint32). Tar members carry fixed metadata (mtime 0, uid/gid
0, mode 0644, USTAR), so the same samples give the same bytes. See docs/data_format.md.

stdlib + numpy only (no torch, no ray): importable anywhere.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megadiff import MegadiffError
from megadiff.utils.io import sha256_file

FORMAT_NAME = "megadiff-shards"
FORMAT_VERSION = 2  # 2: shard entries may name a document-starts file (``docs``); 1 is still read
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "valid")
REGEN_HINT = "re-run `megadiff data tokenize` with the same config to rewrite it"


@dataclass(frozen=True)
class ManifestInfo:
    """What a consumer needs to know about a dataset directory (Contract 1)."""

    vocab_size: int
    mask_id: int
    pad_id: int
    eos_id: int
    bos_id: int
    seq_len: int
    dtype: str
    tokenizer_path: str
    tokenizer_sha256: str


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size < 65536 else "uint32"


def shard_name(split: str, index: int, partition: int | None = None) -> str:
    """``<split>-<index:06d>.tar``, or ``<split>-<partition:06d>-<index:04d>.tar`` for the shards the
    pipeline's partition ``partition`` writes (each partition numbers its own shards from 0)."""
    if partition is None:
        return f"{split}-{index:06d}.tar"
    return f"{split}-{partition:06d}-{index:04d}.tar"


def sample_key(shard_file: str, j: int) -> str:
    """webdataset key of sample j in a shard: the shard's stem + ``-<j:06d>`` (no dots: the extension
    starts at the first dot)."""
    return _key(_stem(shard_file), j)


def _stem(shard_file: str | os.PathLike) -> str:
    return Path(shard_file).name.removesuffix(".tar")


def _key(stem: str, j: int) -> str:
    return f"{stem}-{j:06d}"


def _member_names(shard_file: str | os.PathLike, n: int) -> list[bytes]:
    """Tar member names ``<sample_key>.npy`` of the first ``n`` samples of a shard."""
    stem = _stem(shard_file)
    return [f"{_key(stem, j)}.npy".encode() for j in range(n)]


def _member_name_array(shard_file: str | os.PathLike, n: int) -> np.ndarray:
    """``_member_names`` as a [n, longest] uint8 array, NUL-padded like a tar header's name field; the
    sample numbers' six digits are written with numpy (one name at a time only past 10**6 samples)."""
    first = _member_names(shard_file, 1)[0]
    prefix, tail = first[:-10], first[-4:]
    if n > 10**6 or first != prefix + b"000000" + tail:
        names = _member_names(shard_file, n)
        out = np.zeros((n, max(map(len, names), default=0)), np.uint8)
        for j, name in enumerate(names):
            out[j, : len(name)] = np.frombuffer(name, np.uint8)
        return out
    out = np.empty((n, len(first)), np.uint8)
    out[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    j = np.arange(n)
    for k in range(6):
        out[:, len(prefix) + 5 - k] = 48 + (j // 10**k) % 10
    out[:, -len(tail) :] = np.frombuffer(tail, np.uint8)
    return out


def npy_header(dtype: str, seq_len: int) -> bytes:
    """The exact .npy header (magic + version + dict + padding) of one sample."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(seq_len, dtype=dtype), version=(1, 0), allow_pickle=False)
    return buf.getvalue()[: -seq_len * np.dtype(dtype).itemsize]


# USTAR header of a member with the fixed metadata above (what tarfile writes for it), the name and the
# checksum left to fill in: mode 0644, uid/gid 0, mtime 0, regular file, empty uname/gname, magic "ustar\0" "00",
# device numbers empty
_BLOCK, _RECORD = 512, 20 * 512  # tarfile's BLOCKSIZE and RECORDSIZE (the archive is padded to a record)
_CHKSUM = slice(148, 156)


def _ustar_template(size: int) -> bytearray:
    h = bytearray(_BLOCK)
    for at, field in ((100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0"), (124, b"%011o\0" % size),
                      (136, b"00000000000\0"), (148, b" " * 8), (156, b"0"), (257, b"ustar\x0000")):
        h[at : at + len(field)] = field
    return h


def _record_bytes(size: int) -> int:
    """Bytes of one member: its header block and its payload padded to whole blocks."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def shard_bytes(shard_file: str, samples: np.ndarray) -> bytes:
    """Serialize ``samples`` [n, seq_len] (already in the token dtype) as one deterministic tar.

    Byte for byte what ``tarfile`` (USTAR, the fixed metadata above) writes for members
    ``<sample_key>.npy``, built with numpy: each record is a 512-byte header (only the name and checksum
    differ between samples) and the .npy payload padded to 512 bytes; then two zero blocks and zeros up
    to a multiple of 10240 bytes (tests/test_data_format_tar.py compares with ``tarfile``).
    """
    if samples.ndim != 2:
        raise ValueError(f"samples must be [n, seq_len], got shape {samples.shape}")
    n = samples.shape[0]
    head = np.frombuffer(npy_header(samples.dtype.name, samples.shape[1]), np.uint8)
    body = np.ascontiguousarray(samples).view(np.uint8).reshape(n, -1)
    size = len(head) + body.shape[1]
    rec = _record_bytes(size)
    end = n * rec + 2 * _BLOCK
    out = np.zeros(end + (-end) % _RECORD, np.uint8)
    recs = out[: n * rec].reshape(n, rec)
    template = _ustar_template(size)
    recs[:, :_BLOCK] = np.frombuffer(bytes(template), np.uint8)
    recs[:, _BLOCK : _BLOCK + len(head)] = head
    recs[:, _BLOCK + len(head) : _BLOCK + size] = body
    names = _member_name_array(shard_file, n)
    if names.shape[1] > 100:
        raise ValueError(f"sample name {bytes(names[0])!r} is longer than USTAR's 100 bytes; "
                         "use a shorter shard name")
    recs[:, : names.shape[1]] = names
    chk = sum(template) + names.sum(axis=1, dtype=np.int64)  # < 8**6: 512 bytes of at most 255
    for k in range(6):  # "%06o\0 ": six octal digits, NUL, space
        recs[:, _CHKSUM.start + 5 - k] = 48 + ((chk >> (3 * k)) & 7)
    recs[:, _CHKSUM.start + 6 : _CHKSUM.stop] = np.frombuffer(b"\0 ", np.uint8)
    return out.tobytes()


def docs_name(shard_file: str) -> str:
    """The document-starts file of a shard: ``<stem>.docs.npy`` beside it (not a tar member)."""
    return f"{_stem(shard_file)}.docs.npy"


def docs_bytes(starts: list[np.ndarray]) -> bytes:
    """Serialize per-sample document starts as one int32 .npy: ``[indptr (n+1), starts...]``.

    ``starts[j]``: sorted positions in sample j where a segment begins, always including 0 (the first
    segment may continue a document of the previous sample); a padding tail is a segment of its own.
    """
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in starts])])
    return docs_bytes_csr(indptr, np.concatenate([np.asarray(s, dtype=np.int32) for s in starts] or [np.zeros(0)]))


def docs_bytes_csr(indptr: np.ndarray, positions: np.ndarray) -> bytes:
    """``docs_bytes`` from the starts in compressed form: sample j's are ``positions[indptr[j]:indptr[j + 1]]``."""
    arr = np.concatenate([np.asarray(indptr, np.int32), np.asarray(positions, np.int32)])
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def read_docs(path: str | os.PathLike, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr [samples+1], starts) from a document-starts file; MegadiffError if it does not fit."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MegadiffError(f"{path}: unreadable document-starts file ({e}); {REGEN_HINT}") from None
    indptr = arr[: samples + 1].astype(np.int64)
    if arr.ndim != 1 or len(indptr) != samples + 1 or indptr[-1] != len(arr) - samples - 1:
        raise MegadiffError(f"{path}: document-starts file does not match its shard ({samples} samples); {REGEN_HINT}")
    return indptr, arr[samples + 1 :].astype(np.int64)


def segment_ids(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Document index within the sample (0-based) of every position, from the segment starts."""
    mark = np.zeros(seq_len, dtype=np.int64)
    mark[starts[starts > 0]] = 1
    return np.cumsum(mark)


# ----------------------------------------------------------------------------- manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<dir>/manifest.json``; raise MegadiffError naming the file and the fix."""
    d = Path(path)
    mf = d / MANIFEST_NAME if d.is_dir() or not str(d).endswith(".json") else d
    if not mf.is_file():
        if d.is_dir() and any(d.glob("*.tar")):
            raise MegadiffError(
                f"{mf} not found but {d} holds shards: the pipeline did not finish (the manifest is written "
                f"last); {REGEN_HINT} (existing complete shards are kept)"
            )
        raise MegadiffError(f"{mf} not found; build the dataset with `megadiff data tokenize CONFIG data.out_dir={d}`")
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegadiffError(f"{mf} is not valid JSON ({e}); {REGEN_HINT}") from None
    validate_manifest(m, mf)
    return m


def validate_manifest(m: Any, where: str | os.PathLike) -> None:
    """Check the manifest's schema: required keys, types, version, per-split shard entries."""

    def need(obj: Any, key: str, typ: type | tuple[type, ...], ctx: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise MegadiffError(f"{where}: missing key {ctx}{key!r}; {REGEN_HINT}")
        if not isinstance(obj[key], typ) or isinstance(obj[key], bool) and typ is not bool:
            raise MegadiffError(f"{where}: key {ctx}{key!r} has type {type(obj[key]).__name__}; {REGEN_HINT}")
        return obj[key]

    if need(m, "format", str, "") != FORMAT_NAME:
        raise MegadiffError(f"{where}: not a megadiff manifest (format={m.get('format')!r})")
    version = need(m, "version", int, "")
    if version not in READ_VERSIONS:
        raise MegadiffError(
            f"{where}: format version {version} is not supported by this megadiff (reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}); {REGEN_HINT} or use the megadiff release that wrote it"
        )
    tok = need(m, "tokenizer", dict, "")
    need(tok, "file", str, "tokenizer.")
    need(tok, "sha256", str, "tokenizer.")
    vocab = need(m, "vocab_size", int, "")
    ids = need(m, "special_ids", dict, "")
    for k in ("mask", "pad", "eos", "bos"):
        v = need(ids, k, int, "special_ids.")
        if not 0 <= v < vocab:
            raise MegadiffError(f"{where}: special_ids.{k}={v} is outside the vocab [0, {vocab})")
    if need(m, "seq_len", int, "") <= 0:
        raise MegadiffError(f"{where}: seq_len must be positive")
    if need(m, "dtype", str, "") != token_dtype(vocab):
        raise MegadiffError(f"{where}: dtype {m['dtype']!r} does not match vocab_size {vocab}")
    splits = need(m, "splits", dict, "")
    for name, sp in splits.items():
        for i, sh in enumerate(need(sp, "shards", list, f"splits.{name}.")):
            for k, t in (("file", str), ("samples", int), ("tokens", int), ("bytes", int), ("sha256", str)):
                need(sh, k, t, f"splits.{name}.shards[{i}].")
            if "docs" in sh:
                for k, t in (("file", str), ("bytes", int), ("sha256", str)):
                    need(sh["docs"], k, t, f"splits.{name}.shards[{i}].docs.")


def manifest_info(m: dict[str, Any], directory: str | os.PathLike) -> ManifestInfo:
    ids = m["special_ids"]
    return ManifestInfo(
        vocab_size=m["vocab_size"],
        mask_id=ids["mask"],
        pad_id=ids["pad"],
        eos_id=ids["eos"],
        bos_id=ids["bos"],
        seq_len=m["seq_len"],
        dtype=m["dtype"],
        tokenizer_path=str(Path(directory) / m["tokenizer"]["file"]),
        tokenizer_sha256=m["tokenizer"]["sha256"],
    )


def check_compat(
    info: ManifestInfo,
    vocab_size: int | None = None,
    mask_id: int | None = None,
    tokenizer_sha256: str | None = None,
) -> None:
    """Fail with a MegadiffError naming the file and the fix if the data does not fit the model.

    ``vocab_size``: the model's real vocab (incl. [MASK]); ``mask_id``: the id the diffusion uses;
    ``tokenizer_sha256``: the tokenizer the model was trained with (e.g. from a checkpoint).
    """
    where = Path(info.tokenizer_path).parent / MANIFEST_NAME
    if vocab_size is not None and vocab_size != info.vocab_size:
        raise MegadiffError(
            f"{where}: the data was tokenized with a vocab of {info.vocab_size} ({info.tokenizer_path}) but the "
            f"model has vocab_size={vocab_size}; set model.vocab_size={info.vocab_size} (or null to read it from "
            f"the manifest), or re-tokenize the data with the model's tokenizer"
        )
    if mask_id is not None and mask_id != info.mask_id:
        raise MegadiffError(
            f"{where}: the data's [MASK] id is {info.mask_id} ({info.tokenizer_path}) but the model uses "
            f"mask_id={mask_id}; take the mask id from the manifest, or re-tokenize with the model's tokenizer"
        )
    if tokenizer_sha256 is not None and tokenizer_sha256 != info.tokenizer_sha256:
        raise MegadiffError(
            f"{where}: tokenizer {info.tokenizer_path} (sha256 {info.tokenizer_sha256[:12]}...) differs from the "
            f"model's tokenizer (sha256 {tokenizer_sha256[:12]}...); re-tokenize the data with the model's "
            f"tokenizer (data.tokenizer.kind=file data.tokenizer.path=...)"
        )


def check_shard(directory: str | os.PathLike, entry: dict[str, Any], checksum: bool = True) -> str | None:
    """The one shard check: ``entry`` (a manifest shard entry) against its file -> None or the problem."""
    f = Path(directory) / entry["file"]
    if not f.is_file():
        return f"{f}: shard missing (listed in {Path(directory) / MANIFEST_NAME})"
    if f.stat().st_size != entry["bytes"]:
        return f"{f}: {f.stat().st_size} bytes but the manifest says {entry['bytes']} (truncated or overwritten)"
    if checksum and sha256_file(f) != entry["sha256"]:
        return f"{f}: sha256 differs from {Path(directory) / MANIFEST_NAME} (corrupt or changed)"
    if "docs" in entry:
        return check_shard(directory, entry["docs"], checksum)
    return None


def check_tokenizer_copy(directory: str | os.PathLike, m: dict[str, Any], checksum: bool = True) -> str | None:
    """The one tokenizer-copy check -> None or the problem."""
    tok = Path(directory) / m["tokenizer"]["file"]
    if not tok.is_file():
        return f"{tok} (the dataset's tokenizer copy) is missing"
    if checksum and sha256_file(tok) != m["tokenizer"]["sha256"]:
        return f"{tok}: sha256 differs from {Path(directory) / MANIFEST_NAME}"
    return None


def verify_dir(path: str | os.PathLike, splits: tuple[str, ...] | None = None) -> list[str]:
    """Check every shard (exists, size, sha256) and the tokenizer copy; return the problems found."""
    d = Path(path)
    m = read_manifest(d)
    problems = [p for p in [check_tokenizer_copy(d, m)] if p]
    for name, sp in m["splits"].items():
        if not splits or name in splits:
            problems += [p for p in (check_shard(d, sh) for sh in sp["shards"]) if p]
    return problems


def index_shard(path: str | os.PathLike, expected: int) -> np.ndarray:
    """Offsets of the .npy payloads of a shard's samples, in member order.

    Members whose header is unreadable or whose name is not the expected key get offset -1
    (a truncated or corrupt tail gives -1 for every sample after the damage). A shard laid out as
    shard_bytes writes it is checked in place with numpy (every header's name, size, type and checksum);
    anything else is read member by member with ``tarfile``.
    """
    fast = _index_fixed_layout(path, expected)
    return fast if fast is not None else _index_tarfile(path, expected)


def _index_fixed_layout(path: str | os.PathLike, expected: int) -> np.ndarray | None:
    """The offsets if all ``expected`` members are the same size, back to back, with the exact headers
    shard_bytes writes (checksums verified); None otherwise (the caller falls back to tarfile)."""
    try:
        with open(path, "rb") as f:
            first = f.read(_BLOCK)
            size = int(first[124:135], 8)
            rec = _record_bytes(size)
            f.seek(0)
            raw = np.fromfile(f, np.uint8, count=expected * rec)
    except (OSError, ValueError):
        return None
    if expected == 0 or len(raw) < expected * rec:
        return None
    heads = raw.reshape(expected, rec)[:, :_BLOCK]
    names = _member_name_array(path, expected)
    if names.shape[1] > 100:  # a name over 100 bytes: not what shard_bytes writes
        return None
    template = np.frombuffer(bytes(_ustar_template(size)), np.uint8)
    digits = heads[:, 148:154].astype(np.int64) - ord("0")
    stored = digits @ (8 ** np.arange(5, -1, -1))
    computed = heads.sum(axis=1, dtype=np.int64) - heads[:, _CHKSUM].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    ok = (np.array_equal(heads[:, : names.shape[1]], names) and not heads[:, names.shape[1] : 100].any()
          and np.array_equal(heads[:, 100:148], np.broadcast_to(template[100:148], (expected, 48)))
          and np.array_equal(heads[:, 156:], np.broadcast_to(template[156:], (expected, _BLOCK - 156)))
          and bool(((digits >= 0) & (digits < 8)).all()) and np.array_equal(stored, computed)
          and bool((heads[:, 154] == 0).all()) and bool((heads[:, 155] == ord(" ")).all()))
    return np.arange(expected, dtype=np.int64) * rec + _BLOCK if ok else None


def _index_tarfile(path: str | os.PathLike, expected: int) -> np.ndarray:
    offsets = np.full(expected, -1, dtype=np.int64)
    names = _member_names(path, expected)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for j, ti in enumerate(tar):
                if j >= expected:
                    break
                if ti.name.encode() == names[j] and ti.isfile():
                    offsets[j] = ti.offset_data
    except (tarfile.TarError, EOFError, OSError):
        pass  # the samples indexed so far stay usable; the rest are -1
    return offsets


def describe(path: str | os.PathLike) -> str:
    """A human-readable summary of a dataset directory's manifest."""
    m = read_manifest(path)
    ids = m["special_ids"]
    lines = [
        f"dataset {path}  (format {m['format']} v{m['version']})",
        f"tokenizer {m['tokenizer']['file']} ({m['tokenizer'].get('kind', '?')}, sha256 {m['tokenizer']['sha256'][:16]}...)",
        f"vocab_size {m['vocab_size']:,}  seq_len {m['seq_len']}  dtype {m['dtype']}  "
        f"special ids: mask {ids['mask']} pad {ids['pad']} eos {ids['eos']} bos {ids['bos']}",
        f"{'split':<8}{'shards':>8}{'samples':>12}{'tokens':>14}{'pad':>8}{'docs':>8}",
    ]
    for name, sp in m["splits"].items():
        lines.append(f"{name:<8}{len(sp['shards']):>8,}{sp.get('samples', 0):>12,}{sp.get('tokens', 0):>14,}"
                     f"{sp.get('pad_tokens', 0):>8,}{sp.get('documents', 0):>8,}")
    src = m.get("sources", {})
    if src:
        lines.append(f"{'source':<16}{'docs_in':>9}{'filtered':>9}{'dedup':>7}{'near':>6}{'docs_out':>9}{'tokens':>13}")
        for name, st in src.items():
            filtered = sum(st["filtered"].values()) if "filtered" in st else st["filtered_short"] + st["filtered_long"]
            lines.append(f"{name:<16}{st['docs_in']:>9,}{filtered:>9,}{st.get('dedup_exact', st.get('dedup', 0)):>7,}"
                         f"{st.get('dedup_near', 0):>6,}{st['docs_out']:>9,}{st['tokens']:>13,}")
    return "\n".join(lines)


def write_dataset(
    out_dir: str | os.PathLike,
    samples: dict[str, np.ndarray],
    tokenizer_json: bytes,
    special_ids: dict[str, int],
    vocab_size: int,
    samples_per_shard: int = 1024,
    config: dict[str, Any] | None = None,
    starts: dict[str, list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Write a dataset directory from already packed samples ({split: [n, seq_len]}); returns the manifest.

    ``starts`` ({split: per-sample document starts, see docs_bytes}) also writes the document-starts
    files, so the loader's micro batches carry ``segment_ids``.

    The Ray pipeline streams its shards itself; this helper makes small datasets for tests and tools
    (same layout, same bytes for the same samples).
    """
    from megadiff.utils.io import atomic_write_bytes, sha256_bytes

    out = Path(out_dir)
    dtype = token_dtype(vocab_size)
    seq_lens = {a.shape[1] for a in samples.values()}
    if len(seq_lens) != 1:
        raise ValueError(f"all splits need one seq_len, got {sorted(seq_lens)}")
    tok_file = f"tokenizer-{sha256_bytes(tokenizer_json)[:8]}.json"
    atomic_write_bytes(out / tok_file, tokenizer_json)
    splits: dict[str, Any] = {}
    for split, arr in samples.items():
        arr = np.asarray(arr)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"split {split}: token ids outside [0, {vocab_size})")
        shards = []
        for k, a in enumerate(range(0, len(arr), samples_per_shard)):
            chunk = arr[a : a + samples_per_shard].astype(dtype)
            name = shard_name(split, k)
            data = shard_bytes(name, chunk)
            docs = docs_bytes(starts[split][a : a + samples_per_shard]) if starts and split in starts else None
            if docs is not None:
                atomic_write_bytes(out / docs_name(name), docs)
            atomic_write_bytes(out / name, data)
            shards.append(shard_entry(name, data, len(chunk), int(chunk.size), docs))
        splits[split] = {"samples": len(arr), "tokens": int(arr.size), "pad_tokens": 0, "documents": 0,
                         "shards": shards}
    manifest = build_manifest({"file": tok_file, "sha256": sha256_bytes(tokenizer_json), "kind": "file"},
                              vocab_size, special_ids, seq_lens.pop(), splits, {}, config or {})
    write_manifest(out, manifest)
    return manifest


def shard_entry(name: str, data: bytes, samples: int, tokens: int, docs: bytes | None = None) -> dict[str, Any]:
    """A manifest shard entry for the serialized shard ``data`` written as ``name`` (and its
    document-starts file ``docs``, written as ``docs_name(name)``)."""
    from megadiff.utils.io import sha256_bytes

    entry: dict[str, Any] = {"file": name, "samples": samples, "tokens": tokens, "bytes": len(data),
                             "sha256": sha256_bytes(data)}
    if docs is not None:
        entry["docs"] = {"file": docs_name(name), "bytes": len(docs), "sha256": sha256_bytes(docs)}
    return entry


def build_manifest(tokenizer: dict[str, str], vocab_size: int, special_ids: dict[str, int], seq_len: int,
                   splits: dict[str, Any], sources: dict[str, Any], config: dict[str, Any],
                   **extra: Any) -> dict[str, Any]:
    """The one place a manifest is assembled (the pipeline and write_dataset both call it)."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": dict(tokenizer),
            "vocab_size": vocab_size, "special_ids": dict(special_ids), "seq_len": seq_len,
            "dtype": token_dtype(vocab_size), "splits": splits, "sources": sources, "config": config, **extra}


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Validate, then write ``<out_dir>/manifest.json`` atomically (the last file a writer writes)."""
    from megadiff.utils.io import atomic_write_json

    validate_manifest(manifest, Path(out_dir) / MANIFEST_NAME)
    atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest)
