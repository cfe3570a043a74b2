"""Block-diffusion sampler: distribution vs exact enumeration (table denoiser), KV cache == recomputation on
real megatron layers, batch invariance, EOS stop, Fast-dLLM threshold decoding."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from test_attention_masks import V, _build, pc  # noqa: F401  (fixture)

from megadiff.diffusion.block_sampler import block_diffusion_sample, full_sequence_flops
from megadiff.model.block_lm import MegatronDenoiser

# ----------------------------------------------------------------------------- table denoiser

LG, BS, REAL, TMASK, TV, TPAD = 4, 2, 3, 3, 4, 5


class TableDenoiser:
    """Logits of position i = table[canvas code, i]; the canvas is the visible tokens (clean prefix + the
    current block) with [MASK] after them: what a BD3-LM network sees. The cache holds the clean prefix."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(TV**LG, LG, TPAD, generator=g, dtype=torch.float64) * 1.5

    def new_state(self):
        return {"prefix": None}

    def _logits(self, visible):
        B, n = visible.shape
        canvas = torch.cat([visible, torch.full((B, LG - n), TMASK)], 1)
        return self.table[(canvas * (TV ** torch.arange(LG))).sum(-1)]

    def __call__(self, tokens, start, state, commit):
        if state is None:
            return self._logits(tokens)[:, :tokens.shape[1]]
        prefix = state["prefix"] if state["prefix"] is not None else tokens[:, :0]
        assert prefix.shape[1] == start
        vis = torch.cat([prefix, tokens], 1)
        if commit:
            state["prefix"] = vis
        return self._logits(vis)[:, start:start + tokens.shape[1]]


def _exact(model):
    """P(y) = prod over blocks of the random-order reveal distribution given the clean prefix."""
    probs = {}
    for y in itertools.product(range(REAL), repeat=LG):
        pr = 1.0
        for s in range(0, LG, BS):
            tot = 0.0
            for order in itertools.permutations(range(s, s + BS)):
                cur, p = list(y[:s]) + [TMASK] * BS, 1.0
                for i in order:
                    row = model._logits(torch.tensor([cur]))[0, i]
                    lg = row[:TV].clone()
                    lg[TMASK] = float("-inf")
                    p *= float(torch.softmax(lg, -1)[y[i]])
                    cur[i] = y[i]
                tot += p
            pr *= tot / math.factorial(BS)
        probs[y] = pr
    return probs


