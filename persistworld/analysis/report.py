"""One command from a sweep directory to its report (Markdown + HTML, tables, figures).

    python -m persistworld.analysis.report SWEEP_DIR [SWEEP_DIR ...] [--factor cfg.key ...]
        [--eval NAME ...] [--out DIR] [--seed-key cfg.seed] [--baseline LABEL] [--embed]

Writes into ``--out`` (default ``SWEEP_DIR/report``):

    report.md, report.html            the report (HTML links the PNGs, or embeds them: --embed)
    runs.parquet, runs.csv            the runs table (every run, failed ones included)
    problems.csv                      runs that are failed / incomplete / missing pieces
    tables/<eval>_table.{md,tex,csv}  paper-layout table (mean ± std over seeds, n)
    tables/<eval>_masked.{md,tex,csv} Table 2 layout (object-only / robot-only), if present
    tables/<eval>_conditions.csv      per condition and metric: mean, std, n, bootstrap CI
    tables/<eval>_paired.csv          paired comparisons against the baseline: per sample (seeds
                                      averaged) and, the headline, with the seeds kept
                                      (hierarchical bootstrap, Stouffer over seeds, Holm)
    tables/<eval>_paired_seeds.csv    per seed: its per-episode deltas' mean, win rate, t-test
    tables/<eval>_curves.csv          metric vs rollout step, with intervals over samples
    tables/<eval>_curves_masked.csv   the same for the object-only / robot-only regions
    figures/*.png, figures/*.pdf      factor vs metric, metric vs time, paired deltas, training
    tables/policy_agreement.csv       with --policy-csv: Pearson r and MMRV per world model
    tables/elo.csv                    with --votes-csv: Elo with bootstrap interval
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from persistworld.analysis import figures as F
from persistworld.analysis.collect import (GROUPS, MASKS, METRICS, baseline_runs,
                                           collect_frames, collect_runs, condition_labels,
                                           condition_order, infer_factors, problem_runs,
                                           read_metrics, write_table)
from persistworld.analysis.stats import (paired_table, preference_study, seed_paired_table,
                                         step_curves, summarize_conditions)
from persistworld.analysis.stats import policy_agreement_table as stats_policy_table
from persistworld.analysis.tables import (ablation_table, cameras_table, masked_table,
                                          metric_column, sample_size_note, split_text)
from persistworld.utils.io import atomic_write_text
from persistworld.errors import UserError

LAYOUT_BUILDERS = {"ablation": ablation_table, "cameras": cameras_table}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


@dataclass
class _Doc:
    """The report as a list of blocks, rendered to Markdown and HTML alike."""
    out_dir: Path
    embed: bool = False
    md: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{_inline_html(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{_inline_html(text)}</p>")

    def table(self, md: str, html_table: str) -> None:
        self.md.append(md)
        self.html.append(html_table)

    def frame(self, df: pd.DataFrame, floatfmt: str = "{:.4g}") -> None:
        if df.empty:
            self.para("(none)")
            return
        shown = df.copy()
        for c in shown.columns:
            if pd.api.types.is_float_dtype(shown[c]):
                shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else floatfmt.format(v))
        shown = shown.astype(str)
        head = "| " + " | ".join(shown.columns) + " |"
        sep = "|" + "|".join("---" for _ in shown.columns) + "|"
        body = ["| " + " | ".join(v.replace("|", r"\|").replace("\n", " ") for v in row) + " |"
                for row in shown.itertuples(index=False)]
        self.md.append("\n".join([head, sep, *body]) + "\n")
        self.html.append(shown.to_html(index=False, border=0, classes="data"))

    def figure(self, paths: Sequence[Path], caption: str) -> None:
        png = next(p for p in paths if p.suffix == ".png")
        rel = png.relative_to(self.out_dir).as_posix()
        others = " ".join(f"[{p.suffix[1:]}]({p.relative_to(self.out_dir).as_posix()})"
                          for p in paths if p.suffix != ".png")
        self.md.append(f"![{caption}]({rel})\n\n*{caption}* {others}\n")
        src = rel
        if self.embed:
            src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        links = " ".join(f'<a href="{html.escape(p.relative_to(self.out_dir).as_posix())}">'
                         f"{p.suffix[1:]}</a>" for p in paths)
        self.html.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)} ({links})</figcaption></figure>")

    def render_html(self, title: str) -> str:
        css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
               "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;"
               "font-size:0.9em}th,td{padding:3px 8px;border-bottom:1px solid #ddd}"
               "td.num{text-align:right;font-variant-numeric:tabular-nums}"
               "th{border-bottom:2px solid #444}caption{font-weight:bold;text-align:left}"
               "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:0.85em;"
               "color:#555}code{background:#f4f4f4;padding:0 3px}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>"
                f"{html.escape(title)}</title><style>{css}</style></head><body>\n"
                + "\n".join(self.html) + "\n</body></html>\n")


def _inline_html(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def eval_splits(runs: pd.DataFrame, eval_name: str) -> pd.DataFrame:
    """The data split each run's evaluation ``eval_name`` used: ``run, split, source``.

    Read, in this order, from a ``<eval>/split`` column of the runs table, from the run's
    ``eval/<eval>/summary.json`` (a ``settings.split`` or top-level ``split`` entry), or from
    its config (``cfg.eval.split``: the split the run's own final evaluation uses; an
    evaluation written later by ``persistworld evaluate eval.split=...`` may differ, which is
    why the summary wins). ``split`` is None where none of these has it. Trivial-baseline rows
    are skipped: they are scored on their run's samples."""
    rows = []
    is_trivial = runs["baseline"].notna() if "baseline" in runs else \
        pd.Series(False, index=runs.index)
    for (_, r), trivial in zip(runs.iterrows(), is_trivial):
        if trivial:
            continue
        split, source = None, ""
        col = r.get(f"{eval_name}/split")
        if col is not None and not pd.isna(col):
            split, source = str(col), "runs table"
        if split is None and isinstance(r.get("run_dir"), str):
            path = Path(r["run_dir"]) / "eval" / eval_name / "summary.json"
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                summary = {}
            found = (summary.get("settings") or {}).get("split", summary.get("split")) \
                if isinstance(summary, dict) else None
            if found is not None:
                split, source = str(found), "summary.json"
        cfg = r.get("cfg.eval.split")
        if split is None and cfg is not None and not pd.isna(cfg):
            split, source = str(cfg), "config.yaml eval.split"
        rows.append({"run": r["run"], "split": split, "source": source})
    return pd.DataFrame(rows, columns=["run", "split", "source"])


