"""The main job on the embedded default (the README's first command).

    [1/6] data      render the mini-DROID dataset (pybullet)             data.root
    [2/6] preview   a contact sheet of one episode                       results/.../data_preview.png
    [3/6] base      the base world model: the checkpoint kept in the repo (models/), or trained
    [4/6] post      PersistWorld RL post-training of the base            runs/post/quickstart
    [5/6] evaluate  base and post-trained, the same held-out rollouts    results/.../models/*/eval
                    (and the base teacher-forced), side by side in `eval_processes` processes
    [6/6] results   Table 1 / Table 2, temporal curves, paired deltas, training curves
                    (results/quickstart/report/), side-by-side videos (truth | base |
                    PersistWorld, results/quickstart/videos/), and the drift figure: both
                    models autoregressive next to the base teacher-forced

Every stage is resumable: rerunning the command skips what is finished (the dataset, a
completed training run, an evaluation whose summary.json exists) and continues the rest.
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from persistworld.errors import UserError

MODELS = ("base", "persistworld")


def _compose(name: str, overrides: list[str]) -> DictConfig:
    """Compose another command's config (inside this Hydra app or outside one)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=overrides)
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        return compose(name, overrides=overrides)


def _data_overrides(cfg: DictConfig) -> list[str]:
    return [f"data.{k}={v}" if not isinstance(v, list) else f"data.{k}=[{','.join(map(str, v))}]"
            for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()]


def check_settings(cfg: DictConfig) -> None:
    """Every stage's settings, before any work: the post-training and evaluation settings
    (and the base-training overrides) fail here with one message naming the setting."""
    from persistworld.evaluation.run import settings_from
    from persistworld.trainers.post_train import validate
    settings_from(cfg.eval)
    if not isinstance(cfg.eval_processes, int) or cfg.eval_processes < 1:
        raise UserError(f"eval_processes={cfg.eval_processes}: give a whole number >= 1 "
                        "(1 = evaluations one after another)")
    validate(_compose("post_train", [*_data_overrides(cfg), f"run_dir={cfg.post.run_dir}",
                                     *cfg.post.overrides]))
    if not cfg.base.checkpoint:
        _compose("train_base", [*_data_overrides(cfg), f"run_dir={cfg.base.run_dir}",
                                *cfg.base.overrides])


def stage_base(cfg: DictConfig) -> Path:
    """The shipped checkpoint when it was made for this dataset, else train one."""
    from persistworld.trainers.base import train_base
    b = cfg.base
    shipped = Path(b.checkpoint) if b.checkpoint else None
    if shipped is not None and shipped.exists():
        import torch
        blob = torch.load(shipped, map_location="cpu", weights_only=False)
        made_for = blob.get("data", {})
        mine = OmegaConf.to_container(cfg.data, resolve=True)
        keys = ("seed", "num_episodes", "val_fraction", "min_steps", "max_steps", "fps",
                "image_height", "image_width", "tasks", "history", "future", "stride")
        diff = [k for k in keys if made_for.get(k) != mine.get(k)]
        if not diff:
            print(f"      using the base checkpoint kept in the repo: {shipped} "
                  f"(regenerate: {blob.get('command', 'see models/README.md')})")
            return shipped
        print(f"      {shipped} was made for other data settings ({', '.join(diff)}): "
              f"training a base model instead")
    overrides = [*_data_overrides(cfg), f"run_dir={b.run_dir}", *b.overrides]
    return train_base(_compose("train_base", overrides))


def stage_post(cfg: DictConfig, base: Path) -> Path:
    from persistworld.trainers.post_train import post_train
    overrides = [*_data_overrides(cfg), f"base_model={base}", f"run_dir={cfg.post.run_dir}",
                 "eval.enabled=false", *cfg.post.overrides]
    return post_train(_compose("post_train", overrides), overrides=list(cfg.post.overrides))


def _evaluate_job(job: tuple) -> str:
    """One evaluation in a spawned worker, with its own torch thread count."""
    import torch

    from persistworld.evaluation.run import evaluate_model
    model, data, settings, out, threads = job
    torch.set_num_threads(threads)
    evaluate_model(model, data, settings, out)
    return out


def run_evaluations(jobs: list[tuple[str, str, object, Path]], data, processes: int) -> None:
    """`jobs`: (what, model, settings, out_dir) still to evaluate. With processes > 1 they run
    side by side, the machine's torch threads shared out among them (on 2 cores one thread
    each: a small model keeps one core busier than two threads keep two); each writes its own
    directory, summary.json last, so an interrupted one is redone on the next run."""
    import torch

    from persistworld.evaluation.run import evaluate_model
    n = min(int(processes), len(jobs))
    if n <= 1:
        for what, model, settings, out in jobs:
            print(f"      {what}")
            evaluate_model(model, data, settings, out)
        return
    threads = max(1, torch.get_num_threads() // n)
    print(f"      side by side, {n} processes x {threads} thread(s): "
          + "; ".join(what for what, *_ in jobs))
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_evaluate_job, [(model, data, settings, str(out), threads)
                                      for _, model, settings, out in jobs]))


