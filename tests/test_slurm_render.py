"""Slurm launcher without a cluster: profiles, rendering, request checks, dry-run, no torch at submit time."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import slurm
from launch.slurm import ClusterProfile, JobRequest, RunSpec
from megadiff import MegadiffError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def _req(tmp_path, n=1, **kw):
    dirs = [tmp_path / f"run{i}" for i in range(n)]
    cmds = [["python", "-c", f"print({i})"] for i in range(n)]
    return JobRequest(name="t", run_dirs=dirs, commands=cmds, **kw)


def _bash_syntax_ok(text: str, tmp_path: Path) -> None:
    f = tmp_path / "check.sbatch"
    f.write_text(text)
    out = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", slurm.profile_names())
def test_every_shipped_profile_loads_and_renders_valid_bash(name, tmp_path):
    prof = slurm.load_profile(name)
    assert prof.name == name and prof.requeue in slurm.REQUEUE_MODES
    g = prof.gpus_per_node
    text = slurm.render(_req(tmp_path, gpus_per_node=g), prof)
    _bash_syntax_ok(text, tmp_path)
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --open-mode=append" in text
    assert f"#SBATCH --ntasks-per-node={max(g, 1)}" in text
    if g:
        assert f"#SBATCH --gpus-per-node={g}" in text


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(MegadiffError, match=r"unknown cluster profile 'nope'.*available: .*local"):
        slurm.load_profile("nope")


def test_profile_with_unknown_key_or_wrong_type_names_the_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("gpus_per_node: 2\npartion: gpu\n")
    with pytest.raises(MegadiffError, match=rf"cluster profile '{p}': unknown key 'partion'; allowed keys: .*partition"):
        slurm.load_profile(str(p))
    p.write_text("gpus_per_node: eight\n")
    with pytest.raises(MegadiffError, match=rf"cluster profile '{p}': bad value for key 'gpus_per_node'"):
        slurm.load_profile(str(p))
    p.write_text("env: [NCCL_DEBUG]\n")
    with pytest.raises(MegadiffError, match=rf"cluster profile '{p}': bad value for key 'env'"):
        slurm.load_profile(str(p))
    p.write_text("requeue: sometimes\n")
    with pytest.raises(MegadiffError, match="key 'requeue' must be one of requeue, chain, none"):
        slurm.load_profile(str(p))
    p.write_text("gpus_per_node: '4'\nenv: {A: 1}\n")  # omegaconf converts what it can, like run configs
    prof = slurm.load_profile(str(p))
    assert isinstance(prof, slurm.ClusterProfile) and prof.gpus_per_node == 4 and prof.name == "bad"


def test_pyxis_container_profile_renders_container_options(tmp_path):
    prof = slurm.load_profile("example-h100")
    text = slurm.render(_req(tmp_path, nodes=4, gpus_per_node=8), prof)
    assert "--container-image=/shared/images/megadiff-25.04.sqsh" in text
    assert "--container-mounts=/shared/data:/shared/data,/shared/runs:/shared/runs" in text
    assert "export NCCL_IB_HCA=mlx5" in text
    for line in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=12", "--account=my-project",
                 "--partition=gpu", "--qos=normal", "--mem-per-gpu=200G", "--exclusive", "--requeue"):
        assert f"#SBATCH {line}\n" in text, line
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "RANK=$SLURM_PROCID" in text and 'FIRST_NODE=$(scontrol show hostnames' in text


def test_chain_mode_uses_singleton_dependency_and_no_requeue(tmp_path):
    prof = slurm.load_profile("example-venv")
    text = slurm.render(_req(tmp_path, gpus_per_node=4, dependency="afterok:7"), prof)
    assert "#SBATCH --dependency=afterok:7,singleton" in text
    assert "#SBATCH --no-requeue" in text and "scontrol requeue" not in text
    assert "module load cuda/12.4 gcc/12" in text


def test_array_renders_one_case_per_member(tmp_path):
    prof = slurm.load_profile("local")
    req = _req(tmp_path, n=3, array_parallel=2, script_dir=tmp_path / "sweep" / "slurm")
    text = slurm.render(req, prof)
    _bash_syntax_ok(text, tmp_path)
    assert "#SBATCH --array=0-2%2" in text
    assert f"#SBATCH --output={tmp_path}/sweep/logs/slurm-%A_%a.out" in text
    for i in range(3):
        assert f"  {i}) RUN_DIR={tmp_path}/run{i}; CMD=(python -c 'print({i})') ;;" in text


def test_impossible_requests_fail_before_submission(tmp_path):
    prof = slurm.load_profile("local")
    with pytest.raises(MegadiffError, match="--gpus-per-node 3 is impossible.*2 GPU"):
        slurm.check_request(_req(tmp_path, gpus_per_node=3), prof)
    with pytest.raises(MegadiffError, match="exceeds the 2 nodes"):
        slurm.check_request(_req(tmp_path, nodes=3), prof)
    with pytest.raises(MegadiffError, match="not a Slurm time"):
        slurm.check_request(_req(tmp_path, time="ten minutes"), prof)
    # against the nodes as scontrol reports them (the profile may promise more than the cluster has)
    big = ClusterProfile(name="big", gpus_per_node=8, cpus_per_gpu=1)
    nodes = [{"NodeName": "n1", "CPUTot": "2", "Gres": "gpu:2", "Partitions": "debug"}]
    with pytest.raises(MegadiffError, match="largest node has 2 GPU"):
        slurm.check_request(_req(tmp_path, gpus_per_node=4), big, nodes)
    with pytest.raises(MegadiffError, match="4 CPUs is impossible"):
        slurm.check_request(_req(tmp_path, tasks_per_node=4), big, nodes)
    slurm.check_request(_req(tmp_path, gpus_per_node=2), big, nodes)  # fits


def test_gres_parsing():
    assert slurm.gres_gpus("gpu:2") == 2
    assert slurm.gres_gpus("gpu:h100:8(S:0-1)") == 8
    assert slurm.gres_gpus("gpu:a100:4,gpu:v100:2") == 6
    assert slurm.gres_gpus("(null)") == 0


def test_sbatch_missing_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    run_dir = tmp_path / "run"
    with pytest.raises(MegadiffError, match="sbatch not found on PATH"):
        slurm.submit_train(RunSpec(TINY, [f"trainer.run_dir={run_dir}"]), "local")
    assert not run_dir.exists()
    # a dry run needs no sbatch
    sub = slurm.submit_train(RunSpec(TINY, [f"trainer.run_dir={run_dir}"]), "local", gpus_per_node=0,
                             tasks_per_node=2, dry_run=True, )
    assert "#SBATCH --ntasks-per-node=2" in sub.script_text and not run_dir.exists()


def test_bad_batch_layout_fails_before_submission(tmp_path):
    with pytest.raises(MegadiffError, match="global_batch"):
        slurm.submit_train(RunSpec(TINY, [f"trainer.run_dir={tmp_path}/r", "trainer.global_batch=12"]), "local",
                           gpus_per_node=2, dry_run=True)


def test_bad_override_fails_before_submission(tmp_path):
    with pytest.raises(MegadiffError, match="unknown config key 'trainer.nope'"):
        slurm.submit_train(RunSpec(TINY, ["trainer.nope=1"]), "local", dry_run=True)


def test_array_members_need_their_own_run_dirs(tmp_path):
    specs = [RunSpec(TINY, [f"trainer.run_dir={tmp_path}/same"])] * 2
    with pytest.raises(MegadiffError, match="share trainer.run_dir"):
        slurm.submit_array(specs, "local", sweep_dir=tmp_path / "sw", dry_run=True)


def test_data_pipeline_renders_ray_head_and_workers(tmp_path):
    sub = slurm.submit_data_pipeline(str(REPO / "configs" / "data_shakespeare.yaml"), [f"data.out_dir={tmp_path}/d"],
                                     "example-h100", nodes=3, dry_run=True)
    text = sub.script_text
    _bash_syntax_ok(text, tmp_path)
    assert "ray.scripts.scripts start --head" in text and '--exclude="$HEAD"' in text
    assert f"data tokenize {tmp_path}/d/slurm/config.yaml" in text and "#SBATCH --nodes=3" in text
    assert "#SBATCH --cpus-per-task=96" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "--signal" not in text and "RAY_AUTH_MODE=token" in text


def test_cli_dry_run_imports_no_torch(tmp_path):
    """`megadiff slurm submit --dry-run` through launch.cli, in a fresh interpreter: no torch, megatron or ray."""
    code = f"""
