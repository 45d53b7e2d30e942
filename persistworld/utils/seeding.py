"""Deterministic seed derivation: any sample is rebuilt from a tuple of integers."""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. (run seed, episode, start, prefix, candidate)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def seeded_normal(shape: tuple[int, ...], seeds: list[int] | torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise (len(seeds), *shape), row b drawn from its own seed only, so a
    candidate's noise does not depend on which other candidates share its batch."""
    rows = []
    for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds):
        g = torch.Generator().manual_seed(int(s))
        rows.append(torch.randn(shape, generator=g, dtype=dtype))
    return torch.stack(rows)
