"""Issue 17's sweep features: data-constrained laws, --csv round trip and exclusions, FLOPs conventions,
budget-centred grids, the U-token loader limit (numpy/scipy; the loader test uses the real tiny dataset)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from megadiff import MegadiffError
from megadiff.cli import main
from megadiff.sweeps import data_fit as DF
from megadiff.sweeps import fit as F
from megadiff.sweeps.external import exclude, read_csv, write_csv
from megadiff.sweeps.plan import plan_sweep
from megadiff.sweeps.spec import load_sweep

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def n_opt_for_tokens(p, u):
    """Compute-optimal N whose optimal D is u (C = k N D): the first-order condition alpha A N^-alpha =
    beta B D^-beta solved for N (written out here, independent of the project code)."""
    return (p["alpha"] * p["A"] * u ** p["beta"] / (p["beta"] * p["B"])) ** (1.0 / p["alpha"])


def synth_dc(rd_star, rn_star=5.0, seed=0, sigma=0.002, us=(1e9, 3e9), epochs=(1, 2, 4, 8, 16, 32, 64),
             fs=(0.3, 1.0, 3.0), objective="ar"):
    """Runs from the data-constrained law written out here (independent of data_fit.py)."""
    rng = np.random.default_rng(seed)
    obs = []
    for u in us:
        un0 = n_opt_for_tokens(TRUE, u)
        for e in epochs:
            for f in fs:
                n, d = un0 * f, u * e
                rd, un = e - 1.0, min(un0, n)
                rn = n / un - 1.0
                d_eff = u + u * rd_star * (1 - math.exp(-rd / rd_star))
                n_eff = un + un * rn_star * (1 - math.exp(-rn / rn_star))
                loss = TRUE["E"] + TRUE["A"] / n_eff ** TRUE["alpha"] + TRUE["B"] / d_eff ** TRUE["beta"]
                obs.append(F.Observation(f"{objective}-u{u:.0e}-e{e}-f{f}", objective, 6 * n * d, n, d, 6 * n * d,
                                         loss * math.exp(rng.normal(0, sigma)), c_6nd=6 * n * d, unique_tokens=u,
                                         epochs=float(e)))
    return obs


@pytest.mark.parametrize("rd_star,epochs", [(15.0, (1, 2, 4, 8, 16, 32, 64)), (500.0, (1, 4, 16, 64, 256, 1024, 4096))],
                         ids=["ar-like", "diffusion-like"])
def test_data_constrained_fit_recovers_the_reuse_half_life(rd_star, epochs):
    fit = DF.fit_data_constrained(synth_dc(rd_star, epochs=epochs), n_boot=16, seed=0)
    assert abs(fit.rd_star / rd_star - 1) < 0.10, fit.rd_star
    lo, hi = fit.intervals()["R_D*"]
    assert lo <= rd_star <= hi and hi / lo < 2.0, (lo, hi)
    lo, hi = fit.intervals()["R_N*"]
    assert lo <= 5.0 <= hi, (lo, hi)


def test_data_constrained_fit_needs_repeated_data():
    obs = [o for o in synth_dc(15.0, us=(1e9, 3e9, 1e10)) if o.epochs == 1]  # 9 runs, none repeated
    with pytest.raises(MegadiffError, match="repeat data"):
        DF.fit_data_constrained(obs, n_boot=0)


def synth_grid(seed=0, sigma=0.0, objective="ar", d_scale=1.0):
    rng = np.random.default_rng(seed)
    obs = []
    for c in (1e18, 3e18, 1e19, 3e19, 1e20):
        n0 = (c / 6.0) ** 0.45 * 1.3
        for f in np.geomspace(1 / 8, 8, 7):
            n = n0 * f
            d = c / (6.0 * n)
            loss = float(F.predict_loss(TRUE, n, d / d_scale)) * math.exp(rng.normal(0, sigma) if sigma else 0.0)
            obs.append(F.Observation(f"{objective}-{c:.0e}-{f:.3f}", objective, c, n, d, 0.0, loss, c_6nd=6 * n * d))
    return obs


def test_csv_round_trip_recovers_the_law_within_2_percent(tmp_path, capsys):
    src = tmp_path / "grid.csv"
    rows = synth_grid()
    src.write_text("N,D,loss,objective\n" + "".join(f"{float(o.n)!r},{float(o.d)!r},{o.loss!r},ar\n" for o in rows))
    out = tmp_path / "fit"
    assert main(["sweep", "fit", "--csv", str(src), "--out", str(out), "--bootstrap", "0"]) == 0
    doc = json.loads((out / "fit.json").read_text())
    p = doc["objectives"]["ar"]["approach3"]["params"]
    for k in ("E", "alpha", "beta"):
        assert abs(p[k] / TRUE[k] - 1) < 0.02, (k, p[k])
    ex = F.allocation_exponents(TRUE)
    assert abs(doc["objectives"]["ar"]["approach3"]["a"] / ex["a"] - 1) < 0.02
    assert doc["objectives"]["ar"]["approach3"]["convention"] == "6nd"  # no C column: 6 N D
    # the fit writes its runs back in the same format; reading them gives the same observations
    again = read_csv(out / "runs.csv")
    assert [(o.n, o.d, o.loss) for o in again] == [(o.n, o.d, o.loss) for o in read_csv(src)]
    assert (out / "residuals.png").stat().st_size > 10_000


def test_exclusions_through_the_cli(tmp_path, capsys):
    """--exclude takes names and globs (applied first), --exclude-top K the K highest losses left: the planted
    diverged runs (2 x the loss; one of them falls in the glob). Both are reported, listed in fit.json and kept
    in runs.csv; the fit on the rest recovers the law."""
    obs = synth_grid(seed=1, sigma=0.002)
    bad = [o.name for o in obs[3::9][:3]]
    src = tmp_path / "grid.csv"
    write_csv([F.Observation(o.name, o.objective, o.budget, o.n, o.d, 0.0, o.loss * (2.0 if o.name in bad else 1.0),
                             c_6nd=o.c_6nd) for o in obs], src)
    out = tmp_path / "fit"
    assert main(["sweep", "fit", "--csv", str(src), "--out", str(out), "--bootstrap", "0", "--exclude-top", "2",
                 "--exclude", "ar-1e+18-*"]) == 0
    report = capsys.readouterr().out
    doc = json.loads((out / "fit.json").read_text())
    gone = {e["run"]: e["why"] for e in doc["excluded"]}
    assert {n for n, w in gone.items() if w.startswith("--exclude-top")} == set(bad) - {n for n in bad if "1e+18" in n}
    assert sum(w == "--exclude ar-1e+18-*" for w in gone.values()) == 7
    assert f"{35 - len(gone)} finished runs used; {len(gone)} excluded" in report
    assert len(read_csv(out / "runs.csv")) == 35  # excluded runs stay in the table (crosses on residuals.png)
    p = doc["objectives"]["ar"]["approach3"]["params"]
    assert abs(p["beta"] / TRUE["beta"] - 1) < 0.05 and abs(p["alpha"] / TRUE["alpha"] - 1) < 0.05
    kept, gone2 = exclude(obs, top=2)
    assert len(kept) == 33 and all(o.loss <= min(g.loss for g, _ in gone2) for o in kept)
    with pytest.raises(MegadiffError, match="matches no run"):
        exclude(obs, names=["nosuch"])


def test_csv_errors_name_the_row_and_the_fix(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("N,D,lossy\n1,2,3\n")
    with pytest.raises(MegadiffError, match="missing loss; unknown lossy"):
        read_csv(p)
    p.write_text("N,D,loss,unique_tokens,epochs\n1e6,1e9,3.0,1e8,4\n")
    with pytest.raises(MegadiffError, match="row 2: unique_tokens x epochs"):
        read_csv(p)
    p.write_text("N,D,loss\n1e6,-5,3.0\n")
    with pytest.raises(MegadiffError, match="row 2: column 'd' must be a positive"):
        read_csv(p)


def test_flops_conventions_side_by_side_and_the_multiplier(tmp_path):
    """kernel vs 6nd: the same losses, two compute axes; an MDM needing m x the data needs m x the compute
    under either convention when its FLOPs per token equal the AR's."""
    m = 3.0
    ar = synth_grid(seed=2, sigma=0.001, objective="ar")
    mdm = synth_grid(seed=3, sigma=0.001, objective="mdlm", d_scale=m)
    # the kernel counts 1.3 x 6 N (attention, logits): a constant factor for both objectives here
    both = [F.Observation(o.name, o.objective, o.budget, o.n, o.d, 1.3 * o.c_6nd, o.loss, c_6nd=o.c_6nd)
            for o in ar + mdm]
    from megadiff.sweeps.results import format_report, run_fits

    res = run_fits(both, n_boot=0, compare_at=[1e21])
    cmp = res["comparison"]["mdlm_vs_ar"]
    assert {r["convention"] for r in cmp["approach3"]} == {"kernel"}
    assert {r["convention"] for r in cmp["approach3_6nd"]} == {"6nd"}
    for a, b in zip(cmp["approach3"], cmp["approach3_6nd"]):
        assert a["multiplier"] == pytest.approx(m, rel=0.1) and b["multiplier"] == pytest.approx(m, rel=0.1)
    a3 = res["objectives"]["ar"]["approach3"]
    assert a3["flops"]["kernel"]["k_at_1e8"] == pytest.approx(1.3 * 6.0, rel=1e-6)
    assert a3["flops"]["6nd"]["k_at_1e8"] == pytest.approx(6.0, rel=1e-6)
    kern, six = a3["optimal"][0], a3["optimal_by_convention"]["6nd"][0]
    assert six["N_opt"] > kern["N_opt"]  # the same C buys more N x D when a token costs less
    report = format_report(res, [], len(both))
    assert "[kernel FLOPs]" in report and "[   6nd FLOPs]" in report and "L-1 next-token targets" in report


