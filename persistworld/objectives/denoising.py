"""The EDM denoising loss of base training (METHOD.md §1), per sample.

    x_sigma = x0 + sigma * eps,          ln sigma ~ N(P_mean, P_std^2)
    L_i     = lambda(sigma_i) * mean_j (D(x_sigma; sigma_i, c_i)_j - x0_ij)^2
              (lambda with the model's sigma_data, 1 for Ctrl-World)

Teacher forcing: the condition c (history latents + poses, future poses) is ground truth and
the loss covers the L future frames only. Like every objective here it returns PER-SAMPLE
values (N,) and takes its randomness (sigma, eps) as arguments; the trainer reduces.
"""
from __future__ import annotations

import torch

from persistworld.objectives.terms import Denoising, Samples
from persistworld.world_model.interface import HistoryBuffer, WorldModel


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1))


def noised_history(buffer: HistoryBuffer, history_sigma: float,
                   history_eps: torch.Tensor | None,
                   history_level: torch.Tensor | None = None) -> HistoryBuffer:
    """Training-only augmentation as Ctrl-World trains (CTRL_WORLD.md): history latents +
    sigma_h * eps with a per-sample level sigma_h = history_sigma * |z|, z standard normal
    (``history_level`` (N,) = |z|; None: sigma_h = history_sigma for every sample), so the model
    learns to treat imperfect history as a rollout hands it, not to copy it. 0 = off.
    eps: (N, H, C, Hs, Ws)."""
    if history_sigma <= 0 or history_eps is None:
        return buffer
    level = history_sigma if history_level is None else \
        history_sigma * _expand(history_level, history_eps)
    return buffer.replace(latents=buffer.latents + level * history_eps)


def denoising_loss(model: WorldModel, x0: torch.Tensor, buffer: HistoryBuffer,
                   future_actions: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                   history_sigma: float = 0.0, history_eps: torch.Tensor | None = None,
                   history_level: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample weighted denoising loss: base training's forward pass (noise x0, denoise
    with the model) and the ``denoising`` term of objectives/terms.py on its estimate.

    x0: (N, L, C, Hs, Ws) clean future latents; buffer: ground-truth history (N, H, ...);
    future_actions: (N, L, A); sigma: (N,) noise levels; eps: like x0, standard normal.
    Returns ``loss`` (N,) = lambda(sigma) * per-sample MSE(x0_hat, x0), and ``mse`` (N,), the
    unweighted x0 error (detached, for logging). ``weight`` (broadcastable to x0, >= 0): a
    per-element weighting of the squared error, normalised per sample (sum w e^2 / sum w), so
    the loss keeps its scale (``trainer.motion_weight``).
    """
    x_sigma = x0 + _expand(sigma, x0) * eps
    x0_hat = model.denoise(x_sigma, sigma, noised_history(buffer, history_sigma, history_eps,
                                                         history_level),
                           future_actions)
    sigma_data = float(getattr(getattr(model, "cfg", None), "sigma_data", 1.0))
    return Denoising()(x0_hat, Samples(x0, sigma, weight=weight, sigma_data=sigma_data))


def draw_noise(model: WorldModel, x0: torch.Tensor, history: torch.Tensor,
               generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The randomness of one denoising step, from ``generator`` only (resumable by seed):
    sigma (N,) from the backend's training distribution (``model.training_sigma``), eps like x0
    (N, L, ...), history eps like history (N, H, ...) and the per-sample history noise level
    |z| (N,) (drawn last, so the first three do not depend on whether history noise is used)."""
    sigma = model.training_sigma(x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator)
    history_eps = torch.randn(history.shape, generator=generator)
    level = torch.randn(x0.shape[0], generator=generator).abs()
    return (sigma.to(x0.device), eps.to(x0.device), history_eps.to(x0.device),
            level.to(x0.device))