def _chi2(tokens, probs):
    codes = (tokens * (REAL ** torch.arange(LG))).sum(-1)
    obs = torch.bincount(codes, minlength=REAL**LG).double().numpy()
    exp = np.array([probs[tuple((c // REAL**i) % REAL for i in range(LG))] for c in range(REAL**LG)]) * len(tokens)
    return stats.chisquare(obs, exp).pvalue


N = 20_000


@pytest.fixture(scope="module")
def table():
    m = TableDenoiser(seed=4)
    return m, _exact(m)


def _sample(model, n=N, **kw):
    kw = {"block_size": BS, "mask_id": TMASK, "vocab_size": TV, **kw}
    return block_diffusion_sample(model, torch.zeros(n, 0, dtype=torch.long), LG, **kw)


@pytest.mark.parametrize("cache", [True, False])
def test_block_sampler_matches_exact_enumeration(table, cache):
    model, probs = table
    out = _sample(model, seed=11, cache=cache)
    assert not bool((out.tokens == TMASK).any())
    assert _chi2(out.tokens, probs) > 1e-3


def test_chi_square_rejects_parallel_decoding(table):
    """threshold = 0 reveals a whole block per call (factorised): a different distribution, rejected."""
    model, probs = table
    out = _sample(model, seed=11, threshold=0.0)
    assert out.nfe == LG // BS * 2 - 1  # one call per block + commits between blocks
    assert _chi2(out.tokens, probs) < 1e-6


def test_cache_and_recomputation_give_identical_tokens_on_the_table(table):
    model, _ = table
    a, b = _sample(model, n=500, seed=3, cache=True), _sample(model, n=500, seed=3, cache=False)
    assert torch.equal(a.tokens, b.tokens)


# ----------------------------------------------------------------------------- real megatron model

PB, GEN, BLK = 8, 24, 8


def _prompts(n, seed=0):
    return torch.randint(0, V - 1, (n, PB), generator=torch.Generator().manual_seed(seed))


def test_kv_cached_logits_equal_recomputed_logits(pc):  # noqa: F811
    m = _build()
    den = MegatronDenoiser(m, BLK)
    x = torch.randint(0, V - 1, (2, 3 * BLK), generator=torch.Generator().manual_seed(5))
    x[:, 2 * BLK + 3:] = V - 1
    with torch.no_grad():
        full = den(x, 0, None, False)[:, 2 * BLK:]
        st = den.new_state()
        den(x[:, :2 * BLK], 0, st, True)  # prompt of two blocks in one commit call (block causal inside)
        cached = den(x[:, 2 * BLK:], 2 * BLK, st, False)
        st2 = den.new_state()
        den(x[:, :BLK], 0, st2, True)
        den(x[:, BLK:2 * BLK], BLK, st2, True)
        cached2 = den(x[:, 2 * BLK:], 2 * BLK, st2, False)
    assert float((full - cached).abs().max() / full.abs().max()) < 1e-5
    assert float((full - cached2).abs().max() / full.abs().max()) < 1e-5


def test_megatron_block_sampling_cache_identical_and_cheaper(pc):  # noqa: F811
    den = MegatronDenoiser(_build(), BLK)
    kw = {"block_size": BLK, "mask_id": V - 1, "vocab_size": V, "seed": 7, "steps_per_block": 4}
    a = block_diffusion_sample(den, _prompts(3), GEN, cache=True, **kw)
    b = block_diffusion_sample(den, _prompts(3), GEN, cache=False, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert not bool((a.tokens == V - 1).any())
    L = PB + GEN
    assert full_sequence_flops(a.calls, L, 1.0, 0.01) < full_sequence_flops(b.calls, L, 1.0, 0.01)


def test_batch_invariance(pc):  # noqa: F811
    """A row's output at a fixed seed and row seed does not depend on the other rows (here: other prompts,
    other row seeds, rows that stop at EOS earlier or later)."""
    den = MegatronDenoiser(_build(), BLK)
    eos = 5
    kw = {"block_size": BLK, "mask_id": V - 1, "vocab_size": V, "seed": 3, "eos_id": eos, "pad_id": 0,
          "threshold": 0.5}
    prompts = _prompts(4, seed=1)
    batch = block_diffusion_sample(den, prompts, GEN, row_seeds=torch.tensor([10, 11, 12, 13]), **kw)
    for i in (0, 3):
        alone = block_diffusion_sample(den, prompts[i:i + 1], GEN, row_seeds=torch.tensor([10 + i]), **kw)
        assert torch.equal(alone.tokens[0], batch.tokens[i]), i
    other = block_diffusion_sample(den, prompts[[2, 1]], GEN, row_seeds=torch.tensor([12, 11]), **kw)
    assert torch.equal(other.tokens[1], batch.tokens[1])


def test_eos_stops_generation_and_pads(table):
    model, _ = table
    out = _sample(model, n=2000, seed=5, eos_id=1, pad_id=2)
    gen = out.tokens
    first = torch.where((gen == 1).any(-1), (gen == 1).to(torch.int8).argmax(-1), LG)
    after = torch.arange(LG)[None] > first[:, None]
    assert bool((gen[after] == 2).all()) and bool(after.any())
    # every row hit EOS in its first block -> no second block was decoded
    early = block_diffusion_sample(_EOSFirst(model), torch.zeros(3, 0, dtype=torch.long), LG,
                                   block_size=BS, mask_id=TMASK, vocab_size=TV, eos_id=1, seed=0)
    assert early.nfe == BS and bool((early.tokens[:, BS:] == 1).all())


class _EOSFirst:
    """The table with EOS (token 1) certain everywhere."""

    def __init__(self, model):
        self.model = model

    def new_state(self):
        return self.model.new_state()

    def __call__(self, tokens, start, state, commit):
        lg = self.model(tokens, start, state, commit).clone()
        lg[..., 1] = 50.0
        return lg


def test_fast_dllm_threshold_trades_calls_for_parallelism(table):
    model, _ = table
    one = _sample(model, n=200, seed=1, threshold=1.0)  # nothing is certain: one token per call
    par = _sample(model, n=200, seed=1, threshold=0.3)
    assert one.nfe == LG + (LG // BS - 1) and bool((one.row_calls == LG).all())
    assert bool((par.row_calls >= LG // BS).all()) and float(par.row_calls.double().mean()) < LG - 0.5


def test_unaligned_prompt_is_revealed_context_of_its_block(table):
    """A prompt ending inside a block: that block is generated with the prompt's tokens already revealed;
    cached and recomputed runs agree and the prompt is kept."""
    model, _ = table
    prompt = torch.randint(0, REAL, (300, 1), generator=torch.Generator().manual_seed(0))
    kw = {"block_size": BS, "mask_id": TMASK, "vocab_size": TV, "seed": 2}
    a = block_diffusion_sample(model, prompt, LG - 1, cache=True, **kw)
    b = block_diffusion_sample(model, prompt, LG - 1, cache=False, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens[:, :1], prompt)
    assert not bool((a.tokens == TMASK).any())


def test_registered_sampler_runs_on_a_canvas(table):
    from megadiff.diffusion.catalog import SAMPLERS

    model, _ = table
    x = torch.full((4, LG), TMASK)
    x[:, 0] = 1
    out = SAMPLERS.get("bd3lm")(None, x, mask_id=TMASK, vocab_size=TV, denoiser=model, block_length=BS,
                                generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == x.shape and bool((out.tokens[:, 0] == 1).all()) and not bool((out.tokens == TMASK).any())
    x[0, 2] = 0  # a fixed token after the generated span: infilling, refused
    with pytest.raises(ValueError, match="no infilling"):
        SAMPLERS.get("bd3lm")(None, x, mask_id=TMASK, vocab_size=TV, denoiser=model, block_length=BS)