# ----------------------------------------------------------------------------- planning


def write_base(tmp):
    p = tmp / "base.yaml"
    p.write_text(yaml.safe_dump({"data": {"out_dir": str(tmp / "ds")},
                                 "model": {"arch": "llama", "max_seq_len": 32}, "trainer": {"micro_batch": 8}}))
    return p


def write_sweep(tmp, **over):
    spec = {"name": "t", "base_config": str(write_base(tmp)), "out_dir": str(tmp / "sweep"), "vocab_size": 128,
            "seq_len": 32, "objectives": ["mdlm", "ar"],
            "models": {"custom": [{"name": f"w{w}", "num_layers": 2, "hidden_size": w, "num_attention_heads": 4}
                                  for w in (32, 48, 64, 96, 128, 192, 256)]},
            "hparams": {"global_batch": 16, "micro_batch": 8, "min_steps": 5}}
    spec.update(over)
    p = tmp / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_data_constrained_plan_is_u_by_epochs(tmp_path):
    sw = write_sweep(tmp_path, data={"unique_tokens": [8192, 32768], "epochs": [1, 4, 16]},
                     models={"custom": [{"name": "s", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4}]})
    plan = plan_sweep(load_sweep(sw))
    assert len(plan.runs) == 2 * 2 * 3 and not plan.refused
    for r in plan.runs:
        assert r.tokens == r.unique_tokens * round(r.epochs) and r.unique_tokens in (8192, 32768)
        assert f"data.unique_tokens={r.unique_tokens}" in r.overrides
        assert r.compute == pytest.approx(r.flops_per_token * r.tokens)
    assert plan.run("ar-u8.19e3-e16-s").epochs == 16
    with pytest.raises(MegadiffError, match="remove budgets"):
        load_sweep(write_sweep(tmp_path, budgets=[1e9], data={"unique_tokens": [8192], "epochs": [1, 2]}))
    with pytest.raises(MegadiffError, match="go together"):
        load_sweep(write_sweep(tmp_path, data={"unique_tokens": [8192]}, budgets=[1e9]))


