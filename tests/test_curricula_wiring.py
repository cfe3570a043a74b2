"""Attention-mask annealing and the block-size curriculum wired into training (issue 13 items 1 and 3).

* the backends apply the annealed mask: SDPA and flex core attention equal an explicit float64 softmax
  with -inf outside the mask (alone and with packed documents);
* the train step uses the step's mask / block size (and validation does not);
* real trainer runs through the CLI: resuming mid-annealing and mid-curriculum gives bit-identical
  parameters; annealing and the curriculum change the loss; the HF export states the annealing state and
  keeps logits parity;
* config errors name the keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megadiff import MegadiffError
from megadiff.config import load_config
from megadiff.diffusion.curricula import annealed_attention, annealing_record, block_curriculum
from megadiff.model.masks import AttentionMask, attention_inputs

# ----------------------------------------------------------------------------- the backends


def _reference_attention(q, k, v, allowed):
    """float64 attention written out: scores, -inf where not allowed, softmax, weighted values (GQA by
    repeating key/value groups). q [S, B, H, D], k/v [S, B, G, D], allowed [B, S, S] -> [S, B, H*D]."""
    S, B, H, D = q.shape
    rep = H // k.shape[2]
    q64, k64, v64 = (x.to(torch.float64).permute(1, 2, 0, 3) for x in (q, k, v))  # [B, heads, S, D]
    k64, v64 = k64.repeat_interleave(rep, dim=1), v64.repeat_interleave(rep, dim=1)
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v64
    return out.permute(2, 0, 1, 3).reshape(S, B, H * D)


def _core(backend: str):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megadiff.model.attention import FlexCoreAttention, SDPACoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            attention_dropout=0.0)
    cls = {"sdpa": SDPACoreAttention, "flex": FlexCoreAttention}[backend]
    return cls(cfg, 1, AttnMaskType.no_mask, "self").eval()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])  # flex: its CPU forward (no backward on CPU)
@pytest.mark.parametrize("documents", [False, True])
def test_backends_apply_the_annealed_mask(backend, documents):
    S, B = 24, 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(S, B, 4, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(S, B, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    allow = annealed_attention(3, 2, S, 8)  # step 2 of 8: causal + ~3/8 of the upper triangle
    upper = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
    assert 0 < int(allow[upper].sum()) < int(upper.sum())
    seg = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 7 + [2] * 12]) if documents else None
    want_mask = allow.expand(B, S, S)
    if documents:
        want_mask = want_mask & (seg[:, :, None] == seg[:, None, :])
    _, mask = attention_inputs(S, B, torch.device("cpu"), segment_ids=seg, allow=allow)
    assert not mask.trivial
    with torch.no_grad():
        got = _core(backend)(q, k, v, mask)
        ref = _reference_attention(q, k, v, want_mask)
        bidir = _reference_attention(q, k, v, torch.ones(B, S, S, dtype=torch.bool) if seg is None else
                                     (seg[:, :, None] == seg[:, None, :]))
    assert float((got - ref).abs().max()) < 1e-12
    assert float((got - bidir).abs().max()) > 1e-2  # the mask matters


def test_allow_shape_and_bd3lm_are_checked():
    with pytest.raises(MegadiffError, match="expected"):
        AttentionMask(8, allow=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(MegadiffError, match="diffusion.anneal_steps"):
        attention_inputs(8, 1, torch.device("cpu"), block_size=4, allow=torch.ones(8, 8, dtype=torch.bool))


# ----------------------------------------------------------------------------- the train step


def _step_ctx(**over):
    from megadiff.diffusion.objectives import make_objective
    from megadiff.diffusion.schedules import make_schedule
    from megadiff.train.step import StepContext

    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    obj = make_objective(cfg.diffusion, make_schedule(cfg.diffusion), 99, 100)
    cur = block_curriculum(cfg.diffusion, cfg.trainer.max_steps, 32)
    return StepContext(obj, cfg.diffusion, 4, noise_seed=cfg.diffusion.seed, anneal_steps=cfg.diffusion.anneal_steps,
                       block_curriculum=cur)


def test_step_mask_and_block_size_follow_the_step():
    from megadiff.train.step import step_allow, step_objective

    sc = _step_ctx(**{"diffusion.anneal_steps": 4, "diffusion.seed": 5})
    for s in range(3):
        assert torch.equal(step_allow(sc, s, 32, "cpu"), annealed_attention(5, s, 32, 4))
    assert step_allow(sc, 3, 32, "cpu") is None and step_allow(sc, 10, 32, "cpu") is None  # all open: no mask
    sc = _step_ctx(**{"diffusion.objective": "bd3lm", "diffusion.block_size": 8, "data.seq_len": 32,
                      "trainer.max_steps": 12, "diffusion.block_curriculum_start": 2,
                      "diffusion.block_curriculum_warmup_steps": 4, "diffusion.block_curriculum_decay_steps": 4})
    got = [step_objective(sc, s, 32).block_size for s in range(12)]
    assert got == [2, 4, 8, 16] + [32] * 4 + [16, 16, 8, 8]  # stages 2, 4, 8, 16 < 32 over 4 steps: one each
    assert sc.objective.for_validation().block_size == 8  # validation: diffusion.block_size


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides,match", [
    (["diffusion.objective=ar", "diffusion.anneal_steps=10"], "'diffusion.anneal_steps' acts only with"),
    (["diffusion.objective=bd3lm", "diffusion.block_size=16", "data.seq_len=64", "diffusion.anneal_steps=10"],
     "'diffusion.anneal_steps' acts only with"),
    (["diffusion.anneal_steps=-1"], "'diffusion.anneal_steps' must be >= 0"),
    (["diffusion.block_curriculum_start=4"], "'diffusion.block_curriculum_start' acts only with diffusion.objective in "
                                             "bd3lm"),
    (["diffusion.objective=bd3lm", "diffusion.block_size=16", "data.seq_len=64",
      "diffusion.block_curriculum_warmup_steps=5"], "block_curriculum_start > 0"),
    (["diffusion.objective=bd3lm", "diffusion.block_size=16", "data.seq_len=64", "trainer.max_steps=10",
      "diffusion.block_curriculum_start=4", "diffusion.block_curriculum_warmup_steps=6",
      "diffusion.block_curriculum_decay_steps=6"], "exceed trainer.max_steps=10"),
    (["diffusion.objective=bd3lm", "diffusion.block_size=16", "data.seq_len=64",
      "diffusion.block_curriculum_start=-2"], "'diffusion.block_curriculum_start' must be >= 0"),
])
def test_config_errors_name_the_keys(overrides, match):
    with pytest.raises(MegadiffError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("start,block,match", [(3, 16, "diffusion.block_curriculum_start=3"),
                                               (4, 12, "diffusion.block_size=12")])
def test_curriculum_sizes_are_checked_against_the_sequence_length(start, block, match):
    cfg = load_config(None, ["diffusion.objective=bd3lm", f"diffusion.block_size={block}", "data.seq_len=96",
                             f"diffusion.block_curriculum_start={start}", "trainer.max_steps=20"])
    with pytest.raises(MegadiffError, match=match):
        block_curriculum(cfg.diffusion, 20, 64)  # the data's sequence length (64), not data.seq_len


def test_annealing_record():
    cfg = load_config(None, ["diffusion.anneal_steps=8"])
    assert annealing_record(cfg.diffusion, 2) == {"anneal_steps": 8, "steps_trained": 2, "fraction_open": 0.25,
                                                  "complete": False}
    assert annealing_record(cfg.diffusion, 9)["complete"] is True
    assert annealing_record(load_config(None, []).diffusion, 5) is None


# ----------------------------------------------------------------------------- real trainer runs


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    from megadiff.convert.ckpt import read_checkpoint

    return read_checkpoint(run_dir).model


def _interrupted_equals_uninterrupted(tiny_data, tmp_path, name, stop, *overrides):
    """Train K steps in one go and stopped at ``stop`` + resumed: losses and parameters bit-identical.
    Returns (uninterrupted run dir, resumed run dir)."""
    from conftest import run_cli, tiny_train_args
    from test_train import losses

    base = ("trainer.save_interval=0", "trainer.eval_interval=0", "tracking.enabled=false", *overrides)
    ref, run = tmp_path / f"{name}-ref", tmp_path / f"{name}-run"
    run_cli(*tiny_train_args(tiny_data, ref, *base))
    p = run_cli(*tiny_train_args(tiny_data, run, *base, f"trainer.stop_after={stop}"), check=False)
    assert p.returncode == 75, p.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stop:06d}"
    assert "resumed from" in run_cli(*tiny_train_args(tiny_data, run, *base)).stdout
    assert losses(run) == losses(ref)
    a, b = _params(ref), _params(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return ref, run


@pytest.mark.slow
def test_annealing_resumes_exactly_changes_the_loss_and_is_exported(tiny_data, tmp_path):
    from conftest import run_cli, tiny_train_args
    from test_convert import _hf_parity
    from test_train import losses

    anneal = ("diffusion.objective=mdlm_adapt", "diffusion.complementary=true", "diffusion.shift=true",
              "diffusion.anneal_steps=6", "trainer.max_steps=7")
    ref, run = _interrupted_equals_uninterrupted(tiny_data, tmp_path, "anneal", 3, *anneal)
    # the mask acts: step 1 (0-based step 0, 1/6 of the upper triangle open) differs from bidirectional
    plain = tmp_path / "plain"
    run_cli(*tiny_train_args(tiny_data, plain, *anneal[:3], "trainer.max_steps=1", "trainer.eval_interval=0",
                             "tracking.enabled=false"))
    assert abs(losses(plain)[1] - losses(ref)[1]) > 1e-5 * losses(plain)[1]  # seen: 8e-5; float noise: ~1e-7
    # the export of the mid-annealing checkpoint states it, and keeps logits parity
    hf = tmp_path / "hf"
    run_cli("convert", "to-hf", str(run / "checkpoints" / "step_000003"), str(hf))
    conf = json.loads((hf / "config.json").read_text())
    assert conf["megadiff_annealing"] == {"anneal_steps": 6, "steps_trained": 3, "fraction_open": 0.5,
                                          "complete": False}
    assert conf["megadiff_parameterisation"]["anneal_steps"] == 6 and conf["is_causal"] is False
    assert conf["megadiff_parameterisation"]["shift"] is True
    card = (hf / "README.md").read_text()
    assert "`diffusion.anneal_steps=6`" in card and "**incomplete**" in card and "50.0%" in card
    _hf_parity(run / "checkpoints" / "step_000003", hf)


@pytest.mark.slow
def test_block_curriculum_resumes_exactly_and_changes_the_loss(tiny_data, tmp_path):
    from conftest import run_cli, tiny_train_args
    from test_train import losses

    bd = ("diffusion.objective=bd3lm", "diffusion.block_size=16", "trainer.max_steps=8")
    cur = ("diffusion.block_curriculum_start=4", "diffusion.block_curriculum_warmup_steps=3",
           "diffusion.block_curriculum_decay_steps=2")  # sizes 4, 8, 16 | 64, 64, 64 | 32, 16
    ref, _ = _interrupted_equals_uninterrupted(tiny_data, tmp_path, "curriculum", 2, *bd, *cur)  # inside warmup
    plain = tmp_path / "plain"
    run_cli(*tiny_train_args(tiny_data, plain, *bd[:2], "trainer.max_steps=1", "trainer.eval_interval=0",
                             "tracking.enabled=false"))
    assert abs(losses(plain)[1] - losses(ref)[1]) > 1e-4 * losses(plain)[1]  # block 4 at step 0, not 16


@pytest.mark.slow
def test_annealed_run_refuses_a_backend_without_masks(tiny_data, tmp_path):
    from conftest import run_cli, tiny_train_args

    p = run_cli(*tiny_train_args(tiny_data, tmp_path / "run", "diffusion.anneal_steps=4", "trainer.max_steps=1",
                                 "model.attention_backend=flash", "tracking.enabled=false"), check=False)
    assert p.returncode != 0 and "attention-mask annealing" in p.stderr
