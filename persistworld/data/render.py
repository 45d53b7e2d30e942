"""Render the mini-DROID dataset with pybullet (``persistworld render``; docs/FORMATS.md).

``render_dataset(cfg)`` renders ``cfg.num_episodes`` train / val episodes and, after them,
``cfg.test_episodes`` test episodes of a scripted Franka Panda (pick-and-place or push, three
views: two external cameras and a wrist camera) into ``cfg.root``:

* ``episodes/ep_XXXXXX.npz``: one atomic, byte-deterministic file per episode. Episode ``i`` is
  rendered from a seed derived from ``(cfg.seed, i)`` only, so the bytes do not depend on the
  number of workers or on the order.
* ``norm_stats.json``: p01 / p99 / mean / std per dimension of ``action`` and ``eef_pose`` over
  the train split.
* ``manifest.json``: written last; its presence marks a complete dataset.

Rerunning after an interruption (even ``kill -9``) keeps every episode file that loads and was
rendered with the same settings and renders the rest.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from persistworld.utils.io import atomic_write_bytes, atomic_write_json, npz_bytes, sha256_file
from persistworld.errors import UserError

FORMAT_VERSION = 1
EPISODE_KEYS = ("action", "eef_pose", "eef_quat", "mask", "meta", "rgb")
# settings that determine the rendered bytes / split (stored in manifest["config"])
RENDER_KEYS = ("seed", "num_episodes", "val_fraction", "test_episodes", "min_steps",
               "max_steps", "fps", "physics_hz", "image_height", "image_width", "tasks",
               "camera_jitter")
# settings a rendered dataset may grow in: more test episodes are appended after the others
# (ids num_episodes, num_episodes + 1, ...), so train, val and every model trained on them
# stay as they were
GROWABLE_KEYS = ("test_episodes",)
# defaults of the clip reader settings, used only to check that an episode holds one clip
# the subset that determines an episode's bytes (stored in its meta as "episode_config"):
# an episode does not depend on how many episodes the dataset has or on the split
EPISODE_CONFIG_KEYS = tuple(k for k in RENDER_KEYS
                            if k not in ("num_episodes", "val_fraction", "test_episodes"))
_CLIP_DEFAULTS = {"history": 6, "future": 5, "stride": 1}
MAX_ATTEMPTS = 4           # redraws of an episode whose physics blew up
_TMP_RE = re.compile(r"\.tmp-(\d+)$")


# ============================================================================================
# config
# ============================================================================================
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    try:
        return cfg[key] if key in cfg else default          # DictConfig
    except TypeError:
        return getattr(cfg, key, default)


def _tasks_list(value: Any) -> list:
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def validate_config(cfg: Any, need_root: bool = False) -> dict:
    """Check the ``data`` settings; return the normalised render config (``RENDER_KEYS``).

    Raises one ``ValueError`` that names every bad setting (``data.<key>: ...``).
    ``need_root``: also require ``data.root`` (the dataset folder).
    """
    from persistworld.data.sim.tasks import TASKS

    errors: list[str] = []
    out: dict[str, Any] = {}

    def need_int(key, lo=None, hi=None, default=None):
        raw = _get(cfg, key, default)
        if raw is None:
            errors.append(f"data.{key}: missing")
            return None
        if isinstance(raw, bool) or not isinstance(raw, (int, np.integer, float, str)):
            errors.append(f"data.{key}: expected an integer, got {raw!r}")
            return None
        try:
            val = int(raw)
            if float(raw) != val:
                raise ValueError
        except (TypeError, ValueError):
            errors.append(f"data.{key}: expected an integer, got {raw!r}")
            return None
        if lo is not None and val < lo or hi is not None and val > hi:
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            errors.append(f"data.{key}: {val} is out of range (must be {rng})")
            return None
        return val

    def need_float(key, lo=None, hi=None, hi_open=False, default=None):
        raw = _get(cfg, key, default)
        try:
            if isinstance(raw, bool):
                raise TypeError
            val = float(raw)
        except (TypeError, ValueError):
            errors.append(f"data.{key}: expected a number, got {raw!r}")
            return None
        if not math.isfinite(val) or (lo is not None and val < lo) or \
                (hi is not None and (val >= hi if hi_open else val > hi)):
            bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]" if hi is not None \
                else f">= {lo}"
            errors.append(f"data.{key}: {val} is out of range (must be in {bound})")
            return None
        return val

    out["seed"] = need_int("seed", lo=0)
    out["num_episodes"] = need_int("num_episodes", lo=1)
    out["val_fraction"] = need_float("val_fraction", lo=0.0, hi=1.0, hi_open=True)
    out["test_episodes"] = need_int("test_episodes", lo=0, default=0)
    out["min_steps"] = need_int("min_steps", lo=2)
    out["max_steps"] = need_int("max_steps", lo=2)
    out["fps"] = need_int("fps", lo=1)
    out["physics_hz"] = need_int("physics_hz", lo=1)
    out["image_height"] = need_int("image_height", lo=16, hi=512)
    out["image_width"] = need_int("image_width", lo=16, hi=512)
    out["camera_jitter"] = need_float("camera_jitter", lo=0.0, hi=0.1)
    need_int("workers", lo=1, default=1)

    tasks = _tasks_list(_get(cfg, "tasks", None))
    if not tasks:
        errors.append(f"data.tasks: empty (choose from {', '.join(TASKS)})")
    for t in tasks:
        if t not in TASKS:
            errors.append(f"data.tasks: unknown task {t!r} (choose from {', '.join(TASKS)})")
    out["tasks"] = [str(t) for t in tasks]

    lo, hi = out["min_steps"], out["max_steps"]
    if lo is not None and hi is not None and lo > hi:
        errors.append(f"data.min_steps ({lo}) must be <= data.max_steps ({hi})")
    if lo is not None:
        clip = {k: _get(cfg, k, d) for k, d in _CLIP_DEFAULTS.items()}
        try:
            h, f, s = (int(clip[k]) for k in ("history", "future", "stride"))
            span = (h + f - 1) * max(s, 1) + 1
        except (TypeError, ValueError):
            span = None
        if span is not None and lo < span:
            errors.append(f"data.min_steps ({lo}) is too short for one training clip: "
                          f"data.history + data.future = {h} + {f} frames at data.stride {s} "
                          f"span {span} recorded steps")
    fps, hz = out["fps"], out["physics_hz"]
    if fps is not None and hz is not None and hz % fps != 0:
        errors.append(f"data.fps ({fps}) must divide data.physics_hz ({hz}) "
                      "(an integer number of physics steps per recorded frame)")
    if need_root and str(_get(cfg, "root", None) or "") == "":
        errors.append("data.root: missing (the dataset folder)")
    if errors:
        raise UserError("invalid data config: " + "; ".join(errors))
    return {k: out[k] for k in RENDER_KEYS}


def episode_seed(master_seed: int, episode_id: int) -> int:
    """The seed of episode ``episode_id``: a function of (master seed, episode id) only."""
    ss = np.random.SeedSequence(entropy=int(master_seed), spawn_key=(int(episode_id),))
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def split_of(render_cfg: Mapping[str, Any]) -> list[str]:
    """'train' / 'val' / 'test' per episode id, deterministic from the master seed.

    Ids ``0 .. num_episodes-1`` are train or val (``val_fraction`` of them, drawn by a seeded
    permutation; >= 1 val episode when there are at least 2 episodes and val_fraction > 0;
    always >= 1 train episode); the ``test_episodes`` ids after them are test. Test episodes
    are appended rather than drawn so that adding them to a dataset changes nothing else."""
    n, frac = int(render_cfg["num_episodes"]), float(render_cfg["val_fraction"])
    n_test = int(render_cfg.get("test_episodes") or 0)
    n_val = int(round(frac * n))
    if frac > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    rng = np.random.default_rng(np.random.SeedSequence(entropy=int(render_cfg["seed"]),
                                                       spawn_key=(2 ** 31 - 1,)))
    val = set(rng.permutation(n)[:n_val].tolist())
    return ["val" if i in val else "train" for i in range(n)] + ["test"] * n_test


def episode_config(render_cfg: Mapping[str, Any]) -> dict:
    """The settings an episode's bytes depend on (``EPISODE_CONFIG_KEYS``)."""
    return {k: render_cfg[k] for k in EPISODE_CONFIG_KEYS}