def test_6nd_convention_plans_tokens_from_6_n_non_embedding(tmp_path):
    sw = write_sweep(tmp_path, budgets=[3e9, 1e10], flops="6nd")
    plan = plan_sweep(load_sweep(sw))
    for r in plan.runs:
        assert r.flops_per_token == 6.0 * r.n_non_embedding and r.flops_convention == "6nd"
        assert r.flops_per_token_kernel > r.flops_per_token_6nd  # logits and attention on top
    # under 6nd both objectives get the same tokens at a budget (the kernel convention gives the AR more)
    assert plan.run("ar-c1e10-w64").tokens == plan.run("mdlm-c1e10-w64").tokens


def test_budget_centred_grid_brackets_the_prior_optimum(tmp_path):
    budgets = [1e11, 1e13, 1e15]
    sw = write_sweep(tmp_path, budgets=budgets, flops="6nd", grid={"center": "chinchilla", "span": 3.0},
                     fit={"n_kind": "non_embedding"})
    plan = plan_sweep(load_sweep(sw))
    ex = F.allocation_exponents(TRUE)
    for b in budgets:
        runs = [r for r in plan.runs if r.budget == b and r.objective == "mdlm"]
        n_star = math.exp(ex["log_G"] + ex["a"] * math.log(b / 6.0))  # Chinchilla's closed form, C = 6 N D
        inside = [r for r in runs if 1 / 3 <= r.n_non_embedding / n_star <= 3]
        assert len(runs) >= 3 and (len(inside) == len(runs) or len(runs) == 3), (b, n_star, [r.size for r in runs])
    sizes = {b: {r.size for r in plan.runs if r.budget == b} for b in budgets}
    assert sizes[1e11] != sizes[1e13] != sizes[1e15]  # the window moves with the budget
    wide = plan_sweep(load_sweep(write_sweep(tmp_path, budgets=budgets, flops="6nd",
                                             grid={"tokens_per_param": [10, 20]})))
    assert len(wide.runs) == 2 * 3 * 7 and any(r.flag for r in wide.runs)
    assert all("outside grid.tokens_per_param" in r.flag for r in wide.runs if r.flag)


