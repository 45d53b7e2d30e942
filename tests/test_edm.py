"""EDM preconditioning, noise levels and the Euler sampler: hand-checkable identities."""
from __future__ import annotations

import math

import pytest
import torch

from persistworld.world_model import edm

SIGMAS = [0.002, 0.05, 0.5, 1.0, 2.0, 10.0, 80.0, 700.0]


def _s(values=SIGMAS, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_coefficients_match_method_md():
    for v in SIGMAS:
        s = torch.tensor(v, dtype=torch.float64)
        assert edm.c_skip(s).item() == pytest.approx(1 / (v * v + 1), rel=1e-12)
        assert edm.c_out(s).item() == pytest.approx(-v / math.sqrt(v * v + 1), rel=1e-12)
        assert edm.c_in(s).item() == pytest.approx(1 / math.sqrt(v * v + 1), rel=1e-12)
        assert edm.c_noise(s).item() == pytest.approx(math.log(v) / 4, rel=1e-12, abs=1e-15)
        assert edm.loss_weight(s).item() == pytest.approx((v * v + 1) / (v * v), rel=1e-12)


def test_preconditioning_identities():
    s = _s()
    # sigma_data = 1 (the v-parameterisation): c_skip + c_out^2 = 1, c_in^2 = c_skip,
    # lambda = 1 / c_out^2 (the weighted x0 error is the plain error of F)
    torch.testing.assert_close(edm.c_skip(s) + edm.c_out(s) ** 2, torch.ones_like(s))
    torch.testing.assert_close(edm.c_in(s) ** 2, edm.c_skip(s))
    torch.testing.assert_close(edm.c_out(s) ** 2 * edm.loss_weight(s), torch.ones_like(s))
    # unit-variance network input when the data has unit variance: Var(c_in x_sigma) = 1
    torch.testing.assert_close(edm.c_in(s) ** 2 * (1 + s ** 2), torch.ones_like(s))
    # unit-variance target: Var(F*) = (c_skip^2 sigma^2 + (1 - c_skip)^2) / c_out^2 = 1
    target_var = ((edm.c_skip(s) * s) ** 2 + (1 - edm.c_skip(s)) ** 2) / edm.c_out(s) ** 2
    torch.testing.assert_close(target_var, torch.ones_like(s))


def test_limits_as_sigma_goes_to_zero_and_infinity():
    tiny, huge = torch.tensor(1e-6, dtype=torch.float64), torch.tensor(1e6, dtype=torch.float64)
    assert edm.c_skip(tiny).item() == pytest.approx(1.0, abs=1e-11)
    assert edm.c_out(tiny).item() == pytest.approx(0.0, abs=1e-5)
    assert edm.c_in(tiny).item() == pytest.approx(1.0, abs=1e-11)
    assert edm.c_skip(huge).item() == pytest.approx(0.0, abs=1e-11)
    assert edm.c_out(huge).item() == pytest.approx(-1.0, abs=1e-11)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 1.0, 4.0, 60.0])
def test_perfect_network_recovers_x0(sigma):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 4, 6, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sig = torch.full((3,), sigma, dtype=torch.float64)
    x_sigma = x0 + sigma * eps
    target = edm.network_target(x0, x_sigma, sig)
    seen = {}

    def F(x_in, noise_cond):
        seen["x_in"], seen["noise_cond"] = x_in, noise_cond
        return target

    x0_hat = edm.precondition(F, x_sigma, sig)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(seen["x_in"], x_sigma / math.sqrt(sigma ** 2 + 1))
    torch.testing.assert_close(seen["noise_cond"], torch.full((3,), math.log(sigma) / 4,
                                                              dtype=torch.float64))