import argparse, sys
from launch import cli
p = argparse.ArgumentParser(); sub = p.add_subparsers(); cli.register(sub)
a = p.parse_args(["slurm", "submit", {TINY!r}, "trainer.run_dir={tmp_path}/r", "--cluster", "local",
                  "--gpus-per-node", "2", "--dry-run"])
rc = a.func(a)
heavy = [m for m in ("torch", "megatron", "ray") if m in sys.modules]
assert rc == 0 and not heavy, heavy
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --gpus-per-node=2" in out.stdout and "megadiff.cli train" in out.stdout


def test_register_adds_the_slurm_group():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    from launch import cli

    cli.register(sub)
    a = p.parse_args(["slurm", "status", "/x"])
    assert a.func is cli.cmd_status


def test_dry_run_without_cluster_uses_generic_defaults_and_absolute_paths(tmp_path, monkeypatch):
    """No --cluster on a dry run: no partition, no node checks; every data path and --chdir absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "megadiff.cli", "slurm", "submit", TINY, "trainer.run_dir=runs/r",
         "data.out_dir=data/shards", "data.valid=[{path: data/other, split: valid}]", "trainer.global_batch=64", "--nodes", "2",
         "--gpus-per-node", "4", "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path / "sub", env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "#SBATCH --partition" not in text and "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=4" in text
    assert f"#SBATCH --chdir={(tmp_path / 'sub').resolve()}\n" in text
    assert "--kill-on-bad-exit=1" in text and "--kill-on-bad-exit=0" not in text
    assert f"train {tmp_path}/sub/runs/r/slurm/config.yaml" in text
    assert not (tmp_path / "sub" / "runs").exists()
    run_dir, _, cfg = slurm.prepare_run(RunSpec(TINY, ["trainer.run_dir=runs/r", "data.out_dir=data/shards",
                                                       "data.valid=[{path: data/other, split: valid}]"]), write=False)
    assert cfg.data.out_dir == str(tmp_path / "data" / "shards")
    assert cfg.data.valid[0].path == str(tmp_path / "data" / "other") and run_dir == tmp_path / "runs" / "r"
    # without --dry-run the cluster is required
    with pytest.raises(MegadiffError, match="--cluster is required to submit"):
        slurm.submit_train(RunSpec(TINY, ["trainer.run_dir=runs/r"]), None)


def test_rendezvous_uses_the_first_nodes_address(tmp_path):
    text = slurm.render(_req(tmp_path, nodes=2, gpus_per_node=2), slurm.load_profile("local"))
    assert 'scontrol show node -o "$FIRST_NODE"' in text and "NodeAddr=" in text
    assert "export GLOO_SOCKET_IFNAME=md0" in text


def test_sweep_executor_submits_an_array(tmp_path):
    from launch.sweep_executor import launch_slurm

    class Run:
        def __init__(self, name):
            self.name = name

        def train_overrides(self, parent_id):
            return [f"trainer.run_dir={tmp_path}/{self.name}", f"tracking.parent_run_id={parent_id}"]

    class Plan:
        base_config, out_dir = TINY, str(tmp_path)

    with pytest.raises(MegadiffError, match="set launch.slurm.cluster"):
        launch_slurm(Plan(), [Run("a")], "p1", {}, dry_run=True)
    with pytest.raises(MegadiffError, match=r"unknown keys \['nodez'\]"):
        launch_slurm(Plan(), [Run("a")], "p1", {"cluster": "local", "nodez": 2}, dry_run=True)
    sub = launch_slurm(Plan(), [Run("a"), Run("b")], "p1", {"cluster": "local", "gpus_per_node": 0,
                                                             "max_parallel": 1}, dry_run=True)
    assert "#SBATCH --array=0-1%1" in sub.script_text and f"{tmp_path}/b/slurm/config.yaml" in sub.script_text
