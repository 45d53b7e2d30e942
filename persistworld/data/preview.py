"""Contact sheet of one episode: rows = views x (RGB, mask), columns = time."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from persistworld.data.dataset import EpisodeStore
from persistworld.utils.io import atomic_path
from persistworld.world_model.interface import VIEWS
from persistworld.errors import UserError

# background / robot / manipulated object, as in docs/FORMATS.md
MASK_COLOURS = np.array([[30, 30, 30], [70, 140, 255], [255, 170, 40]], np.uint8)


def contact_sheet(rgb: np.ndarray, mask: np.ndarray | None, frames: np.ndarray,
                  labels: list[str], scale: int | None = None, pad: int = 2,
                  label_w: int = 56) -> Image.Image:
    """rgb (T, V, h, w, 3) uint8, mask (T, V, h, w) or None (data without segmentation) ->
    one PIL image; ``scale`` defaults to 2 for small renders, 1 from 128 pixels up."""
    _, V, h, w, _ = rgb.shape
    scale = scale or (2 if h < 128 else 1)
    kinds = [("rgb", rgb)] + ([("mask", MASK_COLOURS[mask])] if mask is not None else [])
    cell_h, cell_w = h * scale + pad, w * scale + pad
    top = 14
    sheet = Image.new("RGB", (label_w + len(frames) * cell_w, top + len(kinds) * V * cell_h),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for j, t in enumerate(frames):
        draw.text((label_w + j * cell_w + 2, 1), f"t={t}", fill="black")
    for v in range(V):
        for k, (kind, images) in enumerate(kinds):
            row = len(kinds) * v + k
            draw.text((2, top + row * cell_h + cell_h // 2 - 6), f"{labels[v]}\n{kind}",
                      fill="black")
            for j, t in enumerate(frames):
                tile = Image.fromarray(images[t, v]).resize((w * scale, h * scale),
                                                            Image.NEAREST)
                sheet.paste(tile, (label_w + j * cell_w, top + row * cell_h))
    return sheet


def write_preview(root: str | Path, episode: int = 0, num_frames: int = 8,
                  out: str | Path | None = None) -> Path:
    store = EpisodeStore(root)
    ids = store.episode_ids()
    if episode not in ids:
        raise UserError(f"episode={episode} is not in {root} (it has ids {ids[0]}..{ids[-1]})")
    ep = store.load(episode)
    frames = np.linspace(0, ep.num_steps - 1, num_frames).round().astype(int)
    sheet = contact_sheet(ep.rgb, ep.mask if store.has_masks else None, frames, list(VIEWS))
    out = Path(out) if out is not None else Path(root) / "preview.png"
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def preview_main(cfg) -> Path:
    """`persistworld preview [episode=3] [num_frames=10] [out=PATH]`"""
    out = write_preview(cfg.data.root, int(cfg.episode), int(cfg.num_frames), cfg.out)
    print(f"preview written to {out}")
    return out
