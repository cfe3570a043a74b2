"""NELBO: the schedules' weights against float64 quadrature and enumeration, and evaluate_nelbo against them.

For a time-agnostic model p(x_i | x_visible), with S(M) = sum_{i in M} -log p(x_i | x with M masked),
  NELBO(x) = int_0^1 w(t) E_{M ~ Bern(m(t))^L}[S(M)] dt        (w = -alpha'/(1 - alpha), m = 1 - alpha)
           = E_{sigma uniform over orders} sum_j -log p(x_{sigma_j} | x_{sigma_<j})   (AO-ARM NLL)
for every schedule. References here: scipy quadrature of the schedule's own weight over t (project
code: alpha, nelbo_weight) against the enumeration of all L! orders (independent), in float64.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from megadiff.diffusion.elbo import count_weights, evaluate_nelbo
from megadiff.diffusion.schedules import SCHEDULES

REAL, MASK, VPAD = 3, 3, 6  # tokens 0..2 real, 3 = [MASK]; vocab_size incl. mask = 4; logits width 6
VOCAB = 4
SCHEDS = [("loglinear", {}), ("linear", {}), ("cosine", {}), ("poly", {"power": 0.5}), ("poly", {"power": 2.0})]


def sched(name, kw):
    return SCHEDULES.get(name)(**kw)


class TableModel:
    """A fixed random function of the whole input sequence (time-agnostic, arbitrary)."""

    def __init__(self, L, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.L = L
        self.table = torch.randn(VOCAB**L, L, VPAD, generator=g, dtype=torch.float64) * 1.5

    def __call__(self, x):
        code = (x * (VOCAB ** torch.arange(self.L))).sum(-1)
        return self.table[code]


def _cond_nll(model, x, masked_set, i):
    """-log p(x_i | x with masked_set masked), real tokens only (float64, plain Python)."""
    xt = list(x)
    for j in masked_set:
        xt[j] = MASK
    row = model(torch.tensor([xt]))[0, i]
    vals = [float(row[v]) for v in range(REAL)]
    return math.log(sum(math.exp(v) for v in vals)) - vals[x[i]]


def _mask_sums(model, x):
    """{mask tuple: S(M)} over all non-empty masks."""
    L = len(x)
    out = {}
    for bits in itertools.product([0, 1], repeat=L):
        m = [i for i in range(L) if bits[i]]
        if m:
            out[tuple(m)] = sum(_cond_nll(model, x, m, i) for i in m)
    return out


def _ao_arm_nll(model, x):
    L = len(x)
    perms = list(itertools.permutations(range(L)))
    tot = 0.0
    for order in perms:
        for j, i in enumerate(order):
            tot += _cond_nll(model, x, list(order[j:]), i)  # order[j:] still masked when i is generated
    return tot / len(perms)


def _time_integral(s, sums, L, t_lo=0.0):
    """int_{t_lo}^1 w(t) E_{Bern(m(t))}[S] dt with the schedule's own alpha and weight (scipy quad)."""

    def f(t):
        tt = torch.tensor(t, dtype=torch.float64)
        m, w = float(s.mask_prob(tt)), float(s.nelbo_weight(tt))
        return w * sum(m ** len(M) * (1 - m) ** (L - len(M)) * v for M, v in sums.items())

    return quad(f, t_lo, 1.0, epsabs=1e-13, epsrel=1e-12, limit=200, points=[1e-4, 1e-2])[0]


def _exact_eps(sums, L, eps):
    """int_eps^1 (1/m) E_{Bern(m)}[S] dm + E_{Bern(eps)}[S], by quadrature in m (independent of count_weights)."""
    tot = 0.0
    for M, v in sums.items():
        k = len(M)
        tot += v * (quad(lambda m, k=k: m ** (k - 1) * (1 - m) ** (L - k), eps, 1.0, epsabs=1e-14)[0]
                    + eps**k * (1 - eps) ** (L - k))
    return tot


@pytest.mark.parametrize("name,kw", SCHEDS, ids=[f"{n}{kw.get('power', '')}" for n, kw in SCHEDS])
def test_schedule_nelbo_weight_integrates_to_the_any_order_nll(name, kw):
    """Per-schedule quadrature check of w(t) = -alpha'/(1 - alpha): the NELBO is the AO-ARM NLL for each."""
    L = 3
    model = TableModel(L, seed=L)
    for x in [(0, 1, 2), (2, 2, 1)]:
        a = _time_integral(sched(name, kw), _mask_sums(model, x), L)
        b = _ao_arm_nll(model, x)
        assert math.isclose(a, b, rel_tol=1e-7), (name, a, b)


