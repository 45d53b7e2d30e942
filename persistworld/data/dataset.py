"""Reading the mini-DROID dataset (docs/FORMATS.md): episodes, training clips, rollout starts.

Alignment convention. Every frame k gets one 7-D conditioning pose
    pose[k] = action[k-1]  (the target commanded right before frame k was recorded), k >= 1
    pose[0] = eef_pose[0]  (the measured pose: no command precedes the first frame)
A clip with last history frame t and stride s (in recorded steps) holds
    history frames  t-(H-1)s, ..., t-s, t   and their poses   (frames before 0 repeat frame 0)
    future frames   t+s, ..., t+Ls          and their poses
History and future use the same representation, so a rollout appends the poses of the frames
it generated to its history buffer exactly as it appends the frames. All poses are normalised
with the ``action`` statistics of norm_stats.json.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from persistworld.world_model.interface import VIEWS
from persistworld.errors import UserError

REQUIRED_KEYS = ("rgb", "mask", "eef_pose", "action", "eef_quat", "meta")
UNKNOWN_CLASS = 255        # the mask of data without segmentation (manifest "masks": false)
RENDER_HINT = "create it with `persistworld render data.root={root}`"
# episode splits: models train on `train`; every choice of a setting (learning-rate sweeps,
# Optuna objectives and pruning, in-training checks) is made on `val`; tables, paired tests
# and claims are reported on `test`, which nothing was chosen on
SPLITS = ("train", "val", "test")
SELECTION_SPLIT = "val"
REPORT_SPLIT = "test"
# (path, size, mtime_ns) of the episode files whose sha256 this process has checked
_VERIFIED: set[tuple[str, int, int]] = set()


class DatasetError(UserError):
    """A dataset file is missing or unreadable; the message names the file and the fix."""


@dataclass
class Episode:
    id: int
    rgb: np.ndarray        # (T, V, h, w, 3) uint8
    mask: np.ndarray       # (T, V, h, w) uint8, 0 background / 1 robot / 2 object
    eef_pose: np.ndarray   # (T, 7) float32
    action: np.ndarray     # (T, 7) float32
    meta: dict

    @property
    def num_steps(self) -> int:
        return self.rgb.shape[0]

    @property
    def poses(self) -> np.ndarray:
        """(T, 7) per-frame conditioning pose (module docstring)."""
        return np.concatenate([self.eef_pose[:1], self.action[:-1]], 0)


def _node(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


class EpisodeStore:
    """The manifest, the normalisation statistics and checked episode loading."""

    def __init__(self, root: str | Path, verify_checksums: bool = True):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.exists():
            partial = (self.root / "episodes").exists()
            what = "is incomplete (rendering was interrupted)" if partial else "does not exist"
            raise DatasetError(f"dataset {self.root} {what}: no {manifest_path.name}; "
                               + RENDER_HINT.format(root=self.root)
                               + (" (it resumes where it stopped)" if partial else ""))
        try:
            self.manifest = json.loads(manifest_path.read_text())
            self.norm_stats = json.loads((self.root / "norm_stats.json").read_text())
        except (json.JSONDecodeError, FileNotFoundError) as e:
            raise DatasetError(f"{self.root}: manifest.json or norm_stats.json is unreadable "
                               f"({e}); delete {self.root} and rerun `persistworld render`") from e
        if self.manifest.get("format_version") != 1:
            raise DatasetError(f"{manifest_path}: unsupported format_version "
                               f"{self.manifest.get('format_version')!r} (expected 1)")
        self._by_id = {e["id"]: e for e in self.manifest["episodes"]}
        self.verify_checksums = verify_checksums

    @property
    def has_masks(self) -> bool:
        """False for converted real data (``persistworld convert-data``): no segmentation."""
        return bool((self.manifest.get("config") or {}).get("masks", True))

    def episode_ids(self, split: str | None = None) -> list[int]:
        if split not in (None, *SPLITS):
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        ids = sorted(e["id"] for e in self.manifest["episodes"]
                     if split is None or e["split"] == split)
        if split is not None and not ids:
            raise DatasetError(f"dataset {self.root} has no {split!r} episodes (its manifest "
                               f"was written before the {split} split existed?); rerun "
                               f"`persistworld render data.root={self.root}` (it keeps every "
                               f"rendered episode and adds what is missing)")
        return ids

    def entry(self, episode_id: int) -> dict:
        return self._by_id[episode_id]

    def load(self, episode_id: int) -> Episode:
        entry = self._by_id[episode_id]
        path = self.root / entry["file"]
        fix = (f"delete it and rerun `persistworld render data.root={self.root}` "
               f"(only missing episodes are rendered again)")
        if not path.exists():
            raise DatasetError(f"episode file {path} is missing; {fix}")
        if self.verify_checksums and entry.get("sha256"):
            self._verify(path, entry["sha256"], fix)
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = [k for k in REQUIRED_KEYS if k != "mask" or self.has_masks]
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise DatasetError(f"episode file {path} lacks arrays {missing}; {fix}")
                arrays = {k: z[k] for k in keys}
            if not self.has_masks:          # converted real data: every pixel "unknown"
                arrays["mask"] = np.broadcast_to(np.uint8(UNKNOWN_CLASS),
                                                 arrays["rgb"].shape[:4])
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise DatasetError(f"episode file {path} is corrupt or truncated ({e}); {fix}") from e
        self._check_arrays(path, arrays, entry, fix)
        return Episode(id=episode_id, rgb=arrays["rgb"], mask=arrays["mask"],
                       eef_pose=arrays["eef_pose"], action=arrays["action"],
                       meta=json.loads(bytes(arrays["meta"]).decode("utf-8")))

    @staticmethod
    def _verify(path: Path, sha256: str, fix: str) -> None:
        """The file's sha256 against the manifest's, once per file (and version) per process."""
        from persistworld.utils.io import sha256_file
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            return
        if sha256_file(path) != sha256:
            raise DatasetError(f"episode file {path} does not match its checksum in "
                               f"manifest.json (corrupt or modified); {fix}")
        _VERIFIED.add(key)

    def _check_arrays(self, path: Path, a: dict, entry: dict, fix: str) -> None:
        """Shapes the readers rely on and finite poses, with the file named."""
        cfg = self.manifest.get("config") or {}
        V = len(self.manifest.get("views") or VIEWS)
        h, w = cfg.get("image_height"), cfg.get("image_width")
        rgb = a["rgb"]
        if rgb.ndim != 5 or rgb.shape[1] != V or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise DatasetError(f"episode file {path}: rgb has shape {rgb.shape} {rgb.dtype}, "
                               f"expected (T, {V}, h, w, 3) uint8; {fix}")
        if h is not None and w is not None and tuple(rgb.shape[2:4]) != (int(h), int(w)):
            raise DatasetError(f"episode file {path} holds {rgb.shape[2]}x{rgb.shape[3]} "
                               f"images but the dataset is {h}x{w} (manifest.json config); "
                               f"{fix}")
        T = rgb.shape[0]
        if a["mask"].shape != rgb.shape[:4]:
            raise DatasetError(f"episode file {path}: mask has shape {a['mask'].shape}, "
                               f"expected {rgb.shape[:4]}; {fix}")
        for k in ("eef_pose", "action"):
            if a[k].shape != (T, 7):
                raise DatasetError(f"episode file {path}: {k} has shape {a[k].shape}, "
                                   f"expected ({T}, 7); {fix}")
            bad = ~np.isfinite(a[k])
            if bad.any():
                step = int(np.argwhere(bad)[0][0])
                raise DatasetError(f"episode file {path}: {k} holds NaN/inf (first at step "
                                   f"{step}); {fix}")
        if entry.get("num_steps") is not None and int(entry["num_steps"]) != T:
            raise DatasetError(f"episode file {path} has {T} steps but manifest.json says "
                               f"{entry['num_steps']}; {fix}")

    # -- action normalisation (DROID / Ctrl-World: 1st/99th percentile -> [-1, 1]) -------
    def pose_map_geometry(self) -> dict:
        """The settings the embedded world model's ``pose_maps`` need for this dataset: each
        view's camera matrix (projection @ view of the external cameras without the
        per-episode jitter; [] for the wrist camera), the rig of the wrist camera (it moves
        with the hand) and the position / rotation the normalised poses -1 / +1 stand for
        (``normalize``)."""
        from persistworld.data.sim.scene import external_camera_matrices, wrist_camera_rig
        rc = self.manifest["config"]
        h, w = int(rc["image_height"]), int(rc["image_width"])
        cams = external_camera_matrices(h, w)
        stats = self.norm_stats["action"]
        return {"pose_map_cameras": [cams[v].reshape(-1).tolist() if v in cams else []
                                     for v in VIEWS],
                "pose_map_range": [[float(x) for x in stats["p01"][:6]],
                                   [float(x) for x in stats["p99"][:6]]],
                "pose_map_wrist": {"view": VIEWS.index("wrist"), **wrist_camera_rig(h, w)}}

    def normalize(self, x: np.ndarray, key: str = "action") -> np.ndarray:
        lo = np.asarray(self.norm_stats[key]["p01"], np.float32)
        hi = np.asarray(self.norm_stats[key]["p99"], np.float32)
        span = np.where(hi - lo > 1e-6, hi - lo, 1.0)
        return np.clip(2.0 * (x - lo) / span - 1.0, -1.0, 1.0).astype(np.float32)


def episode_text(ep: Episode) -> str:
    """The episode's first task instruction (converted real data: ``meta["texts"]``), or ""."""
    texts = ep.meta.get("texts") or []
    return str(texts[0]) if texts else ""


