"""`persistworld sweep NAME [options] [hydra overrides]`: run one ablation sweep of sweeps/.

    persistworld sweep prefix_strategy experiment=mini                  # jobs one after another
    persistworld sweep all launcher=submitit_local                      # parallel local processes
    persistworld sweep group_size --profile local seed=0,1              # SLURM job array
    persistworld sweep lr --dry-run                                     # pre-flight only
    persistworld sweep lr --status                                      # where each run stands

A sweep file (sweeps/NAME.yaml) is a Hydra primary config extending `sweep_base` (post_train +
a deterministic run layout) whose `hydra.sweeper.params` list the table's rows (`row=...`,
presets in persistworld/conf/row/) and the seeds. The command is Hydra's own multirun
(`persistworld post-train --multirun --config-dir sweeps --config-name NAME ...`) preceded by a
pre-flight: every job's config is composed exactly as Hydra will compose it and checked with
`post_train.validate`, the dataset, the episode lengths, the base model, one start pool per
table (rows differ only in their factor) and the run directory BEFORE anything is submitted.

Run identity (utils/fingerprint.py): an existing run directory is compared by fingerprint
(settings that change the result, the base model file's and the dataset's sha256). Same
fingerprint: a completed run is skipped (re-evaluated when only eval.* changed), an unfinished
one resumes, a larger trainer.steps extends it. Any other difference makes the run *stale*: the
launch is refused before submitting anything, listing the runs and the differing settings;
`--fresh` moves stale runs aside (`<sweep.out>/.stale/...`, never collected by reports) and
starts them afresh. `--resubmit-failed` launches only the failed and stale runs. Afterwards it
prints each run's state; runs whose SLURM job died without writing a status (cancelled,
killed) are marked `failed` with the SLURM state, so `persistworld report` lists them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from persistworld.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TERMINAL_SLURM = ("CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "FAILED", "BOOT_FAIL",
                  "DEADLINE", "PREEMPTED")


SELECT_ENV = "PERSISTWORLD_SWEEP_SELECT"   # file listing the run dirs a launch may run


class SweepError(UserError):
    """A sweep that cannot start: one line naming the job(s) and setting(s)."""


@dataclass
class Job:
    overrides: list[str]
    run_dir: Path
    row: str = ""
    seed: int = 0
    plan: str = "new"      # new | resume | extend | evaluate | skip (completed) | stale | fresh
    errors: list[str] = field(default_factory=list)
    table: str = ""
    start_pool: int | None = None        # chunks after every start (rollout.start_pool_chunks)
    fingerprint: str = ""                # this launch's
    stale: list[str] = field(default_factory=list)   # why the existing run is not this one
    sweep_out: Path = Path(".")


def _search_dirs(kind: str) -> list[Path]:
    env = os.environ.get("PERSISTWORLD_SWEEPS" if kind == "sweeps" else "PERSISTWORLD_PROFILES")
    base = [Path(env)] if env else []
    sub = Path("sweeps") if kind == "sweeps" else Path("slurm") / "profiles"
    return base + [Path.cwd() / sub, REPO / sub]


def find_yaml(name: str, kind: str) -> Path:
    """sweeps/NAME.yaml (or slurm/profiles/NAME.yaml), or NAME itself when it is a path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
        p = p if p.suffix else p.with_suffix(".yaml")
        if p.exists():
            return p.resolve()
        raise SweepError(f"{kind[:-1]} file {p} does not exist")
    for d in _search_dirs(kind):
        if (d / f"{name}.yaml").exists():
            return (d / f"{name}.yaml").resolve()
    known = sorted({f.stem for d in _search_dirs(kind) if d.is_dir() for f in d.glob("*.yaml")})
    raise SweepError(f"unknown {kind[:-1]} {name!r} (known: {', '.join(known) or 'none'})")


def hydra_overrides(sweep: Path, profile: Path | None, overrides: Sequence[str]) -> list[str]:
    """The overrides the multirun gets: the user's, plus the profile's launcher settings."""
    out = list(overrides)
    if profile is not None:
        out = [f"hydra.searchpath=[pkg://persistworld.conf,file://{profile.parent.parent}]",
               f"+{profile.parent.name}@hydra.launcher={profile.stem}", *out]
        if not any(o.split("=", 1)[0].lstrip("+~") == "launcher" for o in out):
            out.insert(0, "launcher=slurm")
    return out


