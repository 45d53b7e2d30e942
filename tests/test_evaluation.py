"""Rollout evaluation: the trivial baselines are scored on the same samples as the model and
written next to it; `persistworld evaluate model=nothing_moves|repeat_last`."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from persistworld.evaluation.evaluate import (TRIVIAL, EvalSettings, evaluate,
                                              nothing_moves_predictor, repeat_last_predictor)


def _batch(T=10, L=5):
    frames = torch.rand(2, T, 3, 3, 8, 8)
    return {"frames": frames, "start_frame": torch.rand(2, 3, 3, 8, 8)}


def test_trivial_predictors_by_hand():
    b = _batch()
    still = nothing_moves_predictor(5)(b, EvalSettings(mode="teacher_forced"))
    assert torch.equal(still, b["start_frame"].unsqueeze(1).expand_as(b["frames"]))
    tf = repeat_last_predictor(5)(b, EvalSettings(mode="teacher_forced"))
    assert torch.equal(tf[:, :5], b["start_frame"].unsqueeze(1).expand(2, 5, 3, 3, 8, 8))
    assert torch.equal(tf[:, 5:], b["frames"][:, 4:5].expand(2, 5, 3, 3, 8, 8))
    # autoregressive: only the start frame is known, so repeat-last is nothing-moves
    ar = repeat_last_predictor(5)(b, EvalSettings(mode="autoregressive"))
    assert torch.equal(ar, still)
    assert set(TRIVIAL) == {"nothing_moves", "repeat_last"}


@pytest.mark.parametrize("mode", ["teacher_forced", "autoregressive"])
def test_evaluation_writes_the_baselines_on_the_same_samples(tiny_dataset, tmp_path, mode):
    s = EvalSettings(mode=mode, num_chunks=2, batch_size=4, num_videos=0)
    # a "model" that predicts the ground truth: better than every trivial baseline
    perfect = lambda batch, s: batch["frames"].clone()                     # noqa: E731
    summary = evaluate(perfect, tiny_dataset, tmp_path / "ev", s)
    names = {"nothing_moves"} if mode == "autoregressive" else {"nothing_moves", "repeat_last"}
    assert set(summary["baselines"]) == names
    on_disk = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert on_disk["baselines"] == summary["baselines"]
    model_frames = pd.read_parquet(tmp_path / "ev" / "frames.parquet")
    for name in names:
        d = tmp_path / "ev" / "baselines" / name
        frames = pd.read_parquet(d / "frames.parquet")
        keys = ["sample", "episode", "start", "frame", "view"]
        pd.testing.assert_frame_equal(frames[keys], model_frames[keys])   # same samples
        assert json.loads((d / "summary.json").read_text())["baseline"] == name
        for group in ("external", "wrist"):
            assert summary["metrics"][group]["ssim"] > summary["baselines"][name][group]["ssim"]
            assert summary["metrics"][group]["lpips"] < \
                summary["baselines"][name][group]["lpips"]
    # in-training checks (no output folder) score no baselines
    assert "baselines" not in evaluate(perfect, tiny_dataset, None, s)


def test_evaluate_command_runs_a_trivial_baseline(tiny_dataset, tmp_path):
    from persistworld.conf import __name__ as _  # noqa: F401  (the package is importable)
    from persistworld.evaluation.run import evaluate_model
    from omegaconf import OmegaConf
    data = OmegaConf.create({"root": str(tiny_dataset), "future": 5, "stride": 1})
    s = EvalSettings(mode="teacher_forced", num_chunks=1, num_videos=0)
    out = evaluate_model("nothing_moves", data, s, tmp_path / "still")
    assert out["num_samples"] == 1 and not (tmp_path / "still" / "baselines").exists()
