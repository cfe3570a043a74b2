"""Raw text -> packed, tokenized webdataset shards + manifest.json, as partitioned Ray stages.

The input is cut into partitions (files, parquet row-group ranges, byte ranges of jsonl;
data_pipelines/sources.py). Four stages of Ray tasks (data_pipelines/stages.py; records in records.py), at most
``data.num_workers`` in flight, the largest partitions first:

1. scan (one task per partition): read (streamed), normalize, filter (data_pipelines/filters.py),
   hash, decide split and repeats, MinHash (``data.near_dedup``), tokenize; writes the partition's
   tokens and its dedup keys (sorted by hash bucket) to ``<out>/.work/``;
2. dedup buckets (one task per hash bucket): group equal keys across partitions (dedup.py);
3. cluster (one task): near-duplicate clusters, the sorted drop list;
4. pack (one task per partition): drop duplicates, append EOS, pack train and valid separately
   (repeats of a weighted source after the partition's first pass), write the partition's own
   shards ``<split>-<partition>-<k>.tar``.

Every task writes its outputs atomically and then a small record ``.work/<stage>-<i>.json`` naming
its inputs' fingerprint and its outputs' sizes. The driver only plans, schedules, skips every task
whose record verifies (without reading its input) and finally merges the pack records, in partition
order, into ``manifest.json``. Determinism: every task is a pure function of its inputs and the
config, and the merge is in partition order, so shards and manifest are byte-identical for any
number of workers or nodes. After the manifest is written only the pack records stay in ``.work``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from data_pipelines.filters import build_filters
from data_pipelines.records import WORK, fingerprint, read_record, record_path
from data_pipelines.sources import Partition, plan_partitions, resolve_paths
from data_pipelines.stages import cluster_stage, dedup_bucket, pack_partition, scan_partition
from data_pipelines.tokenizer import build_tokenizer, tokenizer_payload
from megadiff import MegadiffError
from megadiff.data.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    build_manifest,
    docs_name,
    token_dtype,
    write_manifest,
)
from megadiff.data.tokenizer import tokenizer_file_name
from megadiff.utils.io import atomic_temp_target, atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from megadiff.utils.procs import kill_marked

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# keys of DataConfig that do not change the output (left out of the manifest's config)
_NOT_OUTPUT = ("num_workers", "out_dir", "train", "valid", "shuffle_seed", "skip_corrupt")
NO_PROGRESS_TIMEOUT_S = float(os.environ.get("MEGADIFF_DATA_NO_PROGRESS_S", "600"))

__all__ = ["WORK", "PipelineResult", "run_pipeline", "print_summary", "ray_session", "run_tasks"]


# ----------------------------------------------------------------------------- driver


@dataclass
class PipelineResult:
    out_dir: Path
    manifest: dict[str, Any]
    computed: dict[str, int]  # tasks run by this call, per stage (scan, bucket, cluster, pack)
    skipped: dict[str, int]  # tasks whose record verified (not run)
    nodes: dict[str, int]  # tasks run per Ray node id
    task_cpu_s: float  # CPU seconds of all tasks run
    seconds: float
    docs: int
    tokens: int
    node_addresses: dict[str, str] = field(default_factory=dict)  # Ray node id -> the node's IP address

    def tasks_per_address(self) -> dict[str, int]:
        """Tasks run per node IP address (the node id where the address is unknown)."""
        out: dict[str, int] = {}
        for node, n in self.nodes.items():
            a = self.node_addresses.get(node, node)
            out[a] = out.get(a, 0) + n
        return dict(sorted(out.items()))


def worker_niceness() -> int:
    """Niceness of a private Ray cluster's task workers (MEGADIFF_RAY_WORKER_NICENESS, default 0)."""
    v = os.environ.get("MEGADIFF_RAY_WORKER_NICENESS", "0")
    if not v.lstrip("-").isdigit() or not 0 <= int(v) <= 19:
        raise MegadiffError(f"MEGADIFF_RAY_WORKER_NICENESS={v!r}: give a niceness from 0 to 19")
    return int(v)


