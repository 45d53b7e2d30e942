"""Rollout modes (``persistworld interact``): replay, policy in the loop, and the keyboard
program driven through tmux, on a tiny embedded model and the tiny rendered dataset."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from persistworld.errors import UserError
from persistworld.rollout.interactive import (Session, key_poses, load_policy, main,
                                              replay_controller, run)
from persistworld.world_model import build_world_model, save_world_model

TINY = dict(history=6, future=5, image_height=64, image_width=64, patch=4, action_hidden=16,
            block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            attention_head_dim=8, norm_num_groups=8, num_steps=2)

CALLS: list = []


def recording_policy(views, pose, chunk, horizon):
    """A policy for the test: records what it sees, moves +1 cm in y per chunk."""
    CALLS.append((views.shape, views.dtype, pose.copy(), chunk, horizon))
    if chunk == 2:
        return None
    target = pose.copy()
    target[1] += 0.01
    return np.repeat(target[None], horizon, 0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("interact") / "model.pt"
    save_world_model(build_world_model(TINY), path)
    return path


def test_replay_follows_the_recorded_poses_and_writes_truth_beside_the_model(
        model_file, tiny_dataset, tmp_path):
    from persistworld.world_model import load_world_model
    s = Session(load_world_model(model_file), tiny_dataset, episode=0, start=2)
    run(s, replay_controller(s), num_chunks=2, out=tmp_path, with_truth=True, progress=False)
    rec = json.loads((tmp_path / "poses.json").read_text())
    np.testing.assert_allclose(np.array(rec["poses"]), s.episode.poses[2:2 + 11], atol=1e-6)
    assert s.chunks == 2 and len(s.frames) == 11
    from PIL import Image
    gif = Image.open(tmp_path / "rollout.gif")
    assert gif.n_frames == 11
    # two rows (truth, model) make the picture taller than the model alone
    alone = tmp_path / "alone"
    s.write(alone)
    assert gif.size[1] > Image.open(alone / "rollout.gif").size[1]


def test_replay_stops_at_the_end_of_the_episode(model_file, tiny_dataset, tmp_path):
    from persistworld.world_model import load_world_model
    s = Session(load_world_model(model_file), tiny_dataset, episode=0)
    n = s.episode.num_steps
    run(s, replay_controller(s), num_chunks=100, out=tmp_path, progress=False)
    assert s.chunks == (n - 1) // 5


def test_policy_in_the_loop_sees_generated_views(model_file, tiny_dataset, tmp_path, capsys):
    CALLS.clear()
    assert main(["policy", "--model", str(model_file), "--data", str(tiny_dataset),
                 "--policy", "test_interactive:recording_policy", "--chunks", "5",
                 "--out", str(tmp_path)]) == 0
    assert [c[3] for c in CALLS] == [0, 1, 2]                    # stopped by returning None
    assert CALLS[0][0] == (3, 64, 64, 3) and CALLS[0][1] == np.uint8 and CALLS[0][4] == 5
    assert CALLS[1][2][1] == pytest.approx(CALLS[0][2][1] + 0.01)
    assert "2 chunks" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["policy"], "--policy module:function"),
    (["policy", "--policy", "nope_module:act"], "cannot be loaded"),
    (["replay", "--episode", "99"], "--episode 99"),
    (["replay", "--chunks", "0"], "--chunks 0"),
])
def test_bad_arguments_fail_with_one_message(model_file, tiny_dataset, args, needle):
    with pytest.raises(UserError, match=needle):
        main([args[0], "--model", str(model_file), "--data", str(tiny_dataset), *args[1:]])


def test_a_controller_with_the_wrong_horizon_is_refused(model_file, tiny_dataset):
    from persistworld.world_model import load_world_model
    s = Session(load_world_model(model_file), tiny_dataset, episode=0)
    with pytest.raises(UserError, match=r"shape \(4, 7\)"):
        s.step(np.zeros((4, 7)))


def test_key_poses_move_linearly_over_the_chunk():
    pose = np.array([0.5, 0.0, 0.3, 0, 0, 0, 0.0])
    p = key_poses(pose, "w", 4, 0.08)
    np.testing.assert_allclose(p[:, 0], [0.52, 0.54, 0.56, 0.58])
    assert key_poses(pose, "g", 4, 0.08)[-1, 6] == 1.0
    np.testing.assert_allclose(key_poses(pose, " ", 4, 0.08), np.repeat(pose[None], 4, 0))
    with pytest.raises(UserError):
        load_policy("no_colon")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_keyboard_program_driven_through_tmux(model_file, tiny_dataset, tmp_path):
    """The terminal program as a user runs it: keys typed into a tmux pane, the screen read
    back, the commanded poses and the video checked."""
    session = f"pw{int(time.time() * 1000) % 10**8}"
    out = tmp_path / "kb"
    cmd = (f"{sys.executable} -m persistworld.cli interact keyboard --model {model_file} "
           f"--data {tiny_dataset} --out {out} --step 0.05; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "140", "-y", "12", cmd],
                   check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                              capture_output=True, text=True).stdout

    def wait_for(text: str, timeout: float = 120) -> str:
        end = time.time() + timeout
        while time.time() < end:
            s = screen()
            if text in s:
                return s
            time.sleep(0.3)
        raise AssertionError(f"{text!r} never appeared; screen:\n{screen()}")
    try:
        wait_for("chunk 0")
        for key in ("w", "w", "r"):
            n = json.loads((out / "poses.json").read_text())["chunks"] if \
                (out / "poses.json").exists() else 0
            subprocess.run(["tmux", "send-keys", "-t", session, key], check=True)
            wait_for(f"generated chunk {n + 1}")
        shown = wait_for("chunk 3")
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        wait_for("3 chunks; video")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    rec = json.loads((out / "poses.json").read_text())
    poses = np.array(rec["poses"])
    assert rec["chunks"] == 3 and len(poses) == 16
    assert poses[10, 0] - poses[0, 0] == pytest.approx(0.10, abs=1e-6)   # two 'w' of 5 cm
    assert poses[15, 2] - poses[10, 2] == pytest.approx(0.05, abs=1e-6)  # one 'r'
    assert f"x={poses[-1, 0]:+.3f}" in shown
    assert (out / "rollout.gif").exists() and (out / "latest.png").exists()
