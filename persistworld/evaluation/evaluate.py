"""Rollout evaluation (METHOD.md §5): from one observed state of held-out episodes, back-fill
the history with that frame, roll out N chunks, score every frame of every view.

Modes:
    autoregressive   the model's own outputs feed the history (what users deploy)
    teacher_forced   ground-truth frames feed the history after every chunk; the gap to the
                     autoregressive curve is the compounding (exposure-bias) error
Predictors: a world model, or a trivial baseline (``TRIVIAL``), which a model that models
dynamics must beat:
    nothing_moves   every predicted frame is the start frame (the one observed state)
    repeat_last     every chunk repeats the last ground-truth frame before it (in
                    autoregressive mode it knows only the start frame: then it is nothing_moves)
Every written evaluation scores the trivial baselines on the same samples next to the model
(``baselines/<name>/``; autoregressive: nothing_moves only, as repeat_last is the same there),
so every report shows them as standing rows.

Writes ``eval/<name>/summary.json``, ``frames.parquet``, ``videos/*.gif`` and
``baselines/{nothing_moves,repeat_last}/{summary.json,frames.parquet}`` (docs/FORMATS.md).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from persistworld.data.dataset import REPORT_SPLIT, SPLITS, RolloutDataset
from persistworld.errors import UserError
from persistworld.evaluation.videos import side_by_side, to_uint8, write_gif
from persistworld.rollout.autoregressive import rollout
from persistworld.utils.io import atomic_path, atomic_write_json
from persistworld.utils.seeding import derive_seed
from persistworld.world_model.interface import VIEWS, WorldModel

MODES = ("autoregressive", "teacher_forced")
METRICS = ("ssim", "psnr", "lpips")
MASK_CLASSES = {"robot": 1, "object": 2}
GROUP_OF_VIEW = {"ext1": "external", "ext2": "external", "wrist": "wrist"}


@dataclass
class EvalSettings:
    split: str = REPORT_SPLIT     # tables and claims: test; in-training checks: val
    num_chunks: int = 14          # chunks of L frames per rollout (paper: 14 = 70 frames)
    mode: str = "autoregressive"
    max_samples: int | None = None
    starts_per_episode: int = 1
    batch_size: int = 8           # rollouts generated together
    num_steps: int | None = None  # sampler steps (None: the model's default)
    seed: int = 0
    num_videos: int = 4           # side-by-side GIFs written
    masked: bool = True           # object-only / robot-only metrics

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"eval.mode: unknown {self.mode!r} (choose from {', '.join(MODES)})")
        if self.split not in SPLITS:
            raise UserError(f"eval.split: unknown {self.split!r} (choose from "
                            f"{', '.join(SPLITS)})")
        for key in ("num_chunks", "batch_size", "starts_per_episode"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_steps", "max_samples"):
            v = getattr(self, key)
            if v is not None and int(v) < 1:
                raise UserError(f"eval.{key} must be >= 1 (null: "
                                f"{'the model default' if key == 'num_steps' else 'all'}), "
                                f"got {v}")
        if int(self.num_videos) < 0:
            raise UserError(f"eval.num_videos must be >= 0, got {self.num_videos}")


Predictor = Callable[[dict, EvalSettings], torch.Tensor]


def model_predictor(model: WorldModel) -> Predictor:
    """Predicted frames (B, N*L, V, 3, h, w) of a world model for a batch of samples."""
    def predict(batch: dict, s: EvalSettings) -> torch.Tensor:
        device = next(model.parameters()).device
        start = model.encode(batch["start_frame"].unsqueeze(1).to(device))[:, 0]  # (B, C, Hs, Ws)
        buffer = model.start_buffer(start, batch["start_action"].to(device), batch.get("text"))
        teacher = model.encode(batch["frames"].to(device)) if s.mode == "teacher_forced" else None
        seeds = [derive_seed(s.seed, int(e), int(t0)) for e, t0 in
                 zip(batch["episode"], batch["start"])]
        latents, _ = rollout(model, buffer, batch["actions"].to(device), s.num_chunks, seeds,
                             num_steps=s.num_steps, teacher_latents=teacher)
        return model.decode(latents).clamp(0, 1).cpu()
    return predict


def nothing_moves_predictor(future: int) -> Predictor:
    """Every predicted frame is the start frame (B, T, V, 3, h, w)."""
    def predict(batch: dict, s: EvalSettings) -> torch.Tensor:
        frames, start = batch["frames"], batch["start_frame"]           # (B, T, V, 3, h, w)
        return start.unsqueeze(1).expand(*frames.shape[:2], *start.shape[1:]).clone()
    return predict


def repeat_last_predictor(future: int) -> Predictor:
    """Each chunk repeats the last frame the predictor may know: the last ground-truth frame
    before the chunk when teacher-forced, the start frame when autoregressive."""
    def predict(batch: dict, s: EvalSettings) -> torch.Tensor:
        if s.mode == "autoregressive":
            return nothing_moves_predictor(future)(batch, s)
        frames, start = batch["frames"], batch["start_frame"]           # (B, T, V, 3, h, w)
        T = frames.shape[1]
        last = torch.cat([start.unsqueeze(1), frames[:, future - 1:-1:future]], 1)  # per chunk
        return last.repeat_interleave(future, 1)[:, :T].clone()
    return predict


# the trivial baselines, by the name `persistworld evaluate model=NAME` and reports use
TRIVIAL = {"nothing_moves": nothing_moves_predictor, "repeat_last": repeat_last_predictor}


def _score(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, masked: bool,
           lpips_model) -> dict[str, np.ndarray]:
    """Every metric per (B, T, V)."""
    from persistworld.metrics.image import frame_metrics
    class_masks = {name: masks == cls for name, cls in MASK_CLASSES.items()} if masked else None
    m = frame_metrics(pred, target, lpips_model=lpips_model, masks=class_masks)
    out = {k: m[k].cpu().numpy() for k in METRICS}
    for name in class_masks or {}:
        for k in METRICS:
            out[f"{k}_{name}"] = m[f"{name}_{k}"].cpu().numpy()
    return out


def summarise(frames: pd.DataFrame, mode: str, num_chunks: int) -> dict:
    """Whole-rollout means per camera group (Table 1) and masked (Table 2)."""
    def group_means(suffix: str) -> dict:
        res = {}
        for group, df in frames.groupby("group"):
            # mean over frames within each sample first, then over samples
            per_sample = df.groupby("sample")[[f"{k}{suffix}" for k in METRICS]].mean()
            res[group] = {k: float(per_sample[f"{k}{suffix}"].mean()) for k in METRICS}
        return res
    metrics = group_means("")
    if "ssim_object" in frames:
        for cls_name in MASK_CLASSES:
            metrics[cls_name] = group_means(f"_{cls_name}")
    return {"mode": mode, "num_chunks": num_chunks, "num_samples": int(frames["sample"].nunique()),
            "metrics": metrics}


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """``summary["metrics"]`` as flat ``{prefix}external/lpips``-style keys (metrics.jsonl)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = float(v)
    return out