def test_centre_on_an_earlier_fit(tmp_path):
    fit_json = tmp_path / "fit.json"
    fit_json.write_text(json.dumps({"objectives": {"mdlm": {"approach3": {
        "params": TRUE, "convention": "6nd", "flops": {"6nd": {"log_k": math.log(6.0), "g": 1.0}}}}}}))
    sw = write_sweep(tmp_path, budgets=[1e10], objectives=["mdlm"], grid={"center": "fit", "prior_fit": str(fit_json)})
    chin = write_sweep(tmp_path, budgets=[1e10], objectives=["mdlm"], grid={"center": "chinchilla"})
    assert [r.size for r in plan_sweep(load_sweep(sw)).runs] == [r.size for r in plan_sweep(load_sweep(chin)).runs]
    ar = write_sweep(tmp_path, budgets=[1e10], objectives=["ar"], grid={"center": "fit", "prior_fit": str(fit_json)})
    with pytest.raises(MegadiffError, match="no Approach 3 law for objective 'ar'"):
        plan_sweep(load_sweep(ar))


# ----------------------------------------------------------------------------- loader


def test_unique_token_prefix_is_deterministic_and_repeated(tiny_data):
    from megadiff.data.loader import GlobalBatchLoader, ShardDataset, limit_unique_tokens

    ds = ShardDataset(tiny_data, "train")
    L = ds.info.seq_len
    [pre] = limit_unique_tokens([ds], 40 * L + 7, seed=3)  # rounded down to whole samples
    assert len(pre) == 40
    [again] = limit_unique_tokens([ShardDataset(tiny_data, "train")], 40 * L, seed=3)
    assert np.array_equal(pre.index, again.index)  # the same prefix in every process
    loader = GlobalBatchLoader([pre], None, global_batch=8, micro_batch=4, seed=0)
    seen = [tuple(b["tokens"][i].tolist()) for _ in range(15) for b in loader.next_global() for i in range(4)]
    assert len(seen) == 120 and len(set(seen)) <= 40  # 3 epochs over 40 samples
    firsts = {tuple(pre[i].tolist()) for i in range(40)}
    assert set(seen) == firsts and all(seen.count(s) == 3 for s in firsts)
    with pytest.raises(MegadiffError, match="data.unique_tokens=.* has"):
        limit_unique_tokens([ds], (len(ds) + 1) * L, seed=0)
    assert limit_unique_tokens([ds], None, seed=0) == [ds]


