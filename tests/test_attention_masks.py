"""Mask-aware attention on real megatron-core layers (CPU): packed documents equal documents run alone,
the backends agree, the BD3-LM mask matches its definition, RoPE follows position ids."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from megadiff import MegadiffError
from megadiff.config import ModelConfig, load_config
from megadiff.model.masks import AttentionMask, attention_inputs, document_positions, packed_seq_params

V = 97


@pytest.fixture(scope="module")
def pc():
    from megadiff.dist.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(device="cpu")
    yield ctx
    destroy_parallel()


def _build(arch="llama", causal=False, backend="sdpa", groups=2, seed=7):
    from megadiff.model.build import build_model

    cfg = OmegaConf.structured(ModelConfig(arch=arch, num_layers=2, hidden_size=64, num_attention_heads=4,
                                           num_query_groups=groups if arch == "llama" else None, max_seq_len=64,
                                           attention_backend=backend))
    torch.manual_seed(seed)
    m = build_model(cfg, V, causal=causal, masked=True).model
    with torch.no_grad():  # non-trivial norms/biases so every parameter matters
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


DOCS = [5, 8, 3]


def _packed():
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, V - 1, (2, sum(DOCS)), generator=g)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(DOCS)]).expand(2, -1).clone()
    seg[1] = torch.tensor([0] * 10 + [1] * 6)  # the second row packs two other documents
    return toks, seg


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_sample_logits_equal_each_document_alone(pc, arch, causal):
    m = _build(arch, causal)
    toks, seg = _packed()
    pos, mask = attention_inputs(toks.shape[1], 2, toks.device, segment_ids=seg, reset_position_ids=True)
    with torch.no_grad():
        packed = m(toks, pos, mask)
        leaky = m(toks, torch.arange(toks.shape[1]).expand(2, -1), None)
        for b in range(2):
            for d in seg[b].unique():
                cols = (seg[b] == d).nonzero().squeeze(-1)
                doc = toks[b, cols][None]
                alone = m(doc, torch.arange(doc.shape[1])[None], None)[0]
                err = float((packed[b, cols] - alone).abs().max() / alone.abs().max())
                assert err < 1e-5, (arch, causal, b, int(d), err)
    # control: without the mask, later documents see earlier ones
    assert float((leaky - packed).abs().max()) > 1e-3


def test_rope_positions_follow_position_ids(pc):
    """A document at the end of a row, with restarted positions, equals the document at position 0; without
    restarting positions it does not (RoPE is relative, so shift the whole row to see positions act)."""
    m = _build("llama")
    toks = torch.randint(0, V - 1, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = m(toks, torch.arange(12)[None], None)
        b = m(toks, torch.arange(12)[None] + 5, None)  # RoPE: a uniform shift leaves attention unchanged
        rel = m(toks, torch.arange(12).flip(0)[None], None)  # reversed positions change the result
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    assert float((a - rel).abs().max()) > 1e-3


def test_learned_positions_follow_position_ids(pc):
    m = _build("gpt2")
    toks = torch.randint(0, V - 1, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = m(toks, torch.arange(12)[None], None)
        b = m(toks, torch.arange(12)[None] + 5, None)
    assert float((a - b).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["documents", "documents_causal", "bd3lm", "bd3lm_documents"])
def test_flex_backend_forward_equals_sdpa(pc, kind):
    causal = kind == "documents_causal"
    sdpa, flex = _build(causal=causal, backend="sdpa"), _build(causal=causal, backend="flex")
    toks, seg = _packed()
    L = toks.shape[1]
    bs = 4 if kind.startswith("bd3lm") else 0
    if bs:
        toks = torch.cat([toks, toks.flip(1)], dim=1)
    pos, mask = attention_inputs(L, 2, toks.device, segment_ids=None if kind == "bd3lm" else seg, block_size=bs,
                                 reset_position_ids=kind != "bd3lm")
    with torch.no_grad():
        a = sdpa(toks, pos, mask)
        pos2, mask2 = attention_inputs(L, 2, toks.device, segment_ids=None if kind == "bd3lm" else seg,
                                       block_size=bs, reset_position_ids=kind != "bd3lm")
        b = flex(toks, pos2, mask2)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def test_flex_training_on_cpu_is_a_clear_error(pc):
    flex = _build(backend="flex").train()
    toks, seg = _packed()
    pos, mask = attention_inputs(toks.shape[1], 2, toks.device, segment_ids=seg)
    with pytest.raises(MegadiffError, match="no backward on CPU"):
        flex(toks, pos, mask)


def test_native_gqa_equals_repeated_heads(pc, monkeypatch):
    from megadiff.model import attention

    assert attention._NATIVE_GQA  # torch >= 2.5 here
    m = _build(groups=2)
    toks, seg = _packed()
    pos, mask = attention_inputs(toks.shape[1], 2, toks.device, segment_ids=seg, reset_position_ids=True)
    with torch.no_grad():
        a = m(toks, pos, mask)
        monkeypatch.setattr(attention, "_NATIVE_GQA", False)
        pos, mask = attention_inputs(toks.shape[1], 2, toks.device, segment_ids=seg, reset_position_ids=True)
        b = m(toks, pos, mask)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-6


def test_bd3lm_mask_matches_its_definition():
    L, bs = 8, 2
    m = AttentionMask(2 * L, block_size=bs).dense(False, torch.device("cpu"))[0, 0]
    for q in range(2 * L):
        for k in range(2 * L):
            qn, kn = q < L, k < L  # noisy halves
            bq, bk = (q % L) // bs, (k % L) // bs
            if qn and kn:
                want = bq == bk  # own noisy block
            elif qn:
                want = bk < bq  # clean blocks strictly before
            elif kn:
                want = False  # clean tokens never see noisy ones
            else:
                want = bk <= bq  # block causal
            assert bool(m[q, k]) == want, (q, k)


def test_document_positions_and_thd_cu_seqlens():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert document_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    p = packed_seq_params(seg)
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 6, 7, 12] and p.max_seqlen_q == 5


def test_mask_errors_name_the_fix():
    with pytest.raises(MegadiffError, match="document_mask"):
        attention_inputs(8, 1, torch.device("cpu"), reset_position_ids=True)
    with pytest.raises(MegadiffError, match="block_size=3 must divide"):
        attention_inputs(8, 1, torch.device("cpu"), block_size=3)
    from megadiff.model.masks import step_attention

    with pytest.raises(MegadiffError, match="re-run `megadiff data tokenize`"):
        step_attention(object(), torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long), None,
                       True, False)


def test_config_keys_are_checked():
    with pytest.raises(MegadiffError, match="diffusion.block_size"):
        load_config(None, ["diffusion.objective=bd3lm", "data.seq_len=64", "diffusion.block_size=5"])
    with pytest.raises(MegadiffError, match="diffusion.block_size' acts only with diffusion.objective in bd3lm"):
        load_config(None, ["diffusion.block_size=4"])
    with pytest.raises(MegadiffError, match="reset_position_ids"):
        load_config(None, ["model.reset_position_ids=true"])
    cfg = load_config(None, ["diffusion.objective=bd3lm", "data.seq_len=64", "diffusion.block_size=16",
                             "data.document_mask=true", "model.reset_position_ids=true"])
    assert cfg.diffusion.block_size == 16


def test_masked_runs_refuse_backends_without_masks():
    from megadiff.model.attention import resolve_backend

    assert resolve_backend("auto", "cpu", masked=True) == "sdpa"  # flex has no CPU backward
    assert resolve_backend("auto", "cuda", masked=True) == "flex"
    with pytest.raises(MegadiffError, match="flex"):
        resolve_backend("flash", "cuda", masked=True)


@pytest.mark.slow
def test_masks_at_tp2_and_pp2(tmp_path):
    """BD3-LM over packed documents, and annealed attention over packed documents, through the real train step:
    TP=2 and PP=2 equal TP=1 (2 gloo ranks)."""
    import json
    import subprocess
    import sys

    from conftest import ENV, ROOT

    from megadiff.utils.net import free_port

    out = tmp_path / "checks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(ROOT / "tests" / "dist_mask_checks.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["unmasked_loss_rel"] > 1e-4, res  # documents change the loss (float noise ~1e-7)
    assert res["tp2_logits_rel"] < 1e-5 and res["tp2_loss_rel"] < 1e-5
    assert res["pp2_loss_rel"] < 1e-5 and res["pp2_grad_rel"] < 1e-4
    # attention-mask annealing (mdlm, packed documents, step 2 of 8): the same on every TP rank and PP stage
    assert res["anneal_unmasked_loss_rel"] > 1e-4, res
    assert res["anneal_tp2_logits_rel"] < 1e-5 and res["anneal_tp2_loss_rel"] < 1e-5
    assert res["anneal_pp2_loss_rel"] < 1e-5 and res["anneal_pp2_grad_rel"] < 1e-4
