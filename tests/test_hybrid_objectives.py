"""AR-adaptation objectives: shift parameterisation, complementary masks, joint AR + diffusion loss.

References are independent float64 computations: explicit loops over positions for the losses, and the
exact NELBO of a table model by enumeration over masks, NELBO = sum_M B(|M|, L - |M| + 1) sum_{l in M} CE_l
(the NELBO written over the mask probability p is int_0^1 (1/p) E_p[sum_masked CE] dp, whatever the schedule).
"""

import itertools
import math

import pytest
import torch

from megadiff import MegadiffError
from megadiff.config import load_config
from megadiff.diffusion.catalog import OBJECTIVES
from megadiff.diffusion.noise import Noise, make_noise
from megadiff.diffusion.objectives import make_objective
from megadiff.diffusion.schedules import Cosine, LogLinear, Polynomial
from megadiff.diffusion.shift import (
    aligned_model_fn,
    is_shifted,
    parameterisation_readme,
    parameterisation_record,
    unshift,
)

VOC, MASK, VPAD = 5, 4, 7


def _logp64(row):
    r = row[:VOC].double().clone()
    r[MASK] = -math.inf
    return torch.log_softmax(r, -1)


def _ce(row, tok):
    return -float(_logp64(row)[tok])


# ----------------------------------------------------------------------------- losses vs explicit loops


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("complementary", [False, True])
def test_mdlm_adapt_loss_matches_explicit_loop(shift, complementary):
    g = torch.Generator().manual_seed(2)
    B, L = 4, 9
    sched = Cosine()
    obj = OBJECTIVES.get("mdlm_adapt")(sched, mask_id=MASK, vocab_size=VOC, shift=shift, complementary=complementary)
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    noise = make_noise(3, 1, torch.arange(B), L, global_batch=B)
    xin, aux = obj.prepare(x0, noise)
    R = B * (2 if complementary else 1)
    assert xin.shape == (R, L)
    logits = torch.randn(R, L, VPAD, generator=g)
    out = obj.loss(logits, x0, aux)
    assert int(out.tokens) == B * (L - 1 if shift else L)
    ref = 0.0
    for c in range(2 if complementary else 1):
        for b in range(B):
            t = torch.tensor(float(noise.t[b]), dtype=torch.float64)
            a, da = float(sched.alpha(t)), float(sched.dalpha(t))
            p = 1.0 - a
            w = -da / p if c == 0 else -da / a
            for i in range(L):
                u = float(noise.u[b, i])
                masked = (u < p) if c == 0 else not (u < p)
                if shift and i == 0:
                    masked = False
                row = xin[c * B + b]
                assert int(row[i]) == (MASK if masked else int(x0[b, i]))
                if masked:
                    src = logits[c * B + b, i - 1] if shift else logits[c * B + b, i]
                    ref += w * _ce(src, int(x0[b, i]))
    ref /= 2 if complementary else 1
    assert float(out.loss_sum) == pytest.approx(ref, rel=1e-5)


def test_ar_mdlm_loss_is_weighted_ar_plus_shifted_diffusion():
    g = torch.Generator().manual_seed(8)
    B, L = 3, 8
    sched = LogLinear()
    obj = OBJECTIVES.get("ar_mdlm")(sched, mask_id=MASK, vocab_size=VOC, ar_weight=1.0, diffusion_weight=0.3)
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    noise = make_noise(0, 4, torch.arange(B), L, global_batch=B)
    xin, aux = obj.prepare(x0, noise)
    assert xin.shape == (2 * B, L) and torch.equal(xin[:B], x0)
    assert not bool((xin[B:, 0] == MASK).any())  # token 0 is conditioning under the shift
    logits = torch.randn(2 * B, L, VPAD, generator=g)
    out = obj.loss(logits, x0, aux)
    ar = sum(_ce(logits[b, i], int(x0[b, i + 1])) for b in range(B) for i in range(L - 1))
    diff = 0.0
    for b in range(B):
        t = float(noise.t[b])
        for i in range(1, L):
            if float(noise.u[b, i]) < t:
                diff += _ce(logits[B + b, i - 1], int(x0[b, i])) / t
    assert float(out.loss_sum) == pytest.approx(1.0 * ar + 0.3 * diff, rel=1e-5)
    assert int(out.tokens) == B * (L - 1)
    val = obj.for_validation()
    assert val.traits.is_autoregressive and not val.traits.val_is_bound
    vin, vaux = val.prepare(x0, noise)
    assert float(val.loss(logits[:B], x0, vaux).loss_sum) == pytest.approx(ar, rel=1e-5)


