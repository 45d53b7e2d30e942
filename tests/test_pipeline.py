"""The main job end to end on tiny settings: data -> base -> post-training -> evaluation of
both on the same rollouts -> report (Table 1 / 2 layouts, curves, paired tests) and videos."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BASE = ["world_model.block_out_channels=[16,32]",
        "world_model.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
        "world_model.attention_head_dim=8", "world_model.norm_num_groups=8",
        "world_model.action_hidden=16", "trainer.steps=4", "trainer.eval_every=0",
        "trainer.num_threads=1"]
POST = ["experiment=mini", "trainer.steps=2", "trainer.batch_size=2", "rollout.group_size=4",
        "rollout.best_of_n=1", "rollout.prefix.high=2", "rollout.sampler_steps=3",
        "trainer.num_threads=1", "lora.rank=4", "lora.alpha=4"]


def _quoted(items: list[str]) -> str:
    return "[" + ",".join(f'"{x}"' for x in items) + "]"


@pytest.mark.slow
def test_pipeline_end_to_end(tiny_dataset, tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "persistworld.cli", "pipeline", f"data.root={tiny_dataset}",
           "data.num_episodes=4", "data.val_fraction=0.25", "data.test_episodes=1",
           "data.min_steps=24",
           "data.max_steps=28", "data.workers=1", f"results_dir={results}",
           "base.checkpoint=null", f"base.run_dir={tmp_path / 'base'}",
           f"base.overrides={_quoted(BASE)}", f"post.run_dir={tmp_path / 'post'}",
           f"post.overrides={_quoted(POST)}", "eval.num_chunks=2", "eval.num_steps=2",
           "eval.starts_per_episode=3", "eval.num_videos=2", "report.n_resamples=100"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "base vs PersistWorld" in out.stdout and str(results.resolve()) in out.stdout
    report = results / "report"
    for rel in ("report.md", "report.html", "tables/autoregressive_2_table.tex",
                "tables/autoregressive_2_masked.md", "tables/autoregressive_2_paired.csv",
                "figures/autoregressive_2_vs_time.png",
                "figures/autoregressive_2_paired_persistworld.png",
                "figures/training_curves.png", "figures/drift_vs_teacher_forced.png"):
        assert (report / rel).exists(), rel
    assert (results / "data_preview.png").exists()
    assert len(list((results / "videos").glob("*.gif"))) == 2
    assert len(list((results / "videos").glob("*_frames.png"))) == 2   # first/middle/last
    table = (report / "tables" / "autoregressive_2_table.md").read_text()
    assert "base" in table and "persistworld" in table and "External" in table
    assert "nothing moves (start frame)" in table                   # a standing row
    assert "nothing moves (start frame)" in out.stdout
    timings = json.loads((results / "timings.json").read_text())
    assert {"data", "base", "post_train", "evaluate", "results", "total"} <= set(timings)
    # rerun: every stage is found finished, nothing is redone
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already completed" in again.stdout
    assert "rollouts on held-out episodes" not in again.stdout


@pytest.mark.parametrize("post,message", [
    (["experiment=mini", "rollout.best_of_n=9"], "rollout.best_of_n"),
    (["experiment=mini", "optim.lrr=1"], "optim.lrr"),
])
def test_bad_settings_fail_before_any_work(tmp_path, post, message):
    """A wrong post-training setting stops the main job before rendering or writing anything."""
    cmd = [sys.executable, "-m", "persistworld.cli", "pipeline", f"data.root={tmp_path / 'data'}",
           f"results_dir={tmp_path / 'results'}", f"post.overrides={_quoted(post)}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_evaluations_side_by_side_equal_one_after_another(tiny_dataset, tmp_path):
    """Stage 5's evaluations in spawned processes (one thread each) write what they write one
    after another in this process: same files, same numbers."""
    from persistworld.evaluation.evaluate import EvalSettings
    from persistworld.pipeline import run_evaluations
    from conftest import tiny_data_cfg
    data = tiny_data_cfg(tiny_dataset)
    s = EvalSettings(num_chunks=2, starts_per_episode=2, num_videos=0)
    tf = EvalSettings(num_chunks=2, mode="teacher_forced", num_videos=0, masked=False)
    for way, n in (("serial", 1), ("parallel", 3)):
        run_evaluations([(m, m, st, tmp_path / way / m / st.mode) for m, st in
                         (("repeat_last", s), ("nothing_moves", s), ("repeat_last", tf))],
                        data, processes=n)
    for m, mode in (("repeat_last", "autoregressive"), ("nothing_moves", "autoregressive"),
                    ("repeat_last", "teacher_forced")):
        a, b = (json.loads((tmp_path / w / m / mode / "summary.json").read_text())
                for w in ("serial", "parallel"))
        assert a["metrics"] == b["metrics"] and a["metrics"], (m, mode)


def test_eval_processes_must_be_a_whole_number(tmp_path):
    cmd = [sys.executable, "-m", "persistworld.cli", "pipeline", f"data.root={tmp_path / 'data'}",
           f"results_dir={tmp_path / 'results'}", "eval_processes=0"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "eval_processes" in out.stderr, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
