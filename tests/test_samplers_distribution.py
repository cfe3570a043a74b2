"""Statistical checks: float64 categorical sampling vs float32 Gumbel-max, and sampler output distributions."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from megadiff.diffusion.samplers import SAMPLERS, sample_categorical, sampling_logprobs

# ----------------------------------------------------------------------------- float64 vs float32 Gumbel

V_TAIL, GAP = 2**14, 17.0


def _tail_logits():
    """Token 0 at logit 0, 2**14 tail tokens at -17 (each p ~ 4e-8, together 6.8e-4), plus a mask column."""
    lg = torch.full((V_TAIL + 2,), -GAP, dtype=torch.float64)
    lg[0] = 0.0
    return lg  # mask id = last column


def _float32_gumbel_tail_probability():
    """P(argmax(logits + float32 Gumbel) != 0), computed exactly over the float32 uniforms torch.rand makes.

    torch.rand(float32) returns k * 2**-24, k = 0 .. 2**24 - 1, uniformly (asserted below). With G(k) =
    -log(-log(u_k)) evaluated in float32, the top token wins iff every tail noise is < G_top + GAP:
    P(top) = mean_k F(G(k) + GAP) ** V_TAIL, F(x) = P(G < x) over the same grid.
    """
    u = torch.rand(1 << 20, generator=torch.Generator().manual_seed(0))
    assert float((u.double() * 2**24 - (u.double() * 2**24).round()).abs().max()) == 0.0
    k = torch.arange(2**24, dtype=torch.float64)
    g = (-torch.log(-torch.log((k * 2.0**-24).float()))).double().sort().values
    F = torch.searchsorted(g, g + GAP).double() / 2**24
    return 1.0 - float((F**V_TAIL).mean())


def test_float64_sampling_matches_tail_and_float32_gumbel_does_not():
    logits = _tail_logits()
    mask_id = V_TAIL + 1
    logp = sampling_logprobs(logits, mask_id, V_TAIL + 2)
    p = logp.exp()
    true_tail = float(1 - p[0])
    f32_tail = _float32_gumbel_tail_probability()
    assert f32_tail < 0.6 * true_tail  # the float32 routine under-samples the tail by > 40% (exact: 0.447x)

    N = 10_000_000
    draws = sample_categorical(logp, torch.Generator().manual_seed(1), num_samples=N)
    assert int((draws == mask_id).sum()) == 0
    counts = torch.bincount(draws, minlength=V_TAIL + 2)[: V_TAIL + 1].double()
    # chi-square over {top token, 16 groups of 1024 tail tokens}
    obs = torch.cat([counts[:1], counts[1:].view(16, -1).sum(-1)]).numpy()
    exp = torch.cat([p[:1], p[1 : V_TAIL + 1].view(16, -1).sum(-1)]).numpy() * N
    pval = stats.chisquare(obs, exp).pvalue
    assert pval > 1e-4, pval
    tail = obs[1:].sum()
    sd = math.sqrt(N * true_tail)
    assert abs(tail - N * true_tail) < 4 * sd
    assert (tail - N * f32_tail) > 30 * math.sqrt(N * f32_tail)  # float32-Gumbel tail rate is ruled out


# ----------------------------------------------------------------------------- sampler distributions

L, REAL, MASK, VOCAB, VPAD = 3, 3, 3, 4, 6


class TableModel:
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(VOCAB**L, L, VPAD, generator=g, dtype=torch.float64) * 1.5

    def __call__(self, x):
        return self.table[(x * (VOCAB ** torch.arange(L))).sum(-1)]


def _exact_continuous_distribution(model):
    """Continuous-time reverse process of a time-agnostic model = reveal in a uniform random order."""
    probs = {}
    for y in itertools.product(range(REAL), repeat=L):
        tot = 0.0
        for order in itertools.permutations(range(L)):
            cur, pr = [MASK] * L, 1.0
            for i in order:
                row = model(torch.tensor([cur]))[0, i, :REAL]
                pr *= float(torch.softmax(row, -1)[y[i]])
                cur[i] = y[i]
            tot += pr
        probs[y] = tot / math.factorial(L)
    return probs


def _chi2_p(tokens, probs):
    codes = (tokens * (REAL ** torch.arange(L))).sum(-1)
    obs = torch.bincount(codes, minlength=REAL**L).double().numpy()
    exp = np.array([probs[tuple((c // REAL**i) % REAL for i in range(L))] for c in range(REAL**L)]) * len(tokens)
    return stats.chisquare(obs, exp).pvalue


N = 20_000


@pytest.fixture(scope="module")
def setup():
    model = TableModel(seed=3)
    return model, _exact_continuous_distribution(model), torch.full((N, L), MASK)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("first_hitting", {}),
        ("ancestral", {"steps": 1000, "cache": True}),
        ("ancestral", {"steps": 1000, "cache": False}),
        ("llada", {"steps": L, "remasking": "random"}),
    ],
)
def test_samplers_match_continuous_time_distribution(setup, name, kw):
    model, probs, x = setup
    out = SAMPLERS.get(name)(model, x, mask_id=MASK, vocab_size=VOCAB, generator=torch.Generator().manual_seed(5),
                             **kw)
    assert not bool((out.tokens == MASK).any())
    p = _chi2_p(out.tokens, probs)
    assert p > 1e-3, (name, kw, p)


def test_chi_square_has_power_against_parallel_decoding(setup):
    """One-step ancestral (all tokens at once, factorised) is a different distribution and is rejected."""
    model, probs, x = setup
    out = SAMPLERS.get("ancestral")(model, x, mask_id=MASK, vocab_size=VOCAB, steps=1,
                                    generator=torch.Generator().manual_seed(5))
    assert _chi2_p(out.tokens, probs) < 1e-6