def _frame_rows(batch: dict, scores: dict[str, np.ndarray], future: int) -> list[dict]:
    """Long rows (sample, frame, view) of one batch's scores (B, T, V)."""
    rows = []
    B, T, V = next(iter(scores.values())).shape
    for b in range(B):
        base = {"sample": int(batch["sample"][b]), "episode": int(batch["episode"][b]),
                "start": int(batch["start"][b])}
        for t in range(T):
            for v in range(V):
                row = dict(base, frame=t, chunk=t // future, view=VIEWS[v],
                           group=GROUP_OF_VIEW[VIEWS[v]])
                row.update({k: float(a[b, t, v]) for k, a in scores.items()})
                rows.append(row)
    return rows


# settings that do not change an evaluation's numbers (how many GIFs it writes)
NEUTRAL_SETTINGS = ("num_videos",)


def evaluation_identity(settings: EvalSettings, data_root: str | Path) -> dict:
    """What an evaluation's numbers depend on besides the model: its settings and the
    episodes of its split (their sha256 in the manifest)."""
    from persistworld.utils.fingerprint import dataset_sha256
    return {"settings": {k: v for k, v in dataclasses.asdict(settings).items()
                         if k not in NEUTRAL_SETTINGS},
            "data": {"split": settings.split,
                     "sha256": dataset_sha256(data_root, (settings.split,))}}


