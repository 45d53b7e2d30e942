"""Rollout modes on any backend: replay, keyboard, policy in the loop (Ctrl-World's three).

    persistworld interact replay   --model M --data D [--episode 0] [--chunks 12]
    persistworld interact keyboard --model M --data D            (a terminal program)
    persistworld interact policy   --model M --data D --policy my_module:act

Every mode starts from one recorded frame of an episode (``--start``), asks a *controller* for
the next chunk's L poses, generates the chunk with the world model (its own outputs feed its
history, as in deployment) and records it. The controller contract, shared with policy
evaluation:

    controller(views, pose, chunk, horizon) -> (horizon, 7) poses or None (stop)
        views    (V, h, w, 3) uint8, the newest generated frame of every view (VIEWS order)
        pose     (7,) the current pose, in the dataset's units (not normalised)
        chunk    the number of chunks generated so far
        horizon  L, the frames of one chunk

replay    the episode's recorded poses, chunk by chunk (Ctrl-World's replay script); the video
          shows ground truth | model
keyboard  keys move the end effector by ``--step`` metres over a chunk (w/s x, a/d y, r/f z),
          g toggles the gripper, space holds still, q quits (Ctrl-World's keyboard script)
policy    ``--policy module:function``: any callable of the contract above (a trained policy,
          or a script)

Outputs in ``--out``: ``rollout.gif`` (side by side, all views), ``latest.png`` (the newest
frames, rewritten after every chunk: watch it while driving), ``poses.json`` (what was
commanded). All files are written atomically after every chunk, so an interrupted session
leaves a consistent record of the chunks generated so far.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from persistworld.errors import UserError

Controller = Callable[[np.ndarray, np.ndarray, int, int], "np.ndarray | None"]
KEYS = {"w": (0, +1), "s": (0, -1), "a": (1, +1), "d": (1, -1), "r": (2, +1), "f": (2, -1)}
GRIPPER = 6


class BatchSession:
    """World-model rollouts of B recorded start frames at once, driven chunk by chunk:
    ``step(poses)`` with (B, L, 7) poses generates every rollout's next chunk in one batch (what
    policy evaluation uses; ``Session`` is the one-rollout view of it)."""

    def __init__(self, model, data_root: str | Path, episodes: list[int], start: int = 0,
                 seeds: list[int] | None = None, num_steps: int | None = None):
        from persistworld.data.dataset import EpisodeStore, _to_float_frames, episode_text
        self.model, self.num_steps = model, num_steps
        self.seeds = list(seeds) if seeds is not None else [0] * len(episodes)
        self.store = EpisodeStore(data_root)
        known = set(self.store.episode_ids())
        for e in episodes:
            if e not in known:
                raise UserError(f"--episode {e} is not in {data_root}")
        self.episodes = [self.store.load(e) for e in episodes]
        for ep in self.episodes:
            if not 0 <= start < ep.num_steps:
                raise UserError(f"--start {start}: episode {ep.id} has {ep.num_steps} frames")
        self.start = start
        first = torch.stack([_to_float_frames(ep.rgb[start:start + 1])[0]
                             for ep in self.episodes])                     # (B, V, 3, h, w)
        self.pose = np.stack([ep.poses[start] for ep in self.episodes]).astype(np.float64)
        with torch.no_grad():
            latent = model.encode(first[:, None])[:, 0]
        self.texts = [episode_text(ep) for ep in self.episodes]
        self.buffer = model.start_buffer(latent, self._norm(self.pose), self.texts)
        self.frames = [first]                      # per frame: (B, V, 3, h, w) in [0, 1]
        self.chunks = 0

    def _norm(self, poses: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.store.normalize(poses.astype(np.float32)))

    def step(self, poses: np.ndarray) -> torch.Tensor:
        """Generate the chunk for ``poses`` (B, L, 7) (dataset units); returns its frames
        (B, L, V, 3, h, w) in [0, 1]."""
        from persistworld.rollout.autoregressive import chunk_noise
        poses = np.asarray(poses, np.float64)
        B, L = len(self.episodes), self.model.future
        if poses.shape != (B, L, 7):
            raise UserError(f"the controller returned poses of shape {poses.shape[1:]}; the "
                            f"model needs ({L}, 7) per chunk")
        if not np.isfinite(poses).all():
            raise UserError("the controller returned NaN/inf poses")
        acts = self._norm(poses)
        noise = chunk_noise(self.model, self.seeds, self.chunks)
        with torch.no_grad():
            x = self.model.sample_chunk(self.buffer, acts, noise=noise,
                                        num_steps=self.num_steps)
            frames = self.model.decode(x).clamp(0, 1)
        self.buffer = self.buffer.push(x, acts)
        self.frames.extend(frames.unbind(1))
        self.pose = poses[:, -1]
        self.chunks += 1
        return frames

    def latest_views(self) -> np.ndarray:
        """(B, V, h, w, 3) uint8: the newest generated frame of every rollout."""
        from persistworld.evaluation.videos import to_uint8
        return to_uint8(self.frames[-1])

    def video(self, b: int) -> np.ndarray:
        """(T, V, h, w, 3) uint8: every frame of rollout ``b`` so far."""
        from persistworld.evaluation.videos import to_uint8
        return to_uint8(torch.stack([f[b] for f in self.frames]))


class Session:
    """One world-model rollout driven chunk by chunk from recorded start frame ``start`` of
    ``episode``. ``step(poses)`` generates the next chunk; ``frames`` holds everything so far."""

    def __init__(self, model, data_root: str | Path, episode: int, start: int = 0,
                 seed: int = 0, num_steps: int | None = None):
        self.batch = BatchSession(model, data_root, [episode], start, [seed], num_steps)
        self.model, self.seed, self.num_steps = model, seed, num_steps
        self.store, self.episode, self.start = self.batch.store, self.batch.episodes[0], start
        self.text = self.batch.texts[0]
        self.pose = self.batch.pose[0]
        self.frames = [self.batch.frames[0][0]]
        self.poses: list[list[float]] = [self.pose.tolist()]
        self.chunks = 0

    def step(self, poses: np.ndarray) -> torch.Tensor:
        """Generate the chunk for ``poses`` (L, 7) (dataset units); returns its frames
        (L, V, 3, h, w) in [0, 1]."""
        poses = np.asarray(poses, np.float64)
        frames = self.batch.step(poses[None])[0]
        self.frames.extend(frames)
        self.poses.extend(poses.tolist())
        self.pose = poses[-1]
        self.chunks += 1
        return frames

    def latest_views(self) -> np.ndarray:
        from persistworld.evaluation.videos import to_uint8
        return to_uint8(self.frames[-1][None])[0]

    def truth(self) -> torch.Tensor | None:
        """The recorded frames over the generated span (replay), or None past the episode."""
        from persistworld.data.dataset import _to_float_frames
        end = self.start + len(self.frames)
        if end > self.episode.num_steps:
            return None
        return _to_float_frames(self.episode.rgb[self.start:end])

    def write(self, out: Path, with_truth: bool = False) -> Path:
        """rollout.gif, latest.png and poses.json in ``out`` (atomically)."""
        from PIL import Image

        from persistworld.evaluation.videos import side_by_side, write_gif
        from persistworld.utils.io import atomic_path, atomic_write_json
        out.mkdir(parents=True, exist_ok=True)
        gen = torch.stack(self.frames)
        rows = {"model": gen}
        truth = self.truth() if with_truth else None
        if truth is not None:
            rows = {"truth": truth, "model": gen}
        images = side_by_side(rows)
        write_gif(out / "rollout.gif", images)
        with atomic_path(out / "latest.png") as tmp:
            Image.fromarray(images[-1]).save(tmp, format="PNG")
        atomic_write_json(out / "poses.json", {"episode": self.episode.id, "start": self.start,
                                               "chunks": self.chunks, "poses": self.poses})
        return out / "rollout.gif"


# ---- controllers ----------------------------------------------------------------------------
def replay_controller(session: Session) -> Controller:
    """The episode's recorded poses after the start frame, chunk by chunk; stops at its end."""
    recorded = session.episode.poses
    L = session.model.future

    def act(views, pose, chunk, horizon):
        a = session.start + 1 + chunk * L
        return recorded[a:a + L] if a + L <= len(recorded) else None
    return act


