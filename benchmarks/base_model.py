"""The bars a base world model must pass before post-training it measures anything (issue
"A base world model worth post-training"), on the test split (``--split val`` while choosing a
recipe), against the trivial
baselines evaluated on the same rollouts:

  1. teacher-forced, one chunk (first ``--tf-samples`` held-out starts): PSNR >= 3 dB and SSIM
     >= 0.05 above "repeat the last frame", LPIPS below it (external and wrist cameras);
  2. autoregressive, ``--chunks`` chunks from one observed frame: better than "nothing moves"
     on SSIM, PSNR and LPIPS, external and wrist, over the whole rollout;
  3. the first autoregressive chunk within 0.5 dB (PSNR) of the teacher-forced one;
  4. drift left to fix: teacher-forced minus autoregressive PSNR over chunks 10-13 >= 1.5 dB.

The one-chunk starts are episode starts (t = 0, the history backfilled with the first frame).
The teacher-forced ``--chunks`` rows, the model and "repeat the last frame" given the true
history, show it through whole episodes (mid-episode motion, pauses): no bar, but read them.

    .venv/bin/python benchmarks/base_model.py --model models/mini_droid_base.pt \\
        [--data data/mini_droid] [--steps 10] [--out runs/bench_base/NAME]
        [--sampler sigma_min=3 --sampler sigma_max=40 ...]

``--predictor anchor`` scores the model's x0 anchor alone (for ``x0_anchor: composite`` the last
frame with the robot drawn at each future pose; the denoiser is never called) in the model's
rows: the difference to the model's own bars is what the network adds.

``--sampler KEY=VALUE`` (repeatable) measures the model under other sampler settings (the keys
``export-model --sampler`` takes): a copy with them is written to ``--out``/model.pt and
evaluated. Choose them on ``--split val``; report on test.

Writes the three evaluations (each with its trivial baselines) under ``--out`` and
``bars.json`` / ``bars.md`` there; prints the table. ``--steps`` is the sampler's step count
(the benchmark and the quickstart use 10 Euler steps per chunk).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pandas as pd
import torch

GROUPS = ("external", "wrist")
METRICS = ("ssim", "psnr", "lpips")


def anchor_only(model: str):
    """``--predictor anchor``: the model file loaded with ``sample_chunk`` replaced by its x0
    anchor (the composite: the last frame with the robot drawn at each future pose), the
    denoiser never called; what the network adds is the model's rows minus these."""
    from persistworld.world_model import load_world_model
    wm = load_world_model(model).eval()
    if getattr(wm.cfg, "x0_anchor", "none") == "none":
        raise SystemExit(f"--predictor anchor: {model} has no x0 anchor (world_model.x0_anchor="
                         f"none): its anchor is 0, not a prediction")

    def sample_chunk(buffer, future_actions, generator=None, num_steps=None, noise=None):
        a = wm.anchor(buffer, future_actions)                    # (B, 1 | L, C, Hs, Ws)
        return a.expand(future_actions.shape[0], wm.future, *wm.latent_shape()).clone()
    wm.sample_chunk = sample_chunk
    return wm


def _evaluate(model: str, data: str, out: Path, predictor: str = "model", **settings) -> dict:
    from omegaconf import OmegaConf

    from persistworld.evaluation.evaluate import evaluate, is_current, model_predictor
    from persistworld.evaluation.run import evaluate_model, settings_from
    from persistworld.utils.io import atomic_write_text
    out = out / "eval" / f"{settings['mode']}_{settings['num_chunks']}"
    s = settings_from({"num_videos": 2, **settings})
    digest = hashlib.sha256(Path(model).read_bytes()).hexdigest() + \
        ("" if predictor == "model" else f" {predictor}")
    stamp = out / "model.sha256"              # which model file (and predictor) it is of
    if not (is_current(out, s, data) and stamp.exists() and stamp.read_text() == digest):
        data_cfg = OmegaConf.create({"root": data, "future": 5, "stride": 1})
        stamp.unlink(missing_ok=True)         # other settings, data or model: evaluated again
        if predictor == "anchor":
            evaluate(model_predictor(anchor_only(model)), data, out, s, label="anchor")
        else:
            evaluate_model(model, data_cfg, s, out)
        atomic_write_text(stamp, digest)
    return json.loads((out / "summary.json").read_text()) | {"dir": str(out)}


def _chunk_psnr(eval_dir: str, chunks: range, sub: str = "") -> dict[str, float]:
    f = pd.read_parquet(Path(eval_dir) / sub / "frames.parquet")
    f = f[f["chunk"].isin(list(chunks))]
    return {g: float(f[f["group"] == g].groupby("sample")["psnr"].mean().mean()) for g in GROUPS}


