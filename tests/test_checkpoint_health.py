"""Damaged checkpoints, a full disk, async saves, and set-up failures — through the real CLI and real
megatron dist_checkpointing saves (CPU, gloo).

One 4-step run (saves at steps 2 and 4) is shared; each test copies it before damaging it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ENV, ROOT, run_cli, tiny_train_args

BASE = ("trainer.max_steps=4", "trainer.save_interval=2", "trainer.eval_interval=0", "tracking.enabled=false",
        "trainer.log_interval=1")


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def good_run(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt_health") / "run"
    run_cli(*tiny_train_args(tiny_data, run, *BASE))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_contents_record_every_file_and_verify_reads_no_tensor(good_run):
    d = good_run / "checkpoints" / "step_000004"
    doc = json.loads((d / "contents.json").read_text())
    on_disk = {p.name: p.stat().st_size for p in d.iterdir() if p.name != "contents.json"}
    assert doc["files"] == on_disk and doc["step"] == 4 and doc["total_bytes"] == sum(on_disk.values())
    assert {"megadiff.json", "config.yaml", ".metadata", "common.pt"} <= set(on_disk)
    assert any(n.endswith(".distcp") for n in on_disk)
    code = ("import sys; from megadiff.cli import main; rc = main(['checkpoint', 'verify', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'verify imported torch'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(good_run)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "step_000004 (latest): ok" in p.stdout and "all 2 checkpoint(s) verify" in p.stdout


def test_damaged_latest_is_named_and_the_newest_good_one_offered(good_run, tiny_data, tmp_path):
    run = copy_run(good_run, tmp_path / "run")
    shard = sorted((run / "checkpoints" / "step_000004").glob("*.distcp"))[0]
    shard.unlink()
    common = run / "checkpoints" / "step_000002" / "common.pt"
    original = common.read_bytes()
    common.write_bytes(original[:-5])  # step 2 truncated too ...
    v = run_cli("checkpoint", "verify", str(run), check=False)
    assert v.returncode == 1
    assert f"{shard} is missing" in v.stdout and "has" in v.stdout and "bytes" in v.stdout
    assert "no checkpoint verifies" in v.stdout
    common.write_bytes(original)  # ... and restored: step 2 verifies
    args = tiny_train_args(tiny_data, run, *BASE, "trainer.max_steps=6")
    p = run_cli(*args, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"{shard} is missing" in p.stderr and "trainer.resume=step_000002" in p.stderr
    assert "Traceback" not in p.stderr and "CheckpointException" not in p.stderr


def test_resume_latest_valid_falls_back_loudly_and_reproduces_the_run(good_run, tiny_data, tmp_path):
    run = copy_run(good_run, tmp_path / "run")
    sorted((run / "checkpoints" / "step_000004").glob("*.distcp"))[0].unlink()
    (run / "metrics.jsonl").unlink()
    p = run_cli(*tiny_train_args(tiny_data, run, *BASE, "trainer.resume=latest_valid"))
    assert "WARNING" in p.stderr and "resuming from step_000002" in p.stderr
    assert "resumed from" in p.stdout and "step_000002" in p.stdout
    ref = losses(good_run)
    assert losses(run) == {s: ref[s] for s in (3, 4)}  # steps 3-4 trained again, bit-identical
    assert run_cli("checkpoint", "verify", str(run)).returncode == 0  # step 4 rewritten whole


def test_bad_resume_value_names_the_key(good_run):
    from megadiff import MegadiffError
    from megadiff.checkpoint.manager import CheckpointManager

    mgr = CheckpointManager(good_run)
    assert mgr.resume_step("latest") == 4 and mgr.resume_step("step_000002") == 2
    with pytest.raises(MegadiffError, match=r"'trainer.resume' is 'newest'; allowed: latest, latest_valid"):
        mgr.resume_step("newest")
    with pytest.raises(MegadiffError, match=r"trainer.resume=step_000003: .*step_000003 does not exist"):
        mgr.resume_step("step_000003")
    from megadiff.config import load_config

    with pytest.raises(MegadiffError, match=r"'trainer.resume' is 'newest'"):  # caught before any launch
        load_config("configs/tiny_cpu.yaml", ["trainer.resume=newest"])


def test_failed_setup_leaves_no_run_dir(tiny_data, tmp_path):
    run = tmp_path / "never"
    p = run_cli(*tiny_train_args(tiny_data, run, *BASE, "model.vocab_size=999"), check=False)
    assert p.returncode == 2 and "model.vocab_size=999" in p.stderr, p.stderr[-2000:]
    assert not run.exists()


def test_override_errors_name_the_command_line():
    from megadiff import MegadiffError
    from megadiff.config import load_config

    with pytest.raises(MegadiffError, match=r"^command-line override 'trainer.max_stepz=5': unknown config key"):
        load_config("configs/tiny_cpu.yaml", ["trainer.max_stepz=5"])
    with pytest.raises(MegadiffError, match=r"^command-line override 'trainer.max_steps=many': bad value"):
        load_config("configs/tiny_cpu.yaml", ["trainer.max_steps=many"])
    with pytest.raises(MegadiffError, match=r"Allowed keys in data.sources\[0\]: name, paths"):
        load_config("configs/data_shakespeare.yaml", ["data.sources.0.pathz=x"])


# ------------------------------------------------------------------------------------------- disk full

@pytest.fixture
def small_fs(tmp_path):
    """A 20 MB tmpfs (two checkpoints of the tiny model fit, a third does not); needs root to mount."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot mount a small tmpfs here ({r.stderr.strip()}); the disk-full test needs root"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_save_says_one_line_removes_partial_and_resumes(tiny_data, small_fs):
    run = small_fs / "run"
    args = tiny_train_args(tiny_data, run, "trainer.max_steps=8", "trainer.save_interval=2", "trainer.keep_last=3",
                           "trainer.eval_interval=0", "tracking.enabled=false")
    p = run_cli(*args, check=False)
    assert p.returncode == 74, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("megadiff: error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr
    line = err[0]
    for part in (f"to {run / 'checkpoints'}", "free", "a checkpoint takes 7.", "step_000004",
                 "trainer.keep_last=2", "exit code 74"):
        assert part in line, (part, line)
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000004"
    assert not list(ck.glob("*.tmp")), "partial checkpoint left on the full disk"
    shutil.rmtree(ck / "step_000002")  # the user frees space and keeps one checkpoint from now on
    p = run_cli(*args, "trainer.keep_last=1")
    assert "resumed from" in p.stdout and "(step 4" in p.stdout
    assert (ck / "latest").read_text().strip() == "step_000008"
    assert sorted(d.name for d in ck.iterdir()) == ["latest", "step_000008"]


# ------------------------------------------------------------------------------------------- async save

ASYNC_SCRIPT = """
import os, sys
from megadiff.config import load_config
from megadiff.train.trainer import Trainer
cfg = load_config('configs/tiny_cpu.yaml', sys.argv[2:])
t = Trainer(cfg)
mode = sys.argv[1]
for _ in range(2):
    t.train_step()
t.save()                                     # async: returns with the writer started
ck = t.ckpt.root
print('PENDING', t.ckpt.pending_step, 'LATEST', (ck / 'latest').exists(), 'TMP', (ck / 'step_000002.tmp').is_dir())
t.ckpt.wait()
print('AFTER_WAIT', (ck / 'latest').read_text().strip(), t.ckpt.verify(2))
t.train_step()
t.save()
if mode == 'kill':                           # the job is killed while step 3 is being written:
    import signal                            # SIGKILL to the trainer and its writer process alike
    os.killpg(0, signal.SIGKILL)
t.ckpt.wait()
print('DONE', (ck / 'latest').read_text().strip())
"""


def test_async_save_moves_latest_only_when_finalised_and_survives_a_kill(good_run, tiny_data, tmp_path):
    run = tmp_path / "run"
    over = tiny_train_args(tiny_data, run, *BASE, "trainer.async_save=true")[2:]
    p = subprocess.run([sys.executable, "-c", ASYNC_SCRIPT, "kill", *over], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300, start_new_session=True)
    assert p.returncode == -9, p.stderr[-3000:]
    assert "PENDING 2 LATEST False TMP True" in p.stdout  # not finalised: latest absent, shards in .tmp
    assert "AFTER_WAIT step_000002 []" in p.stdout
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000002" and not (ck / "step_000003").exists()
    # the same step-2 state as a synchronous save: identical shard files
    for f in sorted((good_run / "checkpoints" / "step_000002").glob("*.distcp")):
        assert f.read_bytes() == (ck / "step_000002" / f.name).read_bytes(), f.name
    # resuming after the kill: previous latest loads, the run finishes (the end of training waits for the
    # last async save), the partial step_000003.tmp is gone and the losses equal the synchronous run's
    (run / "metrics.jsonl").unlink(missing_ok=True)
    out = run_cli(*tiny_train_args(tiny_data, run, *BASE, "trainer.async_save=true"))
    assert "resumed from" in out.stdout and "(step 2" in out.stdout
    assert (ck / "latest").read_text().strip() == "step_000004" and not list(ck.glob("*.tmp"))
    ref = losses(good_run)
    assert losses(run) == {s: ref[s] for s in (3, 4)}
