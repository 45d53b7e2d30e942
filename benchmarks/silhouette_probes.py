"""What the embedded model's silhouette decoder and composite anchor are worth without the
denoiser (models/README.md, "Silhouettes and the composite anchor").

    .venv/bin/python benchmarks/silhouette_probes.py [--model models/mini_droid_base.pt]
        [--data data/mini_droid] [--split val] [--clips 64] [--threads 2] [--out FILE]

On ``--clips`` one-chunk clips of the split (every n-th clip, deterministic), with no network
call at all:

1. the decoder's IoU per view: cells more than half covered by the robot in the rendered mask
   vs the decoded silhouette of the same pose;
2. one-chunk PSNR (dB, mean over the L future frames; external = ext1 and ext2, and wrist)
   against the ground truth of
   - repeat the last frame (the trivial baseline),
   - the composite anchor with the decoder's silhouettes (what ``x0_anchor: composite``
     starts from),
   - the same rule with the TRUE silhouettes (the rendered masks): the rule's own ceiling.

A decoder good enough for the rule puts row 2 close to row 3; both must beat row 1, or the
anchor is a worse start than the last frame.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per view group: x, y (N, L, V, 3, h, w) -> (ext, wrist) mean PSNR over frames."""
    mse = (x.clamp(0, 1) - y).pow(2).mean((3, 4, 5)).clamp_min(1e-10)   # (N, L, V)
    db = -10 * mse.log10()
    return torch.stack([db[..., :2].mean(), db[..., 2].mean()])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/mini_droid_base.pt")
    ap.add_argument("--data", default="data/mini_droid")
    ap.add_argument("--split", default="val")
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from persistworld.data.dataset import ClipDataset
    from persistworld.errors import UserError
    from persistworld.world_model import load_world_model
    model = load_world_model(a.model)
    sil = getattr(model, "silhouettes", None)
    if sil is None:
        raise UserError(f"{a.model} has no silhouette decoder (world_model.silhouettes=false)")
    ds = ClipDataset(a.data, a.split, model.history, model.future)
    step = max(1, len(ds) // a.clips)
    items = [ds[i] for i in range(0, len(ds), step)][:a.clips]
    batch = {k: torch.stack([it[k] for it in items]) for k in
             ("hist_frames", "future_frames", "hist_actions", "future_actions",
              "hist_masks", "future_masks")}
    last = batch["hist_frames"][:, -1]                                     # (N, V, 3, h, w)
    poses = torch.cat([batch["hist_actions"][:, -1:], batch["future_actions"]], 1)
    masks = torch.cat([batch["hist_masks"][:, -1:], batch["future_masks"]], 1)
    truth = batch["future_frames"]
    with torch.no_grad():
        iou = sil.iou(batch["future_actions"], batch["future_masks"])
        rows = {
            "repeat the last frame": last.unsqueeze(1).expand_as(truth),
            "composite, decoded silhouettes": sil.composite(last, poses),
            "composite, true silhouettes": sil.composite(last, poses,
                                                         sil.target(masks) - 0.5),
        }
        scores = {name: _psnr(x, truth).tolist() for name, x in rows.items()}
    views = ("ext1", "ext2", "wrist")
    out = {"model": a.model, "split": a.split, "clips": len(items),
           "iou": dict(zip(views, [round(float(v), 3) for v in iou])),
           "psnr_db": {k: {"external": round(v[0], 2), "wrist": round(v[1], 2)}
                       for k, v in scores.items()}}
    print(f"{len(items)} one-chunk clips of {a.split}, model {a.model}")
    print("decoder IoU  " + "  ".join(f"{v} {out['iou'][v]:.3f}" for v in views))
    print(f"{'one-chunk PSNR (dB)':34s} external  wrist")
    for k, v in out["psnr_db"].items():
        print(f"{k:34s} {v['external']:8.2f} {v['wrist']:6.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
