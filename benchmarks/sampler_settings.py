"""One-chunk quality of a world model under sampler settings (steps, Euler / Heun, sigma range,
start at noise or at the last frame),
on the first N rollout starts of a split, next to "repeat the last frame". Choose sampler
settings on the train split (``--split train``: episode starts the model was trained on, not
the held-out ones the bars are reported on).

    .venv/bin/python benchmarks/sampler_settings.py models/mini_droid_base.pt [MORE MODELS]
        [--data data/mini_droid] [--split train] [--samples 16] [--threads 2]
        [--variant steps=10,sigma_max=10,sigma_min=2,start=anchor ...]

``--variant`` (repeatable) replaces the built-in list: comma-separated ``key=value`` of steps,
sampler (euler | heun), sigma_min, sigma_max and start (noise | anchor).

Every setting uses the same per-sample noise (the evaluation's seeds), so rows differ only in
the sampler. Prints PSNR / SSIM per camera group (pixels in [0, 1]).
"""
from __future__ import annotations

import argparse

import torch

VARIANTS = [dict(steps=10, sigma_max=80.0), dict(steps=20, sigma_max=80.0),
            dict(steps=50, sigma_max=80.0), dict(steps=10, sampler="heun", sigma_max=80.0),
            dict(steps=10, sigma_min=0.05, sigma_max=80.0), dict(steps=10, sigma_max=20.0),
            dict(steps=10, sigma_max=10.0), dict(steps=20, sigma_max=10.0),
            dict(steps=10, sigma_max=5.0), dict(steps=10, sigma_max=10.0, sigma_min=0.1),
            dict(steps=10, sigma_max=10.0, sigma_min=0.5),
            dict(steps=10, sigma_max=10.0, sigma_min=1.0),
            dict(steps=10, sigma_max=10.0, sigma_min=2.0),
            dict(steps=5, sigma_max=10.0, sigma_min=1.0),
            # the ODE started at the last frame + sigma_max eps instead of sigma_max eps
            dict(steps=10, sigma_max=10.0, sigma_min=1.0, start="anchor"),
            dict(steps=10, sigma_max=3.0, sigma_min=1.0, start="anchor"),
            dict(steps=6, sigma_max=2.0, sigma_min=1.0, start="anchor"),
            dict(steps=10, sigma_max=3.0, sigma_min=0.5, start="anchor")]


def parse_variant(text: str) -> dict:
    """"steps=10,sigma_max=3,start=anchor" -> {"steps": 10, "sigma_max": 3.0, ...}."""
    kinds = {"steps": int, "sigma_min": float, "sigma_max": float, "sampler": str, "start": str}
    out = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        if key not in kinds or not val:
            raise SystemExit(f"--variant {text!r}: {part!r} is not key=value with key one of "
                             f"{', '.join(kinds)}")
        out[key] = kinds[key](val)
    if "steps" not in out:
        raise SystemExit(f"--variant {text!r}: steps=N is required")
    return out


def main() -> None:
    from persistworld.data.dataset import RolloutDataset
    from persistworld.metrics.image import ssim
    from persistworld.rollout.autoregressive import chunk_noise
    from persistworld.utils.seeding import derive_seed
    from persistworld.world_model import load_world_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="data/mini_droid")
    ap.add_argument("--split", default="train")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", action="append", type=parse_variant, default=None,
                    help="a sampler setting to measure (repeatable; default: the built-in list)")
    a = ap.parse_args()
    variants = a.variant or VARIANTS
    torch.set_num_threads(a.threads)
    b = RolloutDataset(a.data, a.split, 1, 5, 1, 1, a.samples).batch()
    truth = b["frames"]                                                   # (B, L, V, 3, h, w)

    def score(pred: torch.Tensor) -> str:
        B, T, V = truth.shape[:3]
        psnr = 10 * torch.log10(1 / (pred - truth).pow(2).mean((3, 4, 5)))    # (B, T, V)
        s = ssim(pred.flatten(0, 2), truth.flatten(0, 2)).reshape(B, T, V)
        return (f"{psnr[..., :2].mean():.2f} | {s[..., :2].mean():.3f} | "
                f"{psnr[..., 2].mean():.2f} | {s[..., 2].mean():.3f}")

    print("| model | sampler | ext PSNR | ext SSIM | wrist PSNR | wrist SSIM |\n"
          "|---|---|---|---|---|---|")
    print(f"| repeat last frame | - | {score(b['start_frame'].unsqueeze(1).expand_as(truth))} |")
    for path in a.models:
        m = load_world_model(path)
        default = (m.cfg.sampler, m.cfg.sigma_min, m.cfg.sigma_max)
        start = m.encode(b["start_frame"].unsqueeze(1))[:, 0]
        buf = m.start_buffer(start, b["start_action"])
        seeds = [derive_seed(0, int(e), int(t)) for e, t in zip(b["episode"], b["start"])]
        noise = chunk_noise(m, seeds, 0)
        for v in variants:
            m.cfg.sampler = v.get("sampler", default[0])
            m.cfg.sigma_min = v.get("sigma_min", default[1])
            m.cfg.sigma_max = v.get("sigma_max", default[2])
            m.cfg.sampler_start = v.get("start", "noise")
            with torch.no_grad():
                x = m.sample_chunk(buf, b["actions"][:, :5], noise=noise, num_steps=v["steps"])
            desc = ", ".join(f"{k}={val}" for k, val in v.items())
            print(f"| {path} | {desc} | {score(m.decode(x).clamp(0, 1))} |", flush=True)


if __name__ == "__main__":
    main()
