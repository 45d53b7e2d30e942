"""Real-data conversion (``persistworld convert-data``) on small fixtures the tests write in
exactly the two source layouts: Ctrl-World's preprocessed data and the LeRobot v2.1 DROID
release (parquet + one mp4 per view per episode). Videos go through real mp4 encoding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from persistworld.data.convert import ConversionError, convert, main
from persistworld.errors import UserError

H0, W0 = 32, 48          # source frames (DROID is 180 x 320; small here, whole macro blocks)
H, W = 16, 32            # converted


def _frames(T: int, seed: int) -> np.ndarray:
    """Smooth frames (mp4 keeps them close): a gradient whose brightness follows t."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 200, size=3)
    yy, xx = np.mgrid[0:H0, 0:W0]
    out = np.stack([np.stack([np.full((H0, W0), base[c]) + 30 * np.sin(xx / 7 + t / 3 + c)
                              + yy for c in range(3)], -1) for t in range(T)])
    return np.clip(out, 0, 255).astype(np.uint8)


def _mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    import imageio.v3 as iio
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, frames, fps=fps)


def _states(T: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.cumsum(rng.normal(0, 0.01, size=(T, 7)), 0) + [0.5, 0, 0.4, 3.1, 0, 0, 0]
    s[:, 6] = np.clip(s[:, 6], 0, 1)
    return s


def write_ctrl_world(root: Path, n_train=3, n_val=2, T=9) -> Path:
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            eid = f"{i + 1:04d}"
            seed = 100 * (split == "val") + i
            videos = []
            for v in range(3):
                rel = f"videos/{split}/{eid}/{v}.mp4"
                _mp4(root / rel, _frames(T, seed * 3 + v), fps=5)
                videos.append({"video_path": rel})
            ann = {"texts": [f"task {i}"], "episode_id": eid, "success": 1, "video_length": T,
                   "videos": videos, "states": _states(T, seed).tolist()}
            p = root / "annotation" / split / f"{eid}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(ann))
    (root / "stat.json").write_text(json.dumps({"state_01": [0.0] * 7, "state_99": [1.0] * 7}))
    return root


def write_lerobot(root: Path, indices=(0, 1, 2, 99, 199), T15=12) -> Path:
    import pandas as pd
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({
        "codebase_version": "v2.1", "fps": 15, "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/"
                      "episode_{episode_index:06d}.mp4"}))
    (root / "meta" / "episodes.jsonl").write_text("\n".join(
        json.dumps({"episode_index": i, "tasks": [f"put {i} away"], "length": T15})
        for i in indices) + "\n")
    for i in indices:
        s = _states(T15, i)
        pq = root / f"data/chunk-000/episode_{i:06d}.parquet"
        pq.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"observation.state.cartesian_position": list(s[:, :6]),
                      "observation.state.gripper_position": s[:, 6],
                      "frame_index": np.arange(T15)}).to_parquet(pq)
        for v, key in enumerate(("exterior_1_left", "exterior_2_left", "wrist_left")):
            _mp4(root / f"videos/chunk-000/observation.images.{key}/episode_{i:06d}.mp4",
                 _frames(T15, 10 * i + v), fps=15)
    return root


@pytest.fixture(scope="module")
def ctrl_world_src(tmp_path_factory) -> Path:
    return write_ctrl_world(tmp_path_factory.mktemp("cw_src"))


@pytest.fixture(scope="module")
def converted(ctrl_world_src, tmp_path_factory) -> Path:
    return convert("ctrl_world", ctrl_world_src, tmp_path_factory.mktemp("cw") / "out", H, W,
                   progress=False)


def test_ctrl_world_layout_converts_and_reads_back(converted, ctrl_world_src):
    from persistworld.data.dataset import EpisodeStore, RolloutDataset
    m = json.loads((converted / "manifest.json").read_text())
    assert [e["split"] for e in m["episodes"]] == ["train"] * 3 + ["val", "test"]
    assert m["config"]["masks"] is False
    store = EpisodeStore(converted)
    assert not store.has_masks
    ep = store.load(0)
    assert ep.rgb.shape == (9, 3, H, W, 3) and (ep.mask == 255).all()
    ann = json.loads((ctrl_world_src / "annotation/train/0001.json").read_text())
    np.testing.assert_allclose(ep.eef_pose, np.asarray(ann["states"], np.float32), atol=1e-6)
    np.testing.assert_allclose(ep.poses, ep.eef_pose, atol=1e-6)   # frame t's pose = state t
    from persistworld.data.convert import resize
    src = resize(_frames(9, 1), H, W)                              # view 1 of episode 0
    assert np.abs(ep.rgb[:, 1].astype(float) - src).mean() < 6     # mp4 is lossy, not wrong
    # stat.json's percentiles are the normalisation, as Ctrl-World normalises
    stats = json.loads((converted / "norm_stats.json").read_text())
    assert stats["action"]["p01"] == [0.0] * 7 and stats["action"]["p99"] == [1.0] * 7
    ds = RolloutDataset(converted, "test", num_chunks=1, future=4)
    assert len(ds) == 1 and ds[0]["frames"].shape == (4, 3, 3, H, W)


