"""BD3-LM identities on real megatron layers against float64 references, block times, clipping, block NELBO."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from test_attention_masks import V, _build, pc  # noqa: F401  (fixture)

from megadiff.diffusion.block import BD3LM, block_times, evaluate_block_nelbo
from megadiff.diffusion.elbo import evaluate_nelbo
from megadiff.diffusion.noise import make_noise
from megadiff.diffusion.objectives import OBJECTIVES
from megadiff.diffusion.schedules import LogLinear, make_schedule
from megadiff.model.block_lm import bd3lm_model_fn
from megadiff.model.masks import attention_inputs

MASK, L, B = V - 1, 16, 2


def _x0(seed=0):
    return torch.randint(0, V - 1, (B, L), generator=torch.Generator().manual_seed(seed))


def _ce64(logits, target):
    """Float64 CE over the real vocab with the mask column excluded (independent of token_ce)."""
    lg = logits[..., :V].double().clone()
    lg[..., MASK] = float("-inf")
    return -torch.log_softmax(lg, -1).gather(-1, target[..., None]).squeeze(-1)


def _run(model, obj, x0, inp):
    pos, mask = attention_inputs(x0.shape[1], x0.shape[0], x0.device, block_size=obj.block_size)
    return model(inp, pos, mask)


def test_block_size_L_equals_mdlm_loss(pc):  # noqa: F811
    model = _build()
    x0 = _x0()
    noise = make_noise(3, 5, torch.arange(B), L, eps=1e-3, antithetic=True, global_batch=B)
    bd = BD3LM(LogLinear(), MASK, V, block_size=L)
    inp, aux = bd.prepare(x0, noise)
    mdlm = OBJECTIVES.get("mdlm")(LogLinear(), mask_id=MASK, vocab_size=V)
    xt, aux_m = mdlm.prepare(x0, noise)
    assert torch.equal(inp[:, :L], xt) and torch.equal(inp[:, L:], x0) and bool(aux.masked.any())
    with torch.no_grad():
        lo = bd.loss(_run(model, bd, x0, inp), x0, aux)
        logits_m = model(xt, torch.arange(L).expand(B, L), None)
    ref = float((torch.where(aux_m.masked, _ce64(logits_m, x0), 0.0) / noise.t.double()[:, None]).sum())
    assert abs(float(lo.loss_sum) - ref) / ref < 1e-5
    assert abs(float(lo.loss_sum) - float(mdlm.loss(logits_m, x0, aux_m).loss_sum)) / ref < 1e-5
    assert int(lo.tokens) == B * L


def test_block_size_1_at_t1_equals_ar_nll_with_mask_slot_convention(pc):  # noqa: F811
    """Block size 1, every position masked (t = 1, w = 1): the loss is sum_l -log p(x_l | x_<l), read at the
    [MASK] slot l, first token included. Reference: L separate causal runs of the same weights on
    (x_0[:l], [MASK])."""
    bidir, causal = _build(causal=False), _build(causal=True)
    for (n1, p1), (n2, p2) in zip(bidir.state_dict().items(), causal.state_dict().items()):
        assert n1 == n2 and (not torch.is_tensor(p1) or torch.equal(p1, p2))
    x0 = _x0(1)
    bd = BD3LM(LogLinear(), MASK, V, block_size=1)
    inp, aux = bd.prepare_blocks(x0, torch.ones(B, L), torch.rand(B, L))
    assert bool(aux.masked.all())
    with torch.no_grad():
        lo = bd.loss(_run(bidir, bd, x0, inp), x0, aux)
        ref = 0.0
        for b in range(B):
            for pos in range(L):
                seq = torch.cat([x0[b, :pos], torch.tensor([MASK])])[None]
                lg = causal(seq, torch.arange(pos + 1)[None], None)[0, -1]
                ref += float(_ce64(lg, x0[b, pos]))
    assert abs(float(lo.loss_sum) - ref) / ref < 1e-5


def test_block_nelbo_with_one_block_equals_mdlm_nelbo(pc):  # noqa: F811
    model = _build()
    batches = [_x0(2), _x0(3)]
    sched = LogLinear()
    with torch.no_grad():
        blk = evaluate_block_nelbo(bd3lm_model_fn(model, L), batches, sched, MASK, V, block_size=L, n_t=4, seed=9)
        ref = evaluate_nelbo(lambda x: model(x, torch.arange(x.shape[1]).expand_as(x), None), batches, sched,
                             MASK, V, n_t=4, seed=9, mode="grid")
        small = evaluate_block_nelbo(bd3lm_model_fn(model, 4), batches, sched, MASK, V, block_size=4, n_t=4, seed=9)
    assert abs(blk["nelbo"] - ref["nelbo"]) / ref["nelbo"] < 1e-5
    assert abs(small["nelbo"] - ref["nelbo"]) > 1e-3  # blocks condition on clean prefixes: a different bound


def test_block_times_are_uniform_per_block_and_start_at_t():
    eps = 1e-3
    t = eps + (1 - eps) * (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    tk = block_times(t.float(), 8, eps)
    assert torch.equal(tk[:, 0], t.float())
    for k in range(1, 8):
        assert stats.kstest(((tk[:, k].double() - eps) / (1 - eps)).numpy(), "uniform").pvalue > 1e-3
    assert float((tk[:, 1] - tk[:, 0]).abs().mean()) > 0.2  # blocks of a sequence get different times


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_clipped_schedule_keeps_mask_rates_in_range(schedule):
    sched = make_schedule(schedule)
    bd = BD3LM(sched, MASK, V, block_size=4, mask_rate_min=0.3, mask_rate_max=0.8)
    noise = make_noise(0, 0, torch.arange(256), 32, eps=1e-3, antithetic=True, global_batch=256)
    x0 = torch.randint(0, V - 1, (256, 32))
    _, aux = bd.prepare(x0, noise)
    rate = 1 - sched.alpha(aux.t_blocks.double())
    assert float(rate.min()) >= 0.3 - 1e-5 and float(rate.max()) <= 0.8 + 1e-5
    assert 0.5 < float(aux.masked.float().mean()) < 0.6  # mean rate 0.55
    assert not bd.for_validation().clipped


def test_bad_block_size_is_refused():
    with pytest.raises(ValueError, match="must divide"):
        BD3LM(LogLinear(), MASK, V, block_size=5).prepare(_x0(), make_noise(0, 0, torch.arange(B), L, antithetic=False))
    with pytest.raises(ValueError, match="block_size > 0"):
        BD3LM(LogLinear(), MASK, V, block_size=0)
