"""Run directories -> tidy tables (docs/FORMATS.md, "Run directories").

Everything downstream (tables, statistics, figures, the report) is a pure function of the
tables built here:

* the **runs table** (``collect_runs``): one row per run directory, never fewer. Failed,
  running, interrupted or incomplete runs stay in the table with ``status`` and ``problems``
  filled in, so a report can list them instead of silently averaging over what happened to
  finish. Columns:

  - ``run`` (id: path relative to the collected root), ``run_dir`` (absolute path),
    ``status`` (``completed | failed | running | interrupted | pruned | missing`` —
    ``pruned``: stopped early by an Optuna search; ``missing`` means no ``status.json``;
    ``absent`` for an expected directory that does not exist), ``error``,
    ``step``, ``updated``, ``overrides`` (JSON list), ``evals`` (comma-separated eval names),
  - ``cfg.<dotted.key>``: every leaf of ``config.yaml`` (lists/dicts as JSON strings),
  - ``<eval>/<group>/<metric>`` whole-rollout metrics from ``eval/<eval>/summary.json``
    (group ``external | wrist``; metric ``ssim | psnr | lpips``) and the masked variants
    ``<eval>/<mask>/<group>/<metric>`` (mask ``object | robot``), plus ``<eval>/mode``,
    ``<eval>/num_chunks``, ``<eval>/num_samples``,
  - ``metrics/<split>/<key>``: the last logged value of every numeric key of
    ``metrics.jsonl`` (for training curves use ``read_metrics``),
  - ``problems`` (``"; "``-joined reasons, empty when the run is usable) and ``ok``.

* the **frames table** (``collect_frames``): the long per-sample, per-frame, per-view table of
  every ``eval/<eval>/frames.parquet`` with ``run`` and ``eval`` columns added.

* the **baseline rows** (``baseline_runs``): the trivial predictors every evaluation scores on
  its own samples (``eval/<eval>/baselines/<name>/``), as runs-table rows with a ``baseline``
  label and their frames, so every table, curve and paired test shows them as standing rows.

* the **metrics table** (``read_metrics``): long ``run, step, split, key, value`` rows from
  every ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from persistworld.utils.io import atomic_path, read_jsonl

GROUPS = ("external", "wrist")
METRICS = ("ssim", "psnr", "lpips")
MASKS = ("object", "robot")
VIEW_GROUP = {"ext1": "external", "ext2": "external", "wrist": "wrist"}

# A directory holding any of these is a run directory (we do not descend into it).
RUN_MARKERS = ("config.yaml", "status.json", "overrides.yaml", "metrics.jsonl")
# Config keys that vary per run without being an experimental factor (paths, names, hosts).
NON_FACTOR_PATTERNS = ("dir", "path", "root", "host", "name", "hydra", "wandb", "time", "date")
_SAMPLE_KEYS = ("episode", "start", "sample")
# Trivial predictors scored next to every evaluation (evaluation/evaluate.py, TRIVIAL), by the
# label their standing rows carry in reports
BASELINE_LABELS = {"nothing_moves": "nothing moves (start frame)",
                   "repeat_last": "repeat last frame"}


# -- discovery ---------------------------------------------------------------------------------
def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (any((path / m).exists() for m in RUN_MARKERS)
                              or (path / "eval").is_dir())


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """All run directories at or below ``root`` (sorted; hidden folders and the contents of a
    run directory itself are not searched)."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        keep = []
        for d in dirnames:
            p = Path(dirpath) / d
            (found.append(p) if is_run_dir(p) else keep.append(d))
        dirnames[:] = keep
    return sorted(found)


# -- one run -------------------------------------------------------------------------------------
def flatten(tree: Any, prefix: str = "cfg") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"cfg.a.b": 1}``; lists become JSON strings (hashable, so a
    list-valued setting can still be a factor)."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        if not tree and prefix:
            out[prefix] = "{}"
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        out[prefix] = json.dumps(tree, sort_keys=True, default=str)
    else:
        out[prefix] = tree
    return out


