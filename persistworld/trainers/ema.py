"""The reference ("old") policy and the policy EMA (METHOD.md §2).

Both are exponential moving averages of the trained parameters,
    p_ema <- d * p_ema + (1 - d) * p,
differing in the decay schedule d(step) and in what they are used for: the old policy gives
x0_old in the NFT loss; the policy EMA (off by default, as the paper) is what evaluation and
the exported model use.

What is averaged are the trained tensors themselves: the LoRA factors A and B of each adapted
layer (and the action encoder). An EMA of A and of B is NOT an EMA of the merged update
Delta W = s B A: the product of averages, EMA(B) EMA(A), differs from the average of products,
EMA(B A), by the covariance of the factors' trajectories (small while they move slowly, as with
d <= 0.5 over a few steps). This is what DiffusionNFT does (its old and EMA policies are
adapters too). The merged form would keep a dense d_out x d_in matrix per adapted layer for
every averaged role -- for Ctrl-World's UNet about the size of every attention projection,
i.e. the backbone copy that one-backbone post-training (trainers/adapters.py) exists to avoid
-- so it is not offered.

Old-policy schedules (config ``old_policy.schedule``):
    none | frozen   d = 1: the old policy stays the base post-training start point
    copy            d = 0: the old policy is the current policy at every step
    paper           d = min(max, max * step / ramp)  (max 0.5, ramp 500: rises to 0.5 by 500)
    linear          d = min(a * step, max)           (DiffusionNFT: a=0.001, max=0.5)
    affine          d = min(max, start + a * step)   (WorldCompass: start 0.2, a=0.01, max 0.9)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from persistworld.errors import UserError

SCHEDULES = ("none", "frozen", "copy", "paper", "linear", "affine")


@dataclass(frozen=True)
class EMASchedule:
    schedule: str = "paper"
    max: float = 0.5
    ramp: int = 500        # steps (paper schedule)
    a: float = 0.001       # per step (linear / affine)
    start: float = 0.2     # affine

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"old_policy.schedule: unknown {self.schedule!r} "
                            f"(choose from {', '.join(SCHEDULES)})")
        if not 0.0 <= self.max <= 1.0:
            raise UserError(f"old_policy.max must be in [0, 1], got {self.max}")

    def decay(self, step: float) -> float:
        s = self.schedule
        if s in ("none", "frozen"):
            return 1.0
        if s == "copy":
            return 0.0
        if s == "paper":
            return min(self.max, self.max * step / max(self.ramp, 1))
        if s == "linear":
            return min(self.a * step, self.max)
        return min(self.max, self.start + self.a * step)


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor],
               decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, in place."""
    for t, s in zip(target, source, strict=True):
        if decay == 0.0:
            t.copy_(s)
        elif decay != 1.0:
            t.lerp_(s.to(t.dtype), 1.0 - decay)
