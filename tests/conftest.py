"""Shared fixtures: a tiny rendered mini-DROID dataset (real pybullet renders, small sizes)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_DATA = dict(root=None, seed=0, num_episodes=4, val_fraction=0.25, test_episodes=1,
                 min_steps=24, max_steps=28, fps=5, physics_hz=240, image_height=64,
                 image_width=64, tasks=["pick_place", "push"], camera_jitter=0.01, workers=1,
                 history=6, future=5, stride=1)


def tiny_data_cfg(root: Path, **overrides):
    from omegaconf import OmegaConf
    return OmegaConf.create({**TINY_DATA, "root": str(root), **overrides})


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """4 train / val episodes and 1 test episode of 24-28 steps at 64x64, rendered once per
    test session."""
    from persistworld.data.render import render_dataset
    root = tmp_path_factory.mktemp("mini_droid")
    return Path(render_dataset(tiny_data_cfg(root)))
