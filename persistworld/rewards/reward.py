"""The multi-view reward (METHOD.md §4): per candidate clip and view, average each metric
over frames, combine, then average over views (optionally weighting the wrist view):

    R = sum_v w_v * (-w_lpips * LPIPS_v + w_ssim * SSIM_v + w_psnr * PSNR_v) / sum_v w_v

A small factory in the ddpo-pytorch style: heavy models (LPIPS) load once, the callable returns
per-candidate rewards plus an info dict of per-metric, per-view-group means.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from persistworld.world_model.interface import VIEWS
from persistworld.errors import UserError

VIEW_GROUPS = {"external": [VIEWS.index("ext1"), VIEWS.index("ext2")],
               "wrist": [VIEWS.index("wrist")]}


@dataclass(frozen=True)
class RewardWeights:
    w_lpips: float = 1.0
    w_ssim: float = 1.0
    w_psnr: float = 1.0 / 32.0
    wrist_weight: float = 1.0   # Table 8: 2 doubles the wrist view's share

    def __post_init__(self):
        ws = (self.w_lpips, self.w_ssim, self.w_psnr)
        if any(w < 0 for w in ws) or self.wrist_weight < 0:
            raise UserError(f"reward weights must be >= 0, got w_lpips={self.w_lpips}, "
                            f"w_ssim={self.w_ssim}, w_psnr={self.w_psnr}, "
                            f"wrist_weight={self.wrist_weight}")
        if sum(ws) == 0:
            raise UserError("reward: w_lpips, w_ssim and w_psnr are all 0, so every candidate "
                            "would get the same reward; set at least one > 0")

    @property
    def view_weights(self) -> torch.Tensor:
        w = torch.ones(len(VIEWS))
        w[VIEWS.index("wrist")] = self.wrist_weight
        return w


class MultiViewReward:
    def __init__(self, weights: RewardWeights = RewardWeights(), device: str = "cpu"):
        from persistworld.metrics.image import frame_metrics
        from persistworld.metrics.lpips import get_lpips
        self.weights = weights
        self._frame_metrics = frame_metrics
        self._lpips = get_lpips(device) if weights.w_lpips > 0 else None

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """pred, target: (N, T, V, 3, h, w) in [0, 1] -> rewards (N,), info {name: (N,)}."""
        if self._lpips is None:  # LPIPS weight 0: skip the network entirely
            m = self._frame_metrics(pred, target, metrics=("ssim", "psnr"))
            m["lpips"] = torch.full_like(m["ssim"], float("nan"))
        else:
            m = self._frame_metrics(pred, target, lpips_model=self._lpips)
        per_view = {k: v.float().mean(1) for k, v in m.items() if k in ("lpips", "ssim", "psnr")}
        w = self.weights
        lpips = per_view["lpips"].nan_to_num(0.0) if self._lpips is None else per_view["lpips"]
        score = -w.w_lpips * lpips + w.w_ssim * per_view["ssim"] \
            + w.w_psnr * per_view["psnr"]                                     # (N, V)
        vw = w.view_weights.to(score)
        R = (score * vw).sum(1) / vw.sum()
        info = {}
        for name, vals in per_view.items():
            for group, idx in VIEW_GROUPS.items():
                info[f"{name}/{group}"] = vals[:, idx].mean(1)
        return R, info
