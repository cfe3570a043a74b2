"""Schedules (alpha, alpha' vs autograd, inverse) and the rank-free counter-based corruption noise."""

import random

import pytest
import torch

from megadiff.diffusion.noise import (
    _mix_int,
    _mul32,
    corrupt,
    make_noise,
    mix32,
    position_uniforms,
    random_length,
    sample_times,
)
from megadiff.diffusion.schedules import SCHEDULES, make_schedule

ALL = [("loglinear", {}), ("linear", {}), ("cosine", {}), ("poly", {"power": 2.0}), ("poly", {"power": 0.5})]


@pytest.mark.parametrize("name,kw", ALL)
def test_dalpha_matches_autograd_and_inverse(name, kw):
    s = SCHEDULES.get(name)(**kw)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64, requires_grad=True)
    a = s.alpha(t)
    (g,) = torch.autograd.grad(a.sum(), t)
    torch.testing.assert_close(s.dalpha(t.detach()), g, rtol=1e-10, atol=1e-12)
    assert bool((a[1:] < a[:-1]).all()), "alpha must decrease"
    assert abs(float(s.alpha(torch.tensor(0.0, dtype=torch.float64))) - 1.0) < 1e-12
    assert float(s.alpha(torch.tensor(1.0, dtype=torch.float64))) < 1e-6
    torch.testing.assert_close(s.t_of_alpha(a.detach()), t.detach(), rtol=1e-8, atol=1e-8)
    w = s.nelbo_weight(t.detach())
    assert bool((w > 0).all())


def test_make_schedule_from_config():
    class C:
        schedule, schedule_power = "poly", 3.0

    assert make_schedule(C()).power == 3.0
    assert make_schedule("cosine").name == "cosine"


def test_mix32_is_overflow_free_and_matches_python():
    rng = random.Random(0)
    vals = [0, 1, 2**31, 2**32 - 1] + [rng.randrange(2**32) for _ in range(2000)]
    x = torch.tensor(vals, dtype=torch.int64)
    assert _mul32(x, 0x846CA68B).tolist() == [(v * 0x846CA68B) % 2**32 for v in vals]
    assert mix32(x).tolist() == [_mix_int(v) for v in vals]


def test_noise_is_a_function_of_sample_id_only():
    """Same rows whether computed in a batch of 8 or 2, or split as DP=1/2/4 would split them."""
    for anti in (False, True):
        full = make_noise(7, 3, torch.arange(24, 32), 64, 1e-3, anti, 8)
        for idx in ([2, 5], [0, 1, 2, 3], [7]):
            part = make_noise(7, 3, torch.arange(24, 32)[idx], 64, 1e-3, anti, 8)
            assert torch.equal(part.t, full.t[idx]) and torch.equal(part.u, full.u[idx])
        other_step = make_noise(7, 4, torch.arange(24, 32), 64, 1e-3, anti, 8)
        assert not torch.equal(other_step.u, full.u)
    # very large sample ids (beyond 2**32) still hash fine and differ
    big = torch.tensor([2**33 + 5, 5], dtype=torch.int64)
    u = position_uniforms(0, 0, big, 16)
    assert not torch.equal(u[0], u[1])


def test_noise_uniformity():
    n = make_noise(1, 0, torch.arange(256), 512, 1e-3, False, 0)
    u = n.u.double().flatten()
    assert bool((u > 0).all() and (u < 1).all())
    counts = torch.histc(u, bins=32, min=0.0, max=1.0)
    exp = u.numel() / 32
    chi2 = float(((counts - exp) ** 2 / exp).sum())
    assert chi2 < 80, chi2  # 31 dof: 99.99% quantile ~ 70; loose bound
    assert abs(float(u.mean()) - 0.5) < 0.005
    # neighbouring positions and neighbouring samples are uncorrelated
    uu = n.u.double() - 0.5
    assert abs(float((uu[:, 1:] * uu[:, :-1]).mean()) / (1 / 12)) < 0.02
    assert abs(float((uu[1:] * uu[:-1]).mean()) / (1 / 12)) < 0.02
    t = n.t.double()
    assert abs(float(t.mean()) - 0.5) < 0.05 and float(t.min()) >= 1e-3


def test_antithetic_times_form_a_shifted_grid_over_the_global_batch():
    G, eps = 16, 1e-3
    t = sample_times(5, 11, torch.arange(11 * G, 12 * G), eps, True, G).double()
    v = ((t - eps) / (1 - eps)).sort().values
    gaps = v[1:] - v[:-1]
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1.0 / G), atol=1e-6, rtol=0)
    t2 = sample_times(5, 12, torch.arange(12 * G, 13 * G), eps, True, G)
    assert not torch.equal(t, t2.double())


def test_corrupt_masks_at_rate_one_minus_alpha():
    s = SCHEDULES.get("cosine")()
    x0 = torch.randint(0, 50, (512, 256))
    n = make_noise(0, 0, torch.arange(512), 256, 1e-3, True, 512)
    xt, masked = corrupt(x0, n, s, mask_id=99)
    assert torch.equal(xt == 99, masked) and torch.equal(xt[~masked], x0[~masked])
    rate = masked.double().mean(-1)
    expect = 1 - s.alpha(n.t.double())
    assert float((rate - expect).abs().mean()) < 0.03


def test_random_length_same_everywhere_and_at_rate():
    hits = [random_length(3, s, 128, 0.05) for s in range(20000)]
    cropped = [h for h in hits if h != 128]
    assert hits == [random_length(3, s, 128, 0.05) for s in range(20000)]
    assert abs(len(cropped) / 20000 - 0.05) < 0.006
    assert min(cropped) >= 1 and max(cropped) <= 128
    assert random_length(3, 0, 128, 0.0) == 128


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_identical_on_cuda():
    ids = torch.arange(1000, 1064)
    a = make_noise(9, 2, ids, 128, 1e-3, True, 64)
    b = make_noise(9, 2, ids, 128, 1e-3, True, 64, device="cuda")
    assert torch.equal(a.u, b.u.cpu()) and torch.equal(a.t, b.t.cpu())


def test_unit_interval_conversion_never_hits_endpoints():
    u = position_uniforms(0, 0, torch.arange(4), 8)
    assert bool((u > 0).all() and (u < 1).all())
