"""Helpers shared by tests/test_sweeps.py and tests/test_sweeps_slurm.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# a post-training run of a few seconds on the tiny base model and dataset
TINY_POST = ["experiment=mini", "rollout.prefix.high=2", "rollout.group_size=4",
             "rollout.best_of_n=1", "rollout.sampler_steps=3", "trainer.steps=4",
             "trainer.batch_size=2", "trainer.ckpt_every=2", "trainer.num_threads=1",
             "trainer.progress=false", "lora.rank=4", "lora.alpha=4", "eval.num_chunks=2",
             "eval.max_samples=2", "eval.num_steps=3", "eval.num_videos=0"]


def make_tiny_base(data: Path, run_dir: Path) -> Path:
    from hydra import compose, initialize_config_module
    from test_train_base import TINY_OVERRIDES

    from persistworld.trainers.base import train_base
    if not (run_dir / "model.pt").exists():
        with initialize_config_module("persistworld.conf", version_base="1.3"):
            cfg = compose("train_base", overrides=[f"data.root={data}", f"run_dir={run_dir}",
                                                   *TINY_OVERRIDES])
        train_base(cfg)
    return run_dir


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "persistworld.cli", "sweep", *args]


def run_sweep(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(sweep_cmd(*args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {"state": "missing"}


def model_weights(run_dir: Path) -> dict:
    import torch
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
