"""Raw text -> packed, tokenized webdataset shards + manifest.json (Ray).

Stages: [Ray tasks, one per input file] read -> normalize -> filter -> hash -> tokenize;
[driver, fixed file order] exact dedup (global across sources) -> valid/train split by content
hash -> mixture repeats -> append EOS -> pack into ``seq_len`` samples -> write shards.

Determinism: the tasks are pure functions of (file, config, tokenizer); the driver consumes their
results in file order whatever order they finish in, so shards and manifest are byte-identical
for any number of workers. Resumability: every shard goes to a temp name and is renamed; a rerun
recomputes the stream, keeps every existing shard whose sha256 equals the new one and writes only
the others; the manifest is deleted at the start and written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_pipelines.sources import normalize, read_documents, resolve_paths
from data_pipelines.tokenizer import build_tokenizer, tokenizer_payload
from megadiff import MegadiffError
from megadiff.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    shard_bytes,
    shard_name,
    token_dtype,
)
from megadiff.data.tokenizer import tokenizer_file_name
from megadiff.utils.io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEEP, TOO_SHORT, TOO_LONG = 0, 1, 2
# keys of DataConfig that do not change the output (left out of the manifest's config)
_NOT_OUTPUT = ("num_workers", "out_dir", "train", "valid", "shuffle_seed", "skip_corrupt")
# "x\ny" with x, y not whitespace: after that newline is always a pre-token boundary of GPT-2-style
# byte-level BPE ("\n\n" is one pre-token at the end of a string but two before a letter, so no cut there)
_CUT = re.compile(r"(?<=\S)\n(?=\S)")
CHUNK_CHARS = 4096
NO_PROGRESS_TIMEOUT_S = float(os.environ.get("MEGADIFF_DATA_NO_PROGRESS_S", "600"))


# ----------------------------------------------------------------------------- worker side

_TOK_CACHE: dict[str, Any] = {}


def _tokenizer(tok: bytes | list[Any], tok_sha: str | None = None) -> tuple[Any, bool]:
    """The worker's tokenizer, built once per process. ``tok`` is the tokenizer.json bytes or
    ``[ObjectRef]`` (fetched only on a cache miss, so each task does not copy the file)."""
    key = tok_sha or sha256_bytes(tok)  # type: ignore[arg-type]
    if key not in _TOK_CACHE:
        import json

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


def process_file(path: str, src: dict[str, Any], params: dict[str, Any], tok_json: bytes | list[Any],
                 tok_sha: str | None = None) -> dict[str, Any]:
    """One input file -> per-document status, hash, split, repeats and token ids (a pure function)."""
    tok, chunkable = _tokenizer(tok_json, tok_sha)
    docs = read_documents(path, src["format"], src["text_field"], src["doc_split"])
    status, hashes, valid, copies, chars, keep_text = [], [], [], [], [], []
    weight, seed = float(src["weight"]), int(params["seed"])
    for raw in docs:
        text = normalize(raw)
        chars.append(len(text))
        if len(text) < params["min_chars"]:
            st = TOO_SHORT
        elif len(text) > params["max_chars"]:
            st = TOO_LONG
        else:
            st = KEEP
        status.append(st)
        if st != KEEP:
            hashes.append(b"")
            valid.append(False)
            copies.append(0)
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        hashes.append(digest)
        valid.append(_keyed_unit(seed, b"valid", digest) < params["valid_fraction"])
        copies.append(int(weight) + (_keyed_unit(seed, b"weight", digest) < weight - int(weight)))
        keep_text.append(text)
    pieces, owner = [], []
    for d, text in enumerate(keep_text):
        parts = _chunks(text) if chunkable else [text]
        pieces.extend(parts)
        owner.extend([d] * len(parts))
    encs = tok.encode_batch_fast(pieces, add_special_tokens=False) if pieces else []
    lengths = np.zeros(len(keep_text), dtype=np.int64)
    for d, e in zip(owner, encs):
        lengths[d] += len(e.ids)
    dtype = params["dtype"]
    tokens = np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encs]) if encs else np.zeros(0, dtype)
    return {
        "status": np.asarray(status, dtype=np.int8),
        "hashes": hashes,
        "valid": np.asarray(valid, dtype=bool),
        "copies": np.asarray(copies, dtype=np.int64),
        "chars": np.asarray(chars, dtype=np.int64),
        "lengths": lengths,  # per kept document
        "tokens": tokens,
    }


# ----------------------------------------------------------------------------- driver side


@dataclass
class SplitStats:
    shards: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    pad_tokens: int = 0
    documents: int = 0


class Packer:
    """Concatenate-and-chunk into [seq_len] samples; hands full shards to ``emit``."""

    def __init__(self, seq_len: int, per_shard: int, dtype: str, pad_id: int, emit: Any):
        self.seq_len, self.per_shard, self.dtype, self.pad_id, self.emit = seq_len, per_shard, dtype, pad_id, emit
        self.buf: list[np.ndarray] = []
        self.n = 0
        self.shard = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buf.append(tokens)
        self.n += len(tokens)
        cap = self.seq_len * self.per_shard
        if self.n >= cap:
            flat = np.concatenate(self.buf)
            while len(flat) >= cap:
                self._emit(flat[:cap].reshape(self.per_shard, self.seq_len), 0)
                flat = flat[cap:]
            self.buf, self.n = [flat], len(flat)

    def finish(self) -> None:
        if self.n == 0:
            return
        flat = np.concatenate(self.buf)
        pad = (-len(flat)) % self.seq_len
        flat = np.concatenate([flat, np.full(pad, self.pad_id, dtype=self.dtype)])
        self._emit(flat.reshape(-1, self.seq_len), pad)
        self.buf, self.n = [], 0

    def _emit(self, samples: np.ndarray, pad: int) -> None:
        self.emit(self.shard, np.ascontiguousarray(samples, dtype=self.dtype), pad)
        self.shard += 1


@dataclass
class PipelineResult:
    out_dir: Path
    manifest: dict[str, Any]
    written: int  # shards written by this run
    reused: int  # complete shards found from an earlier (interrupted) run and kept
    seconds: float
    docs: int
    tokens: int


@contextlib.contextmanager
def ray_session(num_workers: int) -> Iterator[None]:
    """Use the caller's Ray if it is up; else start a small private one and shut it down after."""
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):  # a cluster started for us (megadiff slurm data-pipeline): join it
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING", log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = os.environ.get("MEGADIFF_RAY_TMP", "/tmp")
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="mdray-", dir=root)  # short path: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=num_workers, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING",
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _output_config(data_cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(data_cfg, resolve=True)
    return {k: v for k, v in c.items() if k not in _NOT_OUTPUT}


def _clean_dir(out: Path) -> None:
    """Delete the manifest (rewritten last) and temp files left by a killed run."""
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST_NAME).unlink()
    for p in out.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def run_pipeline(cfg: Any, progress: bool = True, console: Any = None) -> PipelineResult:
    """Run the whole pipeline for ``cfg`` (a MegadiffConfig); returns what it wrote."""
    import ray

    d = cfg.data
    if not d.sources:
        raise MegadiffError("data.sources is empty; give at least one source (see configs/data_shakespeare.yaml)")
    if d.num_workers < 1 or d.samples_per_shard < 1:
        raise MegadiffError("data.num_workers and data.samples_per_shard must be >= 1")
    names = [s.name for s in d.sources]
    if len(set(names)) != len(names):
        raise MegadiffError(f"data.sources names must be unique, got {names}")
    t0 = time.perf_counter()
    out = Path(d.out_dir)
    files = [(si, p) for si, s in enumerate(d.sources) for p in resolve_paths(list(s.paths))]
    out.mkdir(parents=True, exist_ok=True)
    _clean_dir(out)

    tok = build_tokenizer(d)
    tok_json, ids = tokenizer_payload(tok, f"tokenizer ({d.tokenizer.kind})")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    tok_file = tokenizer_file_name(tok_json)
    if not (out / tok_file).is_file() or sha256_file(out / tok_file) != sha256_bytes(tok_json):
        atomic_write_bytes(out / tok_file, tok_json)
    params = {"seed": d.seed, "min_chars": d.min_chars, "max_chars": d.max_chars,
              "valid_fraction": d.valid_fraction, "dtype": dtype}
    srcs = [{"format": s.format, "text_field": s.text_field, "doc_split": s.doc_split, "weight": s.weight}
            for s in d.sources]

    splits = {s: SplitStats() for s in SPLITS}
    counts = {"written": 0, "reused": 0}

    def writer(split: str) -> Any:
        def emit(k: int, samples: np.ndarray, pad: int) -> None:
            data = shard_bytes(split, k, samples)
            sha, name = sha256_bytes(data), shard_name(split, k)
            path = out / name
            if path.is_file() and path.stat().st_size == len(data) and sha256_file(path) == sha:
                counts["reused"] += 1
            else:
                atomic_write_bytes(path, data)
                counts["written"] += 1
            st = splits[split]
            n_tok = samples.size - pad
            st.shards.append({"file": name, "samples": int(samples.shape[0]), "tokens": int(n_tok),
                              "bytes": len(data), "sha256": sha})
            st.samples += int(samples.shape[0])
            st.tokens += int(n_tok)
            st.pad_tokens += int(pad)

        return emit

    packers = {s: Packer(d.seq_len, d.samples_per_shard, dtype, ids["pad"], writer(s)) for s in SPLITS}
    eos = np.asarray([ids["eos"]], dtype=dtype)
    src_stats = {s.name: {"files": 0, "docs_in": 0, "docs_out": 0, "filtered_short": 0, "filtered_long": 0,
                          "dedup": 0, "valid_docs": 0, "repeats": 0, "chars": 0, "tokens": 0} for s in d.sources}
    seen: set[bytes] = set()
    held: dict[int, list[tuple[np.ndarray, int]]] = {}  # train docs of the current source with copies > 1

    def flush_repeats(si: int) -> None:
        docs = held.pop(si, [])
        for rep in range(1, max((c for _, c in docs), default=1)):
            for toks, c in docs:
                if c > rep:
                    packers["train"].add(toks)
                    src_stats[d.sources[si].name]["repeats"] += 1

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="file", desc="tokenize", dynamic_ncols=True)
    n_docs = n_tokens = 0
    with ray_session(d.num_workers):
        task = ray.remote(num_cpus=1, max_retries=2)(process_file)
        tok_ref, tok_sha = [ray.put(tok_json)], sha256_bytes(tok_json)  # in a list: not resolved per task
        pending: dict[Any, int] = {}
        done: dict[int, dict[str, Any]] = {}
        nxt_submit = nxt_consume = 0
        cur_src = 0
        while nxt_consume < len(files):
            # at most num_workers tasks in flight (the parallelism), and a bounded read-ahead
            while nxt_submit < len(files) and len(pending) < d.num_workers and len(done) < 4 * d.num_workers:
                si, path = files[nxt_submit]
                pending[task.remote(path, srcs[si], params, tok_ref, tok_sha)] = nxt_submit
                nxt_submit += 1
            if nxt_consume not in done:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=NO_PROGRESS_TIMEOUT_S)
                if not ready:
                    raise MegadiffError(f"no input file finished in {NO_PROGRESS_TIMEOUT_S:.0f} s "
                                        f"(set MEGADIFF_DATA_NO_PROGRESS_S to wait longer)")
                for ref in ready:
                    try:
                        done[pending.pop(ref)] = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = e.as_instanceof_cause()
                        if isinstance(cause, MegadiffError):
                            raise MegadiffError(str(cause).splitlines()[-1]) from None
                        raise
                continue
            res = done.pop(nxt_consume)
            si, path = files[nxt_consume]
            nxt_consume += 1
            if si != cur_src:
                flush_repeats(cur_src)
                cur_src = si
            st = src_stats[d.sources[si].name]
            st["files"] += 1
            st["docs_in"] += len(res["status"])
            st["chars"] += int(res["chars"].sum())
            st["filtered_short"] += int((res["status"] == TOO_SHORT).sum())
            st["filtered_long"] += int((res["status"] == TOO_LONG).sum())
            bounds = np.concatenate([[0], np.cumsum(res["lengths"])])
            k = 0  # index among kept documents
            for j in np.flatnonzero(res["status"] == KEEP):
                h, toks = res["hashes"][j], res["tokens"][bounds[k] : bounds[k + 1]]
                k += 1
                if h in seen:
                    st["dedup"] += 1
                    continue
                seen.add(h)
                toks = np.concatenate([toks, eos])
                st["docs_out"] += 1
                st["tokens"] += len(toks)
                n_docs += 1
                n_tokens += len(toks)
                if res["valid"][j]:
                    st["valid_docs"] += 1
                    splits["valid"].documents += 1
                    packers["valid"].add(toks)
                    continue
                c = int(res["copies"][j])
                if c >= 1:
                    splits["train"].documents += 1
                    packers["train"].add(toks)
                if c > 1:
                    held.setdefault(si, []).append((toks, c))
            if bar is not None:
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{n_docs / el:,.0f} docs/s, {n_tokens / el:,.0f} tok/s")
                bar.update(1)
        flush_repeats(cur_src)
        for p in packers.values():
            p.finish()
    if bar is not None:
        bar.close()

    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": {"file": tok_file, "sha256": sha256_bytes(tok_json), "kind": d.tokenizer.kind},
        "vocab_size": vocab,
        "special_ids": ids,
        "seq_len": d.seq_len,
        "dtype": dtype,
        "splits": {name: {"samples": s.samples, "tokens": s.tokens, "pad_tokens": s.pad_tokens,
                          "documents": s.documents, "shards": s.shards} for name, s in splits.items()},
        "sources": src_stats,
        "config": _output_config(d),
    }
    keep = {sh["file"] for s in splits.values() for sh in s.shards} | {tok_file}
    for p in list(out.glob("*.tar")) + list(out.glob("tokenizer-*.json")):
        if p.name not in keep and re.fullmatch(r"(train|valid)-\d{6}\.tar|tokenizer-[0-9a-f]{8}\.json", p.name):
            p.unlink()  # left by an earlier run with another config
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return PipelineResult(out, manifest, counts["written"], counts["reused"], time.perf_counter() - t0,
                          n_docs, n_tokens)