def test_count_weights_match_the_quadrature_of_the_eps_cut_bound():
    """sum_k a_k E_{|M|=k}[S/k] (what evaluate_nelbo estimates) equals the eps-cut integral + reconstruction."""
    L = 4
    model = TableModel(L, seed=2)
    x = (0, 2, 1, 1)
    sums = _mask_sums(model, x)
    for eps in (0.0, 1e-3, 0.05, 0.3):
        a = count_weights(L, eps)
        by_k = sum(float(a[k - 1]) * np.mean([v / k for M, v in sums.items() if len(M) == k])
                   for k in range(1, L + 1))
        assert math.isclose(by_k, _exact_eps(sums, L, eps), rel_tol=1e-10), eps
    assert torch.equal(count_weights(L, 0.0), torch.ones(L, dtype=torch.float64))


def test_eps_in_mask_probability_stays_at_the_bound_where_a_cut_in_t_drops_below():
    """The issue's failure: cutting t < eps loses the mass below m(eps) (1-4% for linear / poly(p<1))."""
    L = 3
    model = TableModel(L, seed=5)
    x = (1, 0, 2)
    sums = _mask_sums(model, x)
    full = _ao_arm_nll(model, x)
    eps = 1e-3
    cut_eps = _exact_eps(sums, L, eps)
    assert abs(cut_eps / full - 1) < 1e-4  # O(eps^2): the same bound for every schedule
    for name, kw in [("linear", {}), ("poly", {"power": 0.5})]:
        t_cut = _time_integral(sched(name, kw), sums, L, t_lo=eps)
        assert t_cut < full * 0.99, (name, t_cut, full)


def _seqs():
    return [tuple(int(v) for v in s) for s in itertools.product(range(REAL), repeat=3)][::3]  # 9 sequences


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_evaluate_nelbo_default_is_unbiased_within_its_standard_error(eps):
    """Seed-averaged: the mean over 24 seeds lies within 4 standard errors of the exact (eps-cut) NELBO."""
    L = 3
    model = TableModel(L, seed=7)
    seqs = _seqs()
    exact = sum(_exact_eps(_mask_sums(model, s), L, eps) for s in seqs) / (len(seqs) * L)
    batches = [torch.tensor(seqs[:4]), torch.tensor(seqs[4:])]
    vals = [evaluate_nelbo(model, batches, None, MASK, VOCAB, n_t=16, seed=s, eps=eps)["nelbo"] for s in range(24)]
    se = np.std(vals, ddof=1) / math.sqrt(len(vals))
    assert se > 0 and abs(np.mean(vals) - exact) < 4 * se, (np.mean(vals), exact, se)
    assert se < 0.02 * exact  # bounded per-draw terms: a few seeds already pin it down


def test_evaluate_nelbo_is_deterministic_and_schedule_free():
    L = 3
    model = TableModel(L, seed=7)
    batches = [torch.tensor(_seqs()[:4]), torch.tensor(_seqs()[4:])]
    r = evaluate_nelbo(model, batches, None, MASK, VOCAB, n_t=8, seed=1)
    assert r == evaluate_nelbo(model, batches, sched("cosine", {}), MASK, VOCAB, n_t=8, seed=1)
    assert r["tokens"] == 27 and r["sequences"] == 9 and math.isclose(r["ppl_bound"], math.exp(r["nelbo"]))
    assert math.isfinite(r["nelbo_sem"]) and r["nelbo_sem"] > 0


def test_per_draw_terms_are_bounded_unlike_uniform_time():
    """Every draw of the default estimator is L a_k x (a mean of k CEs): at most L x max CE x max a_k."""
    L = 4
    model = TableModel(L, seed=3)
    x = torch.tensor([[0, 1, 2, 0]])
    worst = L * max(_mask_sums(model, tuple(x[0].tolist())).values())
    for s in range(40):
        v = evaluate_nelbo(model, [x], None, MASK, VOCAB, n_t=1, seed=s, eps=0.01)["nelbo"] * L
        assert 0 < v <= worst * float(count_weights(L, 0.01).max()) + 1e-12


@pytest.mark.parametrize("name,kw", SCHEDS[:4], ids=["loglinear", "linear", "cosine", "poly0.5"])
def test_grid_quadrature_with_eps_in_mask_probability(name, kw):
    """The midpoint mode over [t(eps), 1] plus the reconstruction term lands on the eps-cut value."""
    L, eps = 3, 1e-3
    model = TableModel(L, seed=9)
    seqs = _seqs()
    exact = sum(_exact_eps(_mask_sums(model, s), L, eps) for s in seqs) / (len(seqs) * L)
    r = evaluate_nelbo(model, [torch.tensor(seqs)], sched(name, kw), MASK, VOCAB, n_t=2048, seed=0, mode="grid",
                       eps=eps)
    assert abs(r["nelbo"] / exact - 1) < 0.04, (name, r["nelbo"], exact)


def test_bad_arguments():
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="mask probability"):
        evaluate_nelbo(TableModel(3), [x], None, MASK, VOCAB, eps=1.0)
    with pytest.raises(ValueError, match="pass the run's schedule"):
        evaluate_nelbo(TableModel(3), [x], None, MASK, VOCAB, mode="grid")
    with pytest.raises(ValueError, match="mode must be"):
        evaluate_nelbo(TableModel(3), [x], None, MASK, VOCAB, mode="midpoint")
