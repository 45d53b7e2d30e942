"""Paper figures from the tidy tables. Every function returns ``(fig, ax)`` (``ax`` may be an
array of axes) and draws on a fresh ``matplotlib.figure.Figure`` with the Agg canvas, so
nothing depends on (or changes) pyplot's global state or the display backend. ``save_figure``
writes PNG and PDF atomically.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from persistworld.analysis.collect import condition_labels, condition_order
from persistworld.analysis.stats import HIGHER_IS_BETTER, PairedComparison
from persistworld.utils.io import atomic_path

METRIC_LABEL = {"ssim": "SSIM", "psnr": "PSNR (dB)", "lpips": "LPIPS"}
GROUP_LABEL = {"external": "external cameras", "wrist": "wrist camera"}
# Keys of metrics.jsonl plotted as training curves by default: exact names or prefixes.
TRAINING_KEYS = ("reward/", "loss/", "loss", "old_deviation", "kl", "grad_norm", "lr")


def new_figure(nrows: int = 1, ncols: int = 1, *, panel: tuple[float, float] = (3.6, 2.8),
               squeeze: bool = False, **kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, **kw)
    return fig, axes


def save_figure(fig: Figure, stem: str | os.PathLike, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` atomically; returns the paths."""
    stem = Path(stem)
    out = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
        out.append(path)
    return out


def _arrow(metric: str) -> str:
    return "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"


def _colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab10"] if n <= 10 else colormaps["viridis"]
    return [cmap(i) if n <= 10 else cmap(i / max(n - 1, 1)) for i in range(n)]


# -- metric vs rollout time (paper Fig. 5 / 11) ----------------------------------------------------
def plot_metric_vs_time(curves: pd.DataFrame, *, hue: str = "run", x: str = "chunk",
                        groups: Sequence[str] | None = None,
                        metrics: Sequence[str] | None = None, order: Sequence[str] | None = None,
                        x_label: str | None = None, title: str | None = None):
    """Mean metric per rollout step with its interval band, one line per ``hue`` value
    (models / conditions overlaid); rows = camera groups, columns = metrics. ``curves`` is the
    output of ``stats.step_curves`` (columns ``hue, group, metric, x, mean, ci_low,
    ci_high``)."""
    groups = list(groups or dict.fromkeys(curves["group"]))
    metrics = list(metrics or dict.fromkeys(curves["metric"]))
    names = list(order or dict.fromkeys(curves[hue]))
    fig, axes = new_figure(len(groups), len(metrics))
    colors = dict(zip(names, _colors(len(names))))
    for r, group in enumerate(groups):
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            sub = curves[(curves["group"] == group) & (curves["metric"] == metric)]
            for name in names:
                s = sub[sub[hue] == name].sort_values(x)
                if s.empty:
                    continue
                ax.plot(s[x], s["mean"], color=colors[name], lw=1.6, label=str(name),
                        marker="o", ms=2.5)
                ax.fill_between(s[x], s["ci_low"], s["ci_high"], color=colors[name], alpha=0.2,
                                lw=0)
            ax.set_title(f"{GROUP_LABEL.get(group, group)}: {METRIC_LABEL.get(metric, metric)} "
                         f"{_arrow(metric)}", fontsize=9)
            ax.set_xlabel(x_label or {"chunk": "rollout step (chunk)",
                                      "frame": "generated frame"}.get(x, x), fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4),
                   fontsize=8, title=hue, title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


