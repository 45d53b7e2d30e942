"""EDM x0 preconditioning, training noise levels and the Euler sampler (METHOD.md §1).

Ctrl-World / SVD's "v-like" preconditioning with sigma_data = 1, one function per equation
(cf. NVlabs/edm ``training/networks.py``, EDMPrecond):

    c_skip(sigma)  = 1 / (sigma^2 + 1)
    c_out(sigma)   = -sigma / sqrt(sigma^2 + 1)
    c_in(sigma)    = 1 / sqrt(sigma^2 + 1)
    c_noise(sigma) = ln(sigma) / 4
    x0_hat         = c_skip * x_sigma + c_out * F(c_in * x_sigma, c_noise)
    lambda(sigma)  = (sigma^2 + 1) / sigma^2          (loss weight)
    ln sigma ~ N(P_mean = 0.7, P_std = 1.6^2)          (training noise levels)

sigma_data = 1 assumes the working space has a standard deviation of about 1: the embedded
model scales pixels accordingly (``embedded.py``, ``pixel_mean`` / ``pixel_std``).

Samplers are pure functions: all randomness comes in through ``noise``, so a sample is
reproducible from the seed that drew its noise (NVlabs/edm ``generate.py``).
"""
from __future__ import annotations

from typing import Callable

import torch
from persistworld.errors import UserError

# Defaults used by Ctrl-World's training noise distribution (METHOD.md §1).
P_MEAN = 0.7
P_STD = 1.6


# ---- preconditioning (sigma: any shape; broadcast by the caller) -------------------------
# EDM's general form with the data standard deviation sigma_data (Karras et al. 2022, Table 1);
# sigma_data = 1 (the default) is exactly Ctrl-World / SVD's form written above.
def c_skip(sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    return sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)


def c_out(sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    return -sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    return 1.0 / (sigma ** 2 + sigma_data ** 2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log() / 4.0


def loss_weight(sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out(sigma)^2: the
    weighted x0 error equals the unweighted error of the network output F against its target."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like`` (B, ...)."""
    return sigma.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def precondition(F: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_sigma: torch.Tensor,
                 sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """x0_hat = c_skip * x_sigma + c_out * F(c_in * x_sigma, c_noise).

    F: the raw network, (B, ...) scaled input, (B,) c_noise -> (B, ...) output.
    x_sigma: (B, ...) noisy sample; sigma: (B,) noise levels (> 0).
    """
    s = _expand(sigma, x_sigma)
    m = F(c_in(s, sigma_data) * x_sigma, c_noise(sigma.to(x_sigma.dtype)))
    return c_skip(s, sigma_data) * x_sigma + c_out(s, sigma_data) * m


def network_target(x0: torch.Tensor, x_sigma: torch.Tensor, sigma: torch.Tensor,
                   sigma_data: float = 1.0) -> torch.Tensor:
    """The output F* for which ``precondition`` returns exactly x0:
    F* = (x0 - c_skip * x_sigma) / c_out. (B, ...) -> (B, ...)."""
    s = _expand(sigma, x0)
    return (x0 - c_skip(s, sigma_data) * x_sigma) / c_out(s, sigma_data)


# ---- noise levels --------------------------------------------------------------------------
def sample_training_sigma(n: int, generator: torch.Generator | None = None,
                          p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """(n,) training noise levels, ln sigma ~ N(p_mean, p_std^2)."""
    return (torch.randn(n, generator=generator) * p_std + p_mean).exp()


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float,
                  rho: float = 7.0) -> torch.Tensor:
    """(num_steps + 1,) decreasing noise levels sigma_max ... sigma_min, then a final 0 (Karras et
    al. 2022, eq. 5): sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise UserError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    else:
        ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0] = sigma_max                      # exact endpoints despite the power rounding
    if num_steps > 1:
        sigmas[-1] = sigma_min
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()


# ---- sampler -------------------------------------------------------------------------------
def _ode_sample(denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                noise: torch.Tensor, sigmas: torch.Tensor, second_order: bool,
                origin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Deterministic integration of the probability-flow ODE dx/dsigma = (x - D(x)) / sigma,
    first order (Euler) or with EDM's second-order (Heun) correction; see the two samplers."""
    B = noise.shape[0]
    x = origin + noise * sigmas[0].to(noise.dtype)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_hat = denoise_fn(x, sigma.expand(B).to(noise.dtype))
        if sigma_next == 0:
            x = x0_hat
            continue
        d = (x - x0_hat) / sigma                            # dx/dsigma
        x_next = x + (sigma_next - sigma) * d
        if second_order:
            d_next = (x_next - denoise_fn(x_next, sigma_next.expand(B).to(noise.dtype))) \
                / sigma_next
            x_next = x + (sigma_next - sigma) * 0.5 * (d + d_next)
        x = x_next
    return x


def euler_sample(denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 noise: torch.Tensor, sigmas: torch.Tensor,
                 origin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Deterministic Euler integration of the probability-flow ODE dx/dsigma = (x - D(x)) / sigma.

    denoise_fn: (B, ...) x, (B,) sigma -> (B, ...) clean estimate D(x; sigma); one call per step
        for the whole batch.
    noise: (B, ...) standard normal; the start is x = origin + sigmas[0] * noise (origin 0: EDM;
        a predictor's anchor, e.g. the last frame: the prior N(x0, sigma_max^2) centred on it).
    sigmas: (N + 1,) decreasing, ending in 0 (``karras_sigmas``).
    The last step, to sigma = 0, is written as x = D(x; sigma_{N-1}), which equals the Euler
    update x + (0 - sigma) (x - D) / sigma in exact arithmetic and avoids its rounding.
    """
    return _ode_sample(denoise_fn, noise, sigmas, second_order=False, origin=origin)


def heun_sample(denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                noise: torch.Tensor, sigmas: torch.Tensor,
                origin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """EDM's deterministic second-order sampler (Karras et al. 2022, Algorithm 1 without
    churn): an Euler step to sigma_{i+1}, then the average of the slopes at both ends; the last
    step, to sigma = 0, is a plain Euler step (x = D). 2N - 1 denoiser calls for N steps.
    Same arguments and randomness as ``euler_sample``."""
    return _ode_sample(denoise_fn, noise, sigmas, second_order=True, origin=origin)


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}
