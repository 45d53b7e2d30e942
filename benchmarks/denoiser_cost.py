"""Cost of one denoiser call and one training step for the embedded world-model variants of
the ablation in models/README.md, including diffusers' UNetSpatioTemporalConditionModel (the
class Ctrl-World uses: every frame its own feature channels) at CPU size.

    .venv/bin/python benchmarks/denoiser_cost.py [--threads 2] [--batch 8]

Prints, per variant: parameters, seconds per training step (forward + backward + AdamW on a
batch of clips, mean of 3 after one warm-up) and milliseconds per denoiser call at batch 1.
"""
from __future__ import annotations

import argparse
import time

import torch

from persistworld.world_model import build_world_model
from persistworld.world_model.interface import HistoryBuffer

# settings on top of conf/world_model/embedded.yaml (64x64 views, H=6, L=5)
SHAPE = dict(history=6, future=5, image_height=64, image_width=64)
VARIANTS = {
    "frames-in-channels UNet (shipped before)": dict(linear_skip=True),
    "+ FrameHead 128": dict(frame_head=128),
    "first level 128 wide": dict(block_out_channels=[128, 128, 192]),
    "patch 2, 4 levels": dict(patch=2, block_out_channels=[32, 64, 96, 128], down_block_types=[
        "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
}


def _time(step, call, params, reps: int = 3) -> tuple[float, float]:
    opt = torch.optim.AdamW(params, lr=1e-4)
    for i in range(reps + 1):
        if i == 1:
            t = time.perf_counter()
        loss = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train = (time.perf_counter() - t) / reps
    with torch.no_grad():
        call()
        t = time.perf_counter()
        for _ in range(reps):
            call()
    return train, (time.perf_counter() - t) / reps


def embedded(over: dict, batch: int):
    from omegaconf import OmegaConf
    base = OmegaConf.to_container(OmegaConf.load(
        "persistworld/conf/world_model/embedded.yaml"))
    m = build_world_model({**base, **SHAPE, **over})
    C, Hs, Ws = m.latent_shape()

    def f(bs: int):
        x = torch.randn(bs, 5, C, Hs, Ws)
        buf = HistoryBuffer(torch.randn(bs, 6, C, Hs, Ws), torch.randn(bs, 6, 7))
        return m.denoise(x, torch.ones(bs), buf, torch.randn(bs, 5, 7)).square().mean()
    return list(m.parameters()), (lambda: f(batch)), (lambda: f(1))


def spatio_temporal(batch: int, frames: int = 5):
    """Each of the 5 future frames its own channels: [noisy frame | newest history frame] in,
    the frame out, temporal layers across frames (SVD's layout at CPU size)."""
    from diffusers import UNetSpatioTemporalConditionModel
    u = UNetSpatioTemporalConditionModel(
        in_channels=96, out_channels=48, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                          "CrossAttnDownBlockSpatioTemporal"),
        up_block_types=("CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                        "UpBlockSpatioTemporal"),
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
        layers_per_block=1, cross_attention_dim=128, num_attention_heads=(1, 2, 4),
        num_frames=frames)

    def f(bs: int):
        x = torch.randn(bs, frames, 96, 48, 16)
        return u(x, torch.ones(bs), torch.randn(bs, 1, 128),
                 torch.zeros(bs, 3)).sample.square().mean()
    return list(u.parameters()), (lambda: f(batch)), (lambda: f(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = [(name, *embedded(over, a.batch)) for name, over in VARIANTS.items()]
    rows.append(("UNetSpatioTemporalConditionModel (32, 64, 128), 5 frames",
                 *spatio_temporal(a.batch)))
    print(f"| variant | parameters | s / training step (batch {a.batch}) | ms / denoiser call "
          f"(batch 1) |\n|---|---|---|---|")
    for name, params, step, call in rows:
        train, fwd = _time(step, call, params)
        n = sum(p.numel() for p in params) / 1e6
        print(f"| {name} | {n:.2f} M | {train:.2f} | {1000 * fwd:.0f} |", flush=True)


if __name__ == "__main__":
    main()
