"""Step schedules for AR adaptation (not wired yet): attention-mask annealing and the block-size curriculum.
References: hand-written tables and binomial bounds, never the code against itself."""

import math

import pytest
import torch

from megadiff.diffusion.curricula import anneal_ratio, annealed_attention, block_size_at


def test_anneal_ratio_table():
    assert [anneal_ratio(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert anneal_ratio(0, 0) == 1.0 and anneal_ratio(7, 0) == 1.0
    with pytest.raises(ValueError):
        anneal_ratio(-1, 4)


def test_annealed_attention_keeps_causal_part_and_opens_the_ratio_of_the_upper_triangle():
    L, steps = 256, 10
    upper = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    n = int(upper.sum())
    for step in (0, 3, 6, 8):
        m = annealed_attention(7, step, L, steps)
        assert bool(m[~upper].all())  # lower triangle and diagonal always allowed
        p = (step + 1) / steps
        k = int(m[upper].sum())
        assert abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p)), (step, k, n * p)
        # rows and columns are not favoured: opened share per row-half matches too
        top = upper.clone()
        top[L // 2:] = False
        kt, nt = int(m[top].sum()), int(top.sum())
        assert abs(kt - nt * p) < 5 * math.sqrt(nt * p * (1 - p))
    assert bool(annealed_attention(7, 9, L, steps).all())  # ratio 1 at the last annealing step


def test_annealed_attention_is_a_function_of_seed_and_step():
    a = annealed_attention(3, 5, 64, 20)
    assert torch.equal(a, annealed_attention(3, 5, 64, 20))  # a resumed run redraws the same mask
    assert not torch.equal(a, annealed_attention(3, 6, 64, 20))
    assert not torch.equal(a, annealed_attention(4, 5, 64, 20))


def test_block_size_curriculum_table():
    L = 64
    got = [block_size_at(s, 30, L, start=1, end=16, warmup_steps=12, decay_steps=6) for s in range(30)]
    want = [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32] + [64] * 12 + [32, 32, 32, 16, 16, 16]
    assert got == want
    # no warmup/decay: plain MDLM
    assert {block_size_at(s, 10, L, start=1, end=16, warmup_steps=0, decay_steps=0) for s in range(10)} == {64}
    # uneven split: 3 warmup stages (4, 8, 16 below 32) over 7 steps
    assert [block_size_at(s, 7, 32, start=4, end=32, warmup_steps=7, decay_steps=0) for s in range(7)] == \
        [4, 4, 4, 8, 8, 16, 16]


@pytest.mark.parametrize("kw,match", [
    ({"start": 3, "end": 16}, "start=3"),
    ({"start": 2, "end": 24}, "end=24"),  # 64 % 24 != 0
    ({"start": 1, "end": 16, "warmup_steps": 20, "decay_steps": 20}, "must fit"),
])
def test_block_size_curriculum_refuses_bad_input(kw, match):
    args = {"warmup_steps": 4, "decay_steps": 4, **kw}
    with pytest.raises(ValueError, match=match):
        block_size_at(0, 30, 64, **args)


def test_block_size_curriculum_needs_power_of_two_ratios():
    with pytest.raises(ValueError, match="power of two"):
        block_size_at(0, 30, 96, start=1, end=3, warmup_steps=4, decay_steps=4)  # 96 / 1 = 96
    assert block_size_at(0, 30, 96, start=3, end=3, warmup_steps=4, decay_steps=4) == 3  # 96 / 3 = 32