@contextlib.contextmanager
def ray_session(num_workers: int) -> Iterator[None]:
    """Use the caller's Ray if it is up; else join RAY_ADDRESS; else start a small private one."""
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
    tmp = _start_private_ray(num_workers)
    try:
        yield
    finally:
        _stop_private_ray(tmp)


def _stop_private_ray(tmp: str) -> None:
    """Shut down the private Ray started in ``tmp``. Ray's shutdown stops its processes one by one, giving
    each 1 s to honour SIGTERM before SIGKILL; its autoscaler monitor (idle here: one fixed node) never
    does, so every run would wait that second. It is killed first (what Ray does after the second)."""
    import ray

    for proc in _private_monitors():
        with contextlib.suppress(OSError):
            proc.kill()  # Ray's kill_all_processes then finds it exited
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _private_monitors() -> list[Any]:
    """The autoscaler monitor processes (Popen) of the Ray node this driver started; [] for a joined cluster."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # Ray's own handle on the node it started
    return [info.process for info in (getattr(node, "all_processes", None) or {}).get("monitor", [])]


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


@contextlib.contextmanager
def _quiet_token_auth_notice() -> Iterator[None]:
    """Ray (2.5x+) announces on every local start that it turned token authentication on by default; for a
    private cluster that is what we want, so the notice is dropped (a warning that auth is *off* still shows)."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    f = _DropTokenAuthNotice()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def _start_private_ray(num_workers: int, attempts: int = 2) -> str:
    """Start a one-node Ray of ``num_workers`` CPUs in a fresh temp dir (returned).

    Ray gives its raylet a fixed 30 s to register; on an overloaded machine it can miss that. Then the
    half-started processes (found by the temp dir: kill_marked) are killed and Ray is started once more
    before a clear error.
    """
    import ray

    root = os.environ.get("MEGADIFF_RAY_TMP", "/tmp")
    Path(root).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        tmp = tempfile.mkdtemp(prefix="mdray-", dir=root)  # short path: Ray's socket paths must fit 107 bytes
        try:
            # Ray starts task workers at niceness 15 (below its own daemons); in a cluster of our own the
            # workers are the job, so they run at MEGADIFF_RAY_WORKER_NICENESS (default 0)
            with _quiet_token_auth_notice():
                ray.init(num_cpus=num_workers, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING",
                         log_to_driver=False, _system_config={"worker_niceness": worker_niceness()})
            return tmp
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            kill_marked(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            load = os.getloadavg()[0]
            if attempt == attempts:
                raise MegadiffError(
                    f"Ray's local node did not start within Ray's 30 s, {attempts} times (load average {load:.1f} on "
                    f"{os.cpu_count()} CPUs: the machine is overloaded). Rerun when it is quieter, or start a cluster "
                    "yourself (`ray start --head --num-cpus N`) and set RAY_ADDRESS to join it") from None
            print(f"[megadiff data] Ray's local node did not start in 30 s (load average {load:.1f}); starting it "
                  "again", file=sys.stderr)
    raise AssertionError("unreachable")


def _on_node(fn: Callable[..., Any], *args: Any) -> tuple[Any, str, float]:
    """``fn(*args)``, the id of the Ray node it ran on and the CPU seconds it took."""
    import ray

    t0 = time.process_time()
    out = fn(*args)
    return out, ray.get_runtime_context().get_node_id(), time.process_time() - t0


def run_tasks(fn: Callable[..., Any], calls: list[tuple[Any, ...]], num_workers: int, what: str,
              bar: Any = None, tally: dict[str, Any] | None = None, weights: list[float] | None = None) -> list[Any]:
    """Run ``fn(*args)`` for each call as Ray tasks, at most ``num_workers`` in flight; results in call order.

    With ``weights`` (an estimate of each call's work) the heaviest calls are submitted first (ties in call
    order): the stage then ends on its lightest tasks instead of leaving workers idle behind a large one
    (longest-processing-time-first scheduling).

    ``tally`` (if given) counts tasks per Ray node id (``tally["nodes"]``), keeps each node's IP address
    (``tally["addresses"]``) and sums the tasks' CPU seconds (``tally["task_cpu_s"]``). A failed task raises
    MegadiffError at once; outputs that other tasks completed stay (each is written atomically and has its
    record), so a rerun continues from them.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=1, max_retries=2)(_on_node)
    # spread the tasks over the cluster's nodes in turn (soft: a busy or lost node's task runs elsewhere);
    # Ray's default packs short tasks onto the driver's node first
    alive = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    nodes = sorted(n["NodeID"] for n in alive)
    if tally is not None:
        tally.setdefault("addresses", {}).update({n["NodeID"]: n.get("NodeManagerAddress", "") for n in alive})
    order = sorted(range(len(calls)), key=lambda k: -weights[k]) if weights is not None else list(range(len(calls)))
    pending: dict[Any, int] = {}
    results: dict[int, Any] = {}
    nxt = 0
    while len(results) < len(calls):
        while nxt < len(calls) and len(pending) < num_workers:
            where = NodeAffinitySchedulingStrategy(nodes[nxt % len(nodes)], soft=True) if nodes else "DEFAULT"
            pending[task.options(scheduling_strategy=where).remote(fn, *calls[order[nxt]])] = order[nxt]
            nxt += 1
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=NO_PROGRESS_TIMEOUT_S)
        if not ready:
            raise MegadiffError(f"no {what} task finished in {NO_PROGRESS_TIMEOUT_S:.0f} s "
                                f"(set MEGADIFF_DATA_NO_PROGRESS_S to wait longer)")
        for ref in ready:
            k = pending.pop(ref)
            try:
                results[k], node, cpu = ray.get(ref)
                if tally is not None:
                    tally["nodes"][node] = tally["nodes"].get(node, 0) + 1
                    tally["task_cpu_s"] += cpu
            except ray.exceptions.RayTaskError as e:
                cause = e.as_instanceof_cause()
                if isinstance(cause, MegadiffError):
                    raise MegadiffError(str(cause).splitlines()[-1]) from None
                raise
            if bar is not None:
                bar.update(1)
    return [results[k] for k in range(len(calls))]


def _output_config(data_cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(data_cfg, resolve=True)
    return {k: v for k, v in c.items() if k not in _NOT_OUTPUT}


def _check_config(d: Any) -> None:
    if not d.sources:
        raise MegadiffError("data.sources is empty; give at least one source (see configs/data_shakespeare.yaml)")
    if d.num_workers < 1 or d.samples_per_shard < 1 or d.partition_bytes < 1:
        raise MegadiffError("data.num_workers, data.samples_per_shard and data.partition_bytes must be >= 1")
    names = [s.name for s in d.sources]
    if len(set(names)) != len(names):
        raise MegadiffError(f"data.sources names must be unique, got {names}")
    nd = d.near_dedup
    if nd.enabled and min(nd.ngram, nd.bands, nd.rows) < 1:
        raise MegadiffError("data.near_dedup.ngram, bands and rows must be >= 1")
    build_filters(d.filters, d.min_chars, d.max_chars)  # unknown filters/parameters fail before any work


def plan(d: Any) -> list[Partition]:
    """Every partition of every source, in source order, file order, position order."""
    parts = []
    for si, s in enumerate(d.sources):
        for path in resolve_paths(list(s.paths)):
            parts += plan_partitions(si, path, s.format, d.partition_bytes)
    return parts


@dataclass
class _Plan:
    out: Path
    work: Path
    parts: list[Partition]
    params: dict[str, Any]
    srcs: list[dict[str, Any]]
    n_buckets: int
    scan_fp: list[str]
    bucket_fp: list[str]
    cluster_fp: str
    pack_fp: list[str]


def _make_plan(d: Any, tok_sha: str, ids: dict[str, int], dtype: str) -> _Plan:
    from omegaconf import OmegaConf

    parts = plan(d)
    params = {"seed": d.seed, "min_chars": d.min_chars, "max_chars": d.max_chars, "valid_fraction": d.valid_fraction,
              "dtype": dtype, "filters": OmegaConf.to_container(d.filters, resolve=True),
              "near_dedup": OmegaConf.to_container(d.near_dedup, resolve=True), "seq_len": d.seq_len,
              "samples_per_shard": d.samples_per_shard, "pad": ids["pad"], "eos": ids["eos"]}
    srcs = [{"text_field": s.text_field, "doc_split": s.doc_split, "weight": s.weight} for s in d.sources]
    n_buckets = 2 * d.num_workers
    scan_params = {k: params[k] for k in ("seed", "min_chars", "max_chars", "valid_fraction", "dtype", "filters",
                                          "near_dedup")}
    scan_fp = [fingerprint(["scan", p.spec(), srcs[p.source], scan_params, tok_sha, n_buckets]) for p in parts]
    bucket_fp = [fingerprint(["bucket", b, n_buckets, scan_fp]) for b in range(n_buckets)]
    # the drop list does not depend on the number of buckets: nor does its fingerprint
    cluster_fp = fingerprint(["cluster", [fingerprint(["scan", p.spec(), srcs[p.source], scan_params, tok_sha])
                                           for p in parts]])
    pack_params = {k: params[k] for k in ("seq_len", "samples_per_shard", "pad", "eos", "dtype")}
    pack_params["format"] = FORMAT_VERSION
    pack_fp = [fingerprint(["pack", i, p.spec(), srcs[p.source], scan_params, tok_sha, cluster_fp, pack_params])
               for i, p in enumerate(parts)]
    out = Path(d.out_dir)
    return _Plan(out, out / WORK, parts, params, srcs, n_buckets, scan_fp, bucket_fp, cluster_fp, pack_fp)


def _stage(name: str, fps: list[str], pl: _Plan, make_call: Callable[[int], tuple[Any, ...]], fn: Callable[..., Any],
           d: Any, counts: dict[str, Any], progress: bool,
           weight: Callable[[int], float] | None = None) -> list[dict[str, Any]]:
    """Run the tasks of one stage whose record does not verify (``weight``: task -> estimated work, largest
    first); return every task's record."""
    recs = [read_record(record_path(pl.work, name, i), fp) for i, fp in enumerate(fps)]
    todo = [i for i, r in enumerate(recs) if r is None]
    counts["computed"][name], counts["skipped"][name] = len(todo), len(fps) - len(todo)
    if todo:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="task", desc=name, dynamic_ncols=True)
        weights = [weight(i) for i in todo] if weight is not None else None
        for i, r in zip(todo, run_tasks(fn, [make_call(i) for i in todo], d.num_workers, name, bar, counts,
                                        weights)):
            recs[i] = r
        if bar is not None:
            bar.close()
    return recs  # type: ignore[return-value]


