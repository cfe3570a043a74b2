"""Launch bookkeeping and fitting against a REAL MLflow sqlite store (no torch).

A stand-in trainer (a small script given as launch.train_command) does what `megadiff train` does
for MLflow: it creates the run with the sweep's tags under the parent run, logs ``val/nelbo`` (drawn
from a known law), continues the same MLflow run when resumed, and exits 0 (done) or 75 (preempted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from megadiff.cli import main
from megadiff.sweeps import launch as L
from megadiff.sweeps.plan import plan_sweep
from megadiff.sweeps.results import final_value
from megadiff.sweeps.spec import load_sweep
from megadiff.tracking import sweep_runs as T

LAW = {"E": 2.0, "A": 60.0, "B": 400.0, "alpha": 0.4, "beta": 0.35}

FAKE_TRAINER = r'''
import json, os, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
ov = {}
for a in sys.argv[2:]:
    k, v = a.split("=", 1)
    ov[k] = v.strip("'")
law = json.loads(os.environ["FAKE_LAW"])
run_dir = Path(ov["trainer.run_dir"]); run_dir.mkdir(parents=True, exist_ok=True)
with open(run_dir / "invocations", "a") as f:
    f.write("x\n")
c = MlflowClient(ov["tracking.uri"])
exp = c.get_experiment_by_name(ov["tracking.experiment"])
idf = run_dir / "mlflow_run_id"
if idf.exists():
    rid = idf.read_text().strip()
    c.update_run(rid, status="RUNNING")
else:
    tags = {k[len("tracking.tags."):]: v for k, v in ov.items() if k.startswith("tracking.tags.")}
    tags["mlflow.runName"] = ov["tracking.run_name"]
    if "tracking.parent_run_id" in ov:
        tags["mlflow.parentRunId"] = ov["tracking.parent_run_id"]
    rid = c.create_run(exp.experiment_id, tags=tags).info.run_id
    idf.write_text(rid)
n, d, steps = float(ov["tracking.tags.N"]), float(ov["tracking.tags.D"]), int(ov["trainer.max_steps"])
loss = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
first = not (run_dir / "checkpoints" / "latest").exists()
if first and ov["tracking.run_name"] in os.environ.get("FAKE_PREEMPT", "").split(","):
    (run_dir / "checkpoints").mkdir(exist_ok=True); (run_dir / "checkpoints" / "latest").write_text("x")
    c.log_metric(rid, "val/nelbo", loss + 1.0, step=steps // 2)
    c.set_terminated(rid, "KILLED")
    sys.exit(75)
c.log_metric(rid, "val/nelbo", loss + 0.5, step=steps // 2)
c.log_metric(rid, "val/nelbo", loss, step=steps)
c.set_terminated(rid, "FINISHED")
'''


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FAKE_LAW", json.dumps(LAW))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINER)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"out_dir": str(tmp_path / "ds")},
                                    "model": {"max_seq_len": 32}, "trainer": {"micro_batch": 8}}))
    spec = {
        "name": "mlf", "base_config": str(base), "out_dir": str(tmp_path / "sweep"), "vocab_size": 128,
        "seq_len": 32, "objectives": ["mdlm"], "budgets": [1e10, 3e10, 1e11],
        "models": {"custom": [{"name": f"w{w}", "num_layers": 2, "hidden_size": w, "num_attention_heads": 4}
                              for w in (32, 48, 64)]},
        "hparams": {"global_batch": 16, "micro_batch": 8, "min_steps": 5},
        "fit": {"bootstrap": 20},
        "launch": {"train_command": [sys.executable, str(fake)], "parallel": 2},  # 2 stand-ins at a time
    }
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _invocations(plan):
    return {r.name: len((Path(r.run_dir) / "invocations").read_text().split())
            for r in plan.feasible if (Path(r.run_dir) / "invocations").exists()}


@pytest.mark.slow  # ~20 stand-in trainer processes, each importing mlflow
def test_launch_preempt_partial_fit_relaunch_resume_and_fit(sweep, monkeypatch, capsys):
    plan = plan_sweep(load_sweep(sweep))
    assert len(plan.feasible) == 9
    victim = "mdlm-c3e10-w48"
    monkeypatch.setenv("FAKE_PREEMPT", victim)
    assert main(["sweep", "launch", str(sweep), "--executor", "local"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED {victim} (exit 75)" in out and "relaunch to resume" in out

    # the partial sweep: fit names the missing run and refuses unless asked
    assert main(["sweep", "fit", str(sweep)]) == 2
    cap = capsys.readouterr()
    assert f"{victim}: MLflow run" in cap.out and "is KILLED" in cap.out and "--allow-partial" in cap.err
    assert main(["sweep", "fit", str(sweep), "--allow-partial", "--no-log"]) == 0
    assert "8 finished runs used; 1 missing" in capsys.readouterr().out

    # relaunch: finished runs are skipped, the preempted one resumes in the same MLflow run
    state = json.loads((Path(plan.out_dir) / "sweep_state.json").read_text())
    rid_before = (Path(plan.run(victim).run_dir) / "mlflow_run_id").read_text()
    assert main(["sweep", "launch", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "8 runs finished (skipped), 1 to run: 1 resume from a checkpoint" in out
    inv = _invocations(plan)
    assert inv.pop(victim) == 2 and set(inv.values()) == {1}
    assert (Path(plan.run(victim).run_dir) / "mlflow_run_id").read_text() == rid_before
    assert json.loads((Path(plan.out_dir) / "sweep_state.json").read_text()) == state  # same parent run

    # a third launch has nothing to do
    assert main(["sweep", "launch", str(sweep)]) == 0
    assert "9 runs finished (skipped), 0 to run" in capsys.readouterr().out
    assert main(["sweep", "status", str(sweep)]) == 0
    assert "9 done" in capsys.readouterr().out

    # the MLflow store: nested runs with the sweep's tags, parent FINISHED
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.tracking_uri)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_role"] == "parent"
    children = T.sweep_runs(plan)
    assert set(children) == {r.name for r in plan.feasible}
    for name, run in children.items():
        r = plan.run(name)
        t = run.data.tags
        assert t["mlflow.parentRunId"] == state["parent_run_id"] and t["sweep_id"] == "mlf"
        assert (t["N"], t["D"], t["objective"]) == (str(r.n_params), str(r.tokens), "mdlm")
        assert float(t["C"]) == pytest.approx(r.compute, rel=1e-5)

    # the fit: every run used, outputs written and logged to the parent run
    assert main(["sweep", "fit", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "9 finished runs used" in out and "Approach 3" in out and "N_opt ∝ C^" in out
    fit_dir = Path(plan.out_dir) / "fit"
    res = json.loads((fit_dir / "fit.json").read_text())
    p3 = res["objectives"]["mdlm"]["approach3"]
    assert all(isinstance(v, float) for v in p3["params"].values())
    assert res["missing"] == [] and len(res["runs"]) == 9
    # the losses came from LAW exactly (noise-free), so the fit recovers it
    assert p3["params"]["alpha"] == pytest.approx(LAW["alpha"], rel=0.05)
    assert p3["params"]["beta"] == pytest.approx(LAW["beta"], rel=0.05)
    assert len(res["objectives"]["mdlm"]["approach2"]["profiles"]) == 3
    arts = {a.path for a in client.list_artifacts(state["parent_run_id"], "fit")}
    assert {"fit/fit.json", "fit/fit.txt", "fit/isoflop.png", "fit/frontier.png"} <= arts
    assert "fit/mdlm/approach3/alpha" in client.get_run(state["parent_run_id"]).data.metrics

    # fit by sweep id (plan read back from the parent run's artifact)
    assert main(["sweep", "fit", "mlf", "--tracking-uri", plan.tracking_uri, "--out", str(fit_dir / "by_id"),
                 "--bootstrap", "0", "--no-log"]) == 0
    assert "9 finished runs used" in capsys.readouterr().out


@pytest.mark.slow
def test_changed_sweep_file_does_not_silently_resume(sweep, capsys):
    spec = yaml.safe_load(sweep.read_text())
    spec["launch"]["train_command"] = [sys.executable, "-c", "pass"]  # only the launcher's bookkeeping matters here
    sweep.write_text(yaml.safe_dump(spec))
    assert main(["sweep", "launch", str(sweep)]) == 0
    spec["hparams"]["lr"] = 1e-2
    for r in plan_sweep(load_sweep(sweep)).feasible:  # make the runs look unfinished
        (Path(r.run_dir) / L.DONE_MARKER).unlink()
    sweep.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["sweep", "launch", str(sweep)]) == 2  # refused before anything is resumed
    assert "changed for runs that already started" in capsys.readouterr().err


def test_empty_and_unlaunched_sweeps(sweep, capsys):
    assert main(["sweep", "fit", str(sweep)]) == 2
    assert "never launched" in capsys.readouterr().err
    plan = plan_sweep(load_sweep(sweep))
    parent = T.ensure_parent(plan)  # launched, but no run ever reported
    L.write_state(plan, parent)
    assert main(["sweep", "fit", str(sweep)]) == 2
    cap = capsys.readouterr()
    assert "9 of 9 planned runs have no final val/nelbo" in cap.out
    assert "no finished run with val/nelbo" in cap.err
    assert main(["sweep", "fit", "nosuchsweep", "--tracking-uri", plan.tracking_uri]) == 2
    assert "no parent run of sweep 'nosuchsweep'" in capsys.readouterr().err


def test_final_value_tail_and_relogged_steps(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    rid = client.create_run(exp).info.run_id
    for step, v, ts in [(10, 5.0, 1000), (20, 4.0, 2000), (30, 3.5, 3000), (30, 3.0, 4000), (40, float("nan"), 5000)]:
        client.log_metric(rid, "val/nelbo", v, timestamp=ts, step=step)
    hist = client.get_metric_history(rid, "val/nelbo")
    assert final_value(hist, 1) == 3.0  # step 30 was logged again after a resume: the later value wins
    assert final_value(hist, 2) == pytest.approx(3.5)
    assert final_value([], 1) is None


def test_slurm_executor_found_through_the_entry_point_group(sweep, tmp_path):
    """`slurm` is not named in megadiff: it is the entry point megadiff.sweep_executors:slurm (launch/)."""
    from launch.submit import Submission

    assert "slurm" in L.executor_names()
    launch_slurm = L.external_executor("slurm")
    prof = tmp_path / "prof.yaml"
    prof.write_text(yaml.safe_dump({"name": "t", "gpus_per_node": 0, "check_nodes": False}))
    plan = plan_sweep(load_sweep(sweep))
    sub = launch_slurm(plan, plan.feasible, "p" * 32, {"cluster": str(prof), "nodes": 1, "max_parallel": 2},
                       dry_run=True)
    assert isinstance(sub, Submission)
    assert "--array=0-8%2" in sub.script_text
    with pytest.raises(Exception, match="unknown keys"):
        launch_slurm(plan, plan.feasible, "p", {"cluster": str(prof), "gpus": 1}, dry_run=True)


def test_unknown_executor_is_a_clear_error_before_anything_starts(sweep, capsys):
    assert main(["sweep", "launch", str(sweep), "--executor", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "sweep executor 'nosuch' is not installed" in err and "megadiff.sweep_executors" in err
    assert "local" in err
    plan = plan_sweep(load_sweep(sweep))
    assert not (Path(plan.out_dir) / "sweep_state.json").exists()  # no parent run, no state written
