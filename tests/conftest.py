"""Shared fixtures. `tiny_data`: a real tokenized dataset (6 Shakespeare plays, BPE 512, seq 64),
made once per session by the real pipeline through the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM_CONF = "/etc/megadiff-slurm/slurm.conf"  # the test cluster's own config (tools/local_slurm.sh)
if "SLURM_CONF" not in os.environ and os.path.exists(LOCAL_SLURM_CONF):
    os.environ["SLURM_CONF"] = LOCAL_SLURM_CONF
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def slurm_running() -> bool:
    """A Slurm cluster answers here (the local test cluster: tools/local_slurm.sh start)."""
    return bool(shutil.which("sbatch")) and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    """The `local` cluster profile; skips without a running cluster (fails in CI, which always starts one)."""
    if not slurm_running():
        msg = "local Slurm cluster not running (start it with: tools/local_slurm.sh start)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from launch import slurm

    return slurm.load_profile("local")


def megadiff_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "megadiff.cli", *args]


def run_cli(*args: str, timeout: float = 600, check: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    p = subprocess.run(megadiff_cmd(*args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"megadiff {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_data") / "shakespeare-64"
    run_cli("data", "tokenize", "configs/data_shakespeare.yaml", f"data.out_dir={out}", "data.seq_len=64",
            "data.tokenizer.vocab_size=512", "data.tokenizer.sample_bytes=2000000",
            "data.sources.0.paths=[pkg://shksprdata/texts/a*_gut.txt,pkg://shksprdata/texts/c*_gut.txt]",
            "data.sources.0.doc_split=blank_line", "data.min_chars=20", "data.valid_fraction=0.1",
            "data.num_workers=1", "data.samples_per_shard=256", "--no-progress")
    assert (out / "manifest.json").exists()
    return out


def tiny_train_args(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["train", "configs/tiny_cpu.yaml", f"data.out_dir={data}", f"trainer.run_dir={run_dir}",
            "model.max_seq_len=64", "trainer.progress=false", "trainer.num_samples=0", "trainer.log_interval=5",
            "trainer.eval_batches=2", "trainer.eval_n_t=2", *overrides]
