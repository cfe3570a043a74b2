"""Shard writing and indexing, megadiff's numpy path beside Python's ``tarfile`` (the former implementation
and the reference the tests compare bytes with), in one run; then the loader's random reads.

  1. build: ``shard_bytes`` (numpy) vs the same tar written member by member with ``tarfile``;
  2. index: ``index_shard`` (headers checked in place with numpy) vs reading the members with ``tarfile``;
  3. (--dataset DIR) ShardDataset + GlobalBatchLoader over that dataset's train split: the first 3 s (every
     shard indexed on first use) and the next 3 s.

Rounds alternate the two paths; medians are reported. Results go to docs/benchmarks.md, section Data.

    python tools/bench_shards.py [--shards 40] [--seq-len 512] [--rounds 3] [--dataset DIR]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megadiff.data.format import _index_tarfile, index_shard, npy_header, sample_key, shard_bytes  # noqa: E402


def tarfile_shard(name: str, samples: np.ndarray) -> bytes:
    """The former shard writer: ``tarfile``, member by member, with the format's fixed metadata."""
    header = npy_header(samples.dtype.name, samples.shape[1])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j in range(samples.shape[0]):
            payload = header + samples[j].tobytes()
            ti = tarfile.TarInfo(f"{sample_key(name, j)}.npy")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(payload), 0, 0o644, 0, 0, "", ""
            tar.addfile(ti, io.BytesIO(payload))
    return out.getvalue()


def loader_rates(path: str) -> tuple[float, float]:
    from megadiff.data.loader import GlobalBatchLoader, ShardDataset

    ld = GlobalBatchLoader([ShardDataset(path, "train")], None, 64, 8, 0, 1, seed=0)
    rates = []
    for _ in range(2):
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3.0:
            n += sum(int(b["tokens"].numel()) for b in ld.next_global())
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--samples", type=int, default=512, help="samples per shard")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dataset", default=None, help="a dataset directory for the loader rows")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50257, (args.samples, args.seq_len)).astype(np.uint16) for _ in range(args.shards)]
    names = [f"train-{k:06d}-0000.tar" for k in range(args.shards)]
    times: dict[str, list[float]] = {k: [] for k in ("numpy build", "tarfile build", "numpy index", "tarfile index")}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / n for n in names]
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fast = [shard_bytes(n, s) for n, s in zip(names, shards)]
            times["numpy build"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = [tarfile_shard(n, s) for n, s in zip(names, shards)]
            times["tarfile build"].append(time.perf_counter() - t0)
            if fast != ref:
                raise SystemExit("numpy and tarfile shards differ")
            for p, b in zip(paths, fast):
                p.write_bytes(b)
            t0 = time.perf_counter()
            a = [index_shard(p, args.samples) for p in paths]
            times["numpy index"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = [_index_tarfile(p, args.samples) for p in paths]
            times["tarfile index"].append(time.perf_counter() - t0)
            if not all(np.array_equal(x, y) for x, y in zip(a, b)):
                raise SystemExit("numpy and tarfile indexes differ")
    n = args.shards * args.samples
    print(f"{args.shards} shards x {args.samples} samples x seq_len {args.seq_len} (uint16), {args.rounds} rounds; "
          "outputs equal")
    print("| what | median s | per sample | speed-up |")
    print("|---|---:|---:|---:|")
    for what in ("build", "index"):
        f, r = statistics.median(times[f"numpy {what}"]), statistics.median(times[f"tarfile {what}"])
        print(f"| {what}: tarfile (former) | {r:.3f} | {r / n * 1e6:.1f} us | |")
        print(f"| {what}: numpy | {f:.3f} | {f / n * 1e6:.1f} us | {r / f:.1f}x |")
    if args.dataset:
        first, nxt = loader_rates(args.dataset)
        print(f"| loader over {args.dataset}: first 3 s / next 3 s | | {first:,.0f} / {nxt:,.0f} tokens/s | |")


if __name__ == "__main__":
    main()
