"""The main job on the embedded default (the README's first command).

Stages run in order and each is resumable, so rerunning the command continues where it
stopped: render data -> preview. Later stages (base model, post-training, evaluation,
results) are added here as they land, without changing the command.
"""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig


def pipeline_main(cfg: DictConfig) -> Path:
    from persistworld.data.preview import write_preview
    from persistworld.data.render import render_dataset

    t0 = time.time()
    results = Path(cfg.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    print(f"[1/2] rendering the mini-DROID dataset into {cfg.data.root}")
    root = render_dataset(cfg.data)
    print("[2/2] writing a preview contact sheet")
    preview = write_preview(root, episode=0, num_frames=8, out=results / "data_preview.png")
    print(f"done in {time.time() - t0:.0f} s. Results: {results.resolve()}\n"
          f"  dataset: {Path(root).resolve()}\n  preview: {preview.resolve()}")
    return results
