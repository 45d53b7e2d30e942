"""A tiny Hydra app for the `hydra/launcher=submitit_slurm` multirun test.

Each job writes result.json into its Hydra output dir and returns its value.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path=".", config_name="hydra_app")
def main(cfg: DictConfig) -> int:
    value = int(cfg.x) ** 2 + int(cfg.offset)
    out = {
        "x": int(cfg.x),
        "value": value,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
    }
    Path(HydraConfig.get().runtime.output_dir, "result.json").write_text(json.dumps(out))
    return value


if __name__ == "__main__":
    main()
