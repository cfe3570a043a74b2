"""The pipeline's Ray tasks (pure functions of their arguments and input files; each writes its
outputs atomically and ends with its record): scan a partition, group a dedup bucket, cluster,
pack a partition into shards. See data_pipelines/pipeline.py for the driver."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from data_pipelines import dedup
from data_pipelines.filters import apply_filters, build_filters
from data_pipelines.records import record_path, write_record
from data_pipelines.sources import Partition, normalize, read_partition
from megadiff import MegadiffError
from megadiff.data.format import SPLITS, docs_bytes_csr, docs_name, shard_bytes, shard_entry, shard_name
from megadiff.utils.io import atomic_write_bytes, sha256_bytes

# "x\ny" with x, y not whitespace: after that newline is always a pre-token boundary of GPT-2-style
# byte-level BPE ("\n\n" is one pre-token at the end of a string but two before a letter, so no cut there)
_CUT = re.compile(r"(?<=\S)\n(?=\S)")
CHUNK_CHARS = 4096
ENCODE_BATCH_CHARS = 1 << 20  # text per encode_batch call (bounds a task's memory)


# ----------------------------------------------------------------------------- scan, bucket, cluster

_TOK_CACHE: dict[str, Any] = {}


def _tokenizer(tok: bytes | list[Any], tok_sha: str | None = None) -> tuple[Any, bool]:
    """The worker's tokenizer, built once per process. ``tok`` is the tokenizer.json bytes or
    ``[ObjectRef]`` (fetched only on a cache miss, so each task does not copy the file)."""
    key = tok_sha or sha256_bytes(tok)  # type: ignore[arg-type]
    if key not in _TOK_CACHE:
        from tokenizers import Tokenizer

        if isinstance(tok, list):
            import ray

            tok = ray.get(tok[0])
        t = Tokenizer.from_str(tok.decode("utf-8"))
        t.encode_special_tokens = True
        spec = json.loads(tok)
        pre = spec.get("pre_tokenizer") or {}
        chunkable = spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
        _TOK_CACHE.clear()
        _TOK_CACHE[key] = (t, chunkable)
    return _TOK_CACHE[key]


def _chunks(text: str) -> list[str]:
    """Cut a long document after single newlines between non-space characters into ~CHUNK_CHARS pieces.

    Such a position is a pre-token boundary of byte-level BPE, so encoding the pieces and
    concatenating gives the ids of the whole text (encode_batch on small pieces is fastest).
    """
    if len(text) <= 2 * CHUNK_CHARS:
        return [text]
    pieces, start = [], 0
    while (m := _CUT.search(text, start + CHUNK_CHARS)) is not None:
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


def _keyed_unit(seed: int, tag: bytes, digest: bytes) -> float:
    h = hashlib.blake2b(digest, digest_size=8, key=seed.to_bytes(8, "little") + tag)
    return int.from_bytes(h.digest(), "little") / 2.0**64


class _Encoder:
    """Batches documents into encode_batch_fast calls of ~ENCODE_BATCH_CHARS; collects ids and lengths."""

    def __init__(self, tok: Any, chunkable: bool, dtype: str):
        self.tok, self.chunkable, self.dtype = tok, chunkable, dtype
        self.pieces: list[str] = []
        self.owner: list[int] = []
        self.chars = 0
        self.n_docs = 0
        self.ids: list[np.ndarray] = []
        self.lengths: list[int] = []

    def add(self, text: str) -> None:
        parts = _chunks(text) if self.chunkable else [text]
        self.pieces.extend(parts)
        self.owner.extend([self.n_docs] * len(parts))
        self.lengths.append(0)
        self.n_docs += 1
        self.chars += len(text)
        if self.chars >= ENCODE_BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.pieces:
            return
        for d, e in zip(self.owner, self.tok.encode_batch_fast(self.pieces, add_special_tokens=False)):
            self.lengths[d] += len(e.ids)
            self.ids.append(np.asarray(e.ids, dtype=self.dtype))
        self.pieces, self.owner, self.chars = [], [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        toks = np.concatenate(self.ids) if self.ids else np.zeros(0, self.dtype)
        return toks, np.asarray(self.lengths, dtype=np.int64)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _named(docs: Iterator[str], i: int) -> Iterator[str]:
    """Prefix read errors with the partition's number."""
    try:
        yield from docs
    except MegadiffError as e:
        raise MegadiffError(f"partition {i}: {e}") from None