def teacher_forced_settings(cfg: DictConfig):
    """The drift figure's reference: the evaluation settings with ground truth fed back."""
    from persistworld.evaluation.run import settings_from
    return settings_from({**OmegaConf.to_container(cfg.eval, resolve=True),
                          "mode": "teacher_forced", "num_videos": 0, "masked": False})


def stage_evaluate(cfg: DictConfig, models: dict[str, Path], results: Path) -> dict[str, Path]:
    """Each model as a small run directory under results/models/<name> (config + status +
    eval/<mode>_<N>), so `analysis` compares them like any sweep. The base's teacher-forced
    evaluation (the drift figure's) runs here too, beside the others."""
    from persistworld.evaluation.run import settings_from
    from persistworld.utils.io import atomic_write_json, atomic_write_text, sha256_file
    s = settings_from(cfg.eval)
    tf = teacher_forced_settings(cfg)
    eval_name = f"{s.mode}_{s.num_chunks}"
    dirs, jobs, digests = {}, [], {}
    for name, path in models.items():
        run = results / "models" / name
        digests[name] = digest = sha256_file(Path(path))
        recorded = yaml.safe_load((run / "config.yaml").read_text()) \
            if (run / "config.yaml").exists() else {}
        if recorded and recorded.get("sha256") != digest:
            print(f"      {name}: the model changed since {run} was evaluated; evaluating again")
            shutil.rmtree(run)
        todo = [(f"{name}: {s.num_chunks}-chunk rollouts on held-out episodes", s, eval_name)]
        if name == "base":
            todo.append((f"base, teacher-forced: {tf.num_chunks} chunks with ground-truth "
                         "history", tf, f"teacher_forced_{tf.num_chunks}"))
        jobs += [(what, str(path), st, run / "eval" / sub) for what, st, sub in todo
                 if not (run / "eval" / sub / "summary.json").exists()]
        dirs[name] = run
    run_evaluations(jobs, cfg.data, int(cfg.eval_processes))
    for name, path in models.items():
        run, digest = dirs[name], digests[name]
        atomic_write_text(run / "config.yaml", yaml.safe_dump(
            {"model": name, "seed": int(cfg.seed), "source": str(path), "sha256": digest}))
        atomic_write_json(run / "status.json", {"state": "completed", "step": 0})
        dirs[name] = run
    return dirs


def stage_drift_figure(cfg: DictConfig, dirs: dict[str, Path], out: Path) -> Path:
    """The base model teacher-forced (ground truth fed back after every chunk) next to the
    autoregressive rollouts of both models: the gap is the compounding (exposure-bias) error
    PersistWorld targets (issue: "show the curve next to the teacher-forced one")."""
    import pandas as pd

    from persistworld.analysis import figures as F
    from persistworld.analysis.stats import step_curves
    s = teacher_forced_settings(cfg)
    tf_dir = dirs["base"] / "eval" / f"teacher_forced_{s.num_chunks}"
    if not (tf_dir / "summary.json").exists():      # evaluated in stage_evaluate
        from persistworld.errors import MissingFile
        raise MissingFile(f"{tf_dir / 'summary.json'} is missing: rerun `persistworld pipeline` "
                          "(stage 5 evaluates it)")
    ar = f"{cfg.eval.mode}_{cfg.eval.num_chunks}"
    parts = [pd.read_parquet(tf_dir / "frames.parquet").assign(run="base, teacher-forced")]
    for name in MODELS:
        parts.append(pd.read_parquet(dirs[name] / "eval" / ar / "frames.parquet")
                     .assign(run=f"{name}, autoregressive"))
    # the trivial baselines on the same samples (scored by each evaluation)
    for path, label in ((dirs["base"] / "eval" / ar / "baselines" / "nothing_moves",
                         "nothing moves (start frame)"),
                        (tf_dir / "baselines" / "repeat_last",
                         "repeat last frame (ground-truth history)")):
        if (path / "frames.parquet").exists():
            parts.append(pd.read_parquet(path / "frames.parquet").assign(run=label))
    curves = step_curves(pd.concat(parts, ignore_index=True), np.random.default_rng(0),
                         by="run", n_resamples=int(cfg.report.n_resamples))
    fig, _ = F.plot_metric_vs_time(curves, hue="run", title="drift: autoregressive vs "
                                   "teacher-forced (band: 95% bootstrap over samples)")
    return F.save_figure(fig, out / "drift_vs_teacher_forced")[0]


