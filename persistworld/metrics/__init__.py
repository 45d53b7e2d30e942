"""Image metrics used as rewards and for evaluation: genuine LPIPS (v0.1, AlexNet), SSIM, PSNR.

All functions take float images in [0, 1], channels first; everything is per image.
See :mod:`persistworld.metrics.image` for the exact SSIM variant, the PSNR cap and the masked
definitions, and :mod:`persistworld.metrics.lpips` for the LPIPS weights.
"""
from persistworld.metrics.image import (
    METRIC_NAMES,
    PSNR_MAX_DB,
    frame_metrics,
    masked_metrics,
    psnr,
    ssim,
    ssim_map,
)
from persistworld.metrics.lpips import LPIPS, MIN_SIZE, find_lpips_weights, get_lpips

__all__ = [
    "LPIPS",
    "METRIC_NAMES",
    "MIN_SIZE",
    "PSNR_MAX_DB",
    "find_lpips_weights",
    "frame_metrics",
    "get_lpips",
    "masked_metrics",
    "psnr",
    "ssim",
    "ssim_map",
]