def expand(sweep: Path, overrides: Sequence[str]) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper builds them: `hydra.sweeper.params` of the
    sweep file, then the command line (later wins), cartesian product in order."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    import persistworld.conf  # noqa: F401  (registers the typed schemas)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    static = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(str(sweep.parent), version_base="1.3"):
        base = compose(sweep.stem, static, return_hydra_config=True)
    params = base.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    return BasicSweeper.split_arguments(parser.parse_overrides(lines), None)[0]


def _base_model_ok(path: str) -> bool:
    p = Path(path)
    return p.is_file() or (p / "model.pt").is_file()


def preflight(sweep: Path, job_overrides: list[list[str]], fresh: bool = False) -> list[Job]:
    """Compose and check every job; nothing is submitted here. ``fresh``: a stale run (other
    fingerprint) is planned "fresh" instead of being an error."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from persistworld.data.dataset import EpisodeStore
    from persistworld.trainers.post_train import (StaleRun, check_episode_lengths, run_plan,
                                                  validate)
    from persistworld.utils.fingerprint import run_identity

    jobs: list[Job] = []
    stores: dict[str, object] = {}
    with initialize_config_dir(str(sweep.parent), version_base="1.3"):
        for ov in job_overrides:
            try:
                cfg = compose(sweep.stem, ov)
            except Exception as e:        # Hydra's own message: typo'd key, wrong type, ...
                from persistworld.cli import one_line
                jobs.append(Job(ov, Path("?"), errors=[one_line(e)]))
                continue
            job = Job(ov, Path(cfg.run_dir), str(cfg.sweep.row), int(cfg.seed),
                      table=str(cfg.sweep.table), sweep_out=Path(cfg.sweep.out))
            jobs.append(job)
            try:
                setup = validate(cfg)[0]
            except UserError as e:
                job.errors.append(str(e))
                continue
            job.start_pool = setup.start_pool_chunks
            root = str(cfg.data.root)
            if not (Path(root) / "manifest.json").is_file():
                job.errors.append(f"data.root={root}: no dataset (manifest.json missing); "
                                  f"render it with `persistworld render data.root={root}`")
                continue
            try:
                store = stores.get(root) or EpisodeStore(root)
                stores[root] = store
                check_episode_lengths(store, setup, int(cfg.data.stride))
            except UserError as e:
                job.errors.append(str(e))
            if not _base_model_ok(str(cfg.base_model)):
                job.errors.append(f"base_model={cfg.base_model}: no model.pt there "
                                  f"(train one with `persistworld train-base`)")
                continue
            identity = run_identity(OmegaConf.to_container(cfg, resolve=True))
            job.fingerprint = identity["fingerprint"]
            try:
                job.plan = {"new": "new", "resume": "resume", "extend": "extend",
                            "evaluate": "evaluate", "completed": "skip (completed)"}[
                    run_plan(job.run_dir, identity, cfg)]
                if job.plan == "resume":
                    st = json.loads((job.run_dir / "status.json").read_text())
                    job.plan = f"resume ({st.get('state')} at step {st.get('step', 0)})"
            except StaleRun as e:
                job.stale.append(str(e))
                job.plan = "fresh (stale run moved aside)" if fresh else "stale"
                if not fresh:
                    job.errors.append(str(e))
    seen: dict[Path, Job] = {}
    for job in jobs:
        if job.run_dir in seen and job.run_dir != Path("?"):
            job.errors.append(f"same run_dir as job {' '.join(seen[job.run_dir].overrides)}")
        seen[job.run_dir] = job
    _check_start_pools(jobs)
    return jobs


def _check_start_pools(jobs: list[Job]) -> None:
    """The rows of one table must draw their starts from one pool (else a row differs from
    another in where its episodes start, not only in its factor)."""
    by_table: dict[str, set[int]] = {}
    for j in jobs:
        if j.start_pool is not None and j.table != "none":
            by_table.setdefault(j.table, set()).add(j.start_pool)
    for table, pools in by_table.items():
        if len(pools) > 1:
            for j in jobs:
                if j.table == table and j.start_pool is not None:
                    j.errors.append(f"table {table}: its rows draw starts from different pools "
                                    f"({sorted(pools)} chunks); set rollout.start_pool_chunks="
                                    f"{max(pools)} for every row (conf/row/{table}/)")


def move_aside(job: Job, sweep_out: Path) -> Path:
    """A stale run's directory -> ``<sweep_out>/.stale/<relative path>-<n>`` (hidden: never
    collected by reports), so the run starts afresh where the sweep layout puts it."""
    import shutil
    try:
        rel = job.run_dir.resolve().relative_to(sweep_out.resolve())
    except ValueError:
        rel = Path(job.run_dir.name)
    n = 0
    while (dest := sweep_out / ".stale" / f"{rel}-{n}").exists():
        n += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(job.run_dir), str(dest))
    return dest


# -- after the launch ------------------------------------------------------------------------
def _sacct_state(job_id: str) -> str | None:
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = [s.strip() for s in out.stdout.splitlines() if s.strip()]
    return states[-1].split()[0] if states else None


def run_state(run_dir: Path, reconcile: bool = True) -> tuple[str, str | None]:
    """(state, error) of one run; with `reconcile`, a run left `running`/`interrupted` whose
    SLURM job has ended (cancelled, killed, timed out without requeue) is marked `failed`."""
    from persistworld.utils.rundir import RunDir
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        status = {"state": "missing" if not run_dir.exists() else "not started"}
    state, error = status.get("state", "missing"), status.get("error")
    job_file = run_dir / "job.json"
    if reconcile and state not in ("completed", "failed", "pruned") and job_file.exists():
        rec = json.loads(job_file.read_text())
        jid = (f"{rec['slurm_array_job_id']}_{rec['slurm_array_task_id']}"
               if "slurm_array_task_id" in rec else rec.get("slurm_job_id"))
        slurm = _sacct_state(str(jid)) if jid else None
        if slurm and slurm.split()[0].rstrip("+") in TERMINAL_SLURM:
            error = f"SLURM job {jid} ended {slurm} before the run finished"
            RunDir(run_dir).set_status("failed", int(status.get("step", 0) or 0), error=error)
            state = "failed"
    return state, error


def print_jobs(jobs: list[Job], title: str, states: dict | None = None) -> None:
    print(title)
    for i, j in enumerate(jobs):
        line = f"  #{i:<3} {j.run_dir}  [{states[i][0] if states else j.plan}]"
        if states and states[i][1]:
            line += f"  {states[i][1]}"
        print(line)
        for e in j.errors:
            print(f"        error: {e}")


def _last_metric(run_dir: Path) -> str:
    """The run's headline: its final external LPIPS, else its last training reward."""
    for summary in sorted(run_dir.glob("eval/*/summary.json")):
        try:
            m = json.loads(summary.read_text())["metrics"]
            return f"{summary.parent.name} ext LPIPS {m['external']['lpips']:.4f}"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    last = None
    try:
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                last = line
        row = json.loads(last) if last else {}
        if "reward/mean" in row:
            return f"reward {row['reward/mean']:.4f} at step {row['step']}"
    except (OSError, ValueError):
        pass
    return "-"


