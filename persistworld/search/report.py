"""`persistworld search-report STUDY_DIR`: what a search found, as files.

    trials.parquet / trials.csv   study.trials_dataframe() + run_dir, run, run_status
                                  (read with pandas, or join with `persistworld collect
                                  STUDY_DIR/trials` on run_dir)
    best.yaml                     the best trial as a `# @package _global_` experiment preset
    experiment/best.yaml          the same, where `--config-dir STUDY_DIR experiment=best`
                                  finds it:
                                    persistworld post-train --config-dir STUDY_DIR \\
                                        experiment=best base_model=... run_dir=...
                                  (or copy it to persistworld/conf/experiment/<name>.yaml)
    pareto/trial_<n>.yaml         multi-objective: one preset per Pareto-optimal trial
    plots/history[_<metric>].png  optimisation history (per objective)
    plots/importance[_<metric>].png  parameter importances (fANOVA, needs >= 2 finished trials)
    plots/intermediate.png        pruning curves (single objective)
    plots/pareto.png              multi-objective Pareto front (2 objectives)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from optuna.trial import TrialState

from persistworld.search.driver import load_study


def _name(metric: str) -> str:
    return metric.replace("/", "_")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: tree}
    return {prefix[:-1]: tree}


def preset_values(trial, space, settings: dict) -> dict[str, Any]:
    """Every setting the trial ran with that differs from `persistworld post-train` given only
    the search-wide command-line overrides: the space's base overrides (group choices such as
    `experiment=mini` expanded to their values) plus the trial's parameters."""
    from omegaconf import OmegaConf
    from persistworld.search.space import compose_post_train
    cli = list(settings["overrides"])
    plain = OmegaConf.to_container(compose_post_train(cli), resolve=True)
    full = OmegaConf.to_container(compose_post_train(
        [*space.base_overrides, *cli, *space.overrides(trial.params)]), resolve=True)
    a, b = _leaves(plain), _leaves(full)
    return {k: v for k, v in b.items() if a.get(k, object()) != v and k != "run_dir"}


def _preset(trial, space, settings: dict, study_dir: Path) -> str:
    """The trial's settings as a Hydra experiment preset (`# @package _global_`)."""
    tree: dict[str, Any] = {}
    for key, value in preset_values(trial, space, settings).items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    values = ", ".join(f"{o.metric}={v:.6g} ({o.direction})"
                       for o, v in zip(space.objectives, trial.values or []))
    head = [
        "# @package _global_",
        f"# persistworld search: trial {trial.number} of study {settings['study_name']!r} "
        f"({study_dir})",
        f"# objectives: {values}, measured on the val split (the search chooses settings "
        f"there); report this preset on test, the default eval.split",
        f"# run dir: {trial.user_attrs.get('run_dir')}",
        f"# search-wide command-line overrides (not included): {settings['overrides']}",
        f"# use: persistworld post-train --config-dir {study_dir} experiment=best "
        "base_model=... run_dir=...",
        "#   or copy it to persistworld/conf/experiment/<name>.yaml: experiment=<name>",
    ]
    return "\n".join(head) + "\n" + yaml.safe_dump(tree, sort_keys=False)