def run_pipeline(cfg: Any, progress: bool = True, console: Any = None) -> PipelineResult:
    """Run the whole pipeline for ``cfg`` (a MegadiffConfig); returns what it wrote and what it skipped."""
    import ray

    d = cfg.data
    _check_config(d)
    t0 = time.perf_counter()
    out = Path(d.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(d)
    tok_json, ids = tokenizer_payload(tok, f"tokenizer ({d.tokenizer.kind})")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    tok_file, tok_sha = tokenizer_file_name(tok_json), sha256_bytes(tok_json)
    if not (out / tok_file).is_file() or sha256_file(out / tok_file) != tok_sha:
        atomic_write_bytes(out / tok_file, tok_json)
    pl = _make_plan(d, tok_sha, ids, dtype)
    pl.work.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {"computed": {}, "skipped": {}, "nodes": {}, "task_cpu_s": 0.0}
    work = str(pl.work)
    pack_recs = [read_record(record_path(pl.work, "pack", i), fp) for i, fp in enumerate(pl.pack_fp)]
    if any(r is None for r in pack_recs):
        with ray_session(d.num_workers):
            tok_ref = [ray.put(tok_json)]  # in a list: not resolved per task
            scans = _stage("scan", pl.scan_fp, pl, lambda i: (i, pl.parts[i].spec(), pl.srcs[pl.parts[i].source],
                           {**pl.params, "n_buckets": pl.n_buckets}, tok_ref, tok_sha, work, pl.scan_fp[i]),
                           scan_partition, d, counts, progress, weight=lambda i: pl.parts[i].nbytes)
            keys = [str(pl.work / f"keys-{i:06d}.npy") for i in range(len(pl.parts))]
            _stage("bucket", pl.bucket_fp, pl, lambda b: (b, keys, work, pl.bucket_fp[b]), dedup_bucket, d, counts,
                   progress)
            buckets = [str(pl.work / f"bucket-{b:06d}.npz") for b in range(pl.n_buckets)]
            clus = _stage("cluster", [pl.cluster_fp], pl, lambda _: (buckets, work, pl.cluster_fp), cluster_stage, d,
                          counts, progress)[0]
            drops = str(pl.work / "drops.npy")
            _drop_manifest(out)  # shards are about to change: until the new manifest, the dataset is incomplete
            pack_recs = _stage("pack", pl.pack_fp, pl, lambda i: (i, pl.params, str(out), work, drops,
                               scans[i]["stats"], pl.pack_fp[i]), pack_partition, d, counts, progress,
                               weight=lambda i: scans[i]["stats"]["chars"])
            dedup_stats = clus["stats"]
    else:
        counts["computed"] = {"scan": 0, "bucket": 0, "cluster": 0, "pack": 0}
        counts["skipped"]["pack"] = len(pack_recs)
        dedup_stats = None
    manifest = _merge(d, pl, pack_recs, {"file": tok_file, "sha256": tok_sha, "kind": d.tokenizer.kind}, vocab, ids,
                      dedup_stats)
    _finish(out, pl, manifest, tok_file)
    n_docs = sum(s["docs_out"] for s in manifest["sources"].values())
    n_tok = sum(s["tokens"] for s in manifest["sources"].values())
    return PipelineResult(out, manifest, counts["computed"], counts["skipped"], counts["nodes"], counts["task_cpu_s"],
                          time.perf_counter() - t0, n_docs, n_tok, counts.get("addresses", {}))


def _drop_manifest(out: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST_NAME).unlink()


_SOURCE_KEYS = ("partitions", "files", "docs_in", "filtered", "dedup_exact", "dedup_near", "docs_out", "valid_docs",
                "repeats", "chars", "tokens")


def _merge(d: Any, pl: _Plan, recs: list[dict[str, Any]], tok: dict[str, str], vocab: int, ids: dict[str, int],
           dedup_stats: dict[str, Any] | None) -> dict[str, Any]:
    """The pack records, in partition order -> the manifest."""
    splits = {s: {"samples": 0, "tokens": 0, "pad_tokens": 0, "documents": 0, "shards": []} for s in SPLITS}
    sources: dict[str, dict[str, Any]] = {}
    files: dict[str, set[str]] = {}
    for part, rec in zip(pl.parts, recs):
        for s in SPLITS:
            sp, rs = splits[s], rec["splits"][s]
            for k in ("samples", "tokens", "pad_tokens", "documents"):
                sp[k] += rs[k]
            sp["shards"] += rs["shards"]
        name = d.sources[part.source].name
        st = sources.setdefault(name, {k: ({} if k == "filtered" else 0) for k in _SOURCE_KEYS})
        st["partitions"] += 1
        files.setdefault(name, set()).add(part.path)
        for k, v in rec["stats"].items():
            if k == "filtered":
                for f, n in v.items():
                    st["filtered"][f] = st["filtered"].get(f, 0) + n
            elif k in st:
                st[k] += v
    for name, fs in files.items():
        sources[name]["files"] = len(fs)
    if dedup_stats is None:  # every pack record verified: the totals the finished run recorded
        dedup_stats = _previous_dedup(pl)
    return build_manifest(tok, vocab, ids, d.seq_len, splits, sources, _output_config(d), dedup=dedup_stats)


def _previous_dedup(pl: _Plan) -> dict[str, Any]:
    for f in (pl.work / "dedup.json", record_path(pl.work, "cluster", 0)):
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(f.read_text())
            if rec.get("fingerprint") == pl.cluster_fp:
                return rec["stats"]
    raise MegadiffError(f"{pl.work}: the dedup totals of the finished partitions are missing; delete {pl.work} "
                        f"and rerun (every partition is recomputed)")


def _finish(out: Path, pl: _Plan, manifest: dict[str, Any], tok_file: str) -> None:
    """Remove stale shards and the intermediate files; keep the pack records; write the manifest last."""
    keep = {f for s in manifest["splits"].values() for sh in s["shards"] for f in (sh["file"], docs_name(sh["file"]))}
    keep.add(tok_file)
    ours = r"(train|valid)-\d{6}(-\d{4})?\.(tar|docs\.npy)|tokenizer-[0-9a-f]{8}\.json"
    for p in list(out.glob("*.tar")) + list(out.glob("*.docs.npy")) + list(out.glob("tokenizer-*.json")):
        if p.name not in keep and re.fullmatch(ours, p.name):
            p.unlink()  # left by an earlier run with another config
    for p in out.glob(".*.tmp"):  # a write cut short by a kill
        target = atomic_temp_target(p.name)
        if target is not None and (re.fullmatch(ours, target) or target == MANIFEST_NAME):
            p.unlink()
    atomic_write_json(pl.work / "dedup.json", {"fingerprint": pl.cluster_fp, "stats": manifest["dedup"]})
    packs = {record_path(pl.work, "pack", i).name for i in range(len(pl.parts))} | {"dedup.json"}
    for p in pl.work.iterdir():
        if p.name not in packs:
            p.unlink()
    write_manifest(out, manifest)


def print_summary(res: PipelineResult, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    m = res.manifest
    t = Table(title=f"sources -> {res.out_dir}")
    cols = ["partitions", "docs_in", "filtered", "dedup_exact", "dedup_near", "docs_out", "valid_docs", "repeats",
            "tokens"]
    t.add_column("source")
    for c in cols:
        t.add_column(c, justify="right")
    for name, st in m["sources"].items():
        t.add_row(name, *(", ".join(f"{k} {v:,}" for k, v in st[c].items()) if c == "filtered" else f"{st[c]:,}"
                          for c in cols))
    console.print(t)
    s = Table(title="splits")
    for c in ("split", "shards", "samples", "tokens", "pad_tokens", "documents"):
        s.add_column(c, justify="right" if c != "split" else "left")
    for name, sp in m["splits"].items():
        s.add_row(name, f"{len(sp['shards']):,}", f"{sp['samples']:,}", f"{sp['tokens']:,}", f"{sp['pad_tokens']:,}",
                  f"{sp['documents']:,}")
    console.print(s)
    dd = m["dedup"]
    el = max(res.seconds, 1e-9)
    console.print(
        f"vocab {m['vocab_size']:,} ({m['tokenizer']['file']}), seq_len {m['seq_len']}, dtype {m['dtype']}; "
        f"{res.docs:,} docs, {res.tokens:,} tokens in {res.seconds:.1f} s ({res.docs / el:,.0f} docs/s, "
        f"{res.tokens / el:,.0f} tokens/s); dedup: {dd['exact_removed']:,} exact, {dd['near_removed']:,} near "
        f"({dd['near_clusters']:,} clusters); tasks run {res.computed}, skipped (record verified) {res.skipped}"
    )
    if res.nodes:  # one line a script can read: which nodes ran the tasks
        console.print(f"tasks per node: {json.dumps(res.tasks_per_address())}", highlight=False, soft_wrap=True)