def is_current(out_dir: str | Path, settings: EvalSettings, data_root: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished evaluation with these settings on this data (a
    relaunch re-evaluates instead of reporting a stale one)."""
    path = Path(out_dir) / "summary.json"
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    want = evaluation_identity(settings, data_root)
    have = {k: v for k, v in (old.get("settings") or {}).items() if k not in NEUTRAL_SETTINGS}
    return have == want["settings"] and old.get("data") == want["data"]


def _write_scores(out_dir: Path, rows: list[dict], settings: EvalSettings, seconds: float,
                  identity: dict, extra: dict | None = None) -> dict:
    frames = pd.DataFrame(rows)
    summary = summarise(frames, settings.mode, settings.num_chunks)
    summary["seconds"] = round(seconds, 2)
    summary["split"] = settings.split
    summary["episodes"] = int(frames["episode"].nunique()) if len(frames) else 0
    summary.update(identity)
    summary.update(extra or {})
    with atomic_path(out_dir / "frames.parquet") as tmp:
        frames.to_parquet(tmp, index=False)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def evaluate(predictor: Predictor, data_root: str | Path, out_dir: str | Path | None,
             settings: EvalSettings, future: int = 5, stride: int = 1,
             lpips_device: str = "cpu", label: str = "model", progress: bool = True,
             baselines: bool = True) -> dict:
    """Roll out, score, and (unless ``out_dir`` is None: in-training checks) write
    ``frames.parquet``, ``videos/``, the trivial baselines on the same samples
    (``baselines/<name>/``, unless ``baselines`` is False) and, last, ``summary.json`` (its
    presence marks a finished evaluation)."""
    from persistworld.metrics.lpips import get_lpips
    out_dir = None if out_dir is None else Path(out_dir)
    if out_dir is None:
        settings = EvalSettings(**{**settings.__dict__, "num_videos": 0})
    ds = RolloutDataset(data_root, settings.split, settings.num_chunks, future, stride,
                        settings.starts_per_episode, settings.max_samples)
    if settings.masked and not ds.store.has_masks:
        raise UserError(f"eval.masked=true but the dataset {data_root} has no segmentation "
                        f"masks (converted real data): set eval.masked=false")
    loader = torch.utils.data.DataLoader(ds, batch_size=settings.batch_size, shuffle=False)
    lpips_model = get_lpips(lpips_device)
    # autoregressive: repeat_last knows only the start frame, i.e. it IS nothing_moves
    trivial = {name: make(future) for name, make in TRIVIAL.items()
               if not (name == "repeat_last" and settings.mode == "autoregressive")} \
        if baselines and out_dir is not None else {}
    trivial_rows: dict[str, list[dict]] = {name: [] for name in trivial}
    rows, videos_left, t0 = [], settings.num_videos, time.time()
    for batch in tqdm(loader, desc=f"eval {settings.mode} x{settings.num_chunks} chunks",
                      unit="batch", disable=not progress):
        pred = predictor(batch, settings)
        target = batch["frames"]
        scores = _score(pred, target, batch["masks"], settings.masked, lpips_model)
        rows.extend(_frame_rows(batch, scores, future))
        for name, base_predict in trivial.items():
            trivial_rows[name].extend(_frame_rows(batch, _score(
                base_predict(batch, settings), target, batch["masks"], settings.masked,
                lpips_model), future))
        for b in range(pred.shape[0]):
            base = {"episode": int(batch["episode"][b]), "start": int(batch["start"][b])}
            if videos_left > 0:
                name = f"ep{base['episode']:05d}_t{base['start']:03d}.gif"
                write_gif(out_dir / "videos" / name,
                          side_by_side({"truth": target[b], label: pred[b]}))
                # the frames too, so that several models can be shown side by side later
                with atomic_path(out_dir / "videos" / name.replace(".gif", ".npz")) as tmp, \
                        open(tmp, "wb") as f:    # a file object: numpy would add ".npz"
                    np.savez_compressed(f, truth=to_uint8(target[b]), pred=to_uint8(pred[b]))
                videos_left -= 1
    if out_dir is None:
        summary = summarise(pd.DataFrame(rows), settings.mode, settings.num_chunks)
        summary["seconds"] = round(time.time() - t0, 2)
        return summary
    seconds = time.time() - t0
    identity = evaluation_identity(settings, data_root)
    base_metrics = {name: _write_scores(out_dir / "baselines" / name, r, settings, 0.0,
                                        identity, {"baseline": name})["metrics"]
                    for name, r in trivial_rows.items()}
    extra = {"baselines": base_metrics} if base_metrics else {}
    return _write_scores(out_dir, rows, settings, seconds, identity, extra)  # summary.json last
