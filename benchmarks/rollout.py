"""Wall time of one autoregressive rollout of one held-out episode (issue target: 14 chunks
at the default 50 Euler steps in <= 30 s on 2 CPU cores).

    .venv/bin/python benchmarks/rollout.py [--model models/mini_droid_base.pt]
        [--data data/mini_droid] [--chunks 14] [--steps 50 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from persistworld.data.dataset import RolloutDataset
from persistworld.rollout.autoregressive import rollout
from persistworld.world_model import load_world_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/mini_droid_base.pt")
    ap.add_argument("--data", default="data/mini_droid")
    ap.add_argument("--chunks", type=int, default=14)
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 10])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_world_model(a.model)
    item = RolloutDataset(a.data, "val", a.chunks, model.future, 1, starts_per_episode=1)[0]
    start = model.encode(item["start_frame"][None, None])[:, 0]
    buf = model.start_buffer(start, item["start_action"][None])
    params = sum(p.numel() for p in model.parameters()) / 1e6
    for steps in a.steps:
        t = time.perf_counter()
        rollout(model, buf, item["actions"][None], a.chunks, [0], num_steps=steps)
        dt = time.perf_counter() - t
        print(f"{a.chunks}-chunk rollout, {steps} Euler steps, {a.threads} threads, "
              f"{params:.2f} M parameters: {dt:.1f} s ({1000 * dt / (a.chunks * steps):.0f} ms "
              f"per denoiser call at batch 1)")


if __name__ == "__main__":
    main()