def bars(model: str, data: str, out: Path, steps: int, tf_samples: int, chunks: int,
         split: str = "test", predictor: str = "model") -> dict:
    common = dict(num_steps=steps, seed=0, batch_size=10, split=split, predictor=predictor)
    tf1 = _evaluate(model, data, out, mode="teacher_forced", num_chunks=1,
                    max_samples=tf_samples, **common)
    ar = _evaluate(model, data, out, mode="autoregressive", num_chunks=chunks, **common)
    tf = _evaluate(model, data, out, mode="teacher_forced", num_chunks=chunks, masked=False,
                   **common)
    rows, checks = [], {}

    def row(name: str, metrics: dict) -> None:
        rows.append({"setting": name, **{f"{g} {m}": metrics[g][m] for g in GROUPS
                                         for m in METRICS}})

    m, rl = tf1["metrics"], tf1["baselines"]["repeat_last"]
    row("teacher-forced 1 chunk: model", m)
    row("teacher-forced 1 chunk: repeat last frame", rl)
    for g in GROUPS:
        checks[f"1 chunk {g}: PSNR >= repeat-last + 3 dB"] = m[g]["psnr"] >= rl[g]["psnr"] + 3
        checks[f"1 chunk {g}: SSIM >= repeat-last + 0.05"] = m[g]["ssim"] >= rl[g]["ssim"] + 0.05
        checks[f"1 chunk {g}: LPIPS < repeat-last"] = m[g]["lpips"] < rl[g]["lpips"]
    m, still = ar["metrics"], ar["baselines"]["nothing_moves"]
    row(f"autoregressive {chunks} chunks: model", m)
    row(f"autoregressive {chunks} chunks: nothing moves", still)
    row(f"teacher-forced {chunks} chunks: model", tf["metrics"])
    row(f"teacher-forced {chunks} chunks: repeat last frame", tf["baselines"]["repeat_last"])
    for g in GROUPS:
        for k in METRICS:
            better = m[g][k] < still[g][k] if k == "lpips" else m[g][k] > still[g][k]
            checks[f"{chunks} chunks {g}: {k.upper()} better than nothing moves"] = better
    first_ar, first_tf = _chunk_psnr(ar["dir"], range(1)), _chunk_psnr(tf["dir"], range(1))
    late = range(10, chunks)
    late_ar, late_tf = _chunk_psnr(ar["dir"], late), _chunk_psnr(tf["dir"], late)
    derived = {}
    for g in GROUPS:
        derived[f"{g}: PSNR first chunk, AR - TF"] = first_ar[g] - first_tf[g]
        derived[f"{g}: PSNR chunks 10-{chunks - 1}, TF - AR (drift)"] = late_tf[g] - late_ar[g]
        checks[f"{g}: first AR chunk within 0.5 dB of TF"] = abs(first_ar[g] - first_tf[g]) <= 0.5
        checks[f"{g}: drift (TF - AR, chunks 10-{chunks - 1}) >= 1.5 dB"] = \
            late_tf[g] - late_ar[g] >= 1.5
    return {"model": model, "predictor": predictor, "split": split, "sampler_steps": steps,
            "tf_samples": tf_samples,
            "table": rows, "derived": derived, "checks": checks,
            "passed": int(sum(checks.values())), "total": len(checks)}


def to_markdown(res: dict) -> str:
    cols = [f"{g} {m}" for g in GROUPS for m in METRICS]
    over = res.get("sampler_overrides") or []
    name = res.get("source_model", res["model"]) + (f" with {', '.join(over)}" if over else "")
    what = (" (its x0 anchor alone, the denoiser never called: the rows named model are the "
            "anchor)") if res.get("predictor", "model") == "anchor" else ""
    lines = [f"# Base-model bars: `{name}`{what} ({res['sampler_steps']} sampler steps, "
             f"{res.get('split', 'val')} split)", "",
             "| setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + r["setting"] + " | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |"
              for r in res["table"]]
    lines += ["", "| derived | dB |", "|---|---|"]
    lines += [f"| {k} | {v:+.2f} |" for k, v in res["derived"].items()]
    lines += ["", f"**{res['passed']} of {res['total']} bars met**", "", "| bar | met |",
              "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in res["checks"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/mini_droid_base.pt")
    ap.add_argument("--data", default="data/mini_droid")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps per chunk")
    ap.add_argument("--tf-samples", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=14)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", default="test", help="test (report; default) or val (while "
                    "choosing a recipe)")
    ap.add_argument("--out", default=None, help="default: runs/bench_base/<model file stem>")
    ap.add_argument("--sampler", action="append", default=[], metavar="KEY=VALUE",
                    help="a sampler setting to measure the model under (repeatable)")
    ap.add_argument("--predictor", choices=("model", "anchor"), default="model",
                    help="anchor: score the model's x0 anchor alone, the denoiser never called")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out or f"runs/bench_base/{Path(a.model).stem}"
               + ("" if a.predictor == "model" else f"_{a.predictor}"))
    model = a.model
    if a.sampler:
        from persistworld.world_model import export_world_model
        from persistworld.world_model.export import sampler_settings
        sampler = sampler_settings(a.sampler)
        out.mkdir(parents=True, exist_ok=True)
        model = str(export_world_model(a.model, out / "model.pt", sampler=sampler))
        print(f"measuring {a.model} with sampler settings {sampler} ({model})")
    res = bars(model, a.data, out, a.steps, a.tf_samples, a.chunks, a.split, a.predictor)
    res["source_model"], res["sampler_overrides"] = a.model, a.sampler
    from persistworld.utils.io import atomic_write_json, atomic_write_text
    atomic_write_json(out / "bars.json", res)
    md = to_markdown(res)
    atomic_write_text(out / "bars.md", md)
    print(md)
    print(f"written to {out}/bars.md")


if __name__ == "__main__":
    main()