def _split_source_text(splits: pd.DataFrame) -> str:
    sources = sorted({s for s in splits["source"] if s})
    missing = int(splits["split"].isna().sum())
    text = f"split from {', '.join(sources)}" if sources else "no run records its split"
    if "config.yaml eval.split" in sources:
        text += (" (the summary.json files record no split: the config's is the one the "
                 "run's own evaluation used)")
    if missing and sources:
        text += f"; {missing} run(s) record none"
    return text


def _samples_per_run(frames: pd.DataFrame, runs: pd.DataFrame,
                     eval_name: str) -> tuple[dict[str, int], str]:
    """Evaluation samples per run (from the frames, else ``<eval>/num_samples``) and the unit
    to call them by: "episodes" when every sample is a different episode, else "samples"."""
    counts: dict[str, int] = {}
    unit = "samples"
    if not frames.empty and "sample" in frames:
        keys = [k for k in ("episode", "start", "sample") if k in frames]
        per = frames.drop_duplicates(["run"] + keys)
        counts = per.groupby("run").size().astype(int).to_dict()
        if "episode" in per:
            eps = per.groupby("run")["episode"].nunique()
            if (eps == per.groupby("run").size()).all():
                unit = "episodes"
    col = f"{eval_name}/num_samples"
    if col in runs:
        for run, n in zip(runs["run"], runs[col]):
            if run not in counts and not pd.isna(n):
                counts[run] = int(n)
    return counts, unit


