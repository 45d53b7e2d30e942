"""x0-adapted DiffusionNFT loss (METHOD.md §2; paper Sec. 3.2, App. A).

With the trained model's clean estimate ``x0_theta`` and the frozen reference ("old") policy's
``x0_old`` at the same (x_sigma, sigma, c), a mixing coefficient ``beta`` and a reward weight
``r`` in [0, 1] for the GENERATED candidate ``x0``:

    x0_pos = (1 - beta) * x0_old + beta * x0_theta
    x0_neg = (1 + beta) * x0_old - beta * x0_theta
    L      = r * ||x0_pos - x0||^2 + (1 - r) * ||x0_neg - x0||^2

Like every objective here it returns PER-SAMPLE values; the trainer reduces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from persistworld.errors import UserError


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, ...) x (N, ...) -> (N,): mean squared error over everything but the batch dim."""
    return (a - b).pow(2).flatten(1).mean(1)


@dataclass(frozen=True)
class NFTVariant:
    """Switches for what reference implementations (DiffusionNFT, WorldCompass) add to the
    paper's form; all off = the paper's loss."""

    inv_beta_scale: bool = False      # divide the loss by beta (DiffusionNFT)
    adaptive_weighting: bool = False  # divide each squared error by its detached mean |error|
    adv_clip_scale: float = 1.0       # multiply by the advantage clip (DiffusionNFT: adv_clip_max)


def nft_loss(x0_theta: torch.Tensor, x0_old: torch.Tensor, x0: torch.Tensor, r: torch.Tensor,
             beta: float, variant: NFTVariant = NFTVariant()) -> dict[str, torch.Tensor]:
    """Per-sample NFT loss. x0_theta, x0_old, x0: (N, ...); r: (N,) in [0, 1].

    Returns ``loss`` (N,) and its parts ``pos`` / ``neg`` (N,), the unweighted squared errors
    of the implicit positive and negative policies (for logging).
    """
    if not 0.0 < beta:
        raise UserError(f"objective.beta must be > 0, got {beta}")
    x0_old = x0_old.detach()
    x0 = x0.detach()
    x0_pos = (1.0 - beta) * x0_old + beta * x0_theta
    x0_neg = (1.0 + beta) * x0_old - beta * x0_theta
    pos = _per_sample_mse(x0_pos, x0)
    neg = _per_sample_mse(x0_neg, x0)
    if variant.adaptive_weighting:
        # DiffusionNFT's per-sample adaptive weight: 1 / mean|x0_pred - x0|, no gradient
        pos = pos / (x0_pos - x0).abs().flatten(1).mean(1).detach().clamp_min(1e-5)
        neg = neg / (x0_neg - x0).abs().flatten(1).mean(1).detach().clamp_min(1e-5)
    loss = r * pos + (1.0 - r) * neg
    if variant.inv_beta_scale:
        loss = loss / beta
    loss = loss * variant.adv_clip_scale
    return {"loss": loss, "pos": pos.detach(), "neg": neg.detach()}


def rwr_loss(x0_theta: torch.Tensor, x0: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample reward-weighted regression onto the generated candidate x0:
    L = r * ||x0_theta - x0||^2 (Peters & Schaal 2007; RAFT / ReST-style fine-tuning on good
    samples). It is the NFT loss without the implicit negative policy: a candidate with r = 0
    is ignored instead of pushed away from, and there is no old policy. Returns ``loss`` (N,)
    and ``pos`` (N,), the unweighted squared error."""
    err = _per_sample_mse(x0_theta, x0.detach())
    return {"loss": r * err, "pos": err.detach()}


def kl_to_base(x0_theta: torch.Tensor, x0_base: torch.Tensor) -> torch.Tensor:
    """Per-sample KL surrogate against the base model (adapters off): ||x0_theta - x0_base||^2.
    The trainer multiplies by w_kl (0 = off)."""
    return _per_sample_mse(x0_theta, x0_base.detach())