def test_write_csv_keeps_the_data_constrained_columns(tmp_path):
    obs = synth_dc(15.0, us=(1e9,), epochs=(1, 4), fs=(1.0,))
    back = read_csv(write_csv(obs, tmp_path / "r.csv"))
    assert [(o.unique_tokens, o.epochs) for o in back] == [(1e9, 1.0), (1e9, 4.0)]


# ----------------------------------------------------------------------------- end to end (stand-in trainer)

STANDIN = r'''
import json, math, os, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
ov = dict(a.split("=", 1) for a in sys.argv[2:])
ov = {k: v.strip("'") for k, v in ov.items()}
law = json.loads(os.environ["STANDIN_LAW"])[ov["diffusion.objective"]]
run_dir = Path(ov["trainer.run_dir"]); run_dir.mkdir(parents=True, exist_ok=True)
c = MlflowClient(ov["tracking.uri"])
exp = c.get_experiment_by_name(ov["tracking.experiment"])
tags = {k[len("tracking.tags."):]: v for k, v in ov.items() if k.startswith("tracking.tags.")}
tags["mlflow.runName"] = ov["tracking.run_name"]
tags["mlflow.parentRunId"] = ov["tracking.parent_run_id"]
rid = c.create_run(exp.experiment_id, tags=tags).info.run_id
n, d, u = float(tags["N_non_embedding"]), float(tags["D"]), float(ov["data.unique_tokens"])
assert u == float(tags["U"])
rd = d / u - 1.0
d_eff = u + u * law["rd"] * (1 - math.exp(-rd / law["rd"]))
loss = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d_eff ** law["beta"]
c.log_metric(rid, "val/nelbo", loss, step=int(ov["trainer.max_steps"]))
c.set_terminated(rid, "FINISHED")
'''


@pytest.mark.slow  # 24 stand-in trainer processes, each importing mlflow
def test_data_constrained_sweep_plan_launch_fit(tmp_path, monkeypatch, capsys):
    """MDM and AR, two U, three epoch counts, two sizes: plan -> launch (real MLflow store) -> fit with its plots.
    The stand-in logs a data-constrained law with R_D* = 4 (AR) and 40 (MDM)."""
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    law = {"E": 2.0, "A": 40.0, "B": 300.0, "alpha": 0.35, "beta": 0.3}
    monkeypatch.setenv("STANDIN_LAW", json.dumps({"ar": dict(law, rd=4.0), "mdlm": dict(law, B=420.0, rd=40.0)}))
    fake = tmp_path / "standin.py"
    fake.write_text(STANDIN)
    sw = write_sweep(tmp_path, data={"unique_tokens": [4096, 16384], "epochs": [1, 4, 16]}, flops="6nd",
                     models={"custom": [{"name": f"w{w}", "num_layers": 2, "hidden_size": w, "num_attention_heads": 4}
                                        for w in (32, 64)]},
                     fit={"bootstrap": 10, "n_kind": "non_embedding"},
                     launch={"train_command": [sys.executable, str(fake)], "parallel": 2})
    assert main(["sweep", "plan", str(sw)]) == 0
    assert main(["sweep", "launch", str(sw)]) == 0
    assert "all 24 runs finished" in capsys.readouterr().out
    assert main(["sweep", "fit", str(sw), "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "Data-constrained law" in out
    doc = json.loads((tmp_path / "sweep" / "fit" / "fit.json").read_text())
    rd = {o: doc["objectives"][o]["data_constrained"]["R_D*"] for o in ("ar", "mdlm")}
    assert rd["mdlm"] > 3 * rd["ar"], rd  # the MDM keeps gaining from repeats far longer
    assert (tmp_path / "sweep" / "fit" / "loss_vs_epochs.png").stat().st_size > 10_000