def _to_float_frames(rgb: np.ndarray) -> torch.Tensor:
    """(T, V, h, w, 3) uint8 -> (T, V, 3, h, w) float32 in [0, 1]."""
    return torch.from_numpy(rgb).permute(0, 1, 4, 2, 3).float().div_(255.0)


class _EpisodeCache:
    """Keeps recently used episodes in memory (a few MB each at 64x64)."""

    def __init__(self, store: EpisodeStore, size: int = 64):
        self.store = store
        self._get = lru_cache(maxsize=size)(store.load)

    def __call__(self, episode_id: int) -> Episode:
        return self._get(episode_id)


class ClipDataset(torch.utils.data.Dataset):
    """Teacher-forcing training clips: H history frames + L future frames + their actions."""

    def __init__(self, root: str | Path, split: str = "train", history: int = 6, future: int = 5,
                 stride: int = 1):
        if history < 1 or future < 1 or stride < 1:
            raise UserError(f"data.history, data.future and data.stride must be >= 1, got "
                            f"{history}, {future}, {stride}")
        self.store = EpisodeStore(root)
        self.split, self.history, self.future, self.stride = split, history, future, stride
        self._episodes = _EpisodeCache(self.store)
        # A clip is indexed by (episode, t) with t the last history frame; history frames
        # before the episode start are back-filled with frame 0 (as a rollout start is).
        self.index: list[tuple[int, int]] = []
        for eid in self.store.episode_ids(split):
            T = self.store.entry(eid)["num_steps"]
            last_t = T - 1 - future * stride
            self.index.extend((eid, t) for t in range(0, last_t + 1))
        if not self.index:
            raise UserError(f"no '{split}' clips of {future} future frames at stride {stride} "
                            f"in {root}: episodes are too short or the split is empty")

    @classmethod
    def from_config(cls, data_cfg: Any, split: str = "train") -> "ClipDataset":
        return cls(_node(data_cfg, "root"), split, int(_node(data_cfg, "history", 6)),
                   int(_node(data_cfg, "future", 5)), int(_node(data_cfg, "stride", 1)))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        eid, t = self.index[i]
        ep = self._episodes(eid)
        s, H, L = self.stride, self.history, self.future
        hist_idx = np.clip(t - s * np.arange(H - 1, -1, -1), 0, None)
        fut_idx = t + s * np.arange(1, L + 1)
        poses = self.store.normalize(ep.poses)
        return {
            "hist_frames": _to_float_frames(ep.rgb[hist_idx]),
            "future_frames": _to_float_frames(ep.rgb[fut_idx]),
            "hist_actions": torch.from_numpy(poses[hist_idx]),
            "future_actions": torch.from_numpy(poses[fut_idx]),
            "hist_masks": torch.from_numpy(ep.mask[hist_idx]),
            "future_masks": torch.from_numpy(ep.mask[fut_idx]),
            "episode": eid,
            "t": int(t),
        }


