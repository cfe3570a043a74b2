"""A real tiny sweep on CPU: plan -> launch (real `megadiff train`) -> fit, 2 budgets x 3 sizes x MDM.

Uses the shipped configs/sweeps/tiny_cpu.yaml with a small synthetic dataset (vocab 128, seq_len
32: a sparse Markov chain over 32 symbols, learnable) and budgets scaled to it. The first budget's three runs
go through the local executor (`--only`); the other three, when the local test cluster is up, as one Slurm
job array (else locally too); then one fit over all six. About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import slurm_running

from megadiff.cli import main
from megadiff.sweeps.plan import plan_sweep
from megadiff.sweeps.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
SIZES = [{"name": "d1w32", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4},
         {"name": "d1w48", "num_layers": 1, "hidden_size": 48, "num_attention_heads": 4},
         {"name": "d2w48", "num_layers": 2, "hidden_size": 48, "num_attention_heads": 4}]


def markov_dataset(path: Path, vocab: int = 128, seq_len: int = 32, n_train: int = 4096, n_valid: int = 64,
                   symbols: int = 32) -> Path:
    """A Markov chain over `symbols` token ids, 2 likely successors each: learnable in ~100 steps."""
    from megadiff.data.format import write_dataset
    from megadiff.data.tokenizer import special_ids, to_bytes, toy_tokenizer

    tok = toy_tokenizer(vocab)
    rng = np.random.default_rng(0)
    k = symbols
    succ = rng.integers(0, k, size=(k, 2))

    def gen(n: int) -> np.ndarray:
        out = np.empty((n, seq_len), np.int64)
        s = rng.integers(0, k, n)
        for j in range(seq_len):
            out[:, j] = s + 4
            nxt = succ[s, rng.integers(0, 2, n)]
            s = np.where(rng.random(n) < 0.05, rng.integers(0, k, n), nxt)
        return out

    write_dataset(path, {"train": gen(n_train), "valid": gen(n_valid)}, to_bytes(tok), special_ids(tok), vocab, 1024)
    return path


def tiny_sweep(tmp: Path, name: str = "e2e") -> Path:
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / "tiny_cpu.yaml").read_text())
    spec.update(name=name, base_config=str(REPO / "configs" / "tiny_cpu.yaml"), out_dir=str(tmp / "sweep"),
                budgets=[5e9, 1e10], vocab_size=None, seq_len=None)
    spec["models"] = {"custom": SIZES}
    spec["overrides"] = list(spec["overrides"]) + [f"data.out_dir={markov_dataset(tmp / 'ds')}",
                                                   "model.max_seq_len=32", "trainer.eval_batches=4"]
    spec["fit"]["bootstrap"] = 30
    p = tmp / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _check_fit(sweep: Path, plan) -> dict:
    res = json.loads((Path(plan.out_dir) / "fit" / "fit.json").read_text())
    assert len(res["runs"]) == 6 and res["missing"] == []
    p3 = res["objectives"]["mdlm"]["approach3"]["params"]
    assert all(math.isfinite(v) for v in p3.values()), p3
    for r in res["runs"]:
        assert 0 < r["loss"] < math.log(128) + 1  # nats/token, near or below uniform
    for png in ("isoflop.png", "frontier.png"):
        f = Path(plan.out_dir) / "fit" / png
        assert f.stat().st_size > 10_000
    return res


@pytest.mark.slow
def test_tiny_sweep_local_and_slurm_executors_then_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = tiny_sweep(tmp_path)
    assert main(["sweep", "plan", str(sweep)]) == 0
    plan = plan_sweep(load_sweep(sweep))
    assert len(plan.feasible) == 6 and sum(r.steps for r in plan.feasible) < 600
    # rank/rendezvous variables of the calling process (here: a port already taken) must not reach the runs
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(busy.getsockname()[1]), "RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    slurm_up = slurm_running()
    if slurm_up:  # the other half goes through the Slurm executor: one sweep, two executors, one fit
        prof = tmp_path / "local.yaml"
        prof.write_text(yaml.safe_dump({"name": "local", "gpus_per_node": 0, "cpus_per_task": 1,
                                        "time": "00:20:00", "env": {"OMP_NUM_THREADS": 1}}))
        spec = yaml.safe_load(sweep.read_text())
        spec["launch"]["slurm"] = {"cluster": str(prof), "nodes": 1, "gpus_per_node": 0, "max_parallel": 2}
        sweep.write_text(yaml.safe_dump(spec))
    t0 = time.time()
    try:
        # two runs at a time on 2 cores, sharing one sqlite MLflow store
        assert main(["sweep", "launch", str(sweep), "--executor", "local", "--parallel", "2",
                     "--only", "mdlm-c5e9-*"]) == 0, capsys.readouterr().out
    finally:
        busy.close()
    out = capsys.readouterr().out
    assert "launching 3 of them" in out and "3 runs not launched (--only)" in out
    assert main(["sweep", "launch", str(sweep), "--only", "nosuch-*"]) == 2
    assert "matches no planned run" in capsys.readouterr().err
    rest = [r for r in plan.feasible if not r.name.startswith("mdlm-c5e9-")]
    if slurm_up:
        assert main(["sweep", "launch", str(sweep), "--executor", "slurm"]) == 0
        out = capsys.readouterr().out
        assert "3 runs finished (skipped), 3 to run" in out and "submitted job array" in out
        deadline = time.time() + 900
        while time.time() < deadline:
            if all((Path(r.run_dir) / "slurm" / "DONE").exists() for r in rest) or _array_gone(plan):
                break
            time.sleep(3)
        missing = [r.name for r in rest if not (Path(r.run_dir) / "slurm" / "DONE").exists()]
        assert not missing, f"array members did not finish: {missing}; see {plan.out_dir}/logs"
    else:
        print("no Slurm cluster (tools/local_slurm.sh start): the second half runs locally too")
        assert main(["sweep", "launch", str(sweep), "--parallel", "2"]) == 0, capsys.readouterr().out
    launch_s = time.time() - t0
    assert main(["sweep", "launch", str(sweep)]) == 0  # relaunch: nothing to do
    assert "6 runs finished (skipped), 0 to run" in capsys.readouterr().out
    assert main(["sweep", "fit", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "6 finished runs used" in out
    res = _check_fit(sweep, plan)
    # the real trainer tagged its MLflow runs and nested them under the parent
    from mlflow.tracking import MlflowClient

    state = json.loads((Path(plan.out_dir) / "sweep_state.json").read_text())
    client = MlflowClient(plan.tracking_uri)
    exp = client.get_experiment_by_name(plan.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.sweep_id = 'e2e'")
    runs = [r for r in runs if r.data.tags.get("sweep_run")]
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert r.data.tags["mlflow.parentRunId"] == state["parent_run_id"]
        pr = plan.run(r.data.tags["sweep_run"])
        # the trainer's own FLOPs/token and parameter count agree with the plan's
        assert float(r.data.params["model.flops_per_token"]) == pytest.approx(pr.flops_per_token, rel=1e-5)
        assert int(r.data.params["model.n_params"]) == pr.n_params
        assert int(r.data.params["trainer.max_steps"]) == pr.steps
    print(f"tiny sweep: launch {launch_s:.0f}s; E={res['objectives']['mdlm']['approach3']['params']['E']:.3f}")


def _array_gone(plan) -> bool:
    jobs = Path(plan.out_dir) / "slurm" / "jobs.jsonl"
    if not jobs.exists():
        return True
    jid = json.loads(jobs.read_text().splitlines()[-1])["job_ids"][-1]
    out = subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True)
    return out.returncode != 0 or not out.stdout.strip()