# -- paired deltas (paper Fig. 4) ------------------------------------------------------------------
def plot_paired_deltas(results: Mapping[str, PairedComparison], *, bins: int = 30,
                       title: str | None = None, ncols: int = 3):
    """Histogram of per-sample ``model - baseline`` deltas per metric (keys like
    ``"external/lpips"``; values from ``stats.paired_comparison``): bars on the model's better
    side green, the others orange, 0 and the mean delta marked, win rate and p-values in the
    title (paper Fig. 4)."""
    keys = list(results)
    ncols = min(ncols, max(len(keys), 1))
    nrows = max(math.ceil(len(keys) / ncols), 1)
    fig, axes = new_figure(nrows, ncols)
    for ax in axes.ravel()[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.ravel(), keys):
        res = results[key]
        metric = key.rsplit("/", 1)[-1]
        d = res.delta
        if d.size:
            lo, hi = min(float(d.min()), 0.0), max(float(d.max()), 0.0)
            pad = 0.04 * (hi - lo) or 1e-6
            edges = np.linspace(lo - pad, hi + pad, bins + 1)
            counts, _ = np.histogram(d, bins=edges)
            centers = (edges[:-1] + edges[1:]) / 2
            good = centers > 0 if res.higher_is_better else centers < 0
            ax.bar(centers, counts, width=np.diff(edges), edgecolor="white", lw=0.4,
                   color=np.where(good, "tab:green", "tab:orange"), alpha=0.85)
            ax.set_xlim(edges[0], edges[-1])
        ax.axvline(0, color="k", lw=0.8)
        ax.axvline(res.mean_delta, color="tab:red", lw=1, ls="--", label="mean Δ")
        side = "→" if res.higher_is_better else "←"
        ax.set_xlabel(f"Δ {METRIC_LABEL.get(metric, metric).split(' ')[0]} "
                      f"(model − baseline); better {side}", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{key}: win {100 * res.win_rate:.1f}% (n={res.n})\n"
                     f"sign p={res.sign_p:.1e}, Wilcoxon p={res.wilcoxon_p:.1e}", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


# -- training curves -------------------------------------------------------------------------------
def select_training_keys(metrics: pd.DataFrame, keys: Sequence[str] = TRAINING_KEYS,
                         split: str = "train") -> list[str]:
    """Keys present in the long metrics table that equal an entry of ``keys`` or start with
    one ending in ``/`` (``"reward/"`` matches ``reward/total``), in the order of ``keys``."""
    present = list(dict.fromkeys(metrics.loc[metrics["split"] == split, "key"]))
    out = []
    for k in keys:
        for p in present:
            if (p == k or (k.endswith("/") and p.startswith(k))) and p not in out:
                out.append(p)
    return out


def plot_training_curves(metrics: pd.DataFrame, *, keys: Sequence[str] = TRAINING_KEYS,
                         split: str = "train", hue: str = "run",
                         hue_of_run: Mapping[str, str] | None = None, smooth: int = 1,
                         dashed: Sequence[str] = (), ncols: int = 3,
                         title: str | None = None):
    """One panel per training key found (``select_training_keys``), value vs step, one line per
    run, coloured by ``hue_of_run[run]`` (e.g. the run's condition) when given; runs in
    ``dashed`` (e.g. failed ones) are drawn dashed. ``metrics`` is ``collect.read_metrics``
    output; ``smooth`` > 1 applies a centred rolling mean."""
    names = select_training_keys(metrics, keys, split)
    sub = metrics[(metrics["split"] == split) & metrics["key"].isin(names)].copy()
    sub[hue] = sub["run"].map(hue_of_run).fillna("?") if hue_of_run else sub["run"]
    ncols = min(ncols, max(len(names), 1))
    nrows = max(math.ceil(len(names) / ncols), 1)
    fig, axes = new_figure(nrows, ncols)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    levels = list(dict.fromkeys(sub[hue]))
    colors = dict(zip(levels, _colors(len(levels))))
    for ax, key in zip(axes.ravel(), names):
        seen = set()
        for run, s in sub[sub["key"] == key].groupby("run", sort=False):
            s = s.sort_values("step")
            y = s["value"].rolling(smooth, center=True, min_periods=1).mean() if smooth > 1 \
                else s["value"]
            h = s[hue].iloc[0]
            ax.plot(s["step"], y, color=colors[h], lw=1.1, alpha=0.85,
                    ls="--" if run in dashed else "-", label=str(h) if h not in seen else None)
            seen.add(h)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    if not names:
        axes[0, 0].text(0.5, 0.5, "no training metrics found", ha="center", va="center",
                        transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
    handles, labels = [], []
    for ax in axes.ravel()[:len(names)]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if handles and len(labels) <= 12:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4),
                   fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


# -- factor vs metric ------------------------------------------------------------------------------
def plot_factor_vs_metric(runs: pd.DataFrame, factor: str, columns: Sequence[str], *,
                          hue: Sequence[str] = (), statuses: Sequence[str] = ("completed",), ncols: int = 3,
                          order: Sequence[str] | None = None, title: str | None = None):
    """For one swept factor: every seed as a point, mean ± std over seeds as an error bar, one
    panel per runs-table column (e.g. ``eval/external/lpips``). The x axis is categorical in
    factor order; ``hue`` factors (the other factors of a multi-factor sweep) get separate
    series."""
    runs = runs[runs["status"].isin(list(statuses))].copy()
    runs["_x"] = condition_labels(runs, [factor])
    xs = list(order or condition_order(runs, [factor]))
    runs["_hue"] = condition_labels(runs, list(hue)) if hue else "all"
    levels = condition_order(runs, list(hue)) if hue else ["all"]
    colors = dict(zip(levels, _colors(len(levels))))
    ncols = min(ncols, max(len(columns), 1))
    nrows = max(math.ceil(len(columns) / ncols), 1)
    fig, axes = new_figure(nrows, ncols)
    for ax in axes.ravel()[len(columns):]:
        ax.set_visible(False)
    width = 0.6
    for ax, col in zip(axes.ravel(), columns):
        for k, level in enumerate(levels):
            off = (k - (len(levels) - 1) / 2) * width / max(len(levels), 1)
            s = runs[runs["_hue"] == level]
            means, stds, pos = [], [], []
            for i, xv in enumerate(xs):
                vals = pd.to_numeric(s.loc[s["_x"] == xv, col], errors="coerce").dropna() \
                    if col in s else pd.Series([], dtype=float)
                if vals.empty:
                    continue
                ax.scatter(np.full(len(vals), i + off - 0.06), vals, s=14, color=colors[level],
                           alpha=0.6, lw=0)
                means.append(vals.mean())
                stds.append(vals.std(ddof=1) if len(vals) > 1 else 0.0)
                pos.append(i + off)
            if pos:
                ax.errorbar(pos, means, yerr=stds, color=colors[level], marker="D", ms=4,
                            capsize=3, lw=1.2, label=None if level == "all" else level)
        metric = col.rsplit("/", 1)[-1]
        ax.set_title(f"{col} {_arrow(metric)}", fontsize=8)
        ax.set_xticks(range(len(xs)), xs, fontsize=7, rotation=30 if len(xs) > 4 else 0)
        ax.set_xlabel(factor, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="y", labelsize=7)
    if len(levels) > 1:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4),
                   fontsize=8, title=", ".join(h.rsplit(".", 1)[-1] for h in hue),
                   title_fontsize=8)
    fig.suptitle(title or f"{factor}: seeds (dots), mean ± std over seeds", fontsize=9)
    return fig, axes
