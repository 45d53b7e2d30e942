"""Does a world model use its future actions? One chunk from the same starts and the same
noise with the true future actions, with another sample's (shuffled) and with the start pose
held (frozen), next to "repeat the last frame".

    .venv/bin/python benchmarks/action_sensitivity.py MODEL [MODEL ...] [--split val]
        [--samples 16] [--threads 2]

An action-conditioned model must score best with the true actions; equal rows mean the
actions are ignored and motion cannot be predicted. Also prints the denoiser's response at
sigma 10: ||D(true) - D(shuffled)|| / ||D(true) - last frame|| (0: the actions change nothing),
and first checks the data: the correlation of pose change with frame change at lags -2..2.
"""
from __future__ import annotations

import argparse

import torch


def alignment(data: str, future: int, clips: int = 60) -> None:
    """Are poses and frames aligned in the data? Correlation over time of the frame-to-frame
    pixel change with the pose change (xyz + rotation), at lags -2..2, over train clips."""
    import random
    from persistworld.data.dataset import RolloutDataset
    ds = RolloutDataset(data, "train", 2, future, 1, None)
    corr: dict[int, list[float]] = {lag: [] for lag in (-2, -1, 0, 1, 2)}
    for i in random.Random(0).sample(range(len(ds)), min(clips, len(ds))):
        it = ds[i]
        df = (it["frames"][1:] - it["frames"][:-1]).abs().mean((1, 2, 3, 4))
        da = (it["actions"][1:] - it["actions"][:-1])[:, :6].abs().sum(1)
        for lag in corr:
            x, y = (da[lag:], df[:len(df) - lag]) if lag >= 0 else (da[:lag], df[-lag:])
            r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
            if r == r:                                      # a clip without motion: NaN
                corr[lag].append(r)
    print("data: corr(|pose change|, |frame change|) at lag " + ", ".join(
        f"{lag:+d}: {sum(v) / len(v):.2f}" for lag, v in corr.items() if v)
        + f" ({clips} train clips; aligned data peak at lag 0)")


def main() -> None:
    from persistworld.data.dataset import RolloutDataset
    from persistworld.rollout.autoregressive import chunk_noise
    from persistworld.utils.seeding import derive_seed
    from persistworld.world_model import load_world_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="data/mini_droid")
    ap.add_argument("--split", default="val")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    future = load_world_model(a.models[0]).future
    b = RolloutDataset(a.data, a.split, 1, future, 1, 1, a.samples).batch()
    truth = b["frames"]                                                   # (B, L, V, 3, h, w)
    n = len(truth)
    alignment(a.data, future)
    perm = torch.roll(torch.arange(n), 1)                                 # another sample's

    def psnr(pred: torch.Tensor) -> str:
        p = 10 * torch.log10(1 / (pred - truth).pow(2).mean((3, 4, 5)))   # (B, L, V)
        return f"{p[..., :2].mean():6.2f} | {p[..., 2].mean():6.2f}"

    rep = b["start_frame"][:, None].expand_as(truth)
    print(f"{a.split}, {n} starts, {a.steps} sampler steps; PSNR external | wrist")
    print(f"  {'repeat the last frame':24s} {psnr(rep)}")
    for path in a.models:
        model = load_world_model(path)
        L = model.future
        if L != future:
            raise SystemExit(f"{path} predicts {L} frames, {a.models[0]} {future}: compare "
                             f"models of one chunk layout")
        start = model.encode(b["start_frame"][:, None])[:, 0]
        buf = model.start_buffer(start, b["start_action"])
        acts = b["actions"][:, :L]
        variants = {"true actions": acts, "shuffled actions": acts[perm],
                    "frozen (start pose)": b["start_action"][:, None].repeat(1, L, 1)}
        noise = chunk_noise(model, [derive_seed(7, i) for i in range(n)], 0)
        print(path)
        with torch.no_grad():
            for name, act in variants.items():
                x = model.sample_chunk(buf, act, noise=noise, num_steps=a.steps)
                print(f"  {name:24s} {psnr(model.decode(x).clamp(0, 1))}")
            sigma = torch.full((n,), 10.0)
            x_s = buf.latents[:, -1:] + sigma.view(-1, 1, 1, 1, 1) * noise
            d_true = model.denoise(x_s, sigma, buf, acts)
            d_shuf = model.denoise(x_s, sigma, buf, acts[perm])
            ratio = (d_true - d_shuf).norm() / (d_true - buf.latents[:, -1:]).norm()
            print(f"  denoiser at sigma 10: ||D(true) - D(shuffled)|| / ||D(true) - last|| "
                  f"= {ratio:.3f}")


if __name__ == "__main__":
    main()
