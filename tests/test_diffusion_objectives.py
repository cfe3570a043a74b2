"""Losses against straightforward float64 references written independently here."""

import math

import pytest
import torch

from megadiff.diffusion.noise import make_noise
from megadiff.diffusion.objectives import OBJECTIVES
from megadiff.diffusion.schedules import SCHEDULES

V, MASK, VPAD = 11, 10, 16  # real vocab incl. [MASK] = 11, megatron-padded logits width 16


def _ref_ce(row_logits, target):
    """-log softmax over the real, non-mask tokens, in Python float64."""
    vals = [float(row_logits[j]) for j in range(V) if j != MASK]
    m = max(vals)
    lse = m + math.log(sum(math.exp(v - m) for v in vals))
    return lse - float(row_logits[target])


def _case(seed, B=3, L=7):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    logits = torch.randn(B, L, VPAD, generator=g) * 3
    logits[..., V:] = 50.0  # padded columns must be ignored
    logits[..., MASK] = 40.0  # SUBS: the mask column must be ignored
    return x0, logits


@pytest.mark.parametrize("sched_name", ["loglinear", "cosine", "poly", "linear"])
@pytest.mark.parametrize("name", ["mdlm", "llada"])
def test_masked_losses_match_float64_reference(name, sched_name):
    sched = SCHEDULES.get(sched_name)()
    obj = OBJECTIVES.get(name)(sched, mask_id=MASK, vocab_size=V)
    x0, logits = _case(1)
    B, L = x0.shape
    noise = make_noise(0, 5, torch.arange(B) + 40, L, 1e-3, True, 8)
    xt, aux = obj.prepare(x0, noise)
    out = obj.loss(logits, x0, aux)
    ref, n_masked = 0.0, 0
    for b in range(B):
        t = float(noise.t[b])
        tt = torch.tensor(t, dtype=torch.float64)
        a, da = float(sched.alpha(tt)), float(sched.dalpha(tt))
        w = -da / (1 - a) if name == "mdlm" else 1.0 / (1 - a)
        for pos in range(L):
            is_masked = float(noise.u[b, pos]) < float(torch.tensor(1 - a).float())
            assert bool(xt[b, pos] == MASK) == is_masked
            if is_masked:
                ref += w * _ref_ce(logits[b, pos].double(), int(x0[b, pos]))
                n_masked += 1
    assert int(out.tokens) == B * L and int(aux.masked.sum()) == n_masked
    assert math.isclose(float(out.loss_sum), ref, rel_tol=1e-5, abs_tol=1e-5)


