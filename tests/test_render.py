"""The pybullet mini-DROID renderer (persistworld.data.render; docs/FORMATS.md)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from persistworld.data import render as R
from persistworld.data.sim.scene import CLASSES, VIEWS, quat_to_relrot, relrot_to_quat

H, W = 32, 40


def small_cfg(root, **over):
    cfg = dict(root=str(root), seed=0, num_episodes=3, val_fraction=0.1, min_steps=12,
               max_steps=14, fps=5, physics_hz=240, image_height=H, image_width=W,
               tasks=["pick_place", "push"], camera_jitter=0.01, workers=1,
               history=6, future=5, stride=1)
    cfg.update(over)
    return cfg


def files_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "episodes").glob("*.npz"))}


def no_tmp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same small dataset rendered with 2 spawned workers and in-process (workers=1)."""
    base = tmp_path_factory.mktemp("render")
    a = R.render_dataset(small_cfg(base / "a", workers=2))
    from omegaconf import OmegaConf                      # the CLI passes a DictConfig
    b = R.render_dataset(OmegaConf.create(small_cfg(base / "b", workers=1)))
    return a, b


def test_layout_and_manifest(datasets):
    root, _ = datasets
    assert (root / "manifest.json").exists() and (root / "norm_stats.json").exists()
    assert no_tmp_files(root)
    man = json.loads((root / "manifest.json").read_text())
    assert man["format_version"] == 1
    assert man["views"] == list(VIEWS) == ["ext1", "ext2", "wrist"]
    assert man["classes"] == {"background": 0, "robot": 1, "object": 2} == CLASSES
    assert man["config"]["image_height"] == H and man["config"]["num_episodes"] == 3
    assert [e["id"] for e in man["episodes"]] == [0, 1, 2]
    splits = [e["split"] for e in man["episodes"]]
    assert splits.count("val") == 1 and splits.count("train") == 2
    for e in man["episodes"]:
        assert e["file"] == f"episodes/ep_{e['id']:06d}.npz"
        assert e["task"] in ("pick_place", "push")
        assert 12 <= e["num_steps"] <= 14
        assert e["sha256"] == R.sha256_file(root / e["file"])


def test_same_seed_same_bytes_any_workers(datasets):
    a, b = datasets
    fa, fb = files_bytes(a), files_bytes(b)
    assert len(fa) == 3 and fa == fb                      # workers=2 (spawned) vs in-process
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    assert ma["episodes"] == mb["episodes"]
    assert (a / "norm_stats.json").read_bytes() == (b / "norm_stats.json").read_bytes()
    # a third time, in this process, out of order
    cfg = small_cfg(a)
    ep = R.render_episode(cfg, 2)
    with np.load(a / "episodes" / "ep_000002.npz") as z:
        for k in R.EPISODE_KEYS:
            assert np.array_equal(ep[k], z[k]), k


def test_different_seed_differs(datasets):
    a, _ = datasets
    other = R.render_episode(small_cfg(a, seed=1), 0)
    with np.load(a / "episodes" / "ep_000000.npz") as z:
        assert not (other["rgb"].shape == z["rgb"].shape and np.array_equal(other["rgb"], z["rgb"]))
    assert R.episode_seed(0, 0) != R.episode_seed(1, 0) != R.episode_seed(0, 1)