def test_ar_mdlm_refuses_bad_weights():
    with pytest.raises(ValueError, match="ar_weight"):
        OBJECTIVES.get("ar_mdlm")(LogLinear(), mask_id=MASK, vocab_size=VOC, ar_weight=0.0, diffusion_weight=0.0)


# ----------------------------------------------------------------------------- expectation = exact NELBO

L3 = 3


class Table:
    """A bidirectional denoiser: arbitrary logits for every canvas (tokens 0..MASK)."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.t = torch.randn((VOC,) * L3 + (L3, VPAD), generator=g, dtype=torch.float64) * 1.5

    def __call__(self, x):
        return torch.stack([self.t[tuple(r.tolist())] for r in x])


def _exact_nelbo(model, x0, shift):
    """sum over masks M of B(|M|, n - |M| + 1) * sum_{l in M} CE_l, n = maskable positions (float64)."""
    pos = list(range(1, L3)) if shift else list(range(L3))
    n, tot = len(pos), 0.0
    for k in range(1, n + 1):
        for M in itertools.combinations(pos, k):
            x = x0.clone()
            x[list(M)] = MASK
            lg = model(x[None])[0]
            ce = sum(_ce(lg[i - 1] if shift else lg[i], int(x0[i])) for i in M)
            tot += math.gamma(k) * math.gamma(n - k + 1) / math.gamma(n + 1) * ce
    return tot / n


def _expected_loss(obj, model, x0, sched, nodes=8):
    """E_{t ~ U(0,1)} E_{mask} [loss_sum / tokens] of the objective itself: every mask pattern enumerated (its
    uniforms chosen to produce it, weighted by its probability), t by composite Gauss-Legendre."""
    import numpy as np

    gl, gw = np.polynomial.legendre.leggauss(nodes)
    edges = [0.0, 1e-4, 1e-2, 0.1, 0.5, 0.9, 0.99, 0.9999, 1.0]
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        for nd, wt in zip(gl, gw):
            t = lo + (hi - lo) * (nd + 1) / 2
            p = float(1.0 - sched.alpha(torch.tensor(t, dtype=torch.float64)))
            for bits in itertools.product([0, 1], repeat=L3):
                prob = math.prod(p if m else 1.0 - p for m in bits)
                if prob == 0.0:
                    continue
                u = torch.tensor([[p / 2 if m else (1.0 + p) / 2 for m in bits]], dtype=torch.float64)
                noise = Noise(t=torch.tensor([t], dtype=torch.float32), u=u)
                xin, aux = obj.prepare(x0[None], noise)
                aux.weight = _weights64(obj, sched, t, aux)
                out = obj.loss(model(xin), x0[None], aux)
                total += wt * (hi - lo) / 2 * prob * float(out.loss_sum) / int(out.tokens)
    return total


def _weights64(obj, sched, t, aux):
    """The objective's row weights re-evaluated at the exact float64 t (the float32 t of Noise is rounded)."""
    from megadiff.diffusion.hybrid import complement_weight

    t64 = torch.tensor([t], dtype=torch.float64)
    w = [sched.nelbo_weight(t64)] + ([complement_weight(sched, t64)] if aux.copies == 2 else [])
    return torch.cat(w)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("complementary", [False, True])
