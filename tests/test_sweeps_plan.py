"""Sweep planning: the IsoFLOP grid, hyperparameter rules, refusals, bad sweep files (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from megadiff import MegadiffError
from megadiff.cli import main
from megadiff.config import load_config
from megadiff.model.flops import flops_per_token
from megadiff.model.presets import resolve_shape
from megadiff.sweeps.plan import plan_sweep
from megadiff.sweeps.spec import load_sweep
from megadiff.train.lr import lr_at

REPO = Path(__file__).resolve().parents[1]


def write_base(tmp: Path) -> Path:
    base = {
        "data": {"out_dir": str(tmp / "ds")},
        "model": {"arch": "llama", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "max_seq_len": 32},
        "trainer": {"micro_batch": 4, "global_batch": 8},
    }
    p = tmp / "base.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def write_sweep(tmp: Path, **over) -> Path:
    spec = {
        "name": "t", "base_config": str(write_base(tmp)), "out_dir": str(tmp / "sweep"),
        "vocab_size": 128, "seq_len": 32, "objectives": ["mdlm"], "budgets": [1e10, 3e10],
        "models": {"custom": [
            {"name": "s", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4},
            {"name": "m", "num_layers": 1, "hidden_size": 48, "num_attention_heads": 4},
            {"name": "l", "num_layers": 2, "hidden_size": 48, "num_attention_heads": 4},
        ]},
        "hparams": {"global_batch": 16, "micro_batch": 8, "lr": 2e-3, "lr_ref_width": 32, "lr_width_exponent": 1.0,
                    "min_lr_ratio": 0.1, "schedule": "wsd", "warmup_fraction": 0.1, "min_steps": 10},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    p = tmp / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_grid_uses_the_trainers_flops_formula(tmp_path):
    plan = plan_sweep(load_sweep(write_sweep(tmp_path, objectives=["mdlm", "ar"])))
    assert len(plan.runs) == 2 * 2 * 3 and not plan.refused
    for r in plan.runs:
        cfg = load_config(plan.base_config, r.train_overrides("p" * 32))
        shape = resolve_shape(cfg.model)
        fpt = flops_per_token(shape, 128, 32, causal=(r.objective == "ar"))
        assert r.flops_per_token == fpt
        assert r.tokens == r.steps * r.global_batch * 32
        assert r.compute == pytest.approx(fpt * r.tokens)
        # D = C / flops-per-token, rounded to whole steps
        assert abs(r.compute - r.budget) <= 0.5 * r.global_batch * 32 * fpt
        assert cfg.trainer.max_steps == r.steps and cfg.trainer.global_batch == 16
        assert cfg.trainer.run_dir == str(tmp_path / "sweep" / r.name)
        assert cfg.diffusion.objective == r.objective
        assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'sweep'}/mlflow.db"
        assert cfg.tracking.parent_run_id == "p" * 32
        tags = cfg.tracking.tags
        assert tags.sweep_id == "t" and tags.sweep_run == r.name and tags.N == str(r.n_params)
        assert tags.D == str(r.tokens) and tags.objective == r.objective
    # the causal AR counts half the attention FLOPs, so it gets more tokens for the same C
    ar, mdm = plan.run("ar-c1e10-l"), plan.run("mdlm-c1e10-l")
    assert ar.flops_per_token < mdm.flops_per_token and ar.tokens > mdm.tokens


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_lr_schedule_decays_exactly_to_the_final_step(tmp_path, schedule):
    plan = plan_sweep(load_sweep(write_sweep(tmp_path, hparams={"schedule": schedule})))
    for r in plan.feasible:
        cfg = load_config(plan.base_config, r.train_overrides(None))
        lrs = np.array([lr_at(s, cfg.optim, r.steps) for s in range(r.steps)])
        assert lrs[-1] == pytest.approx(r.min_lr)  # reached at the last step, not before
        assert lrs[-2] > r.min_lr * (1 + 1e-9)
        assert lrs.max() == pytest.approx(r.lr)
        assert 1 <= r.warmup_steps < r.steps
    # LR rule: lr x (ref_width / width)^1
    assert plan.run("mdlm-c1e10-s").lr == pytest.approx(2e-3)
    assert plan.run("mdlm-c1e10-m").lr == pytest.approx(2e-3 * 32 / 48)


def test_batch_and_ladder_rules(tmp_path):
    spec = load_sweep(write_sweep(
        tmp_path, models={"custom": [], "ladder": {"depths": [1, 2, 3], "aspect_ratio": 16, "head_dim": 16}},
        hparams={"batch_exponent": 0.5}, budgets=[1e10, 4e10]))
    plan = plan_sweep(spec)
    assert [r.size for r in plan.runs[:3]] == ["d1w16", "d2w32", "d3w48"]
    assert plan.run("mdlm-c1e10-d3w48").num_layers == 3 and plan.run("mdlm-c1e10-d3w48").hidden_size == 48
    assert {r.global_batch for r in plan.runs if r.budget == 1e10} == {16}
    assert {r.global_batch for r in plan.runs if r.budget == 4e10} == {32}  # 16 x 4^0.5


def test_budget_too_small_for_the_smallest_model_is_refused(tmp_path, capsys):
    sweep = write_sweep(tmp_path, budgets=[1e7, 1e10])
    plan = plan_sweep(load_sweep(sweep))
    small = [r for r in plan.runs if r.budget == 1e7]
    assert small and not any(r.ok for r in small)
    assert "less than one batch" in small[0].reason
    assert main(["sweep", "plan", str(sweep)]) == 1
    out = capsys.readouterr().out
    assert "budget 1e+07 (mdlm): too small for every model size in the ladder" in out
    assert "refused mdlm-c1e7-s: D = C / FLOPs-per-token" in out
    # launch refuses the whole sweep unless told to skip the refused runs
    assert main(["sweep", "launch", str(sweep), "--dry-run"]) == 2
    assert "--skip-refused" in capsys.readouterr().err


def test_too_few_steps_is_refused_with_the_budget_needed(tmp_path):
    plan = plan_sweep(load_sweep(write_sweep(tmp_path, budgets=[3e9], hparams={"min_steps": 50})))
    bad = {r.size: r.reason for r in plan.refused}
    assert "l" in bad and "steps < hparams.min_steps=50" in bad["l"] and "needs C >=" in bad["l"]


def test_plan_imports_no_torch(tmp_path):
    sweep = write_sweep(tmp_path)
    code = (f"import sys; from megadiff.cli import main; rc = main(['sweep', 'plan', {str(sweep)!r}]); "
            "bad = [m for m in ('torch', 'megatron', 'mlflow', 'ray') if m in sys.modules]; "
            "assert not bad, bad; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "6 runs planned, 0 refused" in out.stdout


@pytest.mark.parametrize("over, msg", [
    ({"budgets": []}, "budgets is empty"),
    ({"objectives": ["diffusion"]}, "allowed: ar, .*llada, mdlm"),
    ({"models": {"custom": [], "presets": ["huge"]}}, "unknown preset 'huge'"),
    ({"hparams": {"schedule": "step"}}, "allowed: wsd, cosine"),
    ({"vocab_size": None}, "needs the data's vocab size"),
    ({"budget": [1e10]}, r"sweep\.yaml: Key 'budget' not in 'SweepSpec'"),
])
def test_bad_sweep_files(tmp_path, over, msg):
    with pytest.raises(MegadiffError, match=msg):
        plan_sweep(load_sweep(write_sweep(tmp_path, **over)))


def test_data_manifest_wins_and_is_checked(tmp_path):
    from megadiff.data.format import write_dataset
    from megadiff.data.tokenizer import special_ids, to_bytes, toy_tokenizer

    tok = toy_tokenizer(64)
    arr = np.random.default_rng(0).integers(4, 200, size=(8, 32))
    write_dataset(tmp_path / "ds", {"train": arr, "valid": arr[:2]}, to_bytes(tok), special_ids(tok), 200, 8)
    with pytest.raises(MegadiffError, match="vocab_size=128 but the dataset .* has vocab_size 200"):
        plan_sweep(load_sweep(write_sweep(tmp_path)))
    plan = plan_sweep(load_sweep(write_sweep(tmp_path, vocab_size=None, seq_len=None)))
    assert plan.vocab_size == 200 and plan.seq_len == 32
    # FLOPs use the vocab padded as the trainer builds it (200 -> 256)
    r = plan.runs[0]
    cfg = load_config(plan.base_config, r.train_overrides(None))
    assert r.flops_per_token == flops_per_token(resolve_shape(cfg.model), 256, 32)


def test_shipped_sweep_files_plan(tmp_path):
    for f in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        plan = plan_sweep(load_sweep(f, [f"out_dir={tmp_path / f.stem}"]))
        assert plan.feasible and not plan.refused, f


def test_batch_multiple_for_data_parallel_runs(tmp_path):
    plan = plan_sweep(load_sweep(write_sweep(tmp_path, hparams={"batch_multiple": 24})))
    assert {r.global_batch for r in plan.runs} == {24}  # 16 rounded to a multiple of 24 (micro 8 x DP 3)
    with pytest.raises(MegadiffError, match="batch_multiple=12 must be a multiple of the micro batch 8"):
        plan_sweep(load_sweep(write_sweep(tmp_path, hparams={"batch_multiple": 12})))
