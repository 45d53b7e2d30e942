"""One signature for every loss of the toolkit, so the config can swap them:

    term(x0_theta, s: Samples) -> {"loss": (N,), <logged parts>: (N,) ...}

``x0_theta`` is the trained model's clean estimate D(x_sigma; sigma, c) of N samples and
``Samples`` everything else a step knows about them (what was noised, at which sigma, their
reward weights, the old policy's and the base model's estimates at the same input). Each term
says which of the optional fields it ``needs``, so a trainer computes (and pays for) only those;
like every objective here it returns PER-SAMPLE values and the trainer reduces.

    nft        x0-adapted DiffusionNFT (objectives/nft.py): the paper's post-training loss
    rwr        reward-weighted regression onto the candidates (objectives/nft.py): NFT without
               its implicit negative policy, the classic baseline it improves on
    kl         the KL surrogate to the base model (adapters off), added with objective.w_kl
    denoising  EDM's weighted denoising loss (objectives/denoising.py): base training

``objective.name`` chooses the post-training term (POST_TRAINING); ``kl`` is added to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from persistworld.errors import UserError
from persistworld.objectives.nft import NFTVariant, kl_to_base, nft_loss, rwr_loss
from persistworld.world_model import edm


@dataclass(frozen=True)
class Samples:
    """What an update knows about its N samples besides the trained estimate."""

    x0: torch.Tensor                      # (N, ...) the clean latents that were noised: the
                                          #   generated candidate (post-training) or the ground
                                          #   truth (base training)
    sigma: torch.Tensor                   # (N,) their noise levels
    r: torch.Tensor | None = None         # (N,) reward weights in [0, 1]
    x0_old: torch.Tensor | None = None    # the old policy's estimate at the same input
    x0_base: torch.Tensor | None = None   # the base model's (adapters off)
    weight: torch.Tensor | None = None    # per-element weight >= 0 (broadcastable to x0)
    sigma_data: float = 1.0               # the model's EDM data std (loss weight)

    def need(self, field: str, term: str) -> torch.Tensor:
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"the {term} loss needs Samples.{field}")
        return value


class Term:
    name: str = ""
    needs: frozenset[str] = frozenset()   # optional Samples fields it reads

    def __call__(self, x0_theta: torch.Tensor, s: Samples) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class NFT(Term):
    beta: float = 1.0
    variant: NFTVariant = NFTVariant()
    name = "nft"
    needs = frozenset({"r", "x0_old"})

    def __call__(self, x0_theta, s):
        return nft_loss(x0_theta, s.need("x0_old", self.name), s.x0, s.need("r", self.name),
                        self.beta, self.variant)


@dataclass(frozen=True)
class RWR(Term):
    name = "rwr"
    needs = frozenset({"r"})

    def __call__(self, x0_theta, s):
        return rwr_loss(x0_theta, s.x0, s.need("r", self.name))


@dataclass(frozen=True)
class KLToBase(Term):
    name = "kl"
    needs = frozenset({"x0_base"})

    def __call__(self, x0_theta, s):
        return {"loss": kl_to_base(x0_theta, s.need("x0_base", self.name))}


@dataclass(frozen=True)
class Denoising(Term):
    name = "denoising"

    def __call__(self, x0_theta, s):
        err = (x0_theta - s.x0).pow(2)
        mse = err.flatten(1).mean(1)                                         # (N,)
        fit = mse
        if s.weight is not None:
            w = s.weight.expand_as(err)
            fit = (w * err).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)
        return {"loss": edm.loss_weight(s.sigma, s.sigma_data) * fit, "mse": mse.detach()}


# objective.name -> the post-training term (the NFT switches of objective.* are NFT's alone)
POST_TRAINING = ("nft", "rwr")
NFT_ONLY = ("inv_beta_scale", "adaptive_weighting", "adv_clip_scale")


def post_training_term(o, variant: NFTVariant) -> Term:
    """The S4 term ``objective.name`` chooses (``o``: the objective config), checked."""
    name = str(o.get("name", "nft"))
    if name not in POST_TRAINING:
        raise UserError(f"objective.name: unknown {name!r} (choose from "
                        f"{', '.join(POST_TRAINING)})")
    if name == "nft":
        return NFT(float(o.beta), variant)
    on = [k for k in NFT_ONLY if o.get(k)]
    if on:
        raise UserError(f"objective.{on[0]} is a switch of the NFT loss; objective.name={name} "
                        f"does not read it: set it to false or use objective.name=nft")
    return RWR()