def test_arrays_shapes_dtypes_ranges(datasets):
    root, _ = datasets
    man = json.loads((root / "manifest.json").read_text())
    robot_seen = np.zeros(2, bool)
    object_seen = np.zeros(2, bool)
    for e in man["episodes"]:
        with np.load(root / e["file"], allow_pickle=False) as z:
            assert sorted(z.files) == sorted(R.EPISODE_KEYS)
            T = e["num_steps"]
            rgb, mask = z["rgb"], z["mask"]
            assert rgb.dtype == np.uint8 and rgb.shape == (T, 3, H, W, 3)
            assert mask.dtype == np.uint8 and mask.shape == (T, 3, H, W)
            assert set(np.unique(mask)) <= {0, 1, 2}
            for key in ("eef_pose", "action"):
                assert z[key].dtype == np.float32 and z[key].shape == (T, 7)
                assert np.all(np.isfinite(z[key]))
            q = z["eef_quat"]
            assert q.dtype == np.float32 and q.shape == (T, 4)
            np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
            pose, act = z["eef_pose"], z["action"]
            assert np.all((pose[:, 6] >= 0) & (pose[:, 6] <= 1))
            assert set(np.unique(act[:, 6])) <= {0.0, 1.0}
            assert np.all(np.linalg.norm(pose[:, 3:6], axis=1) < 1.6)   # near "pointing down"
            assert np.all((pose[:, 2] > 0.0) & (pose[:, 2] < 0.5))
            assert np.all((pose[:, 0] > 0.2) & (pose[:, 0] < 0.9))
            # eef_pose rotation and eef_quat agree
            for t in (0, T - 1):
                np.testing.assert_allclose(quat_to_relrot(q[t]), pose[t, 3:6], atol=1e-4)
            # the robot follows the commands (trails them by a few cm at most)
            lag = np.linalg.norm(pose[1:, :3] - act[:-1, :3], axis=1)
            assert np.median(lag) < 0.03
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            assert meta["episode_id"] == e["id"] and meta["task"] == e["task"]
            assert meta["num_steps"] == T and meta["fps"] == 5
            assert meta["object"]["shape"] in ("cube", "cylinder", "sphere")
            assert len(meta["camera_jitter"]) == 2
            robot_seen |= (mask[:, :2] == 1).any(axis=(2, 3)).any(axis=0)
            object_seen |= (mask[:, :2] == 2).any(axis=(2, 3)).any(axis=0)
            assert (mask[:, 2] == 1).any()                 # wrist view sees the fingers
    assert robot_seen.all() and object_seen.all()


def test_rotation_helpers_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.normal(0, 0.5, 3)
        np.testing.assert_allclose(quat_to_relrot(relrot_to_quat(v)), v, atol=1e-9)


