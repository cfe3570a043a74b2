"""Exact enumeration of the discrete samplers on a tiny table model (L=3, 3 real tokens): the law of every
possible output is computed by walking all reveal sets and token draws, and 20,000 samples of the real
sampler are compared with it (chi-square). Few steps (T=2, 3) make the discrete samplers differ from the
continuous-time process, so these laws are not the one of tests/test_samplers_distribution.py."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from scipy import stats
from test_samplers_distribution import MASK, REAL, VOCAB, L
from test_samplers_distribution import TableModel as _Table
from test_samplers_distribution import _exact_continuous_distribution as continuous_law

from megadiff.diffusion.samplers import SAMPLERS
from megadiff.diffusion.schedules import make_schedule

N = 20_000


class TableModel(_Table):
    """Logits are a fixed random function of the whole canvas (any dependence a network could have)."""

    def probs(self, state: tuple) -> np.ndarray:
        """[L, REAL] float64 token probabilities (the samplers restrict to the real vocab, mask excluded)."""
        row = self(torch.tensor([state]))[0, :, :REAL]
        return torch.softmax(row, -1).numpy()


def _reveal_probs(schedule_name: str, steps: int) -> list[float]:
    sched = make_schedule(schedule_name)
    a = sched.alpha(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).tolist()
    return [1.0 if i == steps - 1 else min(1.0, max(0.0, (a[i + 1] - a[i]) / (1.0 - a[i]))) for i in range(steps)]


def ancestral_law(model, start: dict, positions: list[int], steps: int, schedule: str) -> dict:
    """Each masked position of ``positions`` is revealed in step i with probability p_i, independently; revealed
    tokens are drawn independently from the model's distribution given the current canvas."""
    dist = dict(start)
    for p in _reveal_probs(schedule, steps):
        new: dict = defaultdict(float)
        for state, pr in dist.items():
            rem = [j for j in positions if state[j] == MASK]
            if not rem:
                new[state] += pr
                continue
            q = model.probs(state)
            for k in range(len(rem) + 1):
                for S in itertools.combinations(rem, k):
                    ps = pr * p**k * (1 - p) ** (len(rem) - k)
                    if ps == 0.0:
                        continue
                    for toks in itertools.product(range(REAL), repeat=k):
                        s = list(state)
                        w = ps
                        for j, t in zip(S, toks):
                            s[j] = t
                            w *= q[j, t]
                        new[tuple(s)] += w
        dist = new
    return dist


def llada_low_confidence_law(model, steps: int) -> dict:
    """One block: step k samples a candidate at every masked position and commits the quota_k most confident."""
    n = L
    quotas = [n // steps + (k < n % steps) for k in range(steps)]
    dist = {(MASK,) * L: 1.0}
    for quota in quotas:
        if quota == 0:
            continue
        new: dict = defaultdict(float)
        for state, pr in dist.items():
            rem = [j for j in range(L) if state[j] == MASK]
            q = model.probs(state)
            for toks in itertools.product(range(REAL), repeat=len(rem)):
                w = pr * math.prod(q[j, t] for j, t in zip(rem, toks))
                conf = {j: q[j, t] for j, t in zip(rem, toks)}
                keep = sorted(rem, key=lambda j: -conf[j])[:quota]
                s = list(state)
                for j, t in zip(rem, toks):
                    if j in keep:
                        s[j] = t
                new[tuple(s)] += w
        dist = new
    return dist


def block_law(model, block_length: int, steps: int, schedule: str) -> dict:
    dist = {(MASK,) * L: 1.0}
    for b0 in range(0, L, block_length):
        dist = ancestral_law(model, dist, list(range(b0, min(b0 + block_length, L))), steps, schedule)
    return dist


def chi2_p(tokens: torch.Tensor, law: dict) -> float:
    assert math.isclose(sum(law.values()), 1.0, abs_tol=1e-12)
    assert all(MASK not in y for y, p in law.items() if p > 0)
    codes = (tokens * (REAL ** torch.arange(L))).sum(-1)
    obs = torch.bincount(codes, minlength=REAL**L).double().numpy()
    exp = np.array([law.get(tuple((c // REAL**i) % REAL for i in range(L)), 0.0) for c in range(REAL**L)]) * len(tokens)
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.fixture(scope="module")
def model():
    return TableModel(seed=7)


def _sample(model, name, **kw):
    x = torch.full((N, L), MASK)
    out = SAMPLERS.get(name)(model, x, mask_id=MASK, vocab_size=VOCAB, generator=torch.Generator().manual_seed(11),
                             **kw)
    assert not bool((out.tokens == MASK).any())
    return out.tokens


CASES = [
    ("ancestral", {"steps": 2}, "loglinear"),
    ("ancestral", {"steps": 3}, "loglinear"),
    ("ancestral", {"steps": 2}, "cosine"),
    ("ancestral", {"steps": 3}, "cosine"),
    ("block", {"steps": 2, "block_length": 2}, "loglinear"),
    ("block", {"steps": 3, "block_length": 2}, "cosine"),
]


@pytest.mark.parametrize("name,kw,schedule", CASES)
def test_ancestral_and_block_match_exact_enumeration(model, name, kw, schedule):
    if name == "block":
        law = block_law(model, kw["block_length"], kw["steps"], schedule)
    else:
        law = ancestral_law(model, {(MASK,) * L: 1.0}, list(range(L)), kw["steps"], schedule)
    toks = _sample(model, name, schedule=make_schedule(schedule), **kw)
    assert chi2_p(toks, law) > 1e-3
    # the test has power: with so few steps the law is not the continuous-time one
    assert chi2_p(toks, continuous_law(model)) < 1e-6


@pytest.mark.parametrize("steps", [2, 3])
def test_llada_low_confidence_matches_exact_enumeration(model, steps):
    law = llada_low_confidence_law(model, steps)
    toks = _sample(model, "llada", steps=steps, remasking="low_confidence")
    assert chi2_p(toks, law) > 1e-3
    assert chi2_p(toks, continuous_law(model)) < 1e-6


def test_schedules_give_different_laws(model):
    """Loglinear and cosine reveal at different rates at T=2, so their laws differ (the schedule is used)."""
    a = ancestral_law(model, {(MASK,) * L: 1.0}, list(range(L)), 2, "loglinear")
    b = ancestral_law(model, {(MASK,) * L: 1.0}, list(range(L)), 2, "cosine")
    assert max(abs(a.get(y, 0) - b.get(y, 0)) for y in set(a) | set(b)) > 1e-3