def side_by_side_videos(dirs: dict[str, Path], eval_name: str, out: Path) -> list[Path]:
    """truth | base | PersistWorld for the samples both evaluations kept frames of, as GIFs,
    and for each also a still picture of the first, middle and last frame (``*_frames.png``:
    where a reader sees whether the robot and the object survive the rollout)."""
    from persistworld.evaluation.videos import frames_picture, side_by_side, write_gif, write_png
    first = dirs[MODELS[0]] / "eval" / eval_name / "videos"
    written = []
    for npz in sorted(first.glob("*.npz")):
        rows = {"truth": np.load(npz)["truth"]}
        for name in MODELS:
            other = dirs[name] / "eval" / eval_name / "videos" / npz.name
            if not other.exists():
                break
            rows[name] = np.load(other)["pred"]
        else:
            written.append(write_gif(out / npz.name.replace(".npz", ".gif"), side_by_side(rows)))
            T = len(rows["truth"])
            write_png(out / npz.name.replace(".npz", "_frames.png"),
                      frames_picture(rows, [0, T // 2, T - 1]))
    return written


def comparison_text(summaries: dict[str, dict], paired_csv: Path | None) -> str:
    """A few lines with the relative changes (and paired tests) for the terminal."""
    lines = []
    b, p = summaries["base"]["metrics"], summaries["persistworld"]["metrics"]
    still = summaries["base"].get("baselines", {}).get("nothing_moves")
    for group in ("external", "wrist"):
        parts = []
        for m in ("ssim", "psnr", "lpips"):
            rel = 100 * (p[group][m] - b[group][m]) / abs(b[group][m])
            parts.append(f"{m.upper()} {b[group][m]:.4f} -> {p[group][m]:.4f} ({rel:+.1f}%)")
        lines.append(f"  {group:8s}: " + ", ".join(parts))
        if still:
            lines.append(f"  {'':8s}  nothing moves (start frame): " + ", ".join(
                f"{m.upper()} {still[group][m]:.4f}" for m in ("ssim", "psnr", "lpips")))
    if paired_csv is not None and paired_csv.exists():
        import pandas as pd
        df = pd.read_csv(paired_csv)
        if "model" in df:                  # PersistWorld vs base (not the standing rows)
            df = df[df["model"] == "persistworld"]
        for _, r in df.iterrows():
            line = (f"  paired {r['group']:8s} {r['metric']:5s}: win rate "
                    f"{100 * r['win_rate']:.0f}% of {int(r['n'])}, sign p={r['sign_p']:.2g}, "
                    f"Wilcoxon p={r['wilcoxon_p']:.2g}")
            if "holm_p" in r and not pd.isna(r["holm_p"]):
                line += f", one-sided p={r['combined_p']:.2g} (Holm {r['holm_p']:.2g})"
            lines.append(line)
    return "\n".join(lines)


def pipeline_main(cfg: DictConfig) -> Path:
    from persistworld.analysis.report import render_report
    from persistworld.data.preview import write_preview
    from persistworld.data.render import render_dataset

    t0 = time.time()
    check_settings(cfg)
    results = Path(cfg.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    times = {}

    def lap(name: str, since: float) -> float:
        times[name] = round(time.time() - since, 1)
        return time.time()

    t = time.time()
    print(f"[1/6] data: the mini-DROID dataset in {cfg.data.root}")
    root = render_dataset(cfg.data)
    t = lap("data", t)
    print("[2/6] preview: a contact sheet of episode 0")
    write_preview(root, episode=0, num_frames=8, out=results / "data_preview.png")
    t = lap("preview", t)
    print("[3/6] base world model")
    base = stage_base(cfg)
    t = lap("base", t)
    print(f"[4/6] PersistWorld post-training ({cfg.post.run_dir})")
    post = stage_post(cfg, base)
    t = lap("post_train", t)
    print("[5/6] evaluation: base and post-trained on the same held-out rollouts")
    dirs = stage_evaluate(cfg, {"base": base, "persistworld": post}, results)
    t = lap("evaluate", t)
    print("[6/6] results: tables, curves, paired tests, videos")
    eval_name = f"{cfg.eval.mode}_{cfg.eval.num_chunks}"
    # the training curves of the post-training run belong to the persistworld row
    shutil.copy2(Path(cfg.post.run_dir) / "metrics.jsonl", dirs["persistworld"] / "metrics.jsonl")
    report = render_report(results / "models", factors=["cfg.model"], evals=[eval_name],
                           out_dir=results / "report", layout="cameras", baseline="base",
                           n_resamples=int(cfg.report.n_resamples))
    videos = side_by_side_videos(dirs, eval_name, results / "videos")
    drift = stage_drift_figure(cfg, dirs, results / "report" / "figures")
    lap("results", t)
    summaries = {n: json.loads((d / "eval" / eval_name / "summary.json").read_text())
                 for n, d in dirs.items()}
    text = comparison_text(summaries, results / "report" / "tables" / f"{eval_name}_paired.csv")
    times["total"] = round(time.time() - t0, 1)
    from persistworld.utils.io import atomic_write_json
    atomic_write_json(results / "timings.json", times)
    print(f"done in {times['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in times.items() if k != 'total')}).")
    print(f"base vs PersistWorld, {cfg.eval.num_chunks}-chunk held-out rollouts:\n{text}")
    print(f"Results in {results.resolve()}:\n  report: {report.resolve()}\n"
          f"  tables: {(results / 'report' / 'tables').resolve()}\n"
          f"  figures: {(results / 'report' / 'figures').resolve()}\n"
          f"  videos ({len(videos)}): {(results / 'videos').resolve()}\n"
          f"  drift vs teacher forcing: {Path(drift).resolve()}")
    return results