class RolloutDataset(torch.utils.data.Dataset):
    """Evaluation samples: ONE observed start state + the full ground-truth continuation of
    ``num_chunks`` chunks of L frames (METHOD.md §5), with the commands along the way."""

    def __init__(self, root: str | Path, split: str = "val", num_chunks: int = 14,
                 future: int = 5, stride: int = 1, starts_per_episode: int | None = 1,
                 max_samples: int | None = None):
        """``starts_per_episode``: evenly spaced start frames per episode (1 = the first
        frame); None = every valid start (what post-training samples from)."""
        self.store = EpisodeStore(root)
        self.num_chunks, self.future, self.stride = num_chunks, future, stride
        self._episodes = _EpisodeCache(self.store, size=8)
        span = num_chunks * future * stride
        self.index: list[tuple[int, int]] = []
        too_short = []
        for eid in self.store.episode_ids(split):
            T = self.store.entry(eid)["num_steps"]
            room = T - 1 - span
            if room < 0:
                too_short.append((eid, T))
                continue
            starts = (np.arange(room + 1) if starts_per_episode is None else
                      np.linspace(0, room, starts_per_episode).round().astype(int))
            self.index.extend((eid, int(t0)) for t0 in sorted(set(starts.tolist())))
        if max_samples is not None:
            self.index = self.index[:max_samples]
        if not self.index:
            raise UserError(f"no '{split}' episode in {root} is long enough for {num_chunks} "
                            f"chunks x {future} frames at stride {stride} ({span + 1} frames "
                            f"needed; lengths seen: {[T for _, T in too_short][:5]}); lower "
                            f"eval.num_chunks or render longer episodes (data.min_steps)")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        eid, t0 = self.index[i]
        ep = self._episodes(eid)
        n = self.num_chunks * self.future
        fut_idx = t0 + self.stride * np.arange(1, n + 1)
        poses = self.store.normalize(ep.poses)
        return {
            "start_frame": _to_float_frames(ep.rgb[t0:t0 + 1])[0],   # (V, 3, h, w)
            "start_action": torch.from_numpy(poses[t0]),              # (7,)
            "frames": _to_float_frames(ep.rgb[fut_idx]),              # (N*L, V, 3, h, w)
            "masks": torch.from_numpy(ep.mask[fut_idx]),              # (N*L, V, h, w)
            "actions": torch.from_numpy(poses[fut_idx]),              # (N*L, 7)
            "text": episode_text(ep),                                 # the task instruction
            "episode": eid,
            "start": int(t0),
            "sample": i,
        }

    def batch(self) -> dict:
        """Every sample of the dataset collated into one batch (small benchmark sets)."""
        return torch.utils.data.default_collate([self[i] for i in range(len(self))])

    @staticmethod
    def views() -> tuple[str, ...]:
        return VIEWS