def status_rows(jobs: list[Job]) -> list[dict]:
    """One row per run for ``--status``: state, step, fingerprint match, headline metric,
    SLURM job and time of the last status."""
    from persistworld.utils.fingerprint import read_identity
    rows = []
    for j in jobs:
        state, error = run_state(j.run_dir) if j.run_dir != Path("?") else ("invalid", None)
        st, rec, ident = {}, {}, None
        try:
            st = json.loads((j.run_dir / "status.json").read_text())
        except (OSError, ValueError):
            pass
        try:
            rec = json.loads((j.run_dir / "job.json").read_text())
        except (OSError, ValueError):
            pass
        try:
            ident = read_identity(j.run_dir)
        except UserError:
            ident = {"fingerprint": "corrupt"}
        match = ("-" if ident is None or not j.fingerprint else
                 "same" if ident.get("fingerprint") == j.fingerprint else "STALE")
        slurm = (f"{rec['slurm_array_job_id']}_{rec['slurm_array_task_id']}"
                 if "slurm_array_task_id" in rec else rec.get("slurm_job_id", "-"))
        rows.append({"run": str(j.run_dir), "state": state, "step": st.get("step", "-"),
                     "fingerprint": match, "metric": _last_metric(j.run_dir),
                     "slurm": slurm, "updated": st.get("updated", "-"),
                     "error": error or ""})
    return rows


