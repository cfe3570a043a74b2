"""A tiny bd3lm run through the real CLI: trains, resumes bit-identically after SIGKILL, evaluates (block
NELBO), samples with the bd3lm sampler, exports to HF with the block size recorded."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import run_cli, tiny_train_args
from test_train import losses, start, wait_for

pytestmark = pytest.mark.slow

BD = ("diffusion.objective=bd3lm", "diffusion.block_size=16", "trainer.max_steps=8", "trainer.save_interval=4",
      "trainer.eval_interval=8", "tracking.enabled=false")


def test_bd3lm_trains_resumes_evaluates_samples_and_exports(tiny_data, tmp_path):
    ref = tmp_path / "ref"
    out = run_cli(*tiny_train_args(tiny_data, ref, *BD, "trainer.num_samples=1"))
    assert "val nelbo" in out.stdout and "--- sample 0" in out.stdout
    run = tmp_path / "run"
    args = tiny_train_args(tiny_data, run, *BD, "trainer.num_samples=1")
    p = start(args)
    wait_for(lambda: (run / "checkpoints" / "latest").exists() or p.poll() is not None)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert "resumed from" in run_cli(*args).stdout
    assert losses(run) == losses(ref) and sorted(losses(run)) == list(range(1, 9))

    res = run_cli("eval", str(run), "--n-t", "2", "--batches", "1", "--no-progress", "--out", str(tmp_path / "e.json"))
    ev = json.loads((tmp_path / "e.json").read_text())
    row = ev["results"][0] if "results" in ev else ev
    assert res.returncode == 0 and 0 < json.dumps(row).count("nelbo")

    run_cli("sample", str(run), "--sampler", "bd3lm", "--prompt", "ROMEO:", "--num", "2", "--length", "20",
            "--no-progress", "--out", str(tmp_path / "s.jsonl"))
    recs = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["sampler"] == "bd3lm" and r["sample"] for r in recs)

    run_cli("convert", "to-hf", str(run), str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["megadiff_block_size"] == 16
    assert "Block diffusion: how to sample" in (tmp_path / "hf" / "README.md").read_text()
