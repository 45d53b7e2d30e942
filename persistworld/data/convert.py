"""Real robot data into the dataset format the trainers read (docs/FORMATS.md).

    persistworld convert-data ctrl_world SRC OUT      Ctrl-World's preprocessed layout
    persistworld convert-data lerobot_droid SRC OUT   the LeRobot v2.1 release of DROID

Two readers, one writer. Each reader yields episodes as (T, V, h, w, 3) uint8 frames at 5 Hz
and (T, 7) poses (cartesian xyz, roll / pitch / yaw, gripper: Ctrl-World's state vector);
the writer resizes frames bilinearly to ``--height`` x ``--width`` (192 x 320, Ctrl-World's),
writes one ``episodes/ep_XXXXXX.npz`` per episode atomically (so a killed conversion resumes
where it stopped: finished episodes are kept), then ``norm_stats.json`` and, last,
``manifest.json``.

Layouts read (CTRL_WORLD.md):

ctrl_world    ``annotation/{train,val}/<id>.json`` (``states`` at 5 Hz, ``videos[].video_path``,
              ``texts``, ``success``), the mp4 it names per view (5 fps), and ``stat.json``
              (``state_01`` / ``state_99``: used as the normalisation statistics when present).
lerobot_droid ``meta/info.json`` (``codebase_version`` must be v2.1), ``meta/episodes.jsonl``,
              ``data/chunk-XXX/episode_XXXXXX.parquet`` (``observation.state.cartesian_position``,
              ``observation.state.gripper_position`` at 15 fps) and one mp4 per view under
              ``videos/chunk-XXX/observation.images.<view>/``; frames ``[::3]`` (15 -> 5 Hz).

What the format holds for such data. Views in our order ext1, ext2, wrist (DROID's
exterior_1_left, exterior_2_left, wrist_left; Ctrl-World's 0, 1, 2). ``eef_pose`` = the state;
``action[t]`` = the state at t + 1 (the last one repeated), so the per-frame conditioning pose
``Episode.poses`` is the state of that frame, as Ctrl-World conditions. ``eef_quat`` from
roll / pitch / yaw (extrinsic xyz). There are no segmentation masks: the manifest says
``"masks": false`` and readers return an all-255 ("unknown") mask, which masked metrics refuse
(``eval.masked=false``). Splits: Ctrl-World's held-out rule (its ``val`` folder; for LeRobot
``episode_index % 100 == 99``) split in two, alternately, into our ``val`` (choose settings)
and ``test`` (report); everything else is ``train``.

Bad input (a missing view, a video with fewer frames than states, NaN states, an unknown
layout version) stops the conversion with one error naming the file. A video with MORE frames
than states is cut to the first ones, as Ctrl-World's loader does (mp4 decoding of its own
example episodes gives one frame more than ``video_length``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from persistworld.errors import MissingFile, UserError
from persistworld.world_model.interface import VIEWS

LAYOUTS = ("ctrl_world", "lerobot_droid")
DROID_VIEWS = ("exterior_1_left", "exterior_2_left", "wrist_left")   # in VIEWS order
LEROBOT_VERSION = "v2.1"
LEROBOT_STRIDE = 3                                                   # 15 fps -> 5 Hz


class ConversionError(UserError):
    """Input data that cannot be converted; the message names the file."""


@dataclass
class SourceEpisode:
    key: str                     # the source's episode id
    split: str                   # train | val | test
    load: Callable[[], tuple[list, np.ndarray]]   # -> V x (T, h, w, 3) uint8 frames (VIEWS
                                                  #    order), (T, 7) states; decoded lazily
    meta: dict = field(default_factory=dict)      #    so that a resumed run skips its videos
    where: str = ""              # the file to name in errors


# ---- video -------------------------------------------------------------------------------------
def read_video(path: Path, stride: int = 1) -> np.ndarray:
    """(T, h, w, 3) uint8 frames of an mp4, every ``stride``-th from the first."""
    if not path.is_file():
        raise ConversionError(f"video {path} is missing (one mp4 per view is needed)")
    try:
        import imageio.v3 as iio
        frames = iio.imread(path, plugin="pyav") if _has_pyav() else iio.imread(path)
    except Exception as e:  # noqa: BLE001 - name the file
        raise ConversionError(f"video {path} cannot be decoded ({e}); check it with "
                              f"`ffprobe {path}`") from e
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConversionError(f"video {path} decodes to shape {frames.shape}, expected "
                              f"(T, h, w, 3)")
    return frames[::stride]


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


def resize(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """(T, h0, w0, 3) uint8 -> (T, h, w, 3) uint8, bilinear (as Ctrl-World's preprocessing)."""
    if frames.shape[1:3] == (h, w):
        return frames
    import torch
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def held_out_split(position: int) -> str:
    """The n-th held-out episode (in id order) goes to val when n is even, else to test."""
    return "val" if position % 2 == 0 else "test"


def _check_states(states: np.ndarray, where: str) -> np.ndarray:
    states = np.asarray(states, np.float64)
    if states.ndim != 2 or states.shape[1] != 7:
        raise ConversionError(f"{where}: states have shape {states.shape}, expected (T, 7) "
                              f"(cartesian xyz, roll, pitch, yaw, gripper)")
    bad = ~np.isfinite(states)
    if bad.any():
        raise ConversionError(f"{where}: states hold NaN/inf (first at frame "
                              f"{int(np.argwhere(bad)[0][0])}); drop or repair that episode")
    return states


# ---- Ctrl-World's preprocessed layout ---------------------------------------------------------
def read_ctrl_world(src: Path) -> tuple[Iterator[SourceEpisode], int, dict | None]:
    """Episodes of Ctrl-World's layout, their number, and stat.json's statistics (or None)."""
    ann = src / "annotation"
    if not ann.is_dir():
        raise MissingFile(f"{ann} is missing: not Ctrl-World's preprocessed layout (expected "
                          f"annotation/{{train,val}}/<id>.json, videos/..., stat.json)")
    files = {s: sorted((ann / s).glob("*.json")) for s in ("train", "val")}
    if not any(files.values()):
        raise ConversionError(f"{ann} holds no annotation/train/*.json or annotation/val/*.json")
    stats = None
    for cand in (src / "stat.json", src.parent / "stat.json"):
        if cand.is_file():
            raw = json.loads(cand.read_text())
            if not {"state_01", "state_99"} <= set(raw):
                raise ConversionError(f"{cand} lacks state_01 / state_99")
            stats = {"p01": raw["state_01"], "p99": raw["state_99"]}
            break

    def episodes() -> Iterator[SourceEpisode]:
        for split, paths in files.items():
            for n, path in enumerate(paths):
                try:
                    a = json.loads(path.read_text())
                except json.JSONDecodeError as e:
                    raise ConversionError(f"annotation {path} is not valid JSON ({e})") from e
                for key in ("states", "videos"):
                    if key not in a:
                        raise ConversionError(f"annotation {path} lacks {key!r}")
                if len(a["videos"]) != len(VIEWS):
                    raise ConversionError(f"annotation {path} names {len(a['videos'])} videos, "
                                          f"expected {len(VIEWS)} views")
                ours = "train" if split == "train" else held_out_split(n)
                yield SourceEpisode(
                    key=str(a.get("episode_id", path.stem)), split=ours, where=str(path),
                    load=lambda a=a, path=path: (
                        [read_video(src / v["video_path"]) for v in a["videos"]],
                        _check_states(a["states"], str(path))),
                    meta={"texts": a.get("texts", []), "success": a.get("success"),
                          "source_split": split})
    return episodes(), sum(map(len, files.values())), stats


# ---- LeRobot v2.1 DROID -------------------------------------------------------------------------
def read_lerobot_droid(src: Path) -> tuple[Iterator[SourceEpisode], int, None]:
    info_path = src / "meta" / "info.json"
    if not info_path.is_file():
        raise MissingFile(f"{info_path} is missing: not a LeRobot dataset (expected meta/, "
                          f"data/, videos/)")
    info = json.loads(info_path.read_text())
    version = info.get("codebase_version")
    if version != LEROBOT_VERSION:
        raise ConversionError(f"{info_path}: codebase_version {version!r} is not "
                              f"{LEROBOT_VERSION!r}; only the v2.1 layout (one parquet and "
                              f"one mp4 per view per episode) is read")
    fps = info.get("fps", 15)
    if fps != 15:
        raise ConversionError(f"{info_path}: fps {fps}, expected DROID's 15 (-> 5 Hz by "
                              f"taking every 3rd frame)")
    ep_path = src / "meta" / "episodes.jsonl"
    if not ep_path.is_file():
        raise MissingFile(f"{ep_path} is missing")
    eps = [json.loads(line) for line in ep_path.read_text().splitlines() if line.strip()]
    chunk = int(info.get("chunks_size", 1000))
    data_tpl = info.get("data_path",
                        "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet")
    video_tpl = info.get("video_path", "videos/chunk-{episode_chunk:03d}/{video_key}/"
                                       "episode_{episode_index:06d}.mp4")
    held = sorted(e["episode_index"] for e in eps if e["episode_index"] % 100 == 99)
    position = {idx: n for n, idx in enumerate(held)}

    def episodes() -> Iterator[SourceEpisode]:
        for e in sorted(eps, key=lambda e: e["episode_index"]):
            idx = int(e["episode_index"])
            fmt = dict(episode_chunk=idx // chunk, episode_index=idx)
            pq = src / data_tpl.format(**fmt)
            if not pq.is_file():
                raise ConversionError(f"episode {idx}: {pq} is missing")
            split = (held_out_split(position[idx]) if idx in position else "train")
            yield SourceEpisode(key=str(idx), split=split, where=str(pq),
                                load=lambda pq=pq, fmt=fmt: _lerobot_episode(src, pq, fmt,
                                                                             video_tpl),
                                meta={"texts": list(e.get("tasks", [])),
                                      "source_split": "held_out" if idx in position
                                      else "train"})
    return episodes(), len(eps), None


def _lerobot_episode(src: Path, pq: Path, fmt: dict, video_tpl: str
                     ) -> tuple[list, np.ndarray]:
    import pandas as pd
    table = pd.read_parquet(pq)
    cols = ("observation.state.cartesian_position", "observation.state.gripper_position")
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise ConversionError(f"{pq} lacks columns {missing}")
    cart = np.stack(table[cols[0]].to_numpy()).astype(np.float64)
    grip = np.stack(table[cols[1]].to_numpy()).astype(np.float64).reshape(len(table), -1)
    states = _check_states(np.concatenate([cart, grip[:, :1]], 1), str(pq))
    frames = [read_video(src / video_tpl.format(**fmt, video_key=f"observation.images.{v}"),
                         LEROBOT_STRIDE) for v in DROID_VIEWS]
    return frames, states[::LEROBOT_STRIDE]


READERS = {"ctrl_world": read_ctrl_world, "lerobot_droid": read_lerobot_droid}


# ---- the writer ---------------------------------------------------------------------------------
def euler_to_quat(rpy: np.ndarray) -> np.ndarray:
    """(T, 3) roll / pitch / yaw (extrinsic xyz, DROID's convention) -> (T, 4) xyzw."""
    from scipy.spatial.transform import Rotation
    return Rotation.from_euler("xyz", rpy).as_quat().astype(np.float32)


def episode_arrays(ep: SourceEpisode, height: int, width: int) -> dict:
    frames, states = ep.load()
    T = len(states)
    lengths = [len(f) for f in frames]
    if any(n < T for n in lengths):
        raise ConversionError(f"{ep.where}: {T} states but the views have {lengths} frames; "
                              f"each view needs one frame per state")
    # a video may decode to more frames than there are states (Ctrl-World's own example
    # episodes: one more); its loader clamps to the first ones, so do we
    frames = [f[:T] for f in frames]
    if T < 2:
        raise ConversionError(f"{ep.where}: {T} frame(s); an episode needs at least 2")
    rgb = np.stack([resize(f, height, width) for f in frames], 1)           # (T, V, h, w, 3)
    state = states.astype(np.float32)
    action = np.concatenate([state[1:], state[-1:]], 0)
    meta = {"episode_key": ep.key, "fps": 5, **ep.meta}
    return {"rgb": rgb, "eef_pose": state, "action": action,
            "eef_quat": euler_to_quat(states[:, 3:6]),
            "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}


def _write_npz(path: Path, arrays: dict) -> None:
    from persistworld.utils.io import atomic_path
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def convert(layout: str, src: str | Path, out: str | Path, height: int = 192, width: int = 320,
            max_episodes: int | None = None, progress: bool = True) -> Path:
    """Convert ``src`` (``layout``) into a dataset at ``out``; resumable. Returns ``out``."""
    from tqdm import tqdm

    from persistworld.utils.io import atomic_write_json, sha256_file
    if layout not in READERS:
        raise UserError(f"layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise MissingFile(f"{src} is not a folder")
    if (out / "manifest.json").exists():
        raise UserError(f"{out} already holds a complete dataset (manifest.json); choose "
                        f"another folder or delete it")
    episodes, total, stats = READERS[layout](src)
    total = min(total, max_episodes) if max_episodes else total
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    entries = []
    bar = tqdm(total=total, desc=f"convert {layout}", unit="ep", disable=not progress)
    for i, ep in enumerate(episodes):
        if i >= total:
            break
        name = f"episodes/ep_{i:06d}.npz"
        path = out / name
        done = out / f"{name}.json"             # written after the npz: resume marker
        if done.exists() and path.exists() and json.loads(done.read_text()).get(
                "key") == ep.key:
            rec = json.loads(done.read_text())
        else:
            arrays = episode_arrays(ep, height, width)
            _write_npz(path, arrays)
            rec = {"key": ep.key, "num_steps": int(len(arrays["rgb"])),
                   "sha256": sha256_file(path), "split": ep.split,
                   "task": (ep.meta.get("texts") or [""])[0]}
            atomic_write_json(done, rec)
        entries.append({"id": i, "file": name, "split": rec["split"], "task": rec["task"],
                        "num_steps": rec["num_steps"], "sha256": rec["sha256"],
                        "source_key": rec["key"]})
        bar.update(1)
    bar.close()
    if not any(e["split"] == "train" for e in entries):
        raise ConversionError(f"{src}: no training episodes were found")
    write_norm_stats(out, entries, stats)
    atomic_write_json(out / "manifest.json", {
        "format_version": 1, "views": list(VIEWS), "classes": {"unknown": 255},
        "config": {"image_height": height, "image_width": width, "fps": 5, "masks": False,
                   "source": layout, "source_path": str(src)},
        "episodes": entries})
    for e in entries:
        (out / f"{e['file']}.json").unlink(missing_ok=True)
    return out


def write_norm_stats(out: Path, entries: list[dict], stats: dict | None) -> None:
    """norm_stats.json over the train split (``stat.json``'s percentiles when the source has
    them, as Ctrl-World normalises)."""
    from persistworld.utils.io import atomic_write_json
    poses = np.concatenate([np.load(out / e["file"])["eef_pose"] for e in entries
                            if e["split"] == "train"], 0)
    own = {"p01": np.percentile(poses, 1, 0).tolist(), "p99": np.percentile(poses, 99, 0).tolist(),
           "mean": poses.mean(0).tolist(), "std": poses.std(0).tolist()}
    pose_stats = {**own, **(stats or {})}
    atomic_write_json(out / "norm_stats.json", {"action": pose_stats, "eef_pose": pose_stats})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="persistworld convert-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layout", choices=LAYOUTS)
    ap.add_argument("src", help="the source folder")
    ap.add_argument("out", help="the dataset folder to write (data.root)")
    ap.add_argument("--height", type=int, default=192)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--max-episodes", type=int, default=None)
    a = ap.parse_args(argv)
    out = convert(a.layout, a.src, a.out, a.height, a.width, a.max_episodes)
    m = json.loads((out / "manifest.json").read_text())
    counts = {s: sum(e["split"] == s for e in m["episodes"]) for s in ("train", "val", "test")}
    print(f"wrote {out}: {len(m['episodes'])} episodes {counts}; use data.root={out} "
          f"data.image_height={a.height} data.image_width={a.width} eval.masked=false")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
