"""How many self-generated chunks P precede the branch point (METHOD.md §3, S1).

strategies (config ``rollout.prefix``):
    uniform     P ~ Unif{low..high}                  (paper: 0..9)
    fixed       P = low                              (Table 5: fixed 3, fixed 6)
    curriculum  P ~ Unif{low..m(step)}, m grows linearly from low to high over ramp_steps
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from persistworld.errors import UserError

STRATEGIES = ("uniform", "fixed", "curriculum")


@dataclass(frozen=True)
class PrefixSampler:
    strategy: str = "uniform"
    low: int = 0          # chunks
    high: int = 9         # chunks (inclusive)
    ramp_steps: int = 1000  # curriculum: training steps until `high` is reachable

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"rollout.prefix.strategy: unknown {self.strategy!r} "
                            f"(choose from {', '.join(STRATEGIES)})")
        if self.low < 0 or (self.strategy != "fixed" and self.high < self.low):
            raise UserError(f"rollout.prefix: need 0 <= low <= high, got low={self.low}, "
                            f"high={self.high}")
        if self.strategy == "curriculum" and self.ramp_steps < 1:
            raise UserError("rollout.prefix.ramp_steps must be >= 1")

    @property
    def max_chunks(self) -> int:
        """The longest prefix this sampler can produce (for length validation)."""
        return self.low if self.strategy == "fixed" else self.high

    def upper(self, step: float) -> int:
        if self.strategy == "fixed":
            return self.low
        if self.strategy == "uniform":
            return self.high
        frac = min(1.0, step / self.ramp_steps)
        return self.low + int(round(frac * (self.high - self.low)))

    def sample(self, step: float, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) prefix lengths in chunks at schedule position ``step`` (the optimiser step, or
        samples seen / ``trainer.schedule_batch``: ``Progress.position``)."""
        hi = self.upper(step)
        return torch.randint(self.low, hi + 1, (n,), generator=generator)
