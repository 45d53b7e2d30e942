"""Analysis: run directories -> tables, statistics, figures, report (persistworld.analysis).

Fixture run directories are written here in the documented format (docs/FORMATS.md) by
``write_run``; ``sweep`` is a partly failed learning-rate sweep.
"""
from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from persistworld.analysis import collect, figures, report, stats, tables

VIEWS = ("ext1", "ext2", "wrist")
N_SAMPLES, N_CHUNKS, FRAMES_PER_CHUNK = 8, 4, 2
REPO = Path(__file__).resolve().parents[1]


# -- fixture writer --------------------------------------------------------------------------------
def make_frames(quality: float, seed: int) -> pd.DataFrame:
    """frames.parquet content: quality in [0, 1] raises SSIM/PSNR, lowers LPIPS; metrics
    degrade with rollout time; the object mask is absent on some frames (NaN)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(N_SAMPLES):
        sample_q = quality + 0.02 * rng.standard_normal()
        for f in range(N_CHUNKS * FRAMES_PER_CHUNK):
            chunk = f // FRAMES_PER_CHUNK
            for v in VIEWS:
                wrist = v == "wrist"
                base = sample_q - 0.02 * chunk - (0.1 if wrist else 0.0)
                noise = 0.005 * rng.standard_normal(3)
                obj_absent = (s + f) % 5 == 0
                row = {"sample": s, "episode": 100 + s, "start": 3 * s, "frame": f,
                       "chunk": chunk, "view": v, "group": "wrist" if wrist else "external",
                       "ssim": base + noise[0], "psnr": 15 + 10 * base + noise[1],
                       "lpips": 0.6 - 0.5 * base + noise[2]}
                for mask, shift in (("object", 0.03), ("robot", -0.02)):
                    absent = obj_absent and mask == "object"
                    for m in ("ssim", "psnr", "lpips"):
                        row[f"{m}_{mask}"] = math.nan if absent else row[m] + shift
                rows.append(row)
    return pd.DataFrame(rows)


def summary_from_frames(frames: pd.DataFrame) -> dict:
    def group_means(df: pd.DataFrame, suffix: str = "") -> dict:
        return {g: {m: float(np.nanmean(df.loc[df["group"] == g, m + suffix]))
                    for m in ("ssim", "psnr", "lpips")} for g in ("external", "wrist")}
    metrics = group_means(frames)
    metrics["object"] = group_means(frames, "_object")
    metrics["robot"] = group_means(frames, "_robot")
    return {"mode": "autoregressive", "num_chunks": N_CHUNKS,
            "num_samples": int(frames["sample"].nunique()), "metrics": metrics}


def write_run(run_dir: Path, cfg: dict, *, overrides: list[str] | None = None,
              status: str | None = "completed", error: str | None = None,
              quality: float | None = None, eval_name: str = "val14", seed: int = 0,
              train_steps: int = 20) -> Path:
    """A run directory in the documented format. ``status=None``: no status.json;
    ``quality=None``: no eval folder."""
    import yaml
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "overrides.yaml").write_text(json.dumps(overrides or []))
    if status is not None:
        (run_dir / "status.json").write_text(json.dumps(
            {"state": status, "step": train_steps, "updated": "2026-01-01T00:00:00+00:00",
             "error": error, "host": "test"}))
    rng = np.random.default_rng(seed)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(0, train_steps, 2):
            rec = {"step": step, "split": "train", "reward/mean": 0.1 * step / train_steps
                   + 0.01 * rng.standard_normal(), "loss/nft": 1.0 / (1 + step),
                   "loss/kl": 1e-3 * step, "old_deviation": 0.01 * np.sqrt(step),
                   "lr": cfg["train"]["lr"], "note": "text values are skipped"}
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 99, "split": "tr')  # torn last line: ignored
    if quality is not None:
        frames = make_frames(quality, seed)
        ev = run_dir / "eval" / eval_name
        ev.mkdir(parents=True)
        frames.to_parquet(ev / "frames.parquet", index=False)
        (ev / "summary.json").write_text(json.dumps(summary_from_frames(frames)))
    return run_dir


QUALITY = {1e-4: 0.80, 3e-4: 0.70}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """lr in {1e-4, 3e-4} x seed in {0, 1, 2}, partly failed:
    lr=3e-4 seed=2 failed with an error; lr=1e-4 seed=2 completed without an eval summary;
    one more run dir (seed 3) has a config and metrics but no status.json."""
    root = tmp_path_factory.mktemp("sweep")
    for lr in (1e-4, 3e-4):
        for seed in (0, 1, 2):
            name = f"train.lr={lr:g},seed={seed}"
            cfg = {"seed": seed, "run_dir": str(root / name),
                   "train": {"lr": lr, "steps": 20, "milestones": [5, 10]},
                   "model": {"name": "tiny"}}
            ov = [f"train.lr={lr:g}", f"seed={seed}"]
            if lr == 3e-4 and seed == 2:
                write_run(root / name, cfg, overrides=ov, status="failed",
                          error="RuntimeError: loss is NaN", seed=seed)
            elif lr == 1e-4 and seed == 2:
                write_run(root / name, cfg, overrides=ov, seed=seed)
            else:
                write_run(root / name, cfg, overrides=ov, quality=QUALITY[lr] + 0.01 * seed,
                          seed=10 * seed + int(lr * 1e4))
    cfg = {"seed": 3, "run_dir": str(root / "x"), "train": {"lr": 1e-4, "steps": 20,
                                                             "milestones": [5, 10]},
           "model": {"name": "tiny"}}
    write_run(root / "train.lr=0.0001,seed=3", cfg, overrides=["train.lr=0.0001", "seed=3"],
              status=None)
    (root / "not_a_run" / "empty").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def runs(sweep) -> pd.DataFrame:
    return collect.collect_runs(sweep)


# -- collect ---------------------------------------------------------------------------------------
def test_collect_lists_every_run_with_its_problem(runs):
    assert len(runs) == 7  # six sweep runs + the one without status; the empty dir is no run
    by = runs.set_index("run")
    assert by.loc["train.lr=0.0003,seed=2", "status"] == "failed"
    assert by.loc["train.lr=0.0003,seed=2", "error"] == "RuntimeError: loss is NaN"
    assert "failed: RuntimeError: loss is NaN" in by.loc["train.lr=0.0003,seed=2", "problems"]
    assert by.loc["train.lr=0.0001,seed=2", "status"] == "completed"
    assert "no eval summary" in by.loc["train.lr=0.0001,seed=2", "problems"]
    assert by.loc["train.lr=0.0001,seed=3", "status"] == "missing"
    assert "no status.json" in by.loc["train.lr=0.0001,seed=3", "problems"]
    assert int(runs["ok"].sum()) == 4
    bad = collect.problem_runs(runs)
    assert sorted(bad["run"]) == ["train.lr=0.0001,seed=2", "train.lr=0.0001,seed=3",
                                  "train.lr=0.0003,seed=2"]
    # an eval every run should have: its absence is a problem for all
    strict = collect.collect_runs(sweep_dir := Path(runs["run_dir"][0]).parent, evals=["val99"])
    assert not strict["ok"].any()
    assert collect.collect_runs(sweep_dir, expected=[sweep_dir / "never_ran"]).set_index(
        "run").loc[str(sweep_dir / "never_ran"), "status"] == "absent"


def test_collect_columns_and_values(runs, sweep):
    for col in ("cfg.train.lr", "cfg.seed", "cfg.model.name", "val14/external/ssim",
                "val14/wrist/lpips", "val14/object/external/lpips", "val14/robot/wrist/psnr",
                "val14/num_samples", "metrics/train/loss/nft", "metrics/train/old_deviation"):
        assert col in runs, col
    assert runs["cfg.train.milestones"].iloc[0] == "[5, 10]"  # lists as JSON strings
    assert "metrics/train/note" not in runs
    r = runs.set_index("run").loc["train.lr=0.0001,seed=0"]
    frames = pd.read_parquet(Path(r["run_dir"]) / "eval/val14/frames.parquet")
    ext = frames[frames["group"] == "external"]
    assert r["val14/external/ssim"] == pytest.approx(ext["ssim"].mean())
    assert r["val14/object/external/lpips"] == pytest.approx(np.nanmean(ext["lpips_object"]))
    assert r["metrics/train/loss/nft"] == pytest.approx(1 / 19)  # last logged step: 18


def test_infer_factors_uses_overrides_and_skips_paths_and_seed(runs):
    assert collect.infer_factors(runs) == ["cfg.train.lr"]
    no_overrides = runs.drop(columns=["overrides"])
    assert collect.infer_factors(no_overrides) == ["cfg.train.lr"]  # cfg.run_dir skipped
    assert "cfg.seed" in collect.infer_factors(runs, seed_key="cfg.other")


def test_write_table_roundtrip(runs, tmp_path):
    paths = collect.write_table(runs, tmp_path / "runs")
    assert [p.name for p in paths] == ["runs.parquet", "runs.csv"]
    back = pd.read_parquet(paths[0])
    assert len(back) == len(runs) and list(back.columns) == list(runs.columns)
    assert pd.read_csv(paths[1])["status"].tolist() == runs["status"].tolist()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_frames_table_and_per_sample_scores(runs):
    frames = collect.collect_frames(runs)
    assert set(frames["run"]) == set(runs.loc[runs["ok"], "run"])
    assert len(frames) == 4 * N_SAMPLES * N_CHUNKS * FRAMES_PER_CHUNK * len(VIEWS)
    scores = collect.sample_scores(frames, group="external", metric="ssim")
    assert scores.shape == (N_SAMPLES, 4)
    run = "train.lr=0.0001,seed=0"
    assert scores[run].mean() == pytest.approx(
        runs.set_index("run").loc[run, "val14/external/ssim"])
    steps = collect.step_scores(frames, group="wrist", metric="lpips", mask="object",
                                x="chunk")
    assert set(steps["chunk"]) == set(range(N_CHUNKS))


# -- tables ----------------------------------------------------------------------------------------
def test_ablation_table_from_runs(runs):
    tab = tables.ablation_table(runs, ["cfg.train.lr"], "val14")
    assert tab.rows == ["0.0001", "0.0003"]
    assert tab.n.tolist() == [[2] * 6, [2] * 6]  # failed / summary-less runs do not count
    ok = runs[runs["ok"]]
    ext_ssim = ok.loc[ok["cfg.train.lr"] == 1e-4, "val14/external/ssim"]
    assert tab.mean[0, 0] == pytest.approx(ext_ssim.mean())
    assert tab.std[0, 0] == pytest.approx(ext_ssim.std(ddof=1))
    marks = tab.marks()
    assert (marks[0] == "best").all() and (marks[1] == "second").all()  # lr 1e-4 is better
    md, tex = tab.to_markdown(), tab.to_latex()
    assert "±" in md and "**" in md and "<u>" in md and "| n |" in md.replace(" n ", " n ")
    assert r"\toprule" in tex and r"\cmidrule(lr){3-5}" in tex and r"\textbf{" in tex
    assert r"\underline{" in tex and r"$\pm$" in tex
    frame = tab.to_frame()
    assert set(frame["mark"]) == {"best", "second"} and len(frame) == 12
    masked = tables.masked_table(runs, ["cfg.train.lr"], "val14")
    assert masked.blocks == ["external", "external", "wrist", "wrist"]
    assert masked.marks()[0, 0] == "best" and masked.marks()[2, 0] == "best"


def test_table_note_and_sample_size_line():
    assert tables.sample_size_note([3, 3], [20, 20], ["test", "test"]) == \
        "n = 3 seeds × 20 episodes (test split)"
    assert tables.sample_size_note([2, 3], [18, 20], ["val", None], extra="x") == \
        "n = 2–3 seeds × 18–20 episodes (val split, not recorded for some runs); x"
    assert tables.sample_size_note([1], [1], [], unit="samples") == \
        "n = 1 seed × 1 sample (split not recorded)"
    assert "differ between runs" in tables.split_text(["val", "test"])
    tab = tables.table_from_values(["a", "b"], [[0.8, 20, 0.2, 0.7, 19, 0.3],
                                                [0.7, 19, 0.3, 0.6, 18, 0.4]],
                                   note="n = 3 seeds × 20 episodes (val split)")
    md, tex, html = tab.to_markdown(), tab.to_latex(), tab.to_html()
    assert md.rstrip().endswith("n = 3 seeds × 20 episodes (val split)")
    assert r"{\footnotesize n = 3 seeds $\times$ 20 episodes (val split)}" in tex
    assert tex.index("footnotesize") > tex.index(r"\end{tabular}")
    assert html.rstrip().endswith('<p class="note">n = 3 seeds × 20 episodes (val split)</p>')
    assert "n = 3" not in tables.table_from_values(["a"], [[0.8, 20, 0.2, 0.7, 19, 0.3]]) \
        .to_markdown()


PAPER6 = (["Group size 4", "Group size 8", "K=16, no best-of-N", "K=16, best of 5 (ours)",
           "K=16, best of 2"],
          [[0.875, 25.62, 0.1142, 0.724, 20.56, 0.3379],
           [0.873, 25.61, 0.1176, 0.721, 20.45, 0.3471],
           [0.874, 25.69, 0.1127, 0.725, 20.64, 0.3255],
           [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387],
           [0.876, 25.79, 0.1107, 0.727, 20.69, 0.3212]])


def _marked(tab: tables.Table, col: int, mark: str) -> list[str]:
    return [r for r, m in zip(tab.rows, tab.marks()[:, col]) if m == mark]


def test_paper_table6_marks():
    tab = tables.table_from_values(*PAPER6)
    assert _marked(tab, 0, "best") == ["K=16, best of 2"]          # ext SSIM 0.876
    assert _marked(tab, 0, "second") == ["Group size 4"]           # 0.875
    assert _marked(tab, 2, "best") == ["K=16, best of 2"]          # ext LPIPS 0.1107 (lower)
    assert _marked(tab, 2, "second") == ["K=16, no best-of-N"]     # 0.1127
    for col in (1, 3, 4, 5):
        assert _marked(tab, col, "best") == ["K=16, best of 2"]
        assert _marked(tab, col, "second") == ["K=16, no best-of-N"]
    md = tab.to_markdown()
    assert "**0.876**" in md and "<u>0.875</u>" in md and "**0.1107**" in md
    assert "<u>0.1127</u>" in md and "0.1176" in md and "**0.1176**" not in md


def test_paper_tables_3_and_4_marks():
    t3 = tables.table_from_values(["3e-4", "1e-4 (ours)"],
                                  [[0.865, 25.02, 0.1230, 0.706, 19.95, 0.3603],
                                   [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387]])
    assert (t3.marks()[1] == "best").all() and (t3.marks()[0] == "second").all()
    t4 = tables.table_from_values(["LPIPS only", "SSIM only", "PSNR only", "Combined (ours)"],
                                  [[0.868, 25.17, 0.1156, 0.708, 19.90, 0.3242],
                                   [0.872, 25.40, 0.1178, 0.724, 20.24, 0.3516],
                                   [0.871, 25.57, 0.1189, 0.716, 20.45, 0.3544],
                                   [0.872, 25.52, 0.1162, 0.721, 20.40, 0.3387]])
    # tie: 0.872 twice bold, next distinct value 0.871 underlined (as in the paper)
    assert _marked(t4, 0, "best") == ["SSIM only", "Combined (ours)"]
    assert _marked(t4, 0, "second") == ["PSNR only"]
    assert _marked(t4, 2, "best") == ["LPIPS only"] and _marked(t4, 2, "second") == \
        ["Combined (ours)"]
    assert _marked(t4, 5, "best") == ["LPIPS only"] and _marked(t4, 5, "second") == \
        ["Combined (ours)"]
    assert _marked(t4, 4, "best") == ["PSNR only"] and _marked(t4, 4, "second") == \
        ["Combined (ours)"]
    # all equal: every entry bold, none underlined (Table 7 ext SSIM)
    t7 = tables.table_from_values(["3", "1 (ours)"], [[0.872, 25.41, 0.1169, 0.719, 20.31,
                                                       0.3424],
                                                      [0.872, 25.52, 0.1162, 0.721, 20.40,
                                                       0.3387]])
    assert list(t7.marks()[:, 0]) == ["best", "best"]


def test_paper_table1_blocks_mark_within_camera():
    tab = tables.table_from_values(
        ["WPE", "IRASim", "Ctrl-World (reported)", "Ctrl-World (reproduced)", "PersistWorld",
         "Ctrl-World (reproduced)", "PersistWorld"],
        [[0.77, 20.33, 0.131], [0.77, 21.36, 0.117], [0.83, 23.56, 0.091],
         [0.84, 23.02, 0.081], [0.86, 24.42, 0.070], [0.62, 17.80, 0.310],
         [0.67, 19.39, 0.277]], layout="cameras", blocks=["external"] * 5 + ["wrist"] * 2)
    m = tab.marks()
    assert m[4].tolist() == ["best"] * 3 and m[6].tolist() == ["best"] * 3
    assert m[3].tolist() == ["second", "", "second"] and m[2, 1] == "second"
    assert m[5].tolist() == ["second"] * 3
    assert r"\midrule" in tab.to_latex()


def test_paper_tables_script(tmp_path):
    sys_argv = sys.argv
    try:
        sys.argv = ["paper_tables.py", "--out", str(tmp_path)]
        runpy.run_path(str(REPO / "analysis" / "paper_tables.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        sys.argv = sys_argv
    t6 = (tmp_path / "table6.md").read_text()
    assert "**0.876**" in t6 and "<u>0.875</u>" in t6
    assert (tmp_path / "table6.tex").exists() and (tmp_path / "table2.csv").exists()


# -- statistics ------------------------------------------------------------------------------------
def test_bootstrap_is_seeded_and_matches_scipy():
    x = np.random.default_rng(0).normal(1.0, 2.0, size=40)
    a = stats.bootstrap_ci(x, np.random.default_rng(7), n_resamples=2000)
    b = stats.bootstrap_ci(x, np.random.default_rng(7), n_resamples=2000)
    c = stats.bootstrap_ci(x, np.random.default_rng(8), n_resamples=2000)
    assert a == b and a != c
    ref = sps.bootstrap((x,), np.mean, n_resamples=2000, method="percentile",
                        rng=np.random.default_rng(7)).confidence_interval
    assert (a.low, a.high) == pytest.approx((ref.low, ref.high))
    assert a.low < x.mean() < a.high and a.estimate == pytest.approx(x.mean()) and a.n == 40
    assert math.isnan(stats.bootstrap_ci([1.0], np.random.default_rng(0)).low)
    assert stats.bootstrap_ci([2.0, 2.0, np.nan], np.random.default_rng(0)).high == 2.0
    with pytest.raises(TypeError):
        stats.bootstrap_ci(x, 0)


def test_paired_comparison_against_scipy():
    base = np.array([0.30, 0.32, 0.28, 0.35, 0.31, 0.29, 0.33, 0.30, 0.34, 0.36])
    delta = np.array([-0.02, -0.03, -0.01, -0.04, 0.01, -0.02, 0.0, -0.05, -0.03, -0.06])
    model = base + delta
    res = stats.paired_comparison(model, base, higher_is_better=False,
                                  rng=np.random.default_rng(0), n_resamples=2000)
    assert (res.n, res.wins, res.losses, res.ties) == (10, 8, 1, 1)
    assert res.win_rate == pytest.approx(0.8)
    assert res.mean_delta == pytest.approx(delta.mean())
    assert res.sign_p == pytest.approx(sps.binomtest(8, 9, 0.5).pvalue)   # = 20/512
    assert res.sign_p == pytest.approx(20 / 512)
    assert res.wilcoxon_p == pytest.approx(sps.wilcoxon(model - base).pvalue)
    assert res.ci_low < res.mean_delta < res.ci_high < 0
    flipped = stats.paired_comparison(-model, -base, higher_is_better=True,
                                      rng=np.random.default_rng(0), n_resamples=2000)
    assert (flipped.wins, flipped.losses) == (8, 1)
    # Series are aligned on their index; NaN pairs dropped
    s_m = pd.Series([1.0, 2.0, np.nan, 4.0], index=[3, 2, 1, 0])
    s_b = pd.Series([0.0, 1.0, 1.0, 5.0], index=[0, 1, 2, 3])
    r2 = stats.paired_comparison(s_m, s_b, higher_is_better=True, rng=np.random.default_rng(0))
    assert (r2.n, r2.wins, r2.losses) == (3, 2, 1)  # index 0: 4-0, 2: 2-1, 3: 1-5
    assert sorted(r2.delta.tolist()) == [-4.0, 1.0, 4.0]


def test_elo_two_games_by_hand():
    res = stats.elo_ratings([("A", "B"), ("B", "A")])
    # game 1: E_A = 0.5 -> A 816, B 784
    assert res.history.loc[0, "rating_winner"] == pytest.approx(816.0)
    assert res.history.loc[0, "rating_loser"] == pytest.approx(784.0)
    # game 2: E_B = 1 / (1 + 10^(32/400)) = 0.4540..., B gains 32 (1 - E_B) = 17.4695
    e_b = 1 / (1 + 10 ** (32 / 400))
    assert e_b == pytest.approx(0.454078, abs=1e-6)
    assert res.ratings["B"] == pytest.approx(784 + 32 * (1 - e_b))
    assert res.ratings["B"] == pytest.approx(801.4695, abs=1e-4)
    assert res.ratings["A"] == pytest.approx(798.5305, abs=1e-4)
    assert stats.expected_score(1200, 800) == pytest.approx(1 / (1 + 10 ** -1))  # ~91%


def test_preference_study_paper_numbers():
    p = stats.preference_test(174, 43, alternative="greater")
    assert p["p_value"] == pytest.approx(3.5e-20, rel=0.01)   # the paper's p
    assert p["rate"] == pytest.approx(0.8018, abs=1e-4)
    assert p["ci_high"] == 1.0 and 0.74 < p["ci_low"] < 0.76
    two = stats.preference_test(174, 43)
    assert two["p_value"] == pytest.approx(sps.binomtest(174, 217).pvalue)
    votes = pd.DataFrame({"winner": ["ours"] * 174 + ["base"] * 43,
                          "loser": ["base"] * 174 + ["ours"] * 43})
    votes = votes.sample(frac=1.0, random_state=0).reset_index(drop=True)
    votes["rater"] = np.arange(len(votes)) % 8
    votes["item"] = np.arange(len(votes)) // 4
    out = stats.preference_study(votes, np.random.default_rng(0), n_resamples=200)
    assert out["wins"] == {"base": 43, "ours": 174}
    elo = out["elo"].set_index("player")
    assert elo.loc["ours", "elo"] + elo.loc["base", "elo"] == pytest.approx(1600)
    assert elo.loc["ours", "elo"] > 800 > elo.loc["base", "elo"]
    assert elo.loc["ours", "low"] < elo.loc["ours", "high"]
    assert -1 <= out["fleiss_kappa"] <= 1


def test_fleiss_kappa_reference_values():
    wiki = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
                     [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
                     [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert stats.fleiss_kappa(wiki) == pytest.approx(0.210, abs=1e-3)  # Fleiss (1971) example
    # varying raters per item, by hand: P = (1 + 0) / 2, p = (3/4, 1/4), Pe = 5/8
    assert stats.fleiss_kappa([[2, 0], [1, 1], [1, 0]]) == pytest.approx(-1 / 3)
    assert stats.fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)


def test_mmrv_and_pearson(tmp_path):
    # pair (0, 1) is ordered wrongly by the world model, real gap 0.3: policies 0 and 1 each
    # have max violation 0.3, policy 2 none -> MMRV = 0.6 / 3
    assert stats.mmrv([0.9, 0.5, 0.4], [0.3, 0.6, 0.2]) == pytest.approx(0.2)
    assert stats.mmrv([0.1, 0.5, 0.9], [0.2, 0.3, 0.4]) == 0.0
    assert stats.mmrv([0.5, 0.5], [0.2, 0.6]) == pytest.approx(0.2)  # tie in WM: violation
    wm, real = [0.9, 0.5, 0.4, 0.7], [0.3, 0.6, 0.2, 0.5]
    agree = stats.policy_agreement(wm, real)
    assert agree["pearson_r"] == pytest.approx(sps.pearsonr(wm, real).statistic)
    long = pd.DataFrame({"policy": list("abcd") * 2, "task": "t1",
                         "source": ["ours"] * 4 + ["real"] * 4, "progress": wm + real})
    path = tmp_path / "policy.csv"
    long.to_csv(path, index=False)
    tab = stats.policy_agreement_table(path)
    assert tab.loc[0, "mmrv"] == pytest.approx(stats.mmrv(wm, real))
    wide = pd.DataFrame({"policy": list("abcdabcd"), "task": ["t1"] * 4 + ["t2"] * 4,
                         "real": real + real[::-1], "ours": wm + wm[::-1],
                         "base": real[::-1] * 2})
    tab2 = stats.policy_agreement_table(wide)
    assert set(tab2["task"]) == {"t1", "t2", "all"} and set(tab2["source"]) == {"ours", "base"}
    assert tab2.set_index(["source", "task"]).loc[("ours", "all"), "n_policies"] == 8


def test_step_curves_and_figures(runs, sweep, tmp_path):
    frames = collect.collect_frames(runs)
    done = runs[runs["ok"]]
    frames["condition"] = frames["run"].map(dict(zip(done["run"], collect.condition_labels(
        done, ["cfg.train.lr"]))))
    curves = stats.step_curves(frames, np.random.default_rng(0), by="condition",
                               n_resamples=500)
    sub = curves[(curves["group"] == "external") & (curves["metric"] == "ssim")]
    assert len(sub) == 2 * N_CHUNKS and (sub["ci_low"] <= sub["mean"]).all()
    assert (sub["mean"] <= sub["ci_high"]).all() and (sub["n"] == N_SAMPLES).all()
    again = stats.step_curves(frames, np.random.default_rng(0), by="condition",
                              n_resamples=500)
    pd.testing.assert_frame_equal(curves, again)
    masked = stats.step_curves(frames, np.random.default_rng(0), by="condition", mask="object",
                               metrics=("lpips",), n_resamples=200)
    assert (masked["n"] == N_SAMPLES).all() and masked[["ci_low", "ci_high"]].notna().all().all()

    fig, ax = figures.plot_metric_vs_time(curves, hue="condition")
    assert ax.shape == (2, 3)
    paths = figures.save_figure(fig, tmp_path / "vs_time")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    _, results = stats.paired_table(frames, "0.0001", "0.0003", np.random.default_rng(0),
                                    by="condition", n_resamples=500)
    assert results["external/lpips"].win_rate == 1.0  # lr 1e-4 is better on every sample
    fig, ax = figures.plot_paired_deltas(results)
    figures.save_figure(fig, tmp_path / "paired", formats=("png",))
    metrics = collect.read_metrics(runs)
    assert figures.select_training_keys(metrics) == ["reward/mean", "loss/nft", "loss/kl",
                                                     "old_deviation", "lr"]
    fig, ax = figures.plot_training_curves(metrics, smooth=3)
    figures.save_figure(fig, tmp_path / "train", formats=("png",))
    fig, ax = figures.plot_factor_vs_metric(runs, "cfg.train.lr",
                                            ["val14/external/ssim", "val14/wrist/lpips"])
    figures.save_figure(fig, tmp_path / "factor", formats=("png",))
    assert len(list(tmp_path.glob("*.png"))) == 4


# -- report ----------------------------------------------------------------------------------------
def test_report_end_to_end(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    votes = pd.DataFrame({"winner": ["ours"] * 9 + ["base"] * 3,
                          "loser": ["base"] * 9 + ["ours"] * 3,
                          "rater": list(range(4)) * 3, "item": [0, 0, 1, 1, 2, 2] * 2})
    votes.to_csv(tmp_path / "votes.csv", index=False)
    pd.DataFrame({"policy": list("abc"), "real": [0.2, 0.5, 0.7],
                  "ours": [0.3, 0.6, 0.9]}).to_csv(tmp_path / "policy.csv", index=False)
    assert report.main([str(sweep), "--out", str(out), "--n-resamples", "500",
                        "--votes-csv", str(tmp_path / "votes.csv"), "--one-sided",
                        "--policy-csv", str(tmp_path / "policy.csv")]) == 0
    md = (out / "report.md").read_text()
    assert "train.lr=0.0003,seed=2" in md and "RuntimeError: loss is NaN" in md
    assert "no status.json" in md and "no eval summary" in md
    assert "`cfg.train.lr`" in md and "**" in md
    assert "Fleiss' kappa" in md and "(greater): p = 0.073" in md  # binomtest(9, 12) one-sided
    agree = pd.read_csv(out / "tables/policy_agreement.csv")
    assert agree.loc[0, "mmrv"] == 0 and agree.loc[0, "pearson_r"] > 0.9
    html = (out / "report.html").read_text()
    assert "<img src=\"figures/val14_vs_time.png\"" in html and "<b>" in html
    for name in ("runs.parquet", "runs.csv", "problems.csv", "tables/val14_table.tex",
                 "tables/val14_table.md", "tables/val14_masked.csv",
                 "tables/val14_conditions.csv", "tables/val14_paired.csv",
                 "tables/val14_curves.csv", "figures/val14_vs_time.pdf",
                 "figures/val14_factor_cfg.train.lr.png", "figures/training_curves.png",
                 "figures/val14_paired_0.0003.png"):
        assert (out / name).exists(), name
    masked = pd.read_csv(out / "tables/val14_curves_masked.csv")  # Table 2's regions per step
    assert set(masked["mask"]) == {"object", "robot"} and masked["mean"].notna().all()
    paired = pd.read_csv(out / "tables/val14_paired.csv")
    assert set(paired["model"]) == {0.0003} and (paired["win_rate"] == 0).all()
    # with the seeds kept: seeds 0 and 1 of lr 3e-4 against seeds 0 and 1 of lr 1e-4, worse on
    # every metric, so the one-sided "better" p is ~1 and stays so after Holm
    assert (paired["n_seeds"] == 2).all() and (paired["episodes_per_seed"] == 8).all()
    assert (paired["combined_p"] > 0.99).all() and (paired["holm_p"] >= paired["combined_p"]).all()
    assert (paired["hier_ci_low"] <= paired["mean_delta_seeds"]).all()
    lp = paired[paired["metric"] == "lpips"]
    assert (lp["hier_ci_low"] > 0).all()                  # LPIPS higher = worse, CI above 0
    seeds = pd.read_csv(out / "tables/val14_paired_seeds.csv")
    assert len(seeds) == 12 and set(seeds["seed"]) == {0, 1}
    assert (seeds["baseline_run"].str.startswith("train.lr=0.0001,seed=")).all()
    # the sample sizes under every table (split: the fixture's runs record none)
    n_line = "n = 2 seeds × 8 episodes (split not recorded)"
    assert md.count(n_line) == 2                          # ablation and masked tables
    assert n_line in (out / "tables/val14_table.md").read_text()
    assert n_line in (out / "tables/val14_masked.md").read_text()
    assert "n = 2 seeds × 8 episodes per comparison (split not recorded)." in md
    assert "| model | group | metric | seed 0 | seed 1 |" in md   # the per-seed table
    assert len(pd.read_parquet(out / "runs.parquet")) == 7
    # default output folder and baseline choice; unknown baseline is refused
    with pytest.raises(ValueError, match="--baseline '0.5' is not a condition"):
        report.render_report(sweep, out_dir=tmp_path / "r2", baseline="0.5")
    assert not (tmp_path / "r2").exists()              # refused before anything is written
    from persistworld import cli                       # the CLI: one line, exit status 2
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(sweep), "--out", str(tmp_path / "r3"), "--factor", "cfg.nope"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--factor cfg.nope" in err


def test_eval_split_from_summary_then_config(tmp_path):
    """The split of an evaluation: its summary.json's settings block first, else the run's
    config (the split its own final evaluation used), else unknown."""
    base_cfg = {"train": {"lr": 1e-4, "steps": 20}, "model": {"name": "tiny"}}
    a = write_run(tmp_path / "a", {**base_cfg, "seed": 0, "eval": {"split": "val"}},
                  quality=0.8)
    b = write_run(tmp_path / "b", {**base_cfg, "seed": 1, "eval": {"split": "val"}},
                  quality=0.8)
    summary = json.loads((b / "eval/val14/summary.json").read_text())
    (b / "eval/val14/summary.json").write_text(json.dumps({**summary,
                                                           "settings": {"split": "test"}}))
    write_run(tmp_path / "c", {**base_cfg, "seed": 2}, quality=0.8)
    runs = collect.collect_runs(tmp_path)
    splits = report.eval_splits(runs, "val14").set_index("run")
    assert splits.loc["a", "split"] == "val" and "config" in splits.loc["a", "source"]
    assert (splits.loc["b", "split"], splits.loc["b", "source"]) == ("test", "summary.json")
    assert pd.isna(splits.loc["c", "split"])
    runs["val14/split"] = ["train", None, None]            # a collected column comes first
    assert report.eval_splits(runs, "val14").set_index("run").loc["a", "split"] == "train"
    assert a.exists()


def test_report_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0
    assert "SWEEP_DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main(["a", "b"])  # several sweeps need --out


def test_report_shows_the_trivial_baselines_as_standing_rows(tmp_path):
    """Each run's evaluation scored the trivial baselines on its samples: every table, curve
    and paired comparison of the report carries them, after the model conditions."""
    root = tmp_path / "sweep"
    for lr, q in QUALITY.items():
        cfg = {"seed": 0, "run_dir": str(root / f"lr={lr:g}"), "train": {"lr": lr, "steps": 20},
               "model": {"name": "tiny"}}
        rd = write_run(root / f"lr={lr:g}", cfg, overrides=[f"train.lr={lr:g}"], quality=q)
        for name, bq in (("nothing_moves", 0.75), ("repeat_last", 0.9)):
            d = rd / "eval" / "val14" / "baselines" / name
            d.mkdir(parents=True)
            frames = make_frames(bq, seed=7)
            frames.to_parquet(d / "frames.parquet", index=False)
            (d / "summary.json").write_text(json.dumps(summary_from_frames(frames)))
    runs = collect.collect_runs(root)
    extra, frames = collect.baseline_runs(runs)
    assert list(extra["run"]) == ["baseline/nothing_moves", "baseline/repeat_last"]
    assert set(frames["run"]) == set(extra["run"]) and set(frames["eval"]) == {"val14"}
    both = pd.concat([runs, extra], ignore_index=True)
    assert collect.condition_order(both, ["cfg.train.lr"]) == [
        "0.0001", "0.0003", "nothing moves (start frame)", "repeat last frame"]
    out = tmp_path / "report"
    report.render_report(root, factors=["cfg.train.lr"], out_dir=out, n_resamples=200,
                         curve_resamples=100)
    table = (out / "tables" / "val14_table.md").read_text()
    assert table.index("0.0003") < table.index("nothing moves (start frame)") < \
        table.index("repeat last frame")
    curves = pd.read_csv(out / "tables" / "val14_curves.csv")
    assert {"nothing moves (start frame)", "repeat last frame"} <= set(curves["condition"])
    paired = pd.read_csv(out / "tables" / "val14_paired.csv")
    assert "repeat last frame" in set(paired["model"].astype(str))
