"""The fused loss path (masked rows only, vocab-parallel chunked linear + CE) against the logits path
and against a float64 reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ENV, ROOT

from megadiff.model import loss_head


def reference(h, W, target, w, vocab_size, mask_id):
    """float64 restricted-vocab CE, summed with weights: the maths the head must reproduce."""
    lg = h.double() @ W.double().t()
    lg[:, vocab_size:] = float("-inf")
    lg[:, mask_id] = float("-inf")
    ce = torch.logsumexp(lg, -1) - lg.gather(1, target[:, None]).squeeze(1)
    return (ce * w.double()).sum(), ce


@pytest.mark.parametrize("chunk_elems", [10**9, 3 * 40])  # one chunk; 3 rows per chunk (uneven split)
def test_linear_cross_entropy_matches_float64_reference(monkeypatch, chunk_elems):
    monkeypatch.setattr(loss_head, "CHUNK_ELEMS", chunk_elems)
    g = torch.Generator().manual_seed(0)
    N, d, V_pad, V, mask = 11, 16, 40, 37, 36  # 3 padded rows + the mask column excluded
    h = torch.randn(N, d, generator=g, requires_grad=True)
    W = torch.randn(V_pad, d, generator=g, requires_grad=True)
    target = torch.randint(0, mask, (N,), generator=g)
    w = torch.rand(N, generator=g) + 0.5
    loss, ce = loss_head.linear_cross_entropy(h, W, target, w, V, mask)
    (2.5 * loss).backward()
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref, ref_ce = reference(h64, W64, target, w, V, mask)
    (2.5 * ref).backward()
    assert loss.dtype == torch.float32 and ce.shape == (N,)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W.grad.double(), W64.grad, rtol=1e-5, atol=1e-6)
    assert float(W.grad[V:].abs().max()) == 0.0 and float(W.grad[mask].abs().max()) == 0.0


def test_no_grad_forward_gives_the_loss_without_building_gradients():
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(5, 8, generator=g, requires_grad=True), torch.randn(16, 8, generator=g, requires_grad=True)
    t, w = torch.randint(0, 15, (5,), generator=g), torch.ones(5)
    with torch.no_grad():
        loss, _ = loss_head.linear_cross_entropy(h, W, t, w, 16, 15)
    torch.testing.assert_close(loss.double(), reference(h.detach(), W.detach(), t, w, 16, 15)[0], rtol=1e-6,
                               atol=1e-5)
    assert loss.grad_fn is None


def run_variants(spec: dict, tmp_path, nproc: int) -> list[list[dict]]:
    """Per rank: [logits-path result, fused-path result], same weights and batch (tools/mem_probe.py)."""
    spec = dict(spec, variants=[{"loss_path": "logits"}, {"loss_path": "fused"}], grads=str(tmp_path / "g"))
    script = str(ROOT / "tools" / "mem_probe.py")
    cmd = [sys.executable, script, json.dumps(spec), str(tmp_path / "o.json")]
    if nproc > 1:
        from megadiff.utils.net import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", *cmd[1:]]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return [torch.load(tmp_path / f"g.rank{r}", weights_only=True) for r in range(nproc)]


BASE = {"num_layers": 2, "hidden_size": 64, "heads": 4, "vocab": 300, "seq": 32, "micro_batch": 2}


@pytest.mark.slow
@pytest.mark.parametrize("name,layout,nproc", [
    ("tp1-mdlm", {"objective": "mdlm"}, 1),
    # mask id 0 (as megadiff's own tokenizers): rank 0's shard holds the -inf mask column
    ("tp2-llada", {"objective": "llada", "tp": 2, "kv_groups": 2, "mask_id": 0}, 2),
    ("pp2-ar", {"objective": "ar", "pp": 2, "num_micro": 2}, 2),
])
def test_fused_loss_path_equals_logits_path(name, layout, nproc, tmp_path):
    ranks = run_variants(dict(BASE, **layout), tmp_path, nproc)
    saw_loss = False
    for logits, fused in ranks:
        torch.testing.assert_close(fused["loss"], logits["loss"], rtol=1e-6, atol=1e-4)
        saw_loss |= float(logits["loss"][1]) > 0
        assert fused["grads"].keys() == logits["grads"].keys()
        for n, g in logits["grads"].items():
            assert float(g.abs().max()) > 0, n
            torch.testing.assert_close(fused["grads"][n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                       msg=f"{name} {n}")
    assert saw_loss  # the last stage reported the loss