def scan_partition(i: int, part: dict[str, Any], src: dict[str, Any], params: dict[str, Any],
                   tok_json: bytes | list[Any], tok_sha: str, work: str, fingerprint: str) -> dict[str, Any]:
    """Stage 1 for partition ``i``: documents -> tokens + split/repeat decisions + dedup keys (files)."""
    p = Partition(**part)
    tok, chunkable = _tokenizer(tok_json, tok_sha)
    filters = build_filters(params["filters"], params["min_chars"], params["max_chars"])
    near = params["near_dedup"]
    hasher = dedup.MinHasher(near["ngram"], near["bands"], near["rows"], params["seed"]) if near["enabled"] else None
    enc = _Encoder(tok, chunkable, params["dtype"])
    seed, weight, n_buckets = int(params["seed"]), float(src["weight"]), int(params["n_buckets"])
    valid, copies, keys = [], [], []
    filtered = {name: 0 for name, _ in filters}
    docs_in = chars = 0
    for raw in _named(read_partition(p, src["text_field"], src["doc_split"]), i):
        docs_in += 1
        text, dropped_by = apply_filters(filters, normalize(raw))
        if text is None:
            filtered[dropped_by] += 1
            continue
        chars += len(text)
        digest = dedup.content_digest(text)
        keys += dedup.doc_keys(enc.n_docs, digest, hasher.band_keys(text) if hasher else None, n_buckets)
        valid.append(_keyed_unit(seed, b"valid", digest) < params["valid_fraction"])
        copies.append(int(weight) + (_keyed_unit(seed, b"weight", digest) < weight - int(weight)))
        enc.add(text)
    if docs_in == 0 and p.stop < 0:
        raise MegadiffError(f"{p.label()}: no documents in this file (partition {i}); remove it from "
                            f"data.sources[{p.source}].paths or fix it")
    tokens, lengths = enc.result()
    wd = Path(work)
    tok_file, key_file = wd / f"tokens-{i:06d}.npz", wd / f"keys-{i:06d}.npy"
    atomic_write_bytes(tok_file, _npz_bytes(tokens=tokens, lengths=lengths, valid=np.asarray(valid, dtype=bool),
                                            copies=np.asarray(copies, dtype=np.int64)))
    atomic_write_bytes(key_file, _npy_bytes(dedup.sort_keys(keys)))
    stats = {"docs_in": docs_in, "filtered": filtered, "kept": enc.n_docs, "chars": chars}
    return write_record(record_path(wd, "scan", i), fingerprint, {"tokens": tok_file, "keys": key_file}, stats=stats)


def dedup_bucket(b: int, key_files: list[str], work: str, fingerprint: str) -> dict[str, Any]:
    """Stage 2: bucket ``b`` of every partition's keys -> exact drops and near-duplicate edges."""
    res = dedup.group_bucket(key_files, b)
    out = Path(work) / f"bucket-{b:06d}.npz"
    atomic_write_bytes(out, _npz_bytes(**res))
    return write_record(record_path(Path(work), "bucket", b), fingerprint, {"bucket": out})


def cluster_stage(bucket_files: list[str], work: str, fingerprint: str) -> dict[str, Any]:
    """Stage 3: near-duplicate clusters over all buckets -> the drop list, sorted by (partition, doc)."""
    drops, stats = dedup.cluster(bucket_files)
    out = Path(work) / "drops.npy"
    atomic_write_bytes(out, _npy_bytes(drops))
    return write_record(record_path(Path(work), "cluster", 0), fingerprint, {"drops": out}, stats=stats)


# ----------------------------------------------------------------------------- pack


