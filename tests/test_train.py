"""Trainer end to end on CPU through the real CLI: exact resume after SIGKILL, resharding resume,
kill during save, preemption signal, NaN guard, MLflow down, metric values, LR schedules."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ENV, ROOT, megadiff_cmd, run_cli, tiny_train_args

pytestmark = pytest.mark.slow


def losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(megadiff_cmd(*args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(pred, timeout: float = 240, every: float = 0.01) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(every)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """20 steps, uninterrupted, TP=1 DP=1."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_cli(*tiny_train_args(tiny_data, run, "trainer.max_steps=20", "trainer.save_interval=10",
                             "trainer.eval_interval=10", "tracking.enabled=false"))
    return run


def test_exact_resume_after_sigkill_is_bit_identical(tiny_data, reference, tmp_path):
    run = tmp_path / "run"
    args = tiny_train_args(tiny_data, run, "trainer.max_steps=20", "trainer.save_interval=10",
                           "trainer.eval_interval=10", "tracking.enabled=false")
    p = start(args)
    wait_for(lambda: (run / "checkpoints" / "latest").exists() or p.poll() is not None)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000010"
    out = run_cli(*args)
    assert "resumed from" in out.stdout
    ref, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, 21))
    assert got == ref  # bit-identical floats, every step


def test_adam_step_counter_after_resume_equals_step_count(tiny_data, reference, tmp_path):
    """Defect 3 of megatron's DistributedOptimizer: after load, one shared `step` tensor advanced once
    per parameter per step. With the fix every parameter's counter equals the global step."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("step_000010\n")
    code = f"""
import sys
from megadiff.config import load_config
from megadiff.train.trainer import Trainer
from megadiff.train.cli import build_callbacks
from megadiff.checkpoint.manager import adam_steps
cfg = load_config('configs/tiny_cpu.yaml', {tiny_train_args(tiny_data, run, 'trainer.max_steps=13',
                                                             'tracking.enabled=false', 'trainer.eval_interval=0')[2:]!r})
t = Trainer(cfg, build_callbacks(cfg))
print('AFTER_LOAD', sorted(adam_steps(t.optimizer)))
t.fit()
print('AFTER_FIT', sorted(adam_steps(t.optimizer)))
"""
    p = subprocess.run([os.sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "AFTER_LOAD [10.0]" in p.stdout
    assert "AFTER_FIT [13.0]" in p.stdout
    assert losses(run) == {s: v for s, v in losses(reference).items() if 11 <= s <= 13}  # bit-identical resume


def test_resharding_resume_tp2_to_tp1_and_dp1_to_dp2(tiny_data, reference, tmp_path):
    ref = losses(reference)
    # TP=2 for 10 steps, then TP=1 for 10 more
    run = tmp_path / "tp"
    base = ("trainer.max_steps=20", "trainer.save_interval=10", "trainer.eval_interval=0", "tracking.enabled=false")
    p = start(tiny_train_args(tiny_data, run, *base, "parallel.tp=2") + ["--nproc-per-node", "2"])
    wait_for(lambda: (run / "checkpoints" / "latest").exists() or p.poll() is not None)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    run_cli(*tiny_train_args(tiny_data, run, *base, "parallel.tp=1"))
    got = losses(run)
    assert sorted(got) == list(range(1, 21))
    for s in range(1, 21):
        assert math.isclose(got[s], ref[s], rel_tol=2e-5), (s, got[s], ref[s])
    # DP=1 checkpoint (the reference's step 10) resumed with DP=2
    import shutil

    run2 = tmp_path / "dp"
    shutil.copytree(reference / "checkpoints", run2 / "checkpoints")
    (run2 / "checkpoints" / "latest").write_text("step_000010\n")
    run_cli(*tiny_train_args(tiny_data, run2, *base), "--nproc-per-node", "2")
    got2 = losses(run2)
    assert sorted(got2) == list(range(11, 21))
    for s in range(11, 21):
        assert math.isclose(got2[s], ref[s], rel_tol=2e-5), (s, got2[s], ref[s])


def test_kill_during_save_keeps_previous_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = tiny_train_args(tiny_data, run, "trainer.max_steps=60", "trainer.save_interval=1", "trainer.keep_last=2",
                           "trainer.eval_interval=0", "tracking.enabled=false")
    p = start(args)
    ck = run / "checkpoints"
    # kill while a step directory is still being written (its .tmp exists) and an older one is latest
    wait_for(lambda: p.poll() is not None or ((ck / "latest").exists() and any(ck.glob("step_*.tmp"))), every=0.002)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    tmp_dirs = list(ck.glob("step_*.tmp"))
    assert tmp_dirs, "the kill did not land inside a save"
    latest = (ck / "latest").read_text().strip()
    assert (ck / latest / "megadiff.json").exists()
    assert int(latest.split("_")[1]) < int(tmp_dirs[0].name.split("_")[1].split(".")[0])
    out = run_cli(*tiny_train_args(tiny_data, run, "trainer.max_steps=" + str(int(latest.split("_")[1]) + 2),
                                   "trainer.save_interval=0", "trainer.eval_interval=0", "tracking.enabled=false"))
    assert f"resumed from {ck / latest}" in out.stdout


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tiny_data, reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("step_000099\n")
    p = run_cli(*tiny_train_args(tiny_data, run, "tracking.enabled=false"), check=False)
    assert p.returncode == 2 and "step_000099 does not exist" in p.stderr, p.stderr[-3000:]
    assert "trainer.resume=step_000020" in p.stderr  # the newest checkpoint that verifies is offered
    (run / "checkpoints" / "latest").write_text("step_000010\n")
    shards = sorted((run / "checkpoints" / "step_000010").glob("*.distcp"))
    sizes = {f: f.stat().st_size for f in shards}
    for f in shards:  # truncated: found by the recorded sizes, before anything loads
        f.write_bytes(b"garbage")
    p = run_cli(*tiny_train_args(tiny_data, run, "tracking.enabled=false"), check=False)
    assert p.returncode == 2 and f"{shards[0].name} has 7 bytes" in p.stderr, p.stderr[-3000:]
    for f in shards:  # same sizes, garbage content: the load itself fails, naming the checkpoint
        f.write_bytes(b"\0" * sizes[f])
    p = run_cli(*tiny_train_args(tiny_data, run, "tracking.enabled=false"), check=False)
    assert p.returncode == 2 and "could not load checkpoint" in p.stderr and "step_000010" in p.stderr, p.stderr[-3000:]


def test_preemption_signal_saves_and_exits_75_then_resumes_identically(tiny_data, reference, tmp_path):
    run = tmp_path / "run"
    args = tiny_train_args(tiny_data, run, "trainer.max_steps=20", "trainer.save_interval=10",
                           "trainer.eval_interval=10", "tracking.enabled=false")
    p = start(args + ["--nproc-per-node", "2"])
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 3 or p.poll() is not None)
    os.killpg(p.pid, signal.SIGUSR1)  # what Slurm's --signal=B:USR1 delivers
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 75, out[-3000:]
    stopped = (run / "checkpoints" / "latest").read_text().strip()
    assert "preempted (SIGUSR1)" in out and stopped != "step_000010"
    run_cli(*args, "--nproc-per-node", "2")
    got, ref = losses(run), losses(reference)
    assert sorted(got) == sorted(ref) == list(range(1, 21))
    for s in ref:  # DP=2 vs the DP=1 reference: same maths, different reduction order
        assert math.isclose(got[s], ref[s], rel_tol=1e-6), (s, got[s], ref[s])


def test_nan_guard_skips_updates_and_aborts(tiny_data, tmp_path):
    run = tmp_path / "run"
    code = f"""