def _table_note(runs: pd.DataFrame, columns: Sequence[str], counts: dict[str, int], unit: str,
                splits: pd.DataFrame) -> str:
    """``sample_size_note`` for a table of ``columns`` over the completed runs (with a
    ``condition`` column): seeds per model condition, samples per run, the split."""
    cols = [c for c in columns if c in runs]
    has = runs[cols].notna().any(axis=1) if cols else pd.Series(False, index=runs.index)
    used = runs[has]
    trivial = used["baseline"].notna() if "baseline" in used else \
        pd.Series(False, index=used.index)
    models = used[~trivial]
    seeds = models.groupby("condition").size().tolist()
    episodes = [counts[r] for r in used["run"] if r in counts]
    split_of = dict(zip(splits["run"], splits["split"]))
    extra = "trivial baselines: 1 evaluation each" if trivial.any() else ""
    return sample_size_note(seeds, episodes, [split_of.get(r) for r in models["run"]],
                            unit=unit, extra=extra)


def _fmt_p(p: float) -> str:
    return "" if pd.isna(p) else f"{p:.2g}"


def _per_seed_cells(per_seed: pd.DataFrame) -> pd.DataFrame:
    """The compact per-seed table: one row per comparison and metric, one column per seed,
    cells ``Δ mean · win rate · p``."""
    if per_seed.empty:
        return per_seed
    cell = [f"{d:+.4g} · {100 * w:.0f}% · p {_fmt_p(p)}" if n else ""
            for d, w, p, n in zip(per_seed["mean_delta"], per_seed["win_rate"],
                                  per_seed["p"], per_seed["n"])]
    long = per_seed.assign(cell=cell, col="seed " + per_seed["seed"].astype(str))
    order = list(dict.fromkeys(long["col"]))
    wide = long.pivot_table(index=["model", "group", "metric"], columns="col", values="cell",
                            aggfunc="first", sort=False)
    return wide.reindex(columns=order).fillna("").reset_index()