def key_poses(pose: np.ndarray, key: str, L: int, step: float) -> np.ndarray:
    """The L poses of one keyboard command: a straight move of ``step`` along the key's axis
    (linear over the chunk), gripper toggled by g, held still by space."""
    target = np.array(pose, np.float64)
    if key in KEYS:
        axis, sign = KEYS[key]
        target[axis] += sign * step
    elif key == "g":
        target[GRIPPER] = 1.0 - target[GRIPPER] if 0 <= target[GRIPPER] <= 1 else 0.0
    elif key != " ":
        raise ValueError(key)
    frac = np.arange(1, L + 1)[:, None] / L
    return pose[None] + frac * (target - pose)[None]


def load_policy(spec: str) -> Controller:
    """``module:function`` -> the callable (a clear error when it does not import)."""
    mod, sep, name = spec.partition(":")
    if not sep:
        raise UserError(f"--policy {spec!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--policy {spec!r} cannot be loaded ({e})") from e
    if not callable(fn):
        raise UserError(f"--policy {spec!r} is not callable")
    return fn


def hold_still(views: np.ndarray, pose: np.ndarray, chunk: int, horizon: int) -> np.ndarray:
    """An example policy: keep the current pose (a template for your own)."""
    return np.repeat(np.asarray(pose)[None], horizon, 0)


