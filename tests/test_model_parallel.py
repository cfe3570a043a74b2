"""TP / PP / DP equivalence and attention direction, on real megatron-core layers under gloo (2 ranks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ENV, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "checks.json"
    from megadiff.utils.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(ROOT / "tests" / "dist_checks.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads(out.read_text())


def test_tp2_equals_tp1(checks):
    assert checks["tp2_logits_rel"] < 1e-5
    assert checks["tp2_loss_rel"] < 1e-5
    assert checks["tp2_grad_rel"] < 1e-4


def test_pp2_equals_pp1(checks):
    assert checks["pp2_loss_rel"] < 1e-5
    assert checks["pp2_grad_rel"] < 1e-4
    assert checks["pp2_num_params_stage"] > 0


def test_dp2_equals_full_batch(checks):
    assert checks["dp2_grad_rel"] < 1e-5


def test_attention_is_bidirectional_and_ar_mode_is_causal(checks):
    half = checks["seq_len"] // 2
    assert checks["bidirectional_changed_before"] == half  # every position before the flipped token moved
    assert checks["bidirectional_changed_from"] == half
    assert checks["causal_changed_before"] == 0  # AR mode: positions < j ignore token j
    assert checks["causal_changed_from"] == half


def test_model_info_cli_prints_counts():
    p = subprocess.run([sys.executable, "-m", "megadiff.cli", "model", "info", "350m", "--arch", "gpt2"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "355,919,872 total" in p.stdout and "FLOPs/token      2.725e+09" in p.stdout and "memory/GPU" in p.stdout