class Packer:
    """Concatenate-and-chunk documents into [seq_len] samples; hands each full shard to
    ``emit(samples, pad, (indptr, starts))`` where ``starts[indptr[j]:indptr[j + 1]]`` are the positions in
    sample j where a segment (a document, or the padding tail) begins, 0 always included."""

    def __init__(self, seq_len: int, per_shard: int, dtype: str, pad_id: int, emit: Callable[..., None]):
        self.seq_len, self.per_shard, self.dtype, self.pad_id, self.emit = seq_len, per_shard, dtype, pad_id, emit
        self.buf: list[np.ndarray] = []
        self.n = 0
        self.starts: list[int] = []  # document starts, relative to the buffer

    def add(self, tokens: np.ndarray) -> None:
        self.starts.append(self.n)
        self.buf.append(tokens)
        self.n += len(tokens)
        cap = self.seq_len * self.per_shard
        if self.n >= cap:
            flat = np.concatenate(self.buf)
            while len(flat) >= cap:
                self._emit(flat[:cap], 0)
                flat = flat[cap:]
            self.buf, self.n = [flat], len(flat)

    def finish(self) -> None:
        if self.n == 0:
            return
        flat = np.concatenate(self.buf)
        pad = (-len(flat)) % self.seq_len
        if pad:
            self.starts.append(len(flat))
        self._emit(np.concatenate([flat, np.full(pad, self.pad_id, dtype=self.dtype)]), pad)
        self.buf, self.n = [], 0

    def _emit(self, flat: np.ndarray, pad: int) -> None:
        L, n = self.seq_len, len(flat)
        st = np.asarray([x for x in self.starts if x < n], dtype=np.int64)
        self.starts = [x - n for x in self.starts if x >= n]
        pos = np.unique(np.concatenate([np.arange(n // L, dtype=np.int64) * L, st]))  # each sample's 0 too
        sample = pos // L
        indptr = np.searchsorted(sample, np.arange(n // L + 1))  # sample j's starts: pos[indptr[j]:indptr[j + 1]]
        self.emit(flat.reshape(-1, L), pad, (indptr, pos - sample * L))


@dataclass
class SplitStats:
    shards: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    pad_tokens: int = 0
    documents: int = 0


def pack_partition(i: int, params: dict[str, Any], out: str, work: str, drops_file: str, scan_stats: dict[str, Any],
                   fingerprint: str) -> dict[str, Any]:
    """Stage 4 for partition ``i``: drop duplicates, EOS, pack, write the partition's shards."""
    od, wd = Path(out), Path(work)
    with np.load(wd / f"tokens-{i:06d}.npz") as z:
        tokens, lengths, valid, copies = z["tokens"], z["lengths"], z["valid"], z["copies"]
    drops = dedup.partition_drops(drops_file, i)
    dtype, eos = params["dtype"], np.asarray([params["eos"]], dtype=params["dtype"])
    splits = {s: SplitStats() for s in SPLITS}
    files: dict[str, Path] = {}

    def writer(split: str) -> Callable[..., None]:
        def emit(samples: np.ndarray, pad: int, starts: tuple[np.ndarray, np.ndarray]) -> None:
            st = splits[split]
            name = shard_name(split, len(st.shards), i)
            data = shard_bytes(name, np.ascontiguousarray(samples, dtype=dtype))
            docs = docs_bytes_csr(*starts)
            atomic_write_bytes(od / docs_name(name), docs)
            atomic_write_bytes(od / name, data)
            files[name], files[docs_name(name)] = od / name, od / docs_name(name)
            st.shards.append(shard_entry(name, data, int(samples.shape[0]), int(samples.size - pad), docs))
            st.samples += int(samples.shape[0])
            st.tokens += int(samples.size - pad)
            st.pad_tokens += pad

        return emit

    packers = {s: Packer(params["seq_len"], params["samples_per_shard"], dtype, params["pad"], writer(s)) for s in SPLITS}
    stats = {"dedup_exact": 0, "dedup_near": 0, "docs_out": 0, "valid_docs": 0, "repeats": 0, "tokens": 0}
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    held: list[tuple[np.ndarray, int]] = []
    for d in range(len(lengths)):
        reason = drops.get(d)
        if reason is not None:
            stats["dedup_exact" if reason == dedup.EXACT else "dedup_near"] += 1
            continue
        toks = np.concatenate([tokens[bounds[d] : bounds[d + 1]], eos])
        stats["docs_out"] += 1
        stats["tokens"] += len(toks)
        if valid[d]:
            stats["valid_docs"] += 1
            splits["valid"].documents += 1
            packers["valid"].add(toks)
            continue
        if copies[d] >= 1:
            splits["train"].documents += 1
            packers["train"].add(toks)
        if copies[d] > 1:
            held.append((toks, int(copies[d])))
    for rep in range(1, max((c for _, c in held), default=1)):
        for toks, c in held:
            if c > rep:
                packers["train"].add(toks)
                stats["repeats"] += 1
    for p in packers.values():
        p.finish()
    body = {"stats": {**scan_stats, **stats},
            "splits": {s: {"samples": v.samples, "tokens": v.tokens, "pad_tokens": v.pad_tokens,
                           "documents": v.documents, "shards": v.shards} for s, v in splits.items()}}
    return write_record(record_path(wd, "pack", i), fingerprint, files, **body)