def render_report(sweep_dirs: str | Path | Sequence[str | Path], *,
                  factors: Sequence[str] | None = None, evals: Sequence[str] | None = None,
                  out_dir: str | Path | None = None, seed_key: str = "cfg.seed",
                  baseline: str | None = None, layout: str = "ablation", rng_seed: int = 0,
                  n_resamples: int = 10_000, curve_resamples: int = 2_000, x: str = "chunk",
                  training_keys: Sequence[str] = F.TRAINING_KEYS, max_paired_figures: int = 6,
                  policy_csv: str | Path | None = None, votes_csv: str | Path | None = None,
                  preference_alternative: str = "two-sided", embed: bool = False) -> Path:
    """Render the report of one or several sweeps; returns the path of ``report.md``.

    ``factors`` default to ``collect.infer_factors`` (config keys that vary, minus the seed);
    ``evals`` default to every eval name found; ``baseline`` is the condition label the paired
    comparisons are made against (default: the first condition in factor order). All
    resampling draws from ``np.random.default_rng(rng_seed)``. Optional extra sections:
    ``policy_csv`` (per-policy task progress in world models vs real, see
    ``stats.policy_agreement_table``) and ``votes_csv`` (2AFC votes ``winner, loser[, rater,
    item]`` in casting order, see ``stats.preference_study``).
    """
    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, Path)) else \
        [Path(d) for d in sweep_dirs]
    out = Path(out_dir) if out_dir is not None else dirs[0] / "report"
    rng = np.random.default_rng(rng_seed)

    runs = collect_runs(dirs, evals=evals)
    runs = runs[~runs["run_dir"].map(lambda p: Path(p).resolve().is_relative_to(out.resolve()))]
    factors = list(factors) if factors is not None else infer_factors(runs, seed_key)
    # the trivial baselines the runs' evaluations scored on the same samples: standing rows
    trivial_runs, trivial_frames = baseline_runs(runs, evals)
    if not trivial_runs.empty:
        runs = pd.concat([runs, trivial_runs], ignore_index=True)
    missing_factors = [f for f in factors if f not in runs]
    if missing_factors:
        raise UserError(f"--factor {', '.join(missing_factors)}: not in any run's config "
                        f"(keys look like cfg.sweep.row, cfg.optim.lr)")
    done = runs[runs["status"] == "completed"].copy()
    done["condition"] = condition_labels(done, factors)
    conditions = condition_order(done, factors)
    found_evals = sorted({e for es in runs["evals"].dropna() for e in es.split(",") if e})
    eval_names = list(evals) if evals else found_evals
    if baseline is not None and baseline not in conditions:
        raise UserError(f"--baseline {baseline!r} is not a condition; conditions: "
                        f"{', '.join(map(repr, conditions))}")
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    write_table(runs, out / "runs")
    problems = problem_runs(runs)
    write_table(problems, out / "problems", formats=("csv",))
    base = baseline if baseline is not None else (conditions[0] if conditions else None)

    doc = _Doc(out, embed=embed)
    title = "Sweep report: " + ", ".join(d.name for d in dirs)
    doc.heading(title, 1)
    doc.para(f"Sweep directories: {', '.join(f'`{d}`' for d in dirs)}. "
             f"{len(runs)} run directories, {int((runs['status'] == 'completed').sum())} "
             f"completed, {len(problems)} with problems. Factors: "
             f"{', '.join(f'`{f}`' for f in factors) or '(none)'}; seeds: `{seed_key}`; "
             f"conditions: {len(conditions)}; eval sets: {', '.join(eval_names) or '(none)'}.")
    doc.para("Tables: mean ± std over seeds (std with ddof = 1), n = seeds with a result; only "
             "completed runs count; best **bold**, second underlined per column (compared as "
             "displayed; SSIM, PSNR higher is better, LPIPS lower). Intervals: percentile "
             f"bootstrap, 95%, rng seed {rng_seed}.")

    doc.heading("Runs with problems")
    doc.para("Listed, never dropped silently. Failed or incomplete runs do not enter the "
             "tables; their conditions show a smaller n.")
    doc.frame(problems[["run", "status", "problems"]])
    counts = done.groupby("condition").size().reindex(conditions, fill_value=0)
    doc.heading("Conditions")
    cond_df = pd.DataFrame({"condition": conditions, "completed runs": counts.values})
    if seed_key in done:
        cond_df["seeds"] = [",".join(map(str, done.loc[done["condition"] == c, seed_key]))
                            for c in conditions]
    doc.frame(cond_df)

    frames_all = collect_frames(done, eval_names) if eval_names else pd.DataFrame()
    if eval_names and not trivial_frames.empty:
        frames_all = pd.concat([frames_all, trivial_frames[trivial_frames["eval"].isin(
            eval_names)]], ignore_index=True)
    if not frames_all.empty:
        frames_all["condition"] = frames_all["run"].map(dict(zip(done["run"],
                                                                 done["condition"])))
    metric_cols = lambda e: [metric_column(e, g, m) for g in GROUPS for m in METRICS]  # noqa

    seed_of_run = dict(zip(done["run"], done[seed_key])) if seed_key in done else {}
    for ev in eval_names:
        doc.heading(f"Eval `{ev}`")
        frames = frames_all[frames_all["eval"] == ev] if not frames_all.empty else frames_all
        splits = eval_splits(done, ev)
        counts, unit = _samples_per_run(frames, done, ev)
        doc.para(f"Sample sizes: n = seeds × evaluation {unit} per run, under every table; "
                 f"{_split_source_text(splits)}.")
        tab = LAYOUT_BUILDERS[layout](runs, factors, ev, seed_key=seed_key, order=conditions,
                                      caption=f"{ev}: whole-rollout metrics "
                                              f"(mean ± std over seeds)",
                                      note=_table_note(done, metric_cols(ev), counts, unit,
                                                       splits))
        paths = tab.write(out / "tables" / f"{_slug(ev)}_table")
        doc.table(tab.to_markdown(), tab.to_html())
        doc.para(f"Files: `{paths['md'].name}`, `{paths['tex'].name}` (LaTeX, booktabs), "
                 f"`{paths['csv'].name}`.")
        masked_cols = [metric_column(ev, g, m, k) for k in ("object", "robot") for g in GROUPS
                       for m in METRICS]
        if any(c in runs and runs[c].notna().any() for c in masked_cols):
            mt = masked_table(runs, factors, ev, seed_key=seed_key, order=conditions,
                              caption=f"{ev}: object-only / robot-only metrics",
                              note=_table_note(done, masked_cols, counts, unit, splits))
            mt.write(out / "tables" / f"{_slug(ev)}_masked")
            doc.table(mt.to_markdown(), mt.to_html())
        cols = [c for c in metric_cols(ev) + masked_cols if c in runs]
        cond_stats = summarize_conditions(runs, factors, cols, seed_key=seed_key, rng=rng,
                                          n_resamples=n_resamples)
        write_table(cond_stats, out / "tables" / f"{_slug(ev)}_conditions", formats=("csv",))
        doc.para(f"Per-condition means with bootstrap intervals over seeds: "
                 f"`{_slug(ev)}_conditions.csv`.")

        for factor in factors:
            others = [f for f in factors if f != factor]
            fig, _ = F.plot_factor_vs_metric(runs, factor, [c for c in metric_cols(ev)
                                                            if c in runs],
                                             hue=others)
            stem = out / "figures" / f"{_slug(ev)}_factor_{_slug(factor)}"
            doc.figure(F.save_figure(fig, stem), f"{ev}: {factor} vs metric")

        if frames.empty:
            doc.para("No frames.parquet: no per-step curves or paired comparisons.")
            continue
        curves = step_curves(frames, rng, by="condition", x=x, n_resamples=curve_resamples)
        write_table(curves, out / "tables" / f"{_slug(ev)}_curves", formats=("csv",))
        masked = [step_curves(frames, rng, by="condition", x=x, mask=m,
                              n_resamples=curve_resamples)
                  for m in MASKS if f"lpips_{m}" in frames and frames[f"lpips_{m}"].notna().any()]
        if masked:                                       # Table 2's regions, per rollout step
            write_table(pd.concat(masked, ignore_index=True),
                        out / "tables" / f"{_slug(ev)}_curves_masked", formats=("csv",))
        fig, _ = F.plot_metric_vs_time(curves, hue="condition", x=x, order=[
            c for c in conditions if c in set(curves["condition"])])
        doc.figure(F.save_figure(fig, out / "figures" / f"{_slug(ev)}_vs_time"),
                   f"{ev}: metric vs rollout time (band: 95% bootstrap interval over samples, "
                   f"seeds averaged)")

        others = [c for c in conditions if c != base and c in set(frames["condition"])]
        if base is None or base not in set(frames["condition"]) or not others:
            continue
        doc.heading(f"Paired comparisons against `{base}` ({ev})", 3)
        doc.para("Deltas are model − baseline per evaluation sample (whole-rollout mean), with "
                 "the seeds kept: seed s of the model against seed s of the baseline (a side "
                 "with one run, e.g. a trivial baseline, against every seed of the other). "
                 "Headline per metric: Δ = mean over seeds of the seed's mean delta, its 95% "
                 "CI from a hierarchical bootstrap (seeds resampled, then episodes within each "
                 "drawn seed), and p = paired t-test per seed combined over seeds with "
                 "Stouffer's method on signed z, one-sided (H1: the model is better, in the "
                 "metric's direction); Holm p = Holm-Bonferroni over the metrics of the "
                 "comparison (one family per model). Win rate = mean over seeds. Last column: "
                 "Wilcoxon signed-rank p on the samples with the seeds averaged (the "
                 "previous, per-sample test). Caveat: every seed is scored on the same "
                 "episodes, so Stouffer and the bootstrap, which treat them as independent "
                 "per seed, are optimistic when a per-episode effect is shared across seeds.")
        tables, seed_tables = [], []
        for k, cond in enumerate(others):
            tab_p, results = paired_table(frames, cond, base, rng, by="condition",
                                          n_resamples=n_resamples)
            tab_s, per_seed = seed_paired_table(frames, cond, base, rng, seeds=seed_of_run,
                                                by="condition", n_resamples=n_resamples)
            keys = ["model", "baseline", "group", "mask", "metric"]
            tables.append(tab_p.merge(tab_s, on=keys, how="left", suffixes=("", "_seeds"))
                          if not tab_p.empty else tab_p)
            seed_tables.append(per_seed)
            if k < max_paired_figures and results:
                fig, _ = F.plot_paired_deltas(results, title=f"{ev}: {cond} vs {base}")
                doc.figure(F.save_figure(fig, out / "figures" /
                                         f"{_slug(ev)}_paired_{_slug(cond)}"),
                           f"{ev}: per-sample deltas, {cond} vs {base}")
        paired = pd.concat(tables, ignore_index=True)
        per_seed = pd.concat(seed_tables, ignore_index=True)
        write_table(paired, out / "tables" / f"{_slug(ev)}_paired", formats=("csv",))
        write_table(per_seed, out / "tables" / f"{_slug(ev)}_paired_seeds", formats=("csv",))
        shown = paired[["model", "group", "metric", "n_seeds", "episodes_per_seed",
                        "mean_delta_seeds", "hier_ci_low", "hier_ci_high", "combined_p",
                        "holm_p", "win_rate_seeds", "wilcoxon_p"]].rename(columns={
            "n_seeds": "seeds", "episodes_per_seed": unit, "mean_delta_seeds": "Δ",
            "hier_ci_low": "CI low", "hier_ci_high": "CI high", "combined_p": "p (seeds)",
            "holm_p": "Holm p", "win_rate_seeds": "win rate",
            "wilcoxon_p": "Wilcoxon p (seeds averaged)"})
        doc.frame(shown)
        by_model = paired.drop_duplicates("model")
        split_of = dict(zip(splits["run"], splits["split"]))
        model_runs = frames.loc[frames["condition"].isin(others + [base]), "run"].unique()
        split_note = split_text([split_of[r] for r in model_runs if r in split_of])
        sizes = {m: f"{int(s)} seed{'s' if s != 1 else ''} × {e} {unit}"
                 for m, s, e in zip(by_model["model"], by_model["n_seeds"].fillna(0),
                                    by_model["episodes_per_seed"].fillna("?"))}
        if len(set(sizes.values())) == 1:
            doc.para(f"n = {next(iter(sizes.values()))} per comparison ({split_note}).")
        else:
            doc.para("n per comparison: " + "; ".join(f"{m}: {v}" for m, v in sizes.items())
                     + f" ({split_note}).")
        notes = sorted({n for n in paired.get("note", pd.Series(dtype=object)).dropna() if n})
        if notes:
            doc.para("Notes: " + "; ".join(notes) + ".")
        doc.para(f"Per seed (Δ mean · win rate · one-sided paired t-test p; file "
                 f"`{_slug(ev)}_paired_seeds.csv`):")
        doc.frame(_per_seed_cells(per_seed))

    metrics = read_metrics(runs)
    if not metrics.empty and F.select_training_keys(metrics, training_keys):
        doc.heading("Training curves")
        fig, _ = F.plot_training_curves(
            metrics, keys=training_keys, hue="condition",
            hue_of_run=dict(zip(runs["run"], condition_labels(runs, factors))),
            dashed=list(runs.loc[runs["status"] != "completed", "run"]))
        doc.figure(F.save_figure(fig, out / "figures" / "training_curves"),
                   "training metrics from metrics.jsonl, every run with one, coloured by "
                   "condition (dashed: runs that did not complete)")

    if policy_csv is not None:
        doc.heading("Policy evaluation: world model vs real world")
        agree = stats_policy_table(policy_csv)
        write_table(agree, out / "tables" / "policy_agreement", formats=("csv",))
        doc.para("Pearson r of per-policy task progress and MMRV (mean maximum rank violation, "
                 "SIMPLER's definition: mean over policies of the largest real-progress gap "
                 "over which the world model orders that policy wrongly; 0 is perfect).")
        doc.frame(agree)
    if votes_csv is not None:
        study = preference_study(pd.read_csv(votes_csv), rng, alternative=preference_alternative)
        doc.heading("Human preference study (2AFC)")
        lines = [f"{study['n_votes']} votes; wins: " + ", ".join(
            f"{m} {w}" for m, w in study["wins"].items()) + "."]
        if "binomial" in study:
            b = study["binomial"]
            lines.append(f"{b['model']} preferred in {100 * b['rate']:.1f}% "
                         f"({b['wins']} vs {b['losses']}); exact binomial test vs 50% "
                         f"({b['alternative']}): p = {b['p_value']:.2g}; 95% Clopper-Pearson "
                         f"interval [{100 * b['ci_low']:.1f}%, {100 * b['ci_high']:.1f}%].")
        if "fleiss_kappa" in study:
            lines.append(f"Fleiss' kappa over {study['n_items_rated_twice']} items rated at "
                         f"least twice: {study['fleiss_kappa']:.3f}.")
        doc.para(" ".join(lines))
        doc.para("Elo (start 800, K = 32, votes in recorded order) with a 95% bootstrap "
                 "interval (votes resampled with replacement, which also reorders them):")
        doc.frame(study["elo"], floatfmt="{:.1f}")
        write_table(study["elo"], out / "tables" / "elo", formats=("csv",))

    atomic_write_text(out / "report.md", "\n".join(doc.md))
    atomic_write_text(out / "report.html", doc.render_html(title))
    return out / "report.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m persistworld.analysis.report",
        description="Render a sweep's report (Markdown + HTML, paper-layout tables, figures) "
                    "from its run directories.")
    p.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR",
                   help="sweep folder(s) or run directories; searched recursively")
    p.add_argument("--factor", dest="factors", action="append", default=None,
                   metavar="cfg.KEY", help="factor column (repeatable); default: inferred")
    p.add_argument("--eval", dest="evals", action="append", default=None, metavar="NAME",
                   help="eval name (repeatable); default: all found")
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR/report)")
    p.add_argument("--seed-key", default="cfg.seed", help="config key of the seed")
    p.add_argument("--baseline", default=None,
                   help="condition label to compare against (default: first condition)")
    p.add_argument("--layout", choices=sorted(LAYOUT_BUILDERS), default="ablation",
                   help="table layout: ablation (Tables 3-11) or cameras (Table 1)")
    p.add_argument("--x", choices=("chunk", "frame"), default="chunk",
                   help="time axis of the rollout curves")
    p.add_argument("--rng-seed", type=int, default=0, help="seed of the bootstrap generator")
    p.add_argument("--n-resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--training-key", dest="training_keys", action="append", default=None,
                   help="metrics.jsonl key or prefix ending in '/' to plot (repeatable)")
    p.add_argument("--policy-csv", default=None,
                   help="CSV of per-policy task progress (policy, source, progress[, task]) "
                        "or wide (policy[, task], real, <world model>...)")
    p.add_argument("--votes-csv", default=None,
                   help="CSV of 2AFC votes (winner, loser[, rater, item]) in casting order")
    p.add_argument("--one-sided", action="store_true",
                   help="one-sided binomial test (preferred model better than 50%%), as the "
                        "paper's p = 3.5e-20")
    p.add_argument("--embed", action="store_true", help="embed PNGs in report.html")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.sweep_dirs) > 1 and args.out is None:
        build_parser().error("--out is required with several sweep directories")
    path = render_report(args.sweep_dirs, factors=args.factors, evals=args.evals,
                         out_dir=args.out, seed_key=args.seed_key, baseline=args.baseline,
                         layout=args.layout, x=args.x, rng_seed=args.rng_seed,
                         n_resamples=args.n_resamples,
                         training_keys=args.training_keys or F.TRAINING_KEYS,
                         policy_csv=args.policy_csv, votes_csv=args.votes_csv,
                         preference_alternative="greater" if args.one_sided else "two-sided",
                         embed=args.embed)
    print(path)
    print(path.with_suffix(".html"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
