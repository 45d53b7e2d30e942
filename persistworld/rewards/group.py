"""Group-relative reward weights and best-of-N selection (METHOD.md §3, S3).

Within each group of K candidates branched from the same prefix:
    A = (R - mean_K R) / (std_K R + eps),   r = (clip(A, -c, c) / c + 1) / 2  in [0, 1]
with c = 1 in the paper. Shifting or scaling all rewards of a group leaves r unchanged.

``norm="batch"`` divides by one std for the whole batch instead, that of the rewards minus their
group means (as Dr. GRPO argues against per-group std): a group whose candidates barely differ
then gets weights near 1/2 instead of the full 0 / 1 that per-group std gives any gap.

``shuffle_within_groups`` is the control of the whole signal: each group's rewards handed to its
candidates in a random order, so the update, its weights and best-of-N are what they would be,
except for which candidate they favour.
"""
from __future__ import annotations

import torch


ADV_NORMS = ("group", "batch")


def group_advantages(R: torch.Tensor, clip: float = 1.0, eps: float = 1e-6,
                     norm: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """R: (B, K) rewards -> (A, r), both (B, K). Population std over the K candidates of each
    group (``norm="group"``) or over all B*K rewards minus their group means (``"batch"``)."""
    if R.dim() != 2 or R.shape[1] < 2:
        raise ValueError(f"rewards must be (B, K) with K >= 2, got {tuple(R.shape)}")
    if norm not in ADV_NORMS:
        raise ValueError(f"norm must be one of {ADV_NORMS}, got {norm!r}")
    centred = R - R.mean(1, keepdim=True)
    std = (R.std(1, unbiased=False, keepdim=True) if norm == "group"
           else centred.pow(2).mean().sqrt())
    A = centred / (std + eps)
    r = (A.clamp(-clip, clip) / clip + 1.0) / 2.0
    return A, r


def shuffle_within_groups(R: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """R: (B, K) -> (B, K), each row permuted by its own random permutation (drawn from
    ``generator``, row by row)."""
    order = torch.stack([torch.randperm(R.shape[1], generator=generator) for _ in range(len(R))])
    return R.gather(1, order.to(R.device))


def best_of_n(R: torch.Tensor, n: int | None) -> torch.Tensor:
    """Indices (B, 2n) of the top-n and bottom-n candidates of each group (best first, then
    worst first); ``n=None`` or ``2n >= K`` keeps all K in reward order."""
    B, K = R.shape
    order = torch.argsort(R, dim=1, descending=True, stable=True)
    if n is None or 2 * n >= K:
        return order
    return torch.cat([order[:, :n], order[:, K - n:].flip(1)], 1)