def trials_table(study, study_dir: Path, space=None) -> pd.DataFrame:
    """study.trials_dataframe() plus run_dir, run (relative to STUDY/trials), run_status and
    one ``objective/<metric>`` column per objective."""
    df = study.trials_dataframe(attrs=("number", "value", "datetime_start",
                                       "datetime_complete", "duration", "params", "user_attrs",
                                       "system_attrs", "state"), multi_index=False)
    if df.empty:
        return df
    if space is not None:
        for i, o in enumerate(space.objectives):
            col = f"values_{i}" if space.multi_objective else "value"
            if col in df:
                df[f"objective/{o.metric}"] = df[col]
    if "user_attrs_run_dir" not in df:
        df["user_attrs_run_dir"] = None
    df["run_dir"] = df["user_attrs_run_dir"]
    root = (Path(study_dir) / "trials").resolve()
    df["run"] = [None if not isinstance(r, str) else Path(r).relative_to(root).as_posix()
                 if Path(r).is_relative_to(root) else r for r in df["run_dir"]]
    status = []
    for r in df["run_dir"]:
        p = Path(r) / "status.json" if isinstance(r, str) else None
        status.append(json.loads(p.read_text()).get("state") if p and p.exists() else None)
    df["run_status"] = status
    for c in df.columns:                       # datetimes/timedeltas -> plain for CSV/Parquet
        if str(df[c].dtype).startswith("timedelta"):
            df[c] = df[c].dt.total_seconds()
        elif df[c].dtype == object:
            df[c] = df[c].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    front = ["number", "state", "run", "run_dir", "run_status"]
    return df[front + [c for c in df.columns if c not in front]]


def _plots(study, space, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    out.mkdir(parents=True, exist_ok=True)
    written = []
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]

    def save(ax, name: str) -> None:
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                         # experimental warnings
        multi = space.multi_objective
        for i, o in enumerate(space.objectives):
            suffix = f"_{_name(o.metric)}" if multi else ""
            target = (lambda t, i=i: t.values[i]) if multi else None
            if finished:
                save(vis.plot_optimization_history(study, target=target, target_name=o.metric),
                     f"history{suffix}.png")
            if len(finished) >= 2:
                try:
                    ax = vis.plot_param_importances(study, target=target, target_name=o.metric)
                    save(ax, f"importance{suffix}.png")
                except (RuntimeError, ValueError, ZeroDivisionError) as e:
                    print(f"search-report: no importance plot for {o.metric}: {e}")
        if not multi and any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            save(vis.plot_intermediate_values(study), "intermediate.png")
        if multi and len(space.objectives) in (2, 3) and finished:
            save(vis.plot_pareto_front(study, target_names=[o.metric for o in space.objectives]),
                 "pareto.png")
    return written


def write_report(study_dir: str | Path) -> dict:
    from persistworld.analysis.collect import write_table
    study_dir = Path(study_dir).resolve()
    study, space, settings = load_study(study_dir)
    trials = study.get_trials(deepcopy=False)
    df = trials_table(study, study_dir, space)
    out: dict[str, Any] = {"trials": len(trials)}
    if not df.empty:
        out["tables"] = [str(p) for p in write_table(df, study_dir / "trials")]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        if space.multi_objective:
            front = sorted(study.best_trials, key=lambda t: t.values[0]
                           * (1 if space.directions[0] == "minimize" else -1))
            (study_dir / "pareto").mkdir(exist_ok=True)
            for t in front:
                (study_dir / "pareto" / f"trial_{t.number:04d}.yaml").write_text(
                    _preset(t, space, settings, study_dir))
            best = front[0]
        else:
            best = study.best_trial
        text = _preset(best, space, settings, study_dir)
        (study_dir / "best.yaml").write_text(text)
        (study_dir / "experiment").mkdir(exist_ok=True)
        (study_dir / "experiment" / "best.yaml").write_text(text)
        out["best"] = {"number": best.number, "values": best.values, "params": best.params,
                       "run_dir": best.user_attrs.get("run_dir")}
    out["plots"] = [str(p) for p in _plots(study, space, study_dir / "plots")]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    out["states"] = counts
    (study_dir / "report.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"search-report {study_dir}: {len(trials)} trials {counts}")
    if "best" in out:
        print(f"  best trial {out['best']['number']}: {out['best']['values']} "
              f"{out['best']['params']}\n  preset: {study_dir / 'best.yaml'}")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="persistworld search-report",
                                description="trials table, best.yaml preset and plots of a "
                                            "`persistworld search` study directory")
    p.add_argument("study_dir")
    a = p.parse_args(argv)
    try:
        write_report(a.study_dir)
    except FileNotFoundError as e:
        print(f"persistworld search-report: error: {e}", file=sys.stderr)
        return 2
    return 0
