"""Side-by-side rollout videos: ground truth | model(s), all three views, as animated GIFs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from persistworld.utils.io import atomic_path
from persistworld.world_model.interface import VIEWS


def to_uint8(frames) -> np.ndarray:
    """(T, V, 3, h, w) float in [0, 1] (tensor or array) -> (T, V, h, w, 3) uint8
    (uint8 input passes through)."""
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
        return frames
    arr = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    return (arr.clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 1, 3, 4, 2)


def side_by_side(rows: dict[str, object], scale: int | None = None,
                 fps_hint: int = 5) -> list[np.ndarray]:
    """rows: label -> (T, V, 3, h, w) frames. Returns T images: one row per label, one column
    per view, with the labels and the frame index drawn on; ``scale`` defaults to 2 for small
    frames (the 64 x 64 renders), 1 from 128 pixels up (DROID's 192 x 320)."""
    arrays = {k: to_uint8(v) for k, v in rows.items()}
    T, V, h, w, _ = next(iter(arrays.values())).shape
    scale = scale or (2 if h < 128 else 1)
    label_w, top, pad = 64, 14, 2
    W = label_w + V * (w * scale + pad)
    H = top + len(arrays) * (h * scale + pad)
    images = []
    for t in range(T):
        canvas = Image.new("RGB", (W, H), "white")
        draw = ImageDraw.Draw(canvas)
        for v in range(V):
            draw.text((label_w + v * (w * scale + pad) + 2, 1), VIEWS[v], fill="black")
        draw.text((2, 1), f"{t / fps_hint:.1f}s", fill="black")
        for r, (label, arr) in enumerate(arrays.items()):
            y = top + r * (h * scale + pad)
            draw.text((2, y + h * scale // 2 - 5), label, fill="black")
            for v in range(V):
                tile = Image.fromarray(arr[t, v]).resize((w * scale, h * scale), Image.NEAREST)
                canvas.paste(tile, (label_w + v * (w * scale + pad), y))
        images.append(np.asarray(canvas))
    return images


def write_gif(path: str | Path, images: list[np.ndarray], fps: int = 5) -> Path:
    path = Path(path)
    frames = [Image.fromarray(im) for im in images]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                       duration=int(1000 / fps), loop=0)
    return path


def frames_picture(rows: dict[str, object], frames: list[int], scale: int | None = None,
                   fps_hint: int = 5) -> np.ndarray:
    """One still image: the ``side_by_side`` panels of the given frame indices, left to right
    (e.g. first, middle and last frame of a rollout: truth | models x views at 0 s, 7 s, 14 s).
    rows: label -> (T, V, 3, h, w) frames; returns (H, W, 3) uint8."""
    panels = side_by_side(rows, scale, fps_hint)
    picked = [panels[t] for t in frames]
    gap = np.full((picked[0].shape[0], 8, 3), 255, np.uint8)
    out = [picked[0]]
    for p in picked[1:]:
        out += [gap, p]
    return np.concatenate(out, 1)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