def test_network_target_is_the_v_prediction():
    """With sigma_data = 1 the network's target is a v-prediction:
    F* = (x0 - c_skip x_sigma) / c_out = (eps - sigma x0) / sqrt(sigma^2 + 1)."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(
        2, 7, generator=g, dtype=torch.float64)
    sig = torch.tensor([0.4, 3.0], dtype=torch.float64)
    x_sigma = x0 + sig[:, None] * eps
    want = (eps - sig[:, None] * x0) / (sig[:, None] ** 2 + 1).sqrt()
    torch.testing.assert_close(edm.network_target(x0, x_sigma, sig), want)


def test_training_sigma_is_lognormal_and_seeded():
    a = edm.sample_training_sigma(200_000, torch.Generator().manual_seed(3))
    b = edm.sample_training_sigma(200_000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and (a > 0).all()
    assert a.log().mean().item() == pytest.approx(0.7, abs=0.02)
    assert a.log().std().item() == pytest.approx(1.6, abs=0.02)
    c = edm.sample_training_sigma(1000, torch.Generator().manual_seed(3), p_mean=-1.0, p_std=0.5)
    assert c.log().mean().item() == pytest.approx(-1.0, abs=0.1)


@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_karras_schedule_endpoints_and_monotonicity(n):
    s = edm.karras_sigmas(n, 0.002, 80.0)
    assert s.shape == (n + 1,)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == 0.0
    if n > 1:
        assert s[-2].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()


def test_karras_schedule_rejects_bad_settings():
    with pytest.raises(ValueError):
        edm.karras_sigmas(0, 0.002, 80.0)
    with pytest.raises(ValueError):
        edm.karras_sigmas(10, 80.0, 0.002)


def test_euler_with_oracle_denoiser_ends_exactly_at_x0():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 5, 3, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    calls = []

    def oracle(x, sigma):
        calls.append(sigma.clone())
        assert sigma.shape == (2,)
        return x0.clone()

    out = edm.euler_sample(oracle, noise, edm.karras_sigmas(50, 0.002, 80.0))
    assert torch.equal(out, x0)
    assert len(calls) == 50                      # one batched call per step


def test_euler_on_gaussian_data_follows_the_exact_ode():
    """Data x0 ~ N(0, 1): the exact denoiser is D(x; s) = x / (1 + s^2), and the probability-flow
    ODE maps x(s_max) to x(0) = x(s_max) / sqrt(1 + s_max^2). Euler with many steps converges."""
    noise = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    sig = edm.karras_sigmas(2000, 0.002, 80.0).double()
    out = edm.euler_sample(lambda x, s: x / (1 + s[:, None] ** 2), noise, sig)
    want = noise * 80.0 / math.sqrt(1 + 80.0 ** 2)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)


def test_euler_is_a_pure_function_of_its_noise():
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(3, 8, generator=g)
    sig = edm.karras_sigmas(10, 0.01, 20.0)
    den = lambda x, s: torch.tanh(x) / (1 + s[:, None])  # noqa: E731 - any deterministic D
    assert torch.equal(edm.euler_sample(den, noise, sig), edm.euler_sample(den, noise, sig))
    other = edm.euler_sample(den, noise + 1e-3, sig)
    assert not torch.equal(other, edm.euler_sample(den, noise, sig))


def test_heun_is_second_order_on_gaussian_data():
    """Data ~ N(0, 1): D(x; sigma) = x / (sigma^2 + 1) and the probability-flow ODE has the
    exact solution x(sigma) = x(sigma_max) sqrt(sigma^2 + 1) / sqrt(sigma_max^2 + 1)."""
    denoise = lambda x, s: x / (s.view(-1, 1) ** 2 + 1)               # noqa: E731
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).double()
    smin, smax = 0.05, 10.0
    exact_end = noise * smax * (smin ** 2 + 1) ** 0.5 / (smax ** 2 + 1) ** 0.5
    errs = {}
    for name in ("euler", "heun"):
        for n in (16, 32):
            sig = edm.karras_sigmas(n, smin, smax)[:-1]               # stop at sigma_min
            x = edm.SAMPLERS[name](denoise, noise, sig.double())
            errs[name, n] = (x - exact_end).abs().max().item()
    assert errs["heun", 16] < errs["euler", 16] / 4
    assert errs["euler", 16] / errs["euler", 32] < 2.6                # first order: ~2x
    assert errs["heun", 16] / errs["heun", 32] > 3.5                  # second order: ~4x


@pytest.mark.parametrize("sd", [0.25, 0.5, 2.0])
def test_general_sigma_data_identities(sd):
    """EDM Table 1 with data std sd: unit-variance input and target for data of std sd,
    lambda = 1 / c_out^2, and F* recovers x0 exactly."""
    s = _s()
    c_skip, c_out, c_in = edm.c_skip(s, sd), edm.c_out(s, sd), edm.c_in(s, sd)
    torch.testing.assert_close(c_in ** 2 * (sd ** 2 + s ** 2), torch.ones_like(s))
    target_var = ((c_skip * s) ** 2 + (1 - c_skip) ** 2 * sd ** 2) / c_out ** 2
    torch.testing.assert_close(target_var, torch.ones_like(s))
    torch.testing.assert_close(c_out ** 2 * edm.loss_weight(s, sd), torch.ones_like(s))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, generator=g, dtype=torch.float64) * sd
    x = x0 + s[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    target = edm.network_target(x0, x, s, sd)
    got = edm.precondition(lambda x_in, cn: target, x, s, sd)
    torch.testing.assert_close(got, x0)