def print_status(jobs: list[Job], title: str) -> list[dict]:
    rows = status_rows(jobs)
    print(title)
    keys = ("state", "step", "fingerprint", "slurm", "updated", "metric")
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys} if rows else {}
    print("  " + "  ".join(f"{k:<{width[k]}}" for k in keys) + "  run")
    for r in rows:
        print("  " + "  ".join(f"{str(r[k]):<{width[k]}}" for k in keys) + f"  {r['run']}")
        if r["error"]:
            print(f"        error: {r['error']}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="persistworld sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="sweep file: sweeps/NAME.yaml, or a path to one")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (seed=0,1 replaces the "
                   "sweep's seeds; experiment=mini; launcher=submitit_local|slurm; ...)")
    p.add_argument("--profile", help="SLURM cluster profile: slurm/profiles/NAME.yaml or a path "
                   "(implies launcher=slurm)")
    p.add_argument("--dry-run", action="store_true", help="pre-flight only: list the jobs")
    p.add_argument("--status", action="store_true",
                   help="each run's state, step, fingerprint match, last metric, SLURM job and "
                        "time (marking runs whose SLURM job died as failed)")
    p.add_argument("--fresh", action="store_true",
                   help="start stale runs (other settings, base model or data than their "
                        "directory holds) afresh; the old ones are moved to <sweep.out>/.stale/")
    p.add_argument("--resubmit-failed", action="store_true",
                   help="launch only the failed runs (resumed) and the stale ones (afresh)")
    args = p.parse_intermixed_args(list(argv) if argv is not None else None)

    try:
        sweep = find_yaml(args.name, "sweeps")
        profile = find_yaml(args.profile, "profiles") if args.profile else None
        overrides = hydra_overrides(sweep, profile, args.overrides)
        jobs = preflight(sweep, expand(sweep, overrides),
                         fresh=args.fresh or args.resubmit_failed or args.status)
    except UserError as e:
        from persistworld.cli import one_line
        print(f"persistworld sweep: error: {one_line(e)}", file=sys.stderr)
        return 2
    if args.status:
        rows = print_status(jobs, f"sweep {sweep.stem}: {len(jobs)} runs")
        return 0 if all(r["state"] == "completed" and r["fingerprint"] == "same"
                        for r in rows) else 1
    if args.resubmit_failed:
        failed = {i for i, j in enumerate(jobs) if run_state(j.run_dir)[0] == "failed"}
        selected = [i for i, j in enumerate(jobs) if i in failed or j.stale]
    else:
        selected = [i for i, j in enumerate(jobs) if not j.plan.startswith("skip")]
    for i, j in enumerate(jobs):
        if i not in selected and not j.plan.startswith("skip"):
            j.plan = f"not selected ({j.plan})"
    bad = [j for j in jobs if j.errors]
    print_jobs(jobs, f"sweep {sweep.stem}: {len(jobs)} jobs, {len(bad)} with errors "
                     f"(pre-flight)")
    if bad:
        stale = [j for j in bad if j.stale and len(j.errors) == len(j.stale)]
        hint = (f"; {len(stale)} are stale: relaunch with --fresh to start them afresh (the "
                f"old runs are kept in <sweep.out>/.stale/)" if stale else "")
        print(f"persistworld sweep: error: {len(bad)} of {len(jobs)} jobs cannot run{hint}; "
              f"nothing was submitted", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    if not selected:
        print("nothing to launch (every run is completed"
              + (", none failed or stale)" if args.resubmit_failed else ")"))
        return 0
    for i in selected:
        if jobs[i].stale and jobs[i].run_dir.exists():
            print(f"  {jobs[i].run_dir}: stale, moved to {move_aside(jobs[i], jobs[i].sweep_out)}")

    import hydra

    from persistworld.sweeps.job import sweep_job
    saved, saved_env = sys.argv, os.environ.get(SELECT_ENV)
    launchable = [i for i, j in enumerate(jobs) if not j.plan.startswith("skip")]
    if selected != launchable:          # a subset: the other jobs exit at once, untouched
        from persistworld.utils.io import atomic_write_json
        select = jobs[0].sweep_out / ".launch-select.json"
        atomic_write_json(select, [str(jobs[i].run_dir.resolve()) for i in selected])
        os.environ[SELECT_ENV] = str(select.resolve())
    else:
        os.environ.pop(SELECT_ENV, None)
    sys.argv = ["persistworld sweep", "--multirun", "--config-dir", str(sweep.parent),
                "--config-name", sweep.stem, *overrides]
    try:
        hydra.main(config_path="pkg://persistworld.conf", config_name="post_train",
                   version_base="1.3")(sweep_job)()
    except SystemExit as e:          # Hydra reports a failed job (or launcher error) and exits
        print(f"persistworld sweep: the multirun ended with status {e.code}", file=sys.stderr)
    except Exception as e:
        print(f"persistworld sweep: the multirun raised {type(e).__name__}: {e}",
              file=sys.stderr)
    finally:
        sys.argv = saved
        if saved_env is None:
            os.environ.pop(SELECT_ENV, None)
        else:
            os.environ[SELECT_ENV] = saved_env
    states = [run_state(j.run_dir) for j in jobs]
    print_jobs(jobs, f"sweep {sweep.stem}: finished", states)
    done = sum(s == "completed" for s, _ in states)
    print(f"{done} of {len(jobs)} runs completed")
    return 0 if done == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