import torch
from megadiff import MegadiffError
from megadiff.config import load_config
from megadiff.train.trainer import Trainer
from megadiff.train.cli import build_callbacks
cfg = load_config('configs/tiny_cpu.yaml', {tiny_train_args(tiny_data, run, 'trainer.max_steps=20',
                                                             'trainer.nan_max_consecutive=3', 'tracking.enabled=false',
                                                             'trainer.eval_interval=0', 'trainer.save_interval=0')[2:]!r})
t = Trainer(cfg, build_callbacks(cfg))
w = t.built.model.decoder.final_layernorm.weight
with torch.no_grad():
    w[0] = float('nan')   # a poisoned weight: every loss is NaN from here on
before = t.built.model.embedding.word_embeddings.weight.detach().clone()
try:
    t.fit()
    print('NO_ABORT')
except MegadiffError as e:
    print('ABORT', e)
after = t.built.model.embedding.word_embeddings.weight.detach()
print('UNCHANGED', bool(torch.equal(before, after)), 'SKIPPED', t.skipped_steps)
"""
    p = subprocess.run([os.sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ABORT training diverged: 3 consecutive steps" in p.stdout
    assert "UNCHANGED True SKIPPED 3" in p.stdout
    recs = [r for r in records(run) if "loss" in r]
    assert len(recs) == 3 and all(r["skipped"] for r in recs)


def test_mlflow_down_buffers_then_replays(tiny_data, tmp_path):
    run = tmp_path / "run"
    base = ("trainer.save_interval=5", "trainer.eval_interval=5")
    out = run_cli(*tiny_train_args(tiny_data, run, "trainer.max_steps=10", *base, "tracking.uri=http://127.0.0.1:9"))
    assert out.stdout.count("MLflow tracking at http://127.0.0.1:9 failed") == 1  # said once, not per step
    buf = run / "mlflow_buffer.jsonl"
    assert buf.exists() and len(buf.read_text().splitlines()) >= 3
    # the server is back (a real sqlite store): the resumed run replays the buffer
    db = tmp_path / "mlflow.db"
    run_cli(*tiny_train_args(tiny_data, run, "trainer.max_steps=12", *base, f"tracking.uri=sqlite:///{db}"))
    assert not buf.exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == [5, 10, 12]
    assert len(client.get_metric_history(run_id, "val/nelbo")) >= 2
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.params["trainer.max_steps"] == "12"


def test_metric_values_follow_the_flops_formula(tiny_data, tmp_path):
    from omegaconf import OmegaConf

    from megadiff.config import ModelConfig
    from megadiff.model.flops import flops_per_token
    from megadiff.model.presets import padded_vocab_size, resolve_shape

    run = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_data, run, "trainer.max_steps=4", "trainer.peak_tflops=0.5",
                             "trainer.eval_interval=0", "tracking.enabled=false"))
    cfg = OmegaConf.load(ROOT / "configs/tiny_cpu.yaml").model
    shape = resolve_shape(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg, {"max_seq_len": 64}))
    vocab = json.loads((tiny_data / "manifest.json").read_text())["vocab_size"]
    fpt = flops_per_token(shape, padded_vocab_size(vocab), 64)
    for r in (r for r in records(run) if "loss" in r):
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert math.isclose(r["tokens_per_s"], 16 * 64 / r["step_s"], rel_tol=1e-9)
        assert math.isclose(r["tflops"], r["tokens_per_s"] * fpt / 1e12, rel_tol=1e-9)
        assert math.isclose(r["mfu"], r["tflops"] / 0.5, rel_tol=1e-9)
        assert r["tokens"] == r["step"] * 16 * 64


def test_lr_schedules_have_the_documented_shapes():
    from omegaconf import OmegaConf

    from megadiff.config import OptimConfig
    from megadiff.train.lr import lr_at

    def curve(**kw):
        oc = OmegaConf.merge(OmegaConf.structured(OptimConfig), kw)
        return [lr_at(s, oc, 100) for s in range(100)]

    c = curve(lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule="cosine")
    assert c[0] == pytest.approx(0.1) and c[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(c[:9], c[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(c[10:], c[11:]))  # then never rises
    assert c[99] == pytest.approx(0.1) and c[54] == pytest.approx(0.55, abs=0.01)  # cosine midpoint
    w = curve(lr=1.0, min_lr=0.0, warmup_steps=10, lr_schedule="wsd", decay_fraction=0.2)
    assert all(x == 1.0 for x in w[10:80])  # stable
    assert w[99] == pytest.approx(0.0) and w[89] == pytest.approx(0.5)  # linear decay over the last 20
    k = curve(lr=0.5, warmup_steps=0, lr_schedule="constant")
    assert set(k) == {0.5}


def test_vocab_padding_follows_the_checkpoint_across_tp(tmp_path):
    """Vocab 300 pads to 512 rows at TP=2 but 384 at TP=1 (megatron: multiple of 128 x TP); GPT-2's 50257 +
    [MASK] is such a vocab. A TP=2 run resumes at TP=1 and loads for sampling (TP=1); the checkpoint records
    its row count, vocab and tokenizer hash, and sampling with another tokenizer is refused."""
    import numpy as np

    from megadiff.data.format import write_dataset
    from megadiff.data.tokenizer import special_ids, to_bytes, toy_tokenizer

    tok = toy_tokenizer(300)
    rng = np.random.default_rng(0)
    data = tmp_path / "ds"
    write_dataset(data, {"train": rng.integers(4, 300, size=(256, 32)), "valid": rng.integers(4, 300, size=(16, 32))},
                  to_bytes(tok), special_ids(tok), 300, 1024)
    run = tmp_path / "run"
    args = ["train", "configs/tiny_cpu.yaml", f"data.out_dir={data}", f"trainer.run_dir={run}", "model.max_seq_len=32",
            "trainer.progress=false", "trainer.num_samples=0", "trainer.eval_interval=0", "tracking.enabled=false",
            "trainer.save_interval=2", "trainer.log_interval=1"]
    run_cli(*args, "trainer.max_steps=2", "parallel.tp=2", "--nproc-per-node", "2")
    meta = json.loads((run / "checkpoints" / "step_000002" / "megadiff.json").read_text())
    assert meta["padded_vocab_size"] == 512 and meta["vocab_size"] == 300 and len(meta["tokenizer_sha256"]) == 64
    run_cli(*args, "trainer.max_steps=3", "parallel.tp=1")  # resumes with 512 rows, not 384
    assert sorted(losses(run)) == [1, 2, 3]
    out = tmp_path / "s.jsonl"
    run_cli("sample", str(run), "--num", "1", "--length", "8", "--out", str(out), "--quiet", "--no-progress")
    rec = json.loads(out.read_text())
    assert rec["nfe"] >= 1 and "[MASK]" not in rec["sample"]
    # a dataset with another tokenizer (same vocab size) is refused by the hash the checkpoint recorded
    other = tmp_path / "other"
    tok2 = toy_tokenizer(300)
    tok2.add_tokens(["extra"])
    write_dataset(other, {"train": rng.integers(4, 300, size=(8, 32))}, to_bytes(tok2), special_ids(tok2), 300, 1024)
    data.rename(tmp_path / "ds_moved")  # the run's own data dir is gone: only the recorded hash can tell
    bad = run_cli("sample", str(run), "--data-dir", str(other), "--quiet", "--no-progress", check=False)
    assert bad.returncode == 2 and "is not the one" in bad.stderr and "sha256" in bad.stderr, bad.stderr
