"""Full-scale dry run: every shipped large-model recipe, an 8B and a 70B layout, built on the meta device
under torch's fake process group at full world size (no weights allocated), with a memory forecast."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ENV, ROOT, run_cli

pytestmark = pytest.mark.slow

# recipe, world size (the layout each recipe states in its header), overrides
LAYOUTS = {
    "mdlm_owt_gpt2small": ("configs/mdlm_owt_gpt2small.yaml", 8, []),
    "smdm_1.1b": ("configs/smdm_1.1b.yaml", 16, []),
    "llada_8b": ("configs/llada_8b.yaml", 128, []),
    "8b_tp8_pp2_dp8": ("configs/llada_8b.yaml", 128, ["model.preset=8b", "model.ffn_hidden_size=null", "model.vocab_size=128256",
                                                      "parallel.tp=8", "parallel.pp=2"]),
    "70b_tp8_pp8_dp16": ("configs/llada_8b.yaml", 1024, ["model.preset=70b", "model.ffn_hidden_size=null", "model.vocab_size=128256",
                                                         "parallel.tp=8", "parallel.pp=8", "trainer.micro_batch=1"]),
}

SCRIPT = r"""
import contextlib, io, json, sys
from megadiff.config import load_config
from megadiff.train.dryrun import dry_run
out = {}
for name, (path, world, ov) in json.loads(sys.argv[1]).items():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = dry_run(load_config(path, ov), world, gpu_mem_gib=80)
    out[name] = {"rc": rc, "stdout": buf.getvalue()}
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dry") / "out.json"
    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(LAYOUTS), str(out)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(out.read_text())


def total_params(stdout: str) -> int:
    line = next(x for x in stdout.splitlines() if x.startswith("parameters (all stages"))
    return int(line.rsplit(" ", 1)[1].replace(",", ""))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_recipe_layouts_build_and_fit_80_gib(runs, name):
    r = runs[name]
    assert r["rc"] == 0, r["stdout"]
    _, world, _ = LAYOUTS[name]
    assert f"dry run: {world} ranks" in r["stdout"]


def test_dry_run_parameter_counts_match_the_published_models(runs):
    # the per-stage counts come from megatron's modules on the meta device (checked against memory.py)
    assert abs(total_params(runs["llada_8b"]["stdout"]) - 8.02e9) < 0.01e9  # LLaDA-8B: 8.02B
    assert abs(total_params(runs["8b_tp8_pp2_dp8"]["stdout"]) - 8.03e9) < 0.01e9  # Llama-3-8B: 8.03B
    assert abs(total_params(runs["70b_tp8_pp8_dp16"]["stdout"]) - 70.55e9) < 0.05e9  # Llama-3-70B: 70.55B
    assert abs(total_params(runs["mdlm_owt_gpt2small"]["stdout"]) - 124.4e6) < 1e6  # GPT-2 small + 2 tokens
    # the probe: a Llama-3-8B-shaped first stage at TP=8, PP=2 holds 502,005,760 parameters per rank
    # with the vocab unpadded (128,256); megadiff pads it to a multiple of 128 x TP = 129,024 rows:
    # 16 layers x 27,271,168 + 129,024 x 4096 / 8
    assert "stage 0: 16 layers, 502,398,976 parameters per rank" in runs["8b_tp8_pp2_dp8"]["stdout"]
    assert 502_398_976 - 502_005_760 == (129_024 - 128_256) * 4096 // 8


def test_layout_that_cannot_fit_is_a_clear_error():
    p = run_cli("train", "configs/llada_8b.yaml", "parallel.tp=1", "parallel.pp=1", "trainer.micro_batch=5",
                "model.recompute=none", "--dry-run", "--world-size", "128", "--gpu-mem-gib", "80", check=False,
                timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "layout does not fit: stage 0 needs" in p.stderr and "--gpu-mem-gib 80" in p.stderr