def print_summary(res: PipelineResult, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 140)
    m = res.manifest
    t = Table(title=f"sources -> {res.out_dir}")
    cols = ["files", "docs_in", "filtered_short", "filtered_long", "dedup", "docs_out", "valid_docs", "repeats",
            "tokens"]
    t.add_column("source")
    for c in cols:
        t.add_column(c, justify="right")
    for name, st in m["sources"].items():
        t.add_row(name, *(f"{st[c]:,}" for c in cols))
    console.print(t)
    s = Table(title="splits")
    for c in ("split", "shards", "samples", "tokens", "pad_tokens", "documents"):
        s.add_column(c, justify="right" if c != "split" else "left")
    for name, sp in m["splits"].items():
        s.add_row(name, f"{len(sp['shards']):,}", f"{sp['samples']:,}", f"{sp['tokens']:,}", f"{sp['pad_tokens']:,}",
                  f"{sp['documents']:,}")
    console.print(s)
    el = max(res.seconds, 1e-9)
    console.print(
        f"vocab {m['vocab_size']:,} ({m['tokenizer']['file']}), seq_len {m['seq_len']}, dtype {m['dtype']}; "
        f"{res.docs:,} docs, {res.tokens:,} tokens in {res.seconds:.1f} s ({res.docs / el:,.0f} docs/s, "
        f"{res.tokens / el:,.0f} tokens/s); shards written {res.written}, kept from an earlier run {res.reused}"
    )