@pytest.mark.parametrize("sched", [Cosine(), Polynomial(2.0)], ids=["cosine", "poly2"])
def test_expected_loss_is_the_exact_nelbo(shift, complementary, sched):
    model, x0 = Table(1), torch.tensor([2, 0, 3])
    obj = OBJECTIVES.get("mdlm_adapt")(sched, mask_id=MASK, vocab_size=VOC, shift=shift, complementary=complementary)
    ref = _exact_nelbo(model, x0, shift)
    assert _expected_loss(obj, model, x0, sched) == pytest.approx(ref, rel=1e-4)


def test_complement_alone_estimates_the_nelbo():
    """Each half is unbiased on its own: the complementary mask with weight -alpha'/alpha integrates to the NELBO."""
    sched, model, x0 = Cosine(), Table(4), torch.tensor([1, 3, 0])
    obj = OBJECTIVES.get("mdlm_adapt")(sched, mask_id=MASK, vocab_size=VOC, complementary=True)
    ref = _exact_nelbo(model, x0, False)
    both = _expected_loss(obj, model, x0, sched)

    class FirstHalf:  # the plain-mask half alone
        def __init__(self, inner):
            self.inner = inner

        def prepare(self, x, noise):
            xin, aux = self.inner.prepare(x, noise)
            return xin, aux

        def loss(self, logits, x, aux):
            aux.weight = aux.weight * torch.tensor([2.0, 0.0], dtype=aux.weight.dtype)
            return self.inner.loss(logits, x, aux)

    first = _expected_loss(FirstHalf(obj), model, x0, sched)
    assert first == pytest.approx(ref, rel=1e-4)
    assert 2 * both - first == pytest.approx(ref, rel=1e-4)  # the complement half alone


# ----------------------------------------------------------------------------- shift helpers and record


def test_unshift_and_aligned_model_fn():
    lg = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    al = unshift(lg)
    assert torch.equal(al[:, 1:], lg[:, :-1]) and torch.equal(al[:, 0], lg[:, 0])
    cfg = load_config("configs/tiny_cpu.yaml", ["diffusion.objective=mdlm_adapt", "diffusion.shift=true"])
    assert is_shifted(cfg.diffusion)
    assert torch.equal(aligned_model_fn(lambda x: lg, cfg.diffusion)(None), al)
    plain = load_config("configs/tiny_cpu.yaml", [])
    fn = lambda x: lg  # noqa: E731
    assert aligned_model_fn(fn, plain.diffusion) is fn and not is_shifted(plain.diffusion)


def test_parameterisation_record_states_the_alignment():
    cfg = load_config("configs/tiny_cpu.yaml", ["diffusion.objective=mdlm_adapt", "diffusion.shift=true",
                                                "diffusion.complementary=true"])
    rec = parameterisation_record(cfg.diffusion)
    assert rec["shift"] is True and rec["logits_alignment"] == "position i predicts token i+1"
    assert rec["complementary"] is True and rec["causal_attention"] is False
    md = parameterisation_readme(cfg.diffusion)
    assert "position i predicts token i+1" in md and "`diffusion.shift=True`" in md
    rec = parameterisation_record(load_config("configs/tiny_cpu.yaml", []).diffusion)
    assert rec["shift"] is False and rec["logits_alignment"] == "position i predicts token i"
    rec = parameterisation_record(load_config("configs/tiny_cpu.yaml", ["diffusion.objective=ar_mdlm"]).diffusion)
    assert rec["shift"] is True and rec["causal_attention"] is True and rec["diffusion_weight"] == 0.3


# ----------------------------------------------------------------------------- config keys


