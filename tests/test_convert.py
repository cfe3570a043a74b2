"""megadiff convert: HF export/import parity, round trips, resharding, bad input (CPU, tiny models)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from megadiff import MegadiffError
from tests.conftest import run_cli, tiny_train_args

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
TOL = 1e-4


def _train(data: Path, run_dir: Path, *extra: str, nproc: int = 1) -> None:
    args = tiny_train_args(data, run_dir, "trainer.max_steps=2", "tracking.enabled=false", "trainer.eval_interval=0",
                           "model.num_query_groups=2", *extra)
    run_cli(*args, *(["--nproc-per-node", str(nproc)] if nproc > 1 else []))


@pytest.fixture(scope="module")
def ckpts(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert")
    _train(tiny_data, root / "tp1")
    _train(tiny_data, root / "tp2pp2", "parallel.tp=2", "parallel.pp=2", nproc=4)
    return {"tp1": root / "tp1", "tp2pp2": root / "tp2pp2", "root": root, "data": tiny_data}


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    from megadiff.convert.ckpt import read_checkpoint

    return read_checkpoint(path).model


def _hf_parity(ckpt: Path, hf_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from megadiff.checkpoint.inference import load_for_inference
    from megadiff.diffusion.shift import is_shifted, unshift

    im = load_for_inference(ckpt, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    x = torch.randint(0, im.info.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = im.model_fn(x), hf(x).logits
        if is_shifted(im.cfg.diffusion):  # the export keeps the AR alignment (output i predicts token i+1);
            got = unshift(got)  # megadiff's inference model_fn realigns it, so compare the realigned logits
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % im.info.vocab_size
        changed = (hf(y).logits[:, 0] - got[:, 0]).abs().max()
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL
    assert changed > 0, "exported model is not bidirectional"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2pp2"])
def test_to_hf_parity_and_round_trip(ckpts, layout):
    src = ckpts[layout]
    hf_dir = ckpts["root"] / f"hf-{layout}"
    run_cli("convert", "to-hf", str(src), str(hf_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in hf_dir.iterdir()}
    card = (hf_dir / "README.md").read_text()
    assert "[MASK]" in card and "mdlm" in card
    conf = json.loads((hf_dir / "config.json").read_text())
    assert conf["is_causal"] is False
    assert conf["megadiff_parameterisation"]["shift"] is False and "position i predicts token i**" in card
    _hf_parity(src, hf_dir)
    back = ckpts["root"] / f"back-{layout}"
    run_cli("convert", "from-hf", str(hf_dir), str(back), "--tp", "1", "--pp", "1")
    a, b = _model_tensors(src), _model_tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if layout == "tp1":  # training resumes from the HF import (step 0); one layout is enough
        p = run_cli("train", str(back / "config.yaml"), f"data.out_dir={ckpts['data']}", f"trainer.run_dir={back}",
                    "trainer.max_steps=1", "tracking.enabled=false", "trainer.eval_interval=0", "trainer.progress=false",
                    "trainer.num_samples=0", "trainer.micro_batch=8", "trainer.global_batch=16")
        assert "resumed from" in p.stdout and "(step 0" in p.stdout


@pytest.mark.slow
def test_reshard_chain_and_resume(ckpts, tiny_data):
    from megadiff.convert.ckpt import read_checkpoint

    root = ckpts["root"]
    run_cli("convert", "reshard", str(ckpts["tp2pp2"]), str(root / "rs11"), "--tp", "1", "--pp", "1")
    run_cli("convert", "reshard", str(root / "rs11"), str(root / "rs21"), "--tp", "2", "--pp", "1")
    src, mid, dst = (read_checkpoint(p) for p in (ckpts["tp2pp2"], root / "rs11", root / "rs21"))
    for ck in (mid, dst):
        assert ck.model.keys() == src.model.keys() and ck.optimizer.keys() == src.optimizer.keys()
        for k in list(src.model) + list(src.optimizer):
            ref = src.model.get(k, src.optimizer.get(k))
            got = ck.model.get(k, ck.optimizer.get(k))
            assert torch.equal(ref, got), k
    assert dst.meta["layout"] == "tp2-pp1-dp1" and dst.cfg.parallel.tp == 2
    # training resumes from the resharded checkpoint
    p = run_cli(*tiny_train_args(tiny_data, root / "rs21", "trainer.max_steps=3", "tracking.enabled=false",
                                 "trainer.eval_interval=0", "model.num_query_groups=2", "parallel.tp=2"),
                "--nproc-per-node", "2")
    assert "resumed from" in p.stdout and "(step 2" in p.stdout


@pytest.mark.slow
def test_to_torch(ckpts, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    run_cli("convert", "to-torch", str(ckpts["tp1"]), str(out))
    sd = load_file(str(out))
    ref = _model_tensors(ckpts["tp1"])
    assert torch.equal(sd["decoder.layers.1.mlp.linear_fc1.weight"], ref["decoder.layers.mlp.linear_fc1.weight"][1])
    assert torch.equal(sd["embedding.word_embeddings.weight"], ref["embedding.word_embeddings.weight"])


# ----------------------------------------------------------------------------- HF import in AR mode
def _tokenizer(n: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, n)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _hf_model(kind: str, vocab: int):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)
    else:
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, eos_token_id=0,
                            bos_token_id=0)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _megadiff_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    from megatron.core import dist_checkpointing

    from megadiff.checkpoint.manager import CKPT_METADATA
    from megadiff.config import from_yaml_text
    from megadiff.model.build import build_model, forward_logits

    step = run_dir / "checkpoints" / "step_000000"
    cfg = from_yaml_text((step / "config.yaml").read_text())
    built = build_model(cfg.model, json.loads((step / "megadiff.json").read_text())["vocab"]["vocab_size"], causal=True)
    state = dist_checkpointing.load({"model": built.model.sharded_state_dict(prefix="", metadata=CKPT_METADATA)},
                                    str(step))
    built.model.load_state_dict(state["model"], strict=False)
    built.model.eval()
    with torch.no_grad():
        return forward_logits(built.model, x)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_from_hf_causal_parity(kind, tmp_path):
    from megadiff.convert.hf import import_hf

    n_tok, rows = 60, 64  # spare embedding rows: [MASK] takes row 60
    m = _hf_model(kind, rows)
    hf_dir = tmp_path / "hf"
    m.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(_tokenizer(n_tok).to_str())
    import_hf(hf_dir, tmp_path / "run")
    meta = json.loads((tmp_path / "run/checkpoints/step_000000/megadiff.json").read_text())
    assert meta["vocab"]["mask_id"] == n_tok and meta["vocab"]["vocab_size"] == n_tok + 1
    x = torch.randint(0, n_tok, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x).logits
    got = _megadiff_logits(tmp_path / "run", x)[..., :n_tok + 1]
    assert (got - ref[..., :n_tok + 1]).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_bad_inputs(ckpts, tmp_path):
    from megadiff.convert.hf import import_hf
    from megadiff.convert.reshard import reshard

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(MegadiffError, match="unsupported architecture"):
        import_hf(bert, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()

    full = tmp_path / "full"  # 64 tokens fill all 64 rows
    _hf_model("llama", 64).save_pretrained(full)
    (full / "tokenizer.json").write_text(_tokenizer(64).to_str())
    with pytest.raises(MegadiffError, match="no room for \\[MASK\\]"):
        import_hf(full, tmp_path / "o2", grow_vocab=False)
    assert not (tmp_path / "o2").exists()
    import_hf(full, tmp_path / "o2b")  # default: the embedding grows by a row for [MASK]
    assert json.loads((tmp_path / "o2b/checkpoints/step_000000/megadiff.json").read_text())["vocab"]["mask_id"] == 64

    broken = tmp_path / "broken"
    shutil.copytree(ckpts["tp1"] / "checkpoints" / "step_000002", broken)
    next(broken.glob("*.distcp")).unlink()
    with pytest.raises(MegadiffError, match="missing shards"):
        reshard(broken, tmp_path / "o3", 1, 1)
    assert not (tmp_path / "o3").exists()
    p = run_cli("convert", "to-hf", str(broken), str(tmp_path / "o4"), check=False)
    assert p.returncode == 2 and "missing shards" in p.stderr and not (tmp_path / "o4").exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")], "temp output left behind"