def _read_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def summary_columns(eval_name: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten one ``summary.json`` into ``<eval>/<group>/<metric>`` and
    ``<eval>/<mask>/<group>/<metric>`` columns."""
    row: dict[str, Any] = {}
    for key in ("mode", "num_chunks", "num_samples", "split", "episodes"):
        if key in summary:
            row[f"{eval_name}/{key}"] = summary[key]

    def walk(node: Any, parts: list[str]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, parts + [str(k)])
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            row["/".join([eval_name] + parts)] = float(node)

    walk(summary.get("metrics", {}), [])
    return row


def read_run(run_dir: str | os.PathLike, evals: Sequence[str] | None = None) -> dict[str, Any]:
    """One row of the runs table. Never raises on a broken run: what cannot be read becomes a
    ``problems`` entry."""
    run_dir = Path(run_dir)
    row: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "status": "missing",
                           "error": None, "step": np.nan, "updated": None, "overrides": None}
    problems: list[str] = []
    if not run_dir.is_dir():
        row["status"] = "absent"
        row["problems"] = "run directory does not exist"
        row["ok"] = False
        row["evals"] = ""
        return row

    status_path = run_dir / "status.json"
    if status_path.exists():
        try:
            status = json.loads(status_path.read_text(encoding="utf-8"))
            row["status"] = str(status.get("state", "missing"))
            row["error"] = status.get("error")
            row["step"] = status.get("step", np.nan)
            row["updated"] = status.get("updated")
        except (json.JSONDecodeError, OSError) as e:
            row["status"] = "corrupt"
            problems.append(f"status.json unreadable ({e})")
    else:
        problems.append("no status.json")
    if row["status"] == "failed":
        problems.append(f"failed: {row['error'] or 'no error recorded'}")
    elif row["status"] not in ("completed", "missing", "corrupt"):
        problems.append(f"status {row['status']}")

    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        try:
            row.update(flatten(_read_yaml(cfg_path) or {}))
        except (yaml.YAMLError, OSError) as e:
            problems.append(f"config.yaml unreadable ({e})")
    else:
        problems.append("no config.yaml")
    ov_path = run_dir / "overrides.yaml"
    if ov_path.exists():
        try:
            row["overrides"] = json.dumps(list(_read_yaml(ov_path) or []))
        except (yaml.YAMLError, OSError, TypeError) as e:
            problems.append(f"overrides.yaml unreadable ({e})")

    found = sorted(p.parent.name for p in (run_dir / "eval").glob("*/summary.json"))
    row["evals"] = ",".join(found)
    for name in found:
        try:
            summary = json.loads((run_dir / "eval" / name / "summary.json").read_text())
            row.update(summary_columns(name, summary))
        except (json.JSONDecodeError, OSError) as e:
            problems.append(f"eval/{name}/summary.json unreadable ({e})")
    wanted = list(evals) if evals else []
    missing = [e for e in wanted if e not in found]
    if missing:
        problems.append("no eval summary: " + ", ".join(missing))
    elif not wanted and not found:
        problems.append("no eval summary")

    if (run_dir / "metrics.jsonl").exists():
        try:
            last: dict[str, Any] = {}
            for rec in read_jsonl(run_dir / "metrics.jsonl"):
                split = rec.get("split", "train")
                for k, v in rec.items():
                    if k not in ("step", "split") and _is_number(v):
                        last[f"metrics/{split}/{k}"] = float(v)
            row.update(last)
        except (ValueError, OSError) as e:
            problems.append(f"metrics.jsonl unreadable ({e})")

    row["problems"] = "; ".join(problems)
    row["ok"] = not problems
    return row


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# -- many runs -------------------------------------------------------------------------------------
def collect_runs(roots: str | os.PathLike | Iterable[str | os.PathLike], *,
                 evals: Sequence[str] | None = None,
                 expected: Iterable[str | os.PathLike] = ()) -> pd.DataFrame:
    """Collect every run directory under ``roots`` (sweep folders, Optuna study folders, or run
    directories themselves) into the runs table, one row per run.

    ``evals``: eval names every run should have; a run lacking one gets a problem entry.
    ``expected``: run directories that should exist (e.g. from a sweep plan); those that do not
    are listed with status ``absent`` instead of being forgotten.
    """
    roots = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(r) for r in roots]
    rows, seen = [], set()
    for root in roots:
        if not root.exists():
            rows.append({**read_run(root, evals), "run": str(root)})
            seen.add(str(root.resolve()))
            continue
        for rd in find_run_dirs(root):
            rel = rd.name if rd == root else rd.relative_to(root).as_posix()
            run_id = f"{root.name}/{rel}" if len(roots) > 1 else rel
            rows.append({"run": run_id, **read_run(rd, evals)})
            seen.add(str(rd.resolve()))
    for exp in expected:
        if str(Path(exp).resolve()) not in seen:
            rows.append({"run": str(exp), **read_run(exp, evals)})
    if not rows:
        return pd.DataFrame(columns=["run", "run_dir", "status", "error", "problems", "ok"])
    df = pd.DataFrame(rows)
    if df["run"].duplicated().any():  # same relative name under two roots: use full paths
        df["run"] = df["run_dir"]
    front = ["run", "status", "ok", "problems", "error", "step", "updated", "run_dir",
             "overrides", "evals"]
    cfg = sorted(c for c in df.columns if c.startswith("cfg."))
    rest = sorted(c for c in df.columns if c not in front and c not in cfg)
    return df[front + cfg + rest].reset_index(drop=True)


def baseline_runs(runs: pd.DataFrame, evals: Sequence[str] | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trivial baselines as standing rows: (runs-table rows, frames table).

    For each eval name, the baselines come from the first completed run (in ``runs`` order)
    that scored them (``eval/<eval>/baselines/<name>/summary.json``): the same samples as that
    run's own evaluation. Rows have ``run = "baseline/<name>"``, ``status = completed``, the
    summary columns of every eval found and ``baseline`` = the label
    (``condition_labels`` uses it)."""
    rows: dict[str, dict[str, Any]] = {}
    parts = []
    done = runs[runs["status"] == "completed"] if "status" in runs else runs.iloc[:0]
    for name, label in BASELINE_LABELS.items():
        run_id = f"baseline/{name}"
        seen: set[str] = set()
        for run_dir in done["run_dir"]:
            for path in sorted(Path(run_dir).glob(f"eval/*/baselines/{name}/summary.json")):
                ev = path.parent.parent.parent.name
                if ev in seen or (evals and ev not in evals):
                    continue
                try:
                    summary = json.loads(path.read_text())
                    frames = pd.read_parquet(path.parent / "frames.parquet")
                except (json.JSONDecodeError, OSError, ValueError):
                    continue                          # a broken copy: try the next run's
                seen.add(ev)
                row = rows.setdefault(run_id, {
                    "run": run_id, "status": "completed", "ok": True, "problems": "",
                    "error": None, "step": 0, "run_dir": str(path.parent.resolve()),
                    "baseline": label, "evals": ""})
                row.update(summary_columns(ev, summary))
                row["evals"] = ",".join(sorted(seen))
                frames.insert(0, "eval", ev)
                frames.insert(0, "run", run_id)
                parts.append(frames)
    frames = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return pd.DataFrame(list(rows.values())), frames


def problem_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are not usable as they stand, with the reason (for the report)."""
    bad = runs[~runs["ok"].astype(bool)]
    return bad[["run", "status", "problems", "run_dir"]].reset_index(drop=True)


def usable_runs(runs: pd.DataFrame, columns: Sequence[str] = (),
                statuses: Sequence[str] = ("completed",)) -> pd.DataFrame:
    """Runs whose status is in ``statuses`` and that have every column in ``columns``."""
    keep = runs["status"].isin(list(statuses))
    for c in columns:
        keep &= runs[c].notna() if c in runs else False
    return runs[keep]


# -- factors and seeds -----------------------------------------------------------------------------
def _override_keys(runs: pd.DataFrame) -> set[str]:
    keys: set[str] = set()
    for ov in runs.get("overrides", pd.Series(dtype=object)).dropna():
        for item in json.loads(ov):
            if isinstance(item, str) and "=" in item:
                keys.add("cfg." + item.split("=", 1)[0].lstrip("+~"))
    return keys


def infer_factors(runs: pd.DataFrame, seed_key: str = "cfg.seed",
                  exclude: Sequence[str] = ()) -> list[str]:
    """The experimental factors of a sweep: ``cfg.*`` columns whose value varies across the
    runs that have a config, minus the seed key and ``exclude``.

    If the runs carry ``overrides.yaml`` and some varying keys were overridden, only those are
    kept: the overrides are exactly what the sweep changed, other varying keys are derived from
    them (an output directory interpolated from the overrides, say). Without overrides, keys
    that look like paths, names or times (``NON_FACTOR_PATTERNS``, matched against the last
    dotted component) are dropped. Pass ``factors`` explicitly wherever this guess is wrong.
    """
    cfg_cols = [c for c in runs.columns if c.startswith("cfg.") and c != seed_key
                and c not in exclude and not c.startswith("cfg.hydra")]
    if not cfg_cols:
        return []
    sub = runs[runs[cfg_cols].notna().any(axis=1)]
    varying = [c for c in cfg_cols if sub[c].astype(str).nunique(dropna=False) > 1]

    def looks_like(c: str, patterns: Sequence[str]) -> bool:
        leaf = c.rsplit(".", 1)[-1].lower()
        return any(p in leaf for p in patterns)

    overridden = _override_keys(sub)
    if overridden & set(varying):
        return [c for c in varying if c in overridden and not looks_like(c, ("dir", "path"))]
    return [c for c in varying if not looks_like(c, NON_FACTOR_PATTERNS)]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:g}"
    return str(v)


def condition_labels(runs: pd.DataFrame, factors: Sequence[str]) -> pd.Series:
    """A readable label per run for its factor setting: ``"0.0001"`` for one factor,
    ``"lr=0.0001, K=16"`` for several (last dotted component of the key); a trivial-baseline
    row (``baseline_runs``) is labelled by its ``baseline`` column."""
    if not factors:
        labels = pd.Series("all", index=runs.index, dtype=object)
    elif len(factors) == 1:
        labels = runs[factors[0]].map(_fmt_value).astype(object) if factors[0] in runs \
            else pd.Series("nan", index=runs.index, dtype=object)
    else:
        parts = [runs[f].map(lambda v, f=f: f"{f.rsplit('.', 1)[-1]}={_fmt_value(v)}")
                 if f in runs else pd.Series(f"{f.rsplit('.', 1)[-1]}=nan", index=runs.index)
                 for f in factors]
        labels = pd.concat(parts, axis=1).agg(", ".join, axis=1).astype(object)
    if "baseline" in runs:
        is_baseline = runs["baseline"].notna()
        labels[is_baseline] = runs.loc[is_baseline, "baseline"]
    return labels


def condition_order(runs: pd.DataFrame, factors: Sequence[str]) -> list[str]:
    """Condition labels ordered by the factor values (numeric order where numeric), the
    trivial baselines last."""
    if runs.empty:
        return []
    trivial = runs["baseline"].notna() if "baseline" in runs else \
        pd.Series(False, index=runs.index)
    models, baselines = runs[~trivial], runs[trivial]
    keyed = models[list(factors)].copy() if factors else pd.DataFrame(index=models.index)
    keyed["_label"] = condition_labels(models, factors)
    keyed = keyed.drop_duplicates("_label")
    if factors and not keyed.empty:
        keyed = keyed.sort_values(list(factors), key=_sort_key, kind="stable")
    trivial_labels = list(dict.fromkeys(baselines["baseline"])) if "baseline" in runs else []
    return list(keyed["_label"]) + trivial_labels


def _sort_key(s: pd.Series) -> pd.Series:
    num = pd.to_numeric(s, errors="coerce")
    return num if num.notna().all() else s.astype(str)


# -- per-frame and training metrics ----------------------------------------------------------------
def collect_frames(runs: pd.DataFrame, evals: Sequence[str] | None = None) -> pd.DataFrame:
    """The long per-step table: every ``eval/<eval>/frames.parquet`` of the runs in ``runs``,
    with ``run`` and ``eval`` columns in front. Runs without one are skipped here (they are
    already listed by ``problem_runs``)."""
    parts = []
    for run, run_dir in zip(runs["run"], runs["run_dir"]):
        for path in sorted(Path(run_dir).glob("eval/*/frames.parquet")):
            name = path.parent.name
            if evals and name not in evals:
                continue
            df = pd.read_parquet(path)
            df.insert(0, "eval", name)
            df.insert(0, "run", run)
            parts.append(df)
    if not parts:
        return pd.DataFrame(columns=["run", "eval", "sample", "frame", "chunk", "view", "group"])
    frames = pd.concat(parts, ignore_index=True)
    if "group" not in frames and "view" in frames:
        frames["group"] = frames["view"].map(VIEW_GROUP)
    return frames


def metric_column(metric: str, mask: str | None = None) -> str:
    """Column of frames.parquet holding ``metric`` (optionally on a segmentation mask)."""
    return f"{metric}_{mask}" if mask else metric


def sample_keys(frames: pd.DataFrame) -> list[str]:
    """Columns that identify an evaluation sample across models (same episode and start)."""
    return [k for k in _SAMPLE_KEYS if k in frames.columns]


def sample_scores(frames: pd.DataFrame, *, group: str, metric: str, mask: str | None = None,
                  by: str = "run") -> pd.DataFrame:
    """Whole-rollout value per evaluation sample: the mean over all frames and all views of
    ``group`` (NaN-aware for masked metrics). Returns rows = samples, columns = values of
    ``by`` (runs, models or conditions): the input of a paired comparison."""
    col = metric_column(metric, mask)
    sub = frames[frames["group"] == group]
    keys = sample_keys(sub)
    out = sub.groupby([by] + keys)[col].mean().unstack(by)
    out.columns.name = by
    return out


def step_scores(frames: pd.DataFrame, *, group: str, metric: str, mask: str | None = None,
                by: str = "run", x: str = "chunk") -> pd.DataFrame:
    """Per sample and rollout step ``x`` (``chunk`` or ``frame``): the mean over the frames in
    that step and the views of ``group``. Long table ``by, <sample keys>, x, value``."""
    col = metric_column(metric, mask)
    sub = frames[frames["group"] == group]
    keys = sample_keys(sub)
    out = sub.groupby([by] + keys + [x])[col].mean().rename("value").reset_index()
    return out


def read_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """Long ``run, step, split, key, value`` table of every numeric key of each run's
    ``metrics.jsonl`` (torn last lines ignored, as ``read_jsonl`` does)."""
    rows = []
    for run, run_dir in zip(runs["run"], runs["run_dir"]):
        path = Path(run_dir) / "metrics.jsonl"
        if not path.exists():
            continue
        try:
            records = read_jsonl(path)
        except ValueError:
            continue  # listed by read_run as a problem
        for rec in records:
            step, split = rec.get("step"), rec.get("split", "train")
            for k, v in rec.items():
                if k not in ("step", "split") and _is_number(v):
                    rows.append((run, step, split, k, float(v)))
    return pd.DataFrame(rows, columns=["run", "step", "split", "key", "value"])


# -- writing ---------------------------------------------------------------------------------------
def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding several Python types (a config key that is an int in one run and
    a string in another) become strings so that Parquet can store them."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype != object:
            continue
        types = {type(v) for v in df[c].dropna()}
        if len(types) > 1 and not types <= {int, float, np.int64, np.float64}:
            df[c] = df[c].map(lambda v: v if v is None or (isinstance(v, float) and np.isnan(v))
                              else str(v))
        elif types <= {int, float, np.int64, np.float64} and types:
            df[c] = pd.to_numeric(df[c])
    return df


def write_table(df: pd.DataFrame, stem: str | os.PathLike,
                formats: Sequence[str] = ("parquet", "csv")) -> list[Path]:
    """Write ``df`` as ``<stem>.parquet`` and ``<stem>.csv`` (atomically)."""
    stem = Path(stem)
    out = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path) as tmp:
            if fmt == "parquet":
                _parquet_safe(df).to_parquet(tmp, index=False)
            elif fmt == "csv":
                df.to_csv(tmp, index=False)
            else:
                raise ValueError(f"unknown table format {fmt!r}")
        out.append(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m persistworld.analysis.collect DIR... --out STEM``: write the runs table."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m persistworld.analysis.collect",
                                description="Collect run directories into one table.")
    p.add_argument("dirs", nargs="+", help="sweep folders or run directories")
    p.add_argument("--out", required=True, help="output stem: writes STEM.parquet, STEM.csv")
    p.add_argument("--eval", dest="evals", action="append", default=None,
                   help="eval name every run should have (repeatable)")
    p.add_argument("--frames", action="store_true",
                   help="also write STEM_frames.parquet (the per-step table)")
    args = p.parse_args(argv)
    runs = collect_runs(args.dirs, evals=args.evals)
    for path in write_table(runs, args.out):
        print(path)
    if args.frames:
        frames = collect_frames(runs, args.evals)
        print(*write_table(frames, f"{args.out}_frames", formats=("parquet",)))
    bad = problem_runs(runs)
    print(f"{len(runs)} runs, {len(runs) - len(bad)} usable, {len(bad)} with problems")
    for r in bad.itertuples():
        print(f"  {r.run}: [{r.status}] {r.problems}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
