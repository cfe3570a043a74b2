"""Shards -> batches (Contract 1 in docs/architecture.md). Never imports Ray.

``ShardDataset``: random access to the packed samples of one manifest split. Each shard's tar
is indexed once (member offsets) and memory-mapped; ``ds[i]`` is a slice of the map.

``GlobalBatchLoader``: the global batch stream. Global batch ``s`` is a function of ``(seed, s)``
only: dataset ``d`` contributes ``k_d`` rows to every global batch (``k_d`` = its weight's share
of ``global_batch``, largest-remainder rounding), its ``c``-th sample is
``perm(seed, d, epoch)[c mod len]`` with ``c = s*k_d + j`` and ``epoch = c // len``, and the
``G`` rows are put in the order of ``permutation(seed, s)``. Rank ``r`` of ``dp`` takes rows
``[r*G/dp, (r+1)*G/dp)`` and cuts them into micro batches. The state is ``{"global_step": s}``;
resuming from it, with any DP size, continues with exactly global batch ``s``. Micro batches are
``{"tokens", "sample_ids"}``, plus ``"segment_ids"`` (int64 [micro_batch, seq_len], the document index
within each sample, 0-based) when every dataset records its document starts (format version 2).
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megadiff import MegadiffError
from megadiff.data.format import (
    MANIFEST_NAME,
    ManifestInfo,
    check_compat,
    check_shard,
    check_tokenizer_copy,
    index_shard,
    manifest_info,
    npy_header,
    read_docs,
    read_manifest,
    sample_key,
    segment_ids,
)

__all__ = ["ShardDataset", "GlobalBatchLoader", "ManifestInfo", "check_compat", "PrefixDataset", "limit_unique_tokens"]

log = logging.getLogger("megadiff.data")
_REWRITE = "re-run `megadiff data tokenize` with the dataset's config (it rewrites missing or damaged shards)"
_SKIP = "or set data.skip_corrupt=true (ShardDataset(skip_corrupt=True)) to skip unreadable samples"


class ShardDataset:
    """One split of a dataset directory: ``len(ds)`` samples, ``ds[i]`` -> int64 [seq_len]."""

    MAX_OPEN = 64  # memory maps kept open (LRU) at least; more when the open-file limit allows (see __init__)
    MAX_DOCS = 4096  # document-starts arrays kept (a few KB each)

    def __init__(self, path: str | os.PathLike, split: str = "train", verify: bool = False, skip_corrupt: bool = False):
        self.path = Path(path)
        self.split = split
        self.skip_corrupt = skip_corrupt
        self._bad: set[int] = set()  # unreadable samples seen so far (skip_corrupt)
        self.manifest = read_manifest(self.path)
        self.info: ManifestInfo = manifest_info(self.manifest, self.path)
        splits = self.manifest["splits"]
        if split not in splits:
            raise MegadiffError(f"{self.path / MANIFEST_NAME} has no split {split!r}; splits: {', '.join(splits)}")
        self.shards = splits[split]["shards"]
        self.files = [self.path / sh["file"] for sh in self.shards]
        self._bad_shards: set[int] = set()
        problem = check_tokenizer_copy(self.path, self.manifest, checksum=verify)
        if problem:
            raise MegadiffError(f"{problem}; {_REWRITE}")
        for k, sh in enumerate(self.shards):
            problem = check_shard(self.path, sh, checksum=verify)
            if problem and self.files[k].is_file() and self.files[k].stat().st_size == sh["bytes"]:
                raise MegadiffError(f"{problem}; {_REWRITE}")  # a checksum failure is never skipped
            if problem:
                if not skip_corrupt:
                    raise MegadiffError(f"{problem}; {_REWRITE}, {_SKIP}")
                log.warning("%s; its unreadable samples will be skipped", problem)
                if not self.files[k].is_file():
                    self._bad_shards.add(k)
        self.cum = np.cumsum([0] + [sh["samples"] for sh in self.shards]).astype(np.int64)
        self.seq_len = self.info.seq_len
        self.dtype = np.dtype(self.info.dtype)
        self._header = npy_header(self.info.dtype, self.seq_len)
        self._hlen = len(self._header)
        self._nbytes = self.seq_len * self.dtype.itemsize
        self._offsets: dict[int, np.ndarray] = {}
        self._docs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._has_segments = all("docs" in sh for sh in self.shards)
        # each map holds a file descriptor: up to a quarter of the soft open-file limit (random reads over
        # many shards would otherwise reopen a shard for most samples)
        self._max_maps = max(self.MAX_OPEN, min(4096, _open_file_limit() // 4))
        self._maps: collections.OrderedDict[int, tuple[mmap.mmap, int]] = collections.OrderedDict()

    @property
    def skipped(self) -> int:
        """Distinct unreadable samples met so far (each is logged once, then replaced by the next readable one)."""
        return len(self._bad)

    def __len__(self) -> int:
        return int(self.cum[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(i)[1]

    def read(self, i: int) -> tuple[int, np.ndarray]:
        """(index of the sample actually read, its tokens): ``i``, or with skip_corrupt the next readable one."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.path} [{self.split}]")
        i %= n
        for attempt in range(n):
            arr = self._read((i + attempt) % n)
            if arr is not None:
                return (i + attempt) % n, arr
        raise MegadiffError(f"{self.path} [{self.split}]: no readable sample at all; {_REWRITE}")

    def sample(self, i: int, with_segments: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens, segment ids or None) of sample ``i`` (with skip_corrupt: of the sample read instead)."""
        j, tokens = self.read(i)
        return tokens, (self.segment_ids(j) if with_segments else None)

    @property
    def has_segments(self) -> bool:
        """Whether every shard records where its samples' documents start (format version >= 2)."""
        return self._has_segments

    def segment_ids(self, i: int) -> np.ndarray:
        """int64 [seq_len]: document index within sample ``i`` (0-based) at every position."""
        if not self.has_segments:
            raise MegadiffError(f"{self.path} [{self.split}] records no document starts (written by an older "
                                f"megadiff); re-run `megadiff data tokenize` to add them")
        k = int(np.searchsorted(self.cum, i % len(self), side="right")) - 1
        if k not in self._docs:
            if len(self._docs) >= self.MAX_DOCS:
                self._docs.pop(next(iter(self._docs)))
            self._docs[k] = read_docs(self.path / self.shards[k]["docs"]["file"], self.shards[k]["samples"])
        indptr, starts = self._docs[k]
        j = i % len(self) - int(self.cum[k])
        return segment_ids(starts[indptr[j] : indptr[j + 1]], self.seq_len)

    def _read(self, i: int) -> np.ndarray | None:
        if i in self._bad:
            return None
        k = int(np.searchsorted(self.cum, i, side="right")) - 1
        j = i - int(self.cum[k])
        if k not in self._bad_shards:
            mm, size = self._map(k)
            off = int(self._index(k)[j])
            if 0 <= off and off + self._hlen + self._nbytes <= size and mm[off : off + self._hlen] == self._header:
                arr = np.frombuffer(mm, self.dtype, self.seq_len, off + self._hlen)
                if int(arr.max()) < self.info.vocab_size:
                    return arr.astype(np.int64)
        what = f"{self.files[k]}: sample {j} ({sample_key(self.shards[k]['file'], j)}.npy) is unreadable"
        if not self.skip_corrupt:
            raise MegadiffError(f"{what} (corrupt or truncated shard); {_REWRITE}, {_SKIP}")
        self._bad.add(i)
        log.warning("%s; skipped (%d skipped so far), using the next sample", what, self.skipped)
        return None

    def _index(self, k: int) -> np.ndarray:
        if k not in self._offsets:
            self._offsets[k] = index_shard(self.files[k], self.shards[k]["samples"])
        return self._offsets[k]

    def _map(self, k: int) -> tuple[mmap.mmap, int]:
        if k in self._maps:
            self._maps.move_to_end(k)
            return self._maps[k]
        with open(self.files[k], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else mmap.mmap(-1, 1)
        self._maps[k] = (mm, size)
        if len(self._maps) > self._max_maps:
            self._maps.popitem(last=False)  # the map closes when its last view is gone
        return mm, size

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for r, i in enumerate(indices):
            out[r] = self[int(i)]
        return out


def _open_file_limit() -> int:
    import resource

    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _quotas(weights: Sequence[float], total: int) -> list[int]:
    """Largest-remainder split of ``total`` rows by ``weights`` (ties: lower index first)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    k = np.floor(exact).astype(int)
    rem = exact - k
    for d in sorted(range(len(w)), key=lambda d: (-rem[d], d))[: total - int(k.sum())]:
        k[d] += 1
    return [int(x) for x in k]


class GlobalBatchLoader:
    """Deterministic, resumable, DP-sharded mixture of datasets (see the module docstring)."""

    def __init__(
        self,
        datasets: Sequence[ShardDataset],
        weights: Sequence[float] | None,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
    ):
        if not datasets:
            raise MegadiffError("GlobalBatchLoader needs at least one dataset (data.train is empty)")
        weights = list(weights) if weights is not None else [1.0] * len(datasets)
        if len(weights) != len(datasets) or any(w <= 0 for w in weights):
            raise MegadiffError(f"mixture weights {weights} must be positive, one per dataset ({len(datasets)})")
        if global_batch % (micro_batch * dp_size) != 0:
            raise MegadiffError(
                f"global_batch={global_batch} must be a multiple of micro_batch x dp_size = {micro_batch} x {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise MegadiffError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        ref = datasets[0]
        for ds in datasets[1:]:
            a, b = ref.info, ds.info
            if (a.seq_len, a.vocab_size, a.mask_id, a.tokenizer_sha256) != (b.seq_len, b.vocab_size, b.mask_id,
                                                                             b.tokenizer_sha256):
                raise MegadiffError(
                    f"datasets {ref.path} and {ds.path} differ in seq_len/vocab/mask id/tokenizer "
                    f"({a.seq_len}/{a.vocab_size}/{a.mask_id}/{a.tokenizer_sha256[:8]} vs {b.seq_len}/{b.vocab_size}/"
                    f"{b.mask_id}/{b.tokenizer_sha256[:8]}); tokenize all mixture components with the same tokenizer "
                    f"and seq_len"
                )
        for ds in datasets:
            if len(ds) == 0:
                raise MegadiffError(f"{ds.path} [{ds.split}] has no samples; add data or drop it from the mixture")
        self.datasets = list(datasets)
        self.weights = weights
        self.quotas = _quotas(weights, global_batch)
        for ds, w, k in zip(self.datasets, weights, self.quotas):
            if k == 0:
                raise MegadiffError(
                    f"weight {w} of {ds.path} gives it 0 of the {global_batch} rows of a global batch; raise its "
                    f"weight or the global batch"
                )
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.global_step = 0
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def info(self) -> ManifestInfo:
        return self.datasets[0].info

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perms:
            if len(self._perms) >= 2 * len(self.datasets):
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([self.seed, 0, d, epoch])
            self._perms[key] = rng.permutation(len(self.datasets[d]))
        return self._perms[key]

    def global_rows(self, step: int) -> list[tuple[int, int]]:
        """(dataset, sample index) of each row of global batch ``step`` (a function of seed and step)."""
        rows: list[tuple[int, int]] = []
        for d, k in enumerate(self.quotas):
            n = len(self.datasets[d])
            for c in range(step * k, (step + 1) * k):
                rows.append((d, int(self._perm(d, c // n)[c % n])))
        order = np.random.default_rng([self.seed, 1, step]).permutation(self.global_batch)
        return [rows[o] for o in order]

    def epoch(self, d: int = 0) -> float:
        """Epochs of dataset ``d`` consumed so far."""
        return self.global_step * self.quotas[d] / len(self.datasets[d])

    def next_global(self) -> list[dict[str, Any]]:
        """This rank's share of the next global batch, as micro batches of int64 tensors."""
        import torch

        s, G = self.global_step, self.global_batch
        per_rank = G // self.dp_size
        lo = self.dp_rank * per_rank
        rows = self.global_rows(s)[lo : lo + per_rank]
        tokens = np.empty((per_rank, self.info.seq_len), dtype=np.int64)
        segs = np.empty_like(tokens) if self.has_segments else None
        for r, (d, i) in enumerate(rows):
            tokens[r], seg = self.datasets[d].sample(i, with_segments=segs is not None)
            if segs is not None:
                segs[r] = seg
        ids = np.arange(s * G + lo, s * G + lo + per_rank, dtype=np.int64)
        self.global_step += 1
        mb = self.micro_batch
        out = []
        for a in range(0, per_rank, mb):
            batch = {"tokens": torch.from_numpy(tokens[a : a + mb]), "sample_ids": torch.from_numpy(ids[a : a + mb])}
            if segs is not None:
                batch["segment_ids"] = torch.from_numpy(segs[a : a + mb])
            out.append(batch)
        return out

    @property
    def has_segments(self) -> bool:
        """Micro batches carry ``segment_ids`` when every dataset records its document starts."""
        return all(ds.has_segments for ds in self.datasets)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.next_global()

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "quotas": list(self.quotas),
            "dataset_sizes": [len(ds) for ds in self.datasets],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue at ``sd["global_step"]``. DP size may differ; seed, batch and data must not."""
        mine = self.state_dict()
        for key in ("seed", "global_batch", "quotas", "dataset_sizes"):
            if key in sd and sd[key] != mine[key]:
                raise MegadiffError(
                    f"loader state has {key}={sd[key]} but this run has {key}={mine[key]}; the batch stream would "
                    f"differ from the saved run's. Restore the run's data config, or start a new run"
                )
        self.global_step = int(sd["global_step"])


class PrefixDataset:
    """The first ``n`` samples of a fixed shuffle (keyed on ``seed``) of a dataset: a deterministic
    U-token prefix of the shuffled split, which ``GlobalBatchLoader`` then repeats epoch after epoch."""

    def __init__(self, ds: Any, n: int, seed: int):
        self.ds, self.info, self.path, self.split = ds, ds.info, ds.path, ds.split
        self.index = np.random.default_rng([seed, 2, len(ds)]).permutation(len(ds))[:n]

    @property
    def skipped(self) -> int:
        return self.ds.skipped

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ds[int(self.index[i])]

    @property
    def has_segments(self) -> bool:
        return self.ds.has_segments

    def sample(self, i: int, with_segments: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        return self.ds.sample(int(self.index[i]), with_segments)


def limit_unique_tokens(datasets: Sequence[Any], unique_tokens: int | None, seed: int) -> list[Any]:
    """``data.unique_tokens``: train on U unique tokens (whole samples) of the one training split, repeated."""
    if unique_tokens is None:
        return list(datasets)
    if len(datasets) != 1:
        raise MegadiffError(f"data.unique_tokens={unique_tokens} limits a single training dataset, but data.train has "
                            f"{len(datasets)}; build one dataset for a data-constrained run")
    ds = datasets[0]
    n = int(unique_tokens) // ds.info.seq_len
    if n < 1 or n > len(ds):
        raise MegadiffError(
            f"data.unique_tokens={unique_tokens} is {n} samples of {ds.info.seq_len} tokens, but {ds.path} "
            f"[{ds.split}] has {len(ds)} ({len(ds) * ds.info.seq_len} tokens); set it between one sample and that")
    return [PrefixDataset(ds, n, seed)]
