"""Unsupervised classifier-free guidance (SMDM): the guided per-position distribution, and the output
distribution of samplers run through the guided model_fn on the table model (exact enumeration over
reveal orders, float64), with a power check against unguided sampling."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from megadiff.diffusion.guidance import guided_logprobs, guided_model_fn, prompt_positions
from megadiff.diffusion.samplers import SAMPLERS

L, REAL, MASK, VOCAB, VPAD = 3, 3, 3, 4, 6  # the table model of tests/test_samplers_distribution.py


class TableModel:
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(VOCAB**L, L, VPAD, generator=g, dtype=torch.float64) * 1.5
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.clone())
        return self.table[(x * (VOCAB ** torch.arange(L))).sum(-1)]


def _guided_row(model, canvas, i, w):
    """float64 guided distribution at position i: (1+w) log p(.|canvas) - w log p(.|prompt masked), renormalised."""
    lc = torch.log_softmax(model.table[sum(c * VOCAB**j for j, c in enumerate(canvas))][i, :REAL], -1)
    unc = [MASK] + list(canvas[1:])
    lu = torch.log_softmax(model.table[sum(c * VOCAB**j for j, c in enumerate(unc))][i, :REAL], -1)
    return torch.softmax((1 + w) * lc - w * lu, -1)


def _exact(model, prompt_tok, w):
    """Distribution of (y1, y2) under first-hitting reveals (uniform order) of the guided model."""
    probs = {}
    for y in itertools.product(range(REAL), repeat=L - 1):
        tot = 0.0
        for order in itertools.permutations(range(1, L)):
            cur, pr = [prompt_tok] + [MASK] * (L - 1), 1.0
            for i in order:
                pr *= float(_guided_row(model, cur, i, w)[y[i - 1]])
                cur[i] = y[i - 1]
            tot += pr
        probs[y] = tot / math.factorial(L - 1)
    return probs


def _chi2_p(tokens, probs):
    codes = tokens[:, 1] + REAL * tokens[:, 2]
    obs = torch.bincount(codes, minlength=REAL**2).double().numpy()
    exp = np.array([probs[(c % REAL, c // REAL)] for c in range(REAL**2)]) * len(tokens)
    return stats.chisquare(obs, exp).pvalue


def test_guided_logprobs_formula_and_limits():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    V, m = 6, 2

    def ref_logp(row):
        r = row[:V].double().clone()
        r[m] = -math.inf
        return torch.log_softmax(r, -1)

    for w in (0.0, -1.0, 0.5, 3.0):
        got = guided_logprobs(c, u, w, m, V)
        assert got.shape == (5, V) and bool(torch.isinf(got[:, m]).all())
        for b in range(5):
            lc, lu = ref_logp(c[b]), ref_logp(u[b])
            keep = torch.arange(V) != m
            ref = torch.log_softmax((1 + w) * lc[keep] - w * lu[keep], -1)
            assert torch.allclose(got[b, keep].double(), ref, atol=1e-5)


def test_wrapper_stacks_conditional_and_prompt_masked_rows_in_one_call():
    model = TableModel(1)
    fn = guided_model_fn(model, prompt=prompt_positions(1, L), w=1.0, mask_id=MASK, vocab_size=VOCAB)
    x = torch.tensor([[2, MASK, 1], [0, MASK, MASK]])
    out = fn(x)
    assert len(model.calls) == 1
    sent = model.calls[0]
    assert torch.equal(sent[:2], x) and torch.equal(sent[2:, 0], torch.full((2,), MASK))
    assert torch.equal(sent[2:, 1:], x[:, 1:])
    assert out.shape == (2, L, VOCAB)
    assert guided_model_fn(model, prompt=prompt_positions(1, L), w=0.0, mask_id=MASK, vocab_size=VOCAB) is model
    with pytest.raises(ValueError, match="canvas has 4"):
        fn(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="bool vector"):
        guided_model_fn(model, prompt=torch.ones(2, L, dtype=torch.bool), w=1.0, mask_id=MASK, vocab_size=VOCAB)


N = 20_000


@pytest.mark.parametrize("name,kw", [("first_hitting", {}), ("ancestral", {"steps": 1000, "cache": True})])
def test_guided_sampling_matches_exact_guided_distribution(name, kw):
    model, w, prompt_tok = TableModel(3), 2.0, 1
    probs = _exact(model, prompt_tok, w)
    fn = guided_model_fn(model, prompt=prompt_positions(1, L), w=w, mask_id=MASK, vocab_size=VOCAB)
    x = torch.tensor([[prompt_tok] + [MASK] * (L - 1)]).repeat(N, 1)
    out = SAMPLERS.get(name)(fn, x, mask_id=MASK, vocab_size=VOCAB, generator=torch.Generator().manual_seed(5), **kw)
    assert bool((out.tokens[:, 0] == prompt_tok).all()) and not bool((out.tokens == MASK).any())
    assert _chi2_p(out.tokens, probs) > 1e-3
    # power: the unguided (w = 0) distribution is rejected for these samples, and differs materially
    unguided = _exact(model, prompt_tok, 0.0)
    assert _chi2_p(out.tokens, unguided) < 1e-6
    assert sum(abs(probs[k] - unguided[k]) for k in probs) > 0.05