def run(session: Session, controller: Controller, num_chunks: int, out: Path,
        with_truth: bool = False, progress: bool = True) -> Path:
    """Drive ``session`` with ``controller`` for up to ``num_chunks`` chunks."""
    from tqdm import tqdm
    for chunk in tqdm(range(num_chunks), desc="chunks", disable=not progress):
        poses = controller(session.latest_views(), session.pose.copy(), chunk,
                           session.model.future)
        if poses is None:
            break
        session.step(poses)
        session.write(out, with_truth)
    return session.write(out, with_truth)


def keyboard(session: Session, out: Path, step: float, max_chunks: int) -> Path:
    """The terminal program: one key = one chunk; the screen shows the pose and the files."""
    import curses

    def loop(scr):
        curses.curs_set(0)
        L = session.model.future
        message = "ready"
        while True:
            p = session.pose
            scr.erase()
            scr.addstr(0, 0, "persistworld interact keyboard")
            scr.addstr(1, 0, f"chunk {session.chunks}  pose x={p[0]:+.3f} y={p[1]:+.3f} "
                             f"z={p[2]:+.3f} gripper={p[GRIPPER]:.2f}")
            scr.addstr(2, 0, f"frames: {out / 'latest.png'}  video: {out / 'rollout.gif'}")
            scr.addstr(3, 0, "keys: w/s x  a/d y  r/f z  g gripper  space hold  q quit")
            scr.addstr(4, 0, message)
            scr.refresh()
            key = scr.getkey()
            if key == "q" or session.chunks >= max_chunks:
                return
            if key not in KEYS and key not in ("g", " "):
                message = f"key {key!r} does nothing"
                continue
            scr.addstr(4, 0, "generating ...".ljust(40))
            scr.refresh()
            session.step(key_poses(session.pose, key, L, step))
            session.write(out)
            message = f"generated chunk {session.chunks} for key {key!r}"
    curses.wrapper(loop)
    return session.write(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="persistworld interact", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["replay", "keyboard", "policy"])
    ap.add_argument("--model", required=True, help="a model.pt or run directory")
    ap.add_argument("--data", required=True, help="the dataset (data.root)")
    ap.add_argument("--episode", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="the recorded start frame")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps per chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default=None, help="module:function (mode policy)")
    ap.add_argument("--step", type=float, default=0.08, help="metres per key (keyboard)")
    ap.add_argument("--out", default=None, help="default: runs/interact/<mode>_ep<episode>")
    a = ap.parse_args(argv)
    if a.mode == "policy" and not a.policy:
        raise UserError("interact policy needs --policy module:function")
    policy = load_policy(a.policy) if a.mode == "policy" else None
    if a.chunks < 1:
        raise UserError(f"--chunks {a.chunks}: must be >= 1")
    from persistworld.world_model import load_world_model
    model = load_world_model(a.model)
    session = Session(model, a.data, a.episode, a.start, a.seed, a.steps)
    out = Path(a.out or f"runs/interact/{a.mode}_ep{a.episode}")
    if a.mode == "keyboard":
        path = keyboard(session, out, a.step, a.chunks)
    elif a.mode == "replay":
        path = run(session, replay_controller(session), a.chunks, out, with_truth=True)
    else:
        path = run(session, policy, a.chunks, out)
    print(f"{session.chunks} chunks; video {path}, poses {out / 'poses.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
