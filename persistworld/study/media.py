"""Browser-playable videos of rollouts: WebM / VP9 through imageio-ffmpeg's bundled ffmpeg.

VP9 in WebM is what Debian's Chromium plays without proprietary codecs (ENVIRONMENT.md). Every
frame is a key frame (``-g 1``), so setting ``currentTime`` lands exactly on a frame: the
study page drives all videos of a trial from one clock and one scrubber, and a seek must never
show a neighbour frame. The frames are enlarged by an integer factor with nearest-neighbour
before encoding (4:2:0 chroma at 64 x 64 would blur the colours of small objects).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from persistworld.errors import UserError
from persistworld.utils.io import atomic_path


def write_webm(path: str | Path, frames: np.ndarray, fps: int = 5, scale: int = 2,
               crf: int = 18) -> Path:
    """(T, h, w, 3) uint8 -> ``path`` (WebM, VP9, yuv420p, all key frames), written atomically."""
    try:
        import imageio_ffmpeg
    except ImportError as e:  # pragma: no cover - the study extra is installed by install.sh
        raise UserError("the study needs imageio-ffmpeg: pip install 'persistworld[study]'") from e
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"write_webm: need (T, h, w, 3) uint8 frames, got {frames.dtype} "
                        f"{frames.shape}")
    if scale > 1:
        frames = frames.repeat(scale, 1).repeat(scale, 2)
    T, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise UserError(f"write_webm: frame size {h}x{w} must be even")
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libvpx-vp9", pix_fmt_out="yuv420p",
            macro_block_size=1, quality=None, ffmpeg_log_level="error",
            output_params=["-f", "webm", "-crf", str(crf), "-b:v", "0", "-g", "1",
                           "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1"])
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return path
