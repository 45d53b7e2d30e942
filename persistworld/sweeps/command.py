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
`post_train.validate`, the dataset, the episode lengths, the base model and the run directory
(a completed run is skipped; an existing one must hold the same settings) BEFORE anything is
submitted. Afterwards it prints each run's state; runs whose SLURM job died without writing a
status (cancelled, killed) are marked `failed` with the SLURM state, so `persistworld report`
lists them.
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

REPO = Path(__file__).resolve().parents[2]
TERMINAL_SLURM = ("CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "FAILED", "BOOT_FAIL",
                  "DEADLINE", "PREEMPTED")


DEFAULT_RESUMABLE = ("trainer.steps", "trainer.progress", "trainer.ckpt_every", "trainer.device",
                     "trainer.num_threads", "trainer.eval_every", "trainer.eval_chunks",
                     "trainer.eval_samples", "eval", "run_dir", "data.root", "data.workers",
                     "base_model", "overrides")


class SweepError(ValueError):
    """A sweep that cannot start: one line naming the job(s) and setting(s)."""


@dataclass
class Job:
    overrides: list[str]
    run_dir: Path
    row: str = ""
    seed: int = 0
    plan: str = "new"                    # new | resume (step N) | skip (completed)
    errors: list[str] = field(default_factory=list)


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


def preflight(sweep: Path, job_overrides: list[list[str]]) -> list[Job]:
    """Compose and check every job; nothing is submitted here."""
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from persistworld.data.dataset import EpisodeStore
    from persistworld.trainers import post_train as pt
    from persistworld.trainers.post_train import check_episode_lengths, validate
    from persistworld.utils.rundir import config_differences
    # settings allowed to change between a run and its resumption (post_train's own list)
    resumable = getattr(pt, "RESUMABLE_CHANGES", DEFAULT_RESUMABLE)

    jobs: list[Job] = []
    stores: dict[str, object] = {}
    with initialize_config_dir(str(sweep.parent), version_base="1.3"):
        for ov in job_overrides:
            try:
                cfg = compose(sweep.stem, ov)
            except Exception as e:        # Hydra's own message: typo'd key, wrong type, ...
                jobs.append(Job(ov, Path("?"), errors=[str(e).splitlines()[0]]))
                continue
            job = Job(ov, Path(cfg.run_dir), str(cfg.sweep.row), int(cfg.seed))
            jobs.append(job)
            try:
                setup = validate(cfg)[0]
            except ValueError as e:
                job.errors.append(str(e))
                continue
            root = str(cfg.data.root)
            if not (Path(root) / "manifest.json").is_file():
                job.errors.append(f"data.root={root}: no dataset (manifest.json missing); "
                                  f"render it with `persistworld render data.root={root}`")
            else:
                try:
                    store = stores.get(root) or EpisodeStore(root)
                    stores[root] = store
                    check_episode_lengths(store, setup, int(cfg.data.stride))
                except Exception as e:
                    job.errors.append(str(e))
            if not _base_model_ok(str(cfg.base_model)):
                job.errors.append(f"base_model={cfg.base_model}: no model.pt there "
                                  f"(train one with `persistworld train-base`)")
            status_path = job.run_dir / "status.json"
            if status_path.exists():
                status = json.loads(status_path.read_text() or "{}")
                if status.get("state") == "completed":
                    job.plan = "skip (completed)"
                else:
                    job.plan = f"resume ({status.get('state')} at step {status.get('step', 0)})"
                cfg_path = job.run_dir / "config.yaml"
                if cfg_path.exists():
                    old = yaml.safe_load(cfg_path.read_text()) or {}
                    diff = config_differences(old, OmegaConf.to_container(cfg, resolve=True),
                                              resumable)
                    if diff:
                        job.errors.append(f"run_dir={job.run_dir} holds a run with other "
                                          f"settings ({', '.join(diff[:6])}); change sweep.out "
                                          f"or delete it")
    seen: dict[Path, Job] = {}
    for job in jobs:
        if job.run_dir in seen and job.run_dir != Path("?"):
            job.errors.append(f"same run_dir as job {' '.join(seen[job.run_dir].overrides)}")
        seen[job.run_dir] = job
    return jobs


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
                   help="print each run's state (marking runs whose SLURM job died as failed)")
    args = p.parse_intermixed_args(list(argv) if argv is not None else None)

    try:
        sweep = find_yaml(args.name, "sweeps")
        profile = find_yaml(args.profile, "profiles") if args.profile else None
        overrides = hydra_overrides(sweep, profile, args.overrides)
        jobs = preflight(sweep, expand(sweep, overrides))
    except Exception as e:
        print(f"persistworld sweep: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.status:
        states = [run_state(j.run_dir) for j in jobs]
        print_jobs(jobs, f"sweep {sweep.stem}: {len(jobs)} runs", states)
        return 0 if all(s == "completed" for s, _ in states) else 1
    bad = [j for j in jobs if j.errors]
    print_jobs(jobs, f"sweep {sweep.stem}: {len(jobs)} jobs, {len(bad)} with errors "
                     f"(pre-flight)")
    if bad:
        print(f"persistworld sweep: error: {len(bad)} of {len(jobs)} jobs cannot run; nothing "
              f"was submitted", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    if all(j.plan.startswith("skip") for j in jobs):
        print("every run is completed; nothing to launch")
        return 0

    import hydra

    from persistworld.sweeps.job import sweep_job
    saved = sys.argv
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
    states = [run_state(j.run_dir) for j in jobs]
    print_jobs(jobs, f"sweep {sweep.stem}: finished", states)
    done = sum(s == "completed" for s, _ in states)
    print(f"{done} of {len(jobs)} runs completed")
    return 0 if done == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