def test_norm_stats_match_numpy(datasets):
    root, _ = datasets
    man = json.loads((root / "manifest.json").read_text())
    stats = json.loads((root / "norm_stats.json").read_text())
    for key in ("action", "eef_pose"):
        chunks = []
        for e in man["episodes"]:
            if e["split"] == "train":
                with np.load(root / e["file"]) as z:
                    chunks.append(z[key])
        x = np.concatenate(chunks).astype(np.float64)
        assert set(stats[key]) == {"p01", "p99", "mean", "std"}
        np.testing.assert_allclose(stats[key]["p01"], np.percentile(x, 1, axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats[key]["p99"], np.percentile(x, 99, axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(stats[key]["std"], x.std(0), rtol=1e-12, atol=1e-15)


def test_resume_rerenders_exactly_missing_and_broken(datasets, tmp_path, monkeypatch):
    src, _ = datasets
    root = tmp_path / "ds"
    shutil.copytree(src, root)
    original = files_bytes(root)
    manifest = (root / "manifest.json").read_bytes()
    # simulate a kill -9: manifest not yet written, one file missing, one truncated,
    # a leftover temporary file of a dead writer
    (root / "manifest.json").unlink()
    (root / "episodes" / "ep_000001.npz").unlink()
    p2 = root / "episodes" / "ep_000002.npz"
    p2.write_bytes(original["ep_000002.npz"][: len(original["ep_000002.npz"]) // 2])
    stale = root / "episodes" / "ep_000001.npz.tmp-999999999"
    stale.write_bytes(b"partial")

    rendered = []
    real = R._render_to_file

    def spy(job):
        rendered.append(job[1])
        return real(job)

    monkeypatch.setattr(R, "_render_to_file", spy)
    R.render_dataset(small_cfg(root))
    assert sorted(rendered) == [1, 2]
    assert files_bytes(root) == original
    assert (root / "manifest.json").read_bytes() == manifest
    assert no_tmp_files(root)
    # a complete dataset: nothing to render, same manifest
    rendered.clear()
    R.render_dataset(small_cfg(root))
    assert rendered == [] and (root / "manifest.json").read_bytes() == manifest


def test_existing_dataset_with_other_config_is_refused(datasets, tmp_path):
    src, _ = datasets
    root = tmp_path / "ds"
    shutil.copytree(src, root)
    with pytest.raises(ValueError, match=r"different render config.*image_width.*data\.root"):
        R.render_dataset(small_cfg(root, image_width=W + 8))
    # partial dataset (no manifest yet) rendered with other settings: refused too
    (root / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"camera_jitter.*data\.root"):
        R.render_dataset(small_cfg(root, camera_jitter=0.02))


@pytest.mark.parametrize("over, message", [
    ({"tasks": ["pik"]}, r"data\.tasks: unknown task 'pik' \(choose from pick_place, push\)"),
    ({"tasks": []}, r"data\.tasks: empty"),
    ({"min_steps": 20, "max_steps": 15}, r"data\.min_steps \(20\) must be <= data\.max_steps"),
    ({"min_steps": 8, "max_steps": 9}, r"data\.min_steps \(8\) is too short for one training clip"),
    ({"fps": 7}, r"data\.fps \(7\) must divide data\.physics_hz \(240\)"),
    ({"image_height": 8}, r"data\.image_height: 8 is out of range"),
    ({"image_width": 1024}, r"data\.image_width: 1024 is out of range"),
    ({"num_episodes": 0}, r"data\.num_episodes"),
    ({"val_fraction": 1.0}, r"data\.val_fraction"),
    ({"seed": "abc"}, r"data\.seed: expected an integer"),
])
def test_config_validation(tmp_path, over, message):
    root = tmp_path / "never_created"
    with pytest.raises(ValueError, match=message):
        R.render_dataset(small_cfg(root, **over))
    assert not root.exists()                               # validated before any work


def test_split_is_deterministic_and_keeps_one_val():
    cfg = {"seed": 3, "num_episodes": 2, "val_fraction": 0.01}
    assert sorted(R.split_of(cfg)) == ["train", "val"]
    big = {"seed": 3, "num_episodes": 50, "val_fraction": 0.1}
    assert R.split_of(big) == R.split_of(dict(big)) and R.split_of(big).count("val") == 5
    assert R.split_of({"seed": 3, "num_episodes": 1, "val_fraction": 0.5}) == ["train"]


def test_test_episodes_come_after_train_and_val_and_do_not_change_them():
    cfg = {"seed": 3, "num_episodes": 50, "val_fraction": 0.1}
    with_test = R.split_of({**cfg, "test_episodes": 7})
    assert with_test[:50] == R.split_of(cfg) and with_test[50:] == ["test"] * 7


def test_adding_a_test_split_to_a_rendered_dataset_keeps_everything_else(tmp_path):
    root = tmp_path / "data"
    R.render_dataset(small_cfg(root, num_episodes=2, min_steps=11, max_steps=11))
    before = files_bytes(root)
    stats = (root / "norm_stats.json").read_text()
    man0 = json.loads((root / "manifest.json").read_text())
    R.render_dataset(small_cfg(root, num_episodes=2, min_steps=11, max_steps=11,
                               test_episodes=1))
    man1 = json.loads((root / "manifest.json").read_text())
    after = files_bytes(root)
    assert {k: after[k] for k in before} == before         # no train / val file touched
    assert (root / "norm_stats.json").read_text() == stats   # statistics over train only
    assert man1["episodes"][:2] == man0["episodes"]
    assert man1["episodes"][2]["split"] == "test" and man1["episodes"][2]["id"] == 2
    assert man1["config"]["test_episodes"] == 1 and "ep_000002.npz" in after


def test_wide_images_render(tmp_path):
    cfg = small_cfg(tmp_path, image_height=96, image_width=160, min_steps=3, max_steps=3,
                    history=2, future=1, tasks=["push"])
    ep = R.render_episode(cfg, 0)
    assert ep["rgb"].shape == (3, 3, 96, 160, 3) and ep["mask"].shape == (3, 3, 96, 160)
    assert (ep["mask"][:, :2] == 2).any()
    assert json.loads(ep["meta"].tobytes())["task"] == "push"


def test_plain_object_config(tmp_path):
    class Cfg:                                             # any object with the attributes
        pass

    cfg = Cfg()
    for k, v in small_cfg(tmp_path, min_steps=3, max_steps=3, history=2, future=1).items():
        setattr(cfg, k, v)
    assert R.validate_config(cfg)["tasks"] == ["pick_place", "push"]