def test_mdlm_equals_llada_for_loglinear_and_is_nelbo_weighted():
    sched = SCHEDULES.get("loglinear")()
    x0, logits = _case(2)
    n = make_noise(3, 0, torch.arange(3), x0.shape[1], 1e-3, False, 0)
    outs = []
    for name in ("mdlm", "llada"):
        obj = OBJECTIVES.get(name)(sched, mask_id=MASK, vocab_size=V)
        _, aux = obj.prepare(x0, n)
        outs.append(obj.loss(logits, x0, aux))
        torch.testing.assert_close(aux.weight.double(), 1.0 / n.t.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(outs[0].loss_sum, outs[1].loss_sum)


def test_ar_loss_matches_reference_and_ignores_noise():
    obj = OBJECTIVES.get("ar")(SCHEDULES.get("loglinear")(), mask_id=MASK, vocab_size=V)
    x0, logits = _case(3)
    inp, aux = obj.prepare(x0, None)
    assert inp is x0
    out = obj.loss(logits, x0, aux)
    B, L = x0.shape
    ref = sum(_ref_ce(logits[b, pos].double(), int(x0[b, pos + 1])) for b in range(B) for pos in range(L - 1))
    assert int(out.tokens) == B * (L - 1)
    assert math.isclose(float(out.loss_sum), ref, rel_tol=1e-5)


def test_bf16_logits_are_upcast_and_grads_finite():
    obj = OBJECTIVES.get("mdlm")(SCHEDULES.get("loglinear")(), mask_id=MASK, vocab_size=V)
    x0, logits = _case(4)
    lg = logits.bfloat16().requires_grad_(True)
    _, aux = obj.prepare(x0, make_noise(0, 0, torch.arange(3), x0.shape[1], 0.5, False, 0))
    out = obj.loss(lg, x0, aux)
    assert out.loss_sum.dtype == torch.float32
    out.loss_sum.backward()
    assert bool(torch.isfinite(lg.grad.float()).all())
    assert float(lg.grad[..., V:].float().abs().sum()) == 0.0 and float(lg.grad[..., MASK].float().abs().sum()) == 0


def test_split_micro_batches_sum_to_full_batch():
    """loss_sum and tokens add up across micro batches (what gradient accumulation relies on)."""
    obj = OBJECTIVES.get("mdlm")(SCHEDULES.get("cosine")(), mask_id=MASK, vocab_size=V)
    x0, logits = _case(5, B=6)
    ids = torch.arange(6) + 60
    full_in, full_aux = obj.prepare(x0, make_noise(1, 10, ids, x0.shape[1], 1e-3, True, 6))
    full = obj.loss(logits, x0, full_aux)
    parts = []
    for sl in (slice(0, 2), slice(2, 6)):
        inp, aux = obj.prepare(x0[sl], make_noise(1, 10, ids[sl], x0.shape[1], 1e-3, True, 6))
        assert torch.equal(inp, full_in[sl])
        parts.append(obj.loss(logits[sl], x0[sl], aux))
    torch.testing.assert_close(sum(p.loss_sum for p in parts), full.loss_sum)
    assert sum(int(p.tokens) for p in parts) == int(full.tokens)


def test_bad_mask_id_rejected():
    with pytest.raises(ValueError):
        OBJECTIVES.get("mdlm")(SCHEDULES.get("loglinear")(), mask_id=V, vocab_size=V)


# ----------------------------------------------------------------------------- the validation bound

@pytest.mark.parametrize("schedule,eps", [("loglinear", 0.0), ("cosine", 0.05), ("linear", 0.02), ("poly", 0.05)])
def test_validation_objective_is_an_unbiased_nelbo_eps(schedule, eps):
    """for_validation() of mdlm/llada estimates NELBO_eps = int_eps^1 (1/m) E_{Bern(m)}[S] dm + E_{Bern(eps)}[S]
    (S = summed CE of the masked tokens; the eps-truncated chain's exact NELBO, an upper bound on the NLL),
    whatever the schedule: reference by enumerating all 2^L masks and integrating over m with scipy."""
    import itertools as it

    from scipy import integrate

    from megadiff.diffusion.noise import make_noise

    L_, V_, M_ = 4, 5, 4  # 4 real tokens, mask id 4
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V_**L_, L_, V_, generator=g, dtype=torch.float64) * 2.0

    def model(x):
        return table[(x * (V_ ** torch.arange(L_))).sum(-1)]

    x0 = torch.tensor([2, 0, 3, 1])
    masks = [torch.tensor(bits, dtype=torch.bool) for bits in it.product([False, True], repeat=L_)]
    S = []
    for m in masks:
        xt = torch.where(m, torch.full_like(x0, M_), x0)
        lp = torch.log_softmax(model(xt[None])[0, :, :M_], -1)
        S.append(float(-(lp[torch.arange(L_), x0] * m).sum()))
    size = [int(m.sum()) for m in masks]

    def expect(p):
        return sum(s * p**k * (1 - p) ** (L_ - k) for s, k in zip(S, size))

    exact = integrate.quad(lambda p: expect(p) / p, eps, 1.0, limit=200)[0] if eps > 0 else \
        integrate.quad(lambda p: expect(p) / p, 1e-12, 1.0, limit=200)[0]
    exact = (exact + expect(eps)) / L_  # nats per token

    sched = SCHEDULES.get(schedule)()
    from megadiff.diffusion.objectives import OBJECTIVES

    for name in ("mdlm", "llada"):
        obj = OBJECTIVES.get(name)(sched, mask_id=M_, vocab_size=M_ + 1)
        obj.eps = eps
        val = obj.for_validation()
        R = 6000
        ids = torch.arange(R)
        t_min = sched.t_at_mask_prob(eps) if eps > 0 else 0.0
        noise = make_noise(3, 0, ids, L_, eps=t_min, antithetic=True, global_batch=R)
        xb = x0.expand(R, L_)
        xt, aux = val.prepare(xb, noise)
        logits = model(xt).float()
        out = val.loss(logits, xb, aux)
        ce = torch.where(aux.masked, -torch.log_softmax(logits[..., :M_].double(), -1).gather(
            -1, xb[..., None]).squeeze(-1), torch.zeros(R, L_, dtype=torch.float64))
        per_row = aux.weight.double() * ce.sum(-1) / L_
        assert math.isclose(float(out.loss_sum) / float(out.tokens), float(per_row.mean()), rel_tol=1e-5)
        sem = float(per_row.std() / math.sqrt(R))
        assert abs(float(per_row.mean()) - exact) < 4 * sem + 1e-9, (name, schedule, eps, float(per_row.mean()), exact, sem)
        assert float(per_row.max()) < 10 * exact * L_  # bounded draws (a mean of k cross-entropies, times a_k)