def test_masked_evaluation_of_unmasked_data_is_refused_before_work(converted, tmp_path):
    from persistworld.evaluation.evaluate import EvalSettings, evaluate
    with pytest.raises(UserError, match="eval.masked=false"):
        evaluate(lambda *a, **k: None, converted, tmp_path / "ev",
                 EvalSettings(split="test", num_chunks=1, masked=True), future=4)
    assert not (tmp_path / "ev").exists()


def test_lerobot_droid_layout_converts_at_5hz_with_the_held_out_rule(tmp_path):
    src = write_lerobot(tmp_path / "lerobot")
    out = convert("lerobot_droid", src, tmp_path / "out", H, W, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert [(e["source_key"], e["split"]) for e in m["episodes"]] == [
        ("0", "train"), ("1", "train"), ("2", "train"), ("99", "val"), ("199", "test")]
    from persistworld.data.dataset import EpisodeStore
    ep = EpisodeStore(out).load(0)
    assert ep.rgb.shape[0] == 4                                  # 12 frames at 15 fps -> 4
    np.testing.assert_allclose(ep.eef_pose, _states(12, 0)[::3].astype(np.float32), atol=1e-6)
    assert ep.meta["texts"] == ["put 0 away"]


def test_a_killed_conversion_resumes_without_redoing_finished_episodes(ctrl_world_src,
                                                                        tmp_path, monkeypatch):
    import persistworld.data.convert as C
    out = tmp_path / "out"
    real, calls = C.episode_arrays, []

    def dying(ep, h, w):
        calls.append(ep.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(ep, h, w)
    monkeypatch.setattr(C, "episode_arrays", dying)
    with pytest.raises(KeyboardInterrupt):
        convert("ctrl_world", ctrl_world_src, out, H, W, progress=False)
    assert not (out / "manifest.json").exists()                 # incomplete: not a dataset
    calls.clear()
    monkeypatch.setattr(C, "episode_arrays", lambda ep, h, w: (calls.append(ep.key),
                                                               real(ep, h, w))[1])
    convert("ctrl_world", ctrl_world_src, out, H, W, progress=False)
    assert len(calls) == 3                                       # 5 episodes, 2 were done
    assert not list(out.glob("episodes/*.json"))                 # resume markers cleaned up
    with pytest.raises(UserError, match="already holds a complete dataset"):
        convert("ctrl_world", ctrl_world_src, out, H, W, progress=False)


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,needle", [
    (lambda r: (r / "videos/train/0002/2.mp4").unlink(), "0002/2.mp4 is missing"),
    (lambda r: _edit_ann(r, "0001", states=_states(11, 0).tolist()), "0001.json: 11 states"),
    (lambda r: _edit_ann(r, "0003", states=[[float("nan")] * 7] * 9), "0003.json: states hold NaN"),
    (lambda r: _edit_ann(r, "0001", videos=[{"video_path": "videos/train/0001/0.mp4"}]),
     "0001.json names 1 videos"),
])
def test_bad_ctrl_world_input_names_the_file(ctrl_world_src, tmp_path, damage, needle):
    src = _copy(ctrl_world_src, tmp_path / "src")
    damage(src)
    with pytest.raises(ConversionError, match=needle.replace(".", r"\.")):
        convert("ctrl_world", src, tmp_path / "out", H, W, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def _edit_ann(root: Path, eid: str, **changes) -> None:
    p = root / "annotation" / "train" / f"{eid}.json"
    a = json.loads(p.read_text())
    a.update(changes)
    p.write_text(json.dumps(a))


def test_unknown_lerobot_version_and_wrong_layout_name_the_file(tmp_path):
    src = write_lerobot(tmp_path / "lr", indices=(0,), T15=3)
    info = json.loads((src / "meta/info.json").read_text())
    (src / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v3.0"}))
    with pytest.raises(ConversionError, match=r"info\.json: codebase_version 'v3\.0'"):
        convert("lerobot_droid", src, tmp_path / "out", H, W, progress=False)
    with pytest.raises(UserError, match="annotation is missing"):
        convert("ctrl_world", src, tmp_path / "out2", H, W, progress=False)


def test_cli_prints_the_settings_to_use(ctrl_world_src, tmp_path, capsys):
    assert main(["ctrl_world", str(ctrl_world_src), str(tmp_path / "o"), "--height", "16",
                 "--width", "32"]) == 0
    assert "eval.masked=false" in capsys.readouterr().out