def test_config_options_reach_the_objective():
    cfg = load_config("configs/tiny_cpu.yaml", ["diffusion.objective=ar_mdlm", "diffusion.ar_weight=0.5",
                                                "diffusion.diffusion_weight=2.0", "diffusion.complementary=true"])
    obj = make_objective(cfg.diffusion, LogLinear(), MASK, VOC)
    assert (obj.ar_weight, obj.diffusion_weight, obj.complementary) == (0.5, 2.0, True)
    cfg = load_config("configs/tiny_cpu.yaml", ["diffusion.objective=mdlm_adapt", "diffusion.shift=true"])
    obj = make_objective(cfg.diffusion, LogLinear(), MASK, VOC)
    assert obj.shift and not obj.complementary
    cfg = load_config("configs/tiny_cpu.yaml", ["diffusion.objective=gidd", "diffusion.uniform_fraction=1.0"])
    assert make_objective(cfg.diffusion, LogLinear(), MASK, VOC).uniform_fraction == 1.0


@pytest.mark.parametrize("name,complementary", [(n, c) for n in sorted(OBJECTIVES.names()) for c in (False, True)
                                                 if not c or "complementary" in OBJECTIVES.traits(n).options])
def test_rows_per_sample_is_what_prepare_stacks(name, complementary):
    """The trainer's FLOPs accounting multiplies by rows_per_sample: it must equal prepare's model rows / B."""
    over = [f"diffusion.objective={name}"] + (["diffusion.complementary=true"] if complementary else [])
    if name == "bd3lm":
        over.append("diffusion.block_size=4")
    cfg = load_config("configs/tiny_cpu.yaml", over)
    obj = make_objective(cfg.diffusion, LogLinear(), MASK, VOC)
    B, L = 3, 8
    x0 = torch.randint(0, MASK, (B, L))
    model_input, _ = obj.prepare(x0, make_noise(0, 1, torch.arange(B), L, global_batch=B))
    assert model_input.shape[0] == obj.rows_per_sample * B
    assert (obj.rows_per_sample > 1) == (complementary or name == "ar_mdlm")
    assert (obj.rows_per_sample > 1) <= OBJECTIVES.traits(name).stacks_rows


@pytest.mark.parametrize("overrides,match", [
    (["diffusion.shift=true"], "diffusion.shift' acts only with diffusion.objective in mdlm_adapt"),
    (["diffusion.objective=gidd", "diffusion.complementary=true"], "diffusion.complementary"),
    (["diffusion.objective=ar_mdlm", "diffusion.ar_weight=0", "diffusion.diffusion_weight=0"], "not both 0"),
    (["diffusion.objective=gidd", "diffusion.uniform_fraction=1.5"], "uniform_fraction"),
    (["diffusion.objective=ar_mdlm", "parallel.pp=2"], "parallel.pp=1"),
])
def test_config_refuses_options_that_would_not_act(overrides, match):
    with pytest.raises(MegadiffError, match=match):
        load_config("configs/tiny_cpu.yaml", overrides)


# ----------------------------------------------------------------------------- through `megadiff train`


def test_megadiff_train_runs_ar_mdlm_with_complementary_masks(tiny_data, tmp_path):
    """The trainer runs a stacked-rows, causal, option-reading objective unchanged; its validation is the AR NLL."""
    import json

    from conftest import run_cli, tiny_train_args

    run = tmp_path / "run"
    run_cli(*tiny_train_args(tiny_data, run, "trainer.max_steps=4", "trainer.eval_interval=2", "tracking.enabled=false",
                             "diffusion.objective=ar_mdlm", "diffusion.complementary=true",
                             "diffusion.diffusion_weight=0.5"))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val/nelbo" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in steps)
    assert [r["step"] for r in evals] == [2, 4] and all(math.isfinite(r["val/nelbo"]) for r in evals)
    assert evals[0]["val/tokens"] == 2 * 16 * 63  # eval_batches x global_batch x (L - 1): next-token positions
    assert evals[1]["val/nelbo"] < evals[0]["val/nelbo"]