def episode_path(root: str | os.PathLike, episode_id: int) -> Path:
    return Path(root) / "episodes" / f"ep_{int(episode_id):06d}.npz"


# ============================================================================================
# one episode
# ============================================================================================
def render_episode(cfg: Any, episode_id: int) -> dict[str, np.ndarray]:
    """Simulate and render episode ``episode_id``; return the arrays of docs/FORMATS.md.

    The episode is a function of (``cfg.seed``, ``episode_id``) and the render settings only.
    A rare physics blow-up (object launched or off the table) is redrawn from a derived seed
    (``meta["attempt"]`` counts the redraws), deterministically.
    """
    rc = validate_config(cfg)
    seed = episode_seed(rc["seed"], episode_id)
    for attempt in range(MAX_ATTEMPTS):
        arrays, meta = _simulate(rc, episode_rng(seed, attempt))
        if meta["valid"] or attempt == MAX_ATTEMPTS - 1:
            break
    meta = {"episode_id": int(episode_id), "seed": seed, "attempt": attempt, **meta,
            "episode_config": episode_config(rc)}
    meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    arrays["meta"] = np.frombuffer(meta_bytes, dtype=np.uint8).copy()
    return arrays


def start_episode(rc: Mapping[str, Any], rng: np.random.Generator) -> dict:
    """The start state of one episode, drawn from ``rng`` (the one definition shared by the
    renderer and closed-loop policy evaluation, ``persistworld.policy_eval.simulator``):
    ``num_steps``, ``task``, ``spec``, the settled ``scene`` and the scripted ``policy``."""
    from persistworld.data.sim.scene import (REST_POSE, Scene, quat_to_relrot,
                                             sample_scene_spec)
    from persistworld.data.sim.tasks import ScriptedPolicy

    num_steps = int(rng.integers(rc["min_steps"], rc["max_steps"] + 1))
    task = rc["tasks"][int(rng.integers(len(rc["tasks"])))]
    spec = sample_scene_spec(rng, rc["camera_jitter"])
    scene = Scene(spec, (rc["image_height"], rc["image_width"]), physics_hz=rc["physics_hz"])

    arm0 = np.asarray(REST_POSE[:7]) + rng.normal(0.0, 0.04, size=7)
    scene.reset_joints(arm0, 1.0)
    pos0, quat0, _ = scene.eef_state()
    scene.command(pos0, quat0, 1.0)
    scene.step(max(1, rc["physics_hz"] // 4))          # let the object and the arm settle
    pos0, quat0, _ = scene.eef_state()
    policy = ScriptedPolicy(task, spec, rng, rc["fps"], pos0, quat_to_relrot(quat0))
    return {"num_steps": num_steps, "task": task, "spec": spec, "scene": scene,
            "policy": policy}


def episode_rng(seed: int, attempt: int) -> np.random.Generator:
    """The generator of redraw ``attempt`` of the episode with seed ``seed``."""
    return np.random.default_rng(seed if attempt == 0 else
                                 np.random.SeedSequence(entropy=seed, spawn_key=(attempt,)))


def _simulate(rc: Mapping[str, Any], rng: np.random.Generator) -> tuple[dict, dict]:
    from persistworld.data.sim.scene import CLASSES, VIEWS, quat_to_relrot, relrot_to_quat

    start = start_episode(rc, rng)
    num_steps, task, spec = start["num_steps"], start["task"], start["spec"]
    scene, policy = start["scene"], start["policy"]
    substeps = rc["physics_hz"] // rc["fps"]

    h, w, v = rc["image_height"], rc["image_width"], len(VIEWS)
    rgb = np.empty((num_steps, v, h, w, 3), dtype=np.uint8)
    mask = np.empty((num_steps, v, h, w), dtype=np.uint8)
    eef_pose = np.empty((num_steps, 7), dtype=np.float32)
    eef_quat = np.empty((num_steps, 4), dtype=np.float32)
    action = np.empty((num_steps, 7), dtype=np.float32)
    obj_xyz = np.empty((num_steps, 3))
    obj_speed = np.empty(num_steps)
    for t in range(num_steps):
        rgb[t], mask[t] = scene.render()
        pos, quat, opening = scene.eef_state()
        quat = quat if quat[3] >= 0 else -quat            # canonical sign (w >= 0)
        eef_pose[t, :3], eef_pose[t, 3:6], eef_pose[t, 6] = pos, quat_to_relrot(quat), opening
        eef_quat[t] = quat
        obj_xyz[t] = scene.object_pose()[0]
        obj_speed[t] = scene.object_speed()
        tpos, trot, tgrip = policy.act(t)
        action[t, :3], action[t, 3:6], action[t, 6] = tpos, trot, tgrip
        if t < num_steps - 1:                              # the last action has no next frame
            scene.command(tpos, relrot_to_quat(trot), tgrip)
            scene.step(substeps)
    goal = policy.info.get("goal")
    end = obj_xyz[-1]
    valid = bool(np.all(obj_xyz[:, 2] > -0.01) and np.all(obj_xyz[:, 2] < 0.35)
                 and np.all(np.abs(obj_xyz[:, :2] - [0.54, 0.0]) < [0.35, 0.40])
                 and np.all(obj_speed < 2.0))
    meta = {
        "task": task, "num_steps": num_steps, "valid": valid,
        "fps": rc["fps"], "physics_hz": rc["physics_hz"], "image_size": [h, w],
        "views": list(VIEWS), "classes": dict(CLASSES),
        "object": {"shape": spec.shape, "size": spec.size, "height": spec.height,
                   "rgb": spec.object_rgb, "start_xy": spec.object_xy, "yaw": spec.object_yaw},
        "goal_xy": goal, "camera_jitter": spec.camera_offsets,
        "scene": spec.to_meta(), "task_info": policy.info,
        "task_done_step": policy.done_step,
        "object_final_xyz": [float(x) for x in end],
        "object_moved": float(np.linalg.norm(end[:2] - obj_xyz[0, :2])),
        "goal_error": None if goal is None else float(np.linalg.norm(end[:2] - goal)),
        "action": "commanded grasp-point target (xyz, rotvec rel. gripper-down, gripper 1=open)",
    }
    arrays = {"rgb": rgb, "mask": mask, "eef_pose": eef_pose, "action": action,
              "eef_quat": eef_quat}
    return arrays, meta


def _render_to_file(job: tuple[dict, int, str]) -> int:
    """Worker: render one episode and write it atomically."""
    cfg, episode_id, path = job
    atomic_write_bytes(path, npz_bytes(render_episode(cfg, episode_id)))
    return episode_id


# ============================================================================================
# dataset
# ============================================================================================
def _mismatch_error(where: str, theirs: Mapping, ours: Mapping, root: Path) -> ValueError:
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    diff = ", ".join(f"{k}: {theirs.get(k)!r} on disk vs {ours.get(k)!r} now" for k in keys)
    return UserError(f"{where} was rendered with a different render config ({diff}). "
                      f"Choose another data.root or delete {root} to re-render.")


def read_episode_meta(path: str | os.PathLike) -> dict | None:
    """The meta dict of an episode file, or None when the file is missing, truncated,
    corrupt or lacks a documented key (such a file is re-rendered)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if names != {f"{k}.npy" for k in EPISODE_KEYS}:
                return None
            if zf.testzip() is not None:               # CRC of every member
                return None
            with zf.open("meta.npy") as f:
                arr = np.lib.format.read_array(f, allow_pickle=False)
        return json.loads(arr.tobytes().decode("utf-8"))
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, KeyError, UnicodeDecodeError):
        return None


def _remove_stale_tmp(folder: Path) -> None:
    """Delete ``*.tmp-<pid>`` leftovers of killed writers (never under a final name)."""
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        m = _TMP_RE.search(f.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue                                 # a live writer owns it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        f.unlink(missing_ok=True)


def compute_norm_stats(arrays: Mapping[str, list[np.ndarray]]) -> dict:
    """p01 / p99 (numpy linear percentiles), mean and std (ddof 0) per dimension."""
    stats = {}
    for key, chunks in arrays.items():
        x = np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks], axis=0)
        p01, p99 = np.percentile(x, [1.0, 99.0], axis=0)
        stats[key] = {"p01": p01.tolist(), "p99": p99.tolist(), "mean": x.mean(0).tolist(),
                      "std": x.std(0).tolist()}
    return stats


def _plain(cfg: Any) -> dict:
    """A picklable plain dict of the settings (for spawned workers)."""
    keys = set(RENDER_KEYS) | set(_CLIP_DEFAULTS) | {"root", "workers"}
    out = {}
    for k in keys:
        v = _get(cfg, k, None)
        if v is None:
            continue
        if k == "tasks":
            v = [str(t) for t in _tasks_list(v)]
        elif k == "root":
            v = str(v)
        out[k] = v
    return out


def render_dataset(cfg: Any) -> Path:
    """Render (or resume rendering) the dataset described by the ``data`` config node into
    ``cfg.root``; return the dataset folder. See the module docstring."""
    from tqdm import tqdm

    from persistworld.data.sim.scene import CLASSES, VIEWS

    rc = validate_config(cfg, need_root=True)
    plain = _plain(cfg)
    workers = int(_get(cfg, "workers", 1) or 1)
    root = Path(str(_get(cfg, "root"))).expanduser()
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None                                   # unreadable: rewritten at the end
        fixed = {k: v for k, v in json.loads(json.dumps(rc)).items() if k not in GROWABLE_KEYS}
        theirs = {k: v for k, v in ((old or {}).get("config") or {}).items()
                  if k not in GROWABLE_KEYS}
        if old is not None and theirs != fixed:
            raise _mismatch_error(str(manifest_path), theirs, fixed, root)
    ep_dir = root / "episodes"
    ep_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(ep_dir)

    n = rc["num_episodes"] + rc["test_episodes"]
    metas: dict[int, dict] = {}
    pending: list[int] = []
    for i in range(n):
        path = episode_path(root, i)
        meta = read_episode_meta(path) if path.exists() else None
        if meta is None:
            pending.append(i)
            continue
        if meta.get("episode_config") != episode_config(rc):
            raise _mismatch_error(str(path), meta.get("episode_config") or {},
                                  episode_config(rc), root)
        metas[i] = meta

    if pending:
        jobs = [(plain, i, str(episode_path(root, i))) for i in pending]
        bar = tqdm(total=n, initial=n - len(pending), desc="render episodes", unit="ep",
                   dynamic_ncols=True)
        try:
            if workers <= 1 or len(pending) == 1:
                from persistworld.data.sim.scene import disconnect_client
                try:
                    for job in jobs:
                        _render_to_file(job)
                        bar.update(1)
                finally:
                    disconnect_client()                  # free this process's physics client
            else:
                # spawn: no inherited pybullet client / torch threads; a worker that dies
                # (e.g. a script without an ``if __name__ == "__main__":`` guard) raises
                # BrokenProcessPool here instead of hanging like multiprocessing.Pool
                with ProcessPoolExecutor(min(workers, len(pending)),
                                         mp_context=mp.get_context("spawn")) as pool:
                    futures = [pool.submit(_render_to_file, job) for job in jobs]
                    try:
                        for fut in as_completed(futures):
                            fut.result()
                            bar.update(1)
                    except BaseException:
                        for fut in futures:
                            fut.cancel()
                        raise
        finally:
            bar.close()
        for i in pending:
            meta = read_episode_meta(episode_path(root, i))
            if meta is None:
                raise RuntimeError(f"episode {i} was rendered but does not load back: "
                                   f"{episode_path(root, i)}")
            metas[i] = meta

    splits = split_of(rc)
    episodes, train = [], {"action": [], "eef_pose": []}
    for i in range(n):
        path = episode_path(root, i)
        episodes.append({"id": i, "file": path.relative_to(root).as_posix(), "split": splits[i],
                         "task": metas[i]["task"], "num_steps": int(metas[i]["num_steps"]),
                         "sha256": sha256_file(path)})
        if splits[i] == "train":
            with np.load(path, allow_pickle=False) as z:
                train["action"].append(z["action"])
                train["eef_pose"].append(z["eef_pose"])
    atomic_write_json(root / "norm_stats.json", compute_norm_stats(train))
    manifest = {"format_version": FORMAT_VERSION, "config": rc, "views": list(VIEWS),
                "classes": dict(CLASSES), "episodes": episodes}
    atomic_write_json(manifest_path, manifest)           # LAST: marks a complete dataset
    return root
