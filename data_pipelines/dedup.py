"""Dedup without a global in-memory set: keys per document, hash-partitioned grouping, clusters.

A document's global id is ``(partition, doc)`` (input order). Each scan task writes its
documents' keys (the 128-bit content hash, and with ``data.near_dedup`` one key per MinHash LSH
band), sorted by bucket = ``key mod B``. Bucket task ``b`` reads bucket ``b`` of every partition's
key file and groups equal keys: for an exact key every member but the first (smallest global
id) is an exact duplicate; for a band key it emits an edge from each member to the group's first
member. One cluster task joins the edges (union-find, over documents that are not exact
duplicates), keeps each cluster's first member and writes the sorted drop list the pack tasks
slice by partition. Memory: a bucket task holds 1/B of the keys; the cluster task only the
near-duplicate edges. The first occurrence in input order wins, whatever B or the worker count.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

KEY_DTYPE = np.dtype([("bucket", "<u4"), ("band", "<i4"), ("k0", "<u8"), ("k1", "<u8"), ("doc", "<u4")])
DROP_DTYPE = np.dtype([("part", "<u4"), ("doc", "<u4"), ("reason", "u1")])  # reason: EXACT or NEAR
EXACT, NEAR = 1, 2
_MERSENNE = np.uint64((1 << 61) - 1)
_TOKEN = re.compile(r"\w+", re.UNICODE)


def content_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class MinHasher:
    """MinHash of word n-gram shingles (lower-cased word tokens) -> ``bands`` LSH band keys.

    Two documents with Jaccard similarity s share at least one band with probability
    ``1 - (1 - s**rows)**bands``.
    """

    def __init__(self, ngram: int, bands: int, rows: int, seed: int):
        self.ngram, self.bands, self.rows = ngram, bands, rows
        rng = np.random.default_rng([seed, 7])
        n = bands * rows
        self.a = rng.integers(1, int(_MERSENNE), size=n, dtype=np.uint64)
        self.b = rng.integers(0, int(_MERSENNE), size=n, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        words = _TOKEN.findall(text.lower())
        n = min(self.ngram, max(len(words), 1))
        grams = {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}
        return np.fromiter((int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                            for g in sorted(grams)), dtype=np.uint64, count=len(grams))

    def signature(self, text: str) -> np.ndarray:
        h = self.shingles(text)[None, :] & _MERSENNE
        with np.errstate(over="ignore"):  # multiply-add mod 2^64, then mod the prime: a fixed hash family
            v = (self.a[:, None] * h + self.b[:, None]) % _MERSENNE
        return v.min(axis=1)

    def band_keys(self, text: str) -> np.ndarray:
        sig = self.signature(text).reshape(self.bands, self.rows)
        return np.asarray([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little")
                           for r in sig], dtype=np.uint64)


def doc_keys(doc: int, digest: bytes, bands: np.ndarray | None, n_buckets: int) -> list[tuple]:
    k0, k1 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    keys = [(k0 % n_buckets, -1, k0, k1, doc)]
    if bands is not None:
        keys += [(int(k) % n_buckets, b, int(k), 0, doc) for b, k in enumerate(bands)]
    return keys


def sort_keys(rows: list[tuple]) -> np.ndarray:
    arr = np.asarray(rows, dtype=KEY_DTYPE) if rows else np.zeros(0, KEY_DTYPE)
    return arr[np.argsort(arr["bucket"], kind="stable")]


def _bucket_slice(path: Path, bucket: int) -> np.ndarray:
    keys = np.load(path, mmap_mode="r")
    lo, hi = np.searchsorted(keys["bucket"], [bucket, bucket + 1])
    return np.asarray(keys[lo:hi])


def group_bucket(key_files: list[str], bucket: int) -> dict[str, np.ndarray]:
    """Bucket ``bucket`` of every partition's keys -> exact drops [n, 2] and near edges [m, 4]
    (``part, doc, first_part, first_doc``), each a function of the keys only."""
    parts, rows = [], []
    for p, f in enumerate(key_files):
        s = _bucket_slice(Path(f), bucket)
        rows.append(s)
        parts.append(np.full(len(s), p, dtype=np.int64))
    keys = np.concatenate(rows) if rows else np.zeros(0, KEY_DTYPE)
    part = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    doc = keys["doc"].astype(np.int64)
    order = np.lexsort((doc, part, keys["k1"], keys["k0"], keys["band"]))
    band, k0, k1, part, doc = keys["band"][order], keys["k0"][order], keys["k1"][order], part[order], doc[order]
    same = np.zeros(len(order), dtype=bool)
    if len(order):
        same[1:] = (band[1:] == band[:-1]) & (k0[1:] == k0[:-1]) & (k1[1:] == k1[:-1])
    first = np.maximum.accumulate(np.where(~same, np.arange(len(order)), 0)) if len(order) else np.zeros(0, int)
    exact = same & (band == -1)
    near = same & (band >= 0)
    return {"exact": np.stack([part[exact], doc[exact]], axis=1) if exact.any() else np.zeros((0, 2), np.int64),
            "edges": np.stack([part[near], doc[near], part[first[near]], doc[first[near]]], axis=1)
            if near.any() else np.zeros((0, 4), np.int64)}


def cluster(bucket_files: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """All buckets' results -> the sorted drop list (DROP_DTYPE) and cluster statistics."""
    exact, edges = [], []
    for f in bucket_files:
        with np.load(f) as z:
            exact.append(z["exact"])
            edges.append(z["edges"])
    ex = np.unique(np.concatenate(exact), axis=0) if exact else np.zeros((0, 2), np.int64)
    ed = np.concatenate(edges) if edges else np.zeros((0, 4), np.int64)
    ex_set = {(int(p), int(d)) for p, d in ex}
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(x: tuple[int, int]) -> tuple[int, int]:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for p, d, fp, fd in ed.tolist():
        a, b = (p, d), (fp, fd)
        if a in ex_set or b in ex_set:
            continue  # an exact copy's first occurrence is in the same groups: its edges are redundant
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is the cluster's first document
    members: dict[tuple[int, int], int] = {}
    near = []
    for x in list(parent):
        r = find(x)
        members[r] = members.get(r, 1) + (x != r)
        if x != r:
            near.append((x[0], x[1], NEAR))
    sizes: dict[int, int] = {}
    for n in members.values():
        sizes[n] = sizes.get(n, 0) + 1
    drops = [(p, d, EXACT) for p, d in sorted(ex_set)] + near
    arr = np.asarray(sorted(drops), dtype=DROP_DTYPE) if drops else np.zeros(0, DROP_DTYPE)
    stats = {"exact_removed": len(ex_set), "near_removed": len(near), "near_clusters": len(members),
             "near_cluster_sizes": {str(k): sizes[k] for k in sorted(sizes)}}
    return arr, stats


def partition_drops(drops_file: str, part: int) -> dict[int, int]:
    """{doc: reason} of partition ``part`` from the cluster task's sorted drop list (memory-mapped)."""
    drops = np.load(drops_file, mmap_mode="r")
    lo, hi = np.searchsorted(drops["part"], [part, part + 1])
    sl = np.asarray(drops[lo:hi])
    return dict(zip(sl["doc"].tolist(), sl["reason"].tolist()))
