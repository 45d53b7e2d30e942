"""`persistworld search SPACE.yaml`: an asynchronous Optuna search over post-training settings.

Layout of a study directory (``--study-dir``, default ``runs/search/<space name>``)::

    space.yaml          the search space (copied at creation; a relaunch must use the same)
    study.json          study name, storage URL (null: the journal file below), CLI overrides
    journal.log         Optuna JournalStorage (JournalFileBackend) holding every trial
    heartbeats/<id>     one file per running trial, touched every heartbeat_interval seconds
    trials/<number>/    one post-train run directory per trial (a retried trial resumes the
                        run directory of the trial it retries)
    workers/            worker logs (local) and submitit folders (slurm)
    trials.csv/.parquet, best.yaml, experiment/best.yaml, plots/*.png   (search-report)

N workers (local processes or SLURM jobs via submitit) each run ``run_worker``: take the next
trial from the shared study (``study.ask()`` under a small file lock so that the total trial
budget ``n_trials`` is never exceeded), run one post-train with the sampled overrides, report
its in-training checks to the pruner, ``study.tell()`` the final evaluation's metrics. No
worker waits for another. Each running trial sends a heartbeat; a trial whose heartbeat
stops (its worker was killed) is failed by ``optuna.storages.fail_stale_trials`` and re-queued
by ``RetryHeartbeatStaleTrialCallback`` (``failures.max_retry``; 0 = leave it failed).

Optuna's own JournalStorage has no heartbeat (optuna 5.0): ``HeartbeatJournalStorage`` adds
one with per-trial files. A database URL (``--storage sqlite:////abs/path/study.db``,
``postgresql://...``) uses ``RDBStorage`` and its native heartbeat.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zlib
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.trial import TrialState

from persistworld.search.space import (SEARCH_OVERRIDES, SearchSpace, SpaceError, load_space,
                                       validate_space)
from persistworld.errors import MissingFile

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

SETTINGS = "study.json"
SPACE = "space.yaml"
JOURNAL = "journal.log"


def log(msg: str) -> None:
    print(f"[search {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- storage -----------------------------------------------------------------------------------
class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage + Optuna's heartbeat protocol, the heartbeat being a file's mtime (the
    journal itself stays small: no log entry per beat)."""

    def __init__(self, backend, heartbeat_dir: Path, heartbeat_interval: int,
                 grace_period: int, stale_trial_callback=None):
        super().__init__(backend)
        self._hb_dir = Path(heartbeat_dir)
        self._hb_dir.mkdir(parents=True, exist_ok=True)
        self._hb_interval = int(heartbeat_interval)
        self._grace = int(grace_period)
        self._stale_cb = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        path = self._hb_dir / str(trial_id)
        path.touch()
        os.utime(path)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            path = self._hb_dir / str(t._trial_id)
            if path.exists():
                last = path.stat().st_mtime
            elif t.datetime_start is not None:
                last = t.datetime_start.timestamp()
            else:
                continue
            if now - last > self._grace:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._hb_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_cb


def open_storage(url: str | None, study_dir: Path, space: SearchSpace):
    """The study's storage: the journal file in the study dir (url None), a journal file path,
    or any SQLAlchemy database URL (RDBStorage), all with heartbeats."""
    f = space.failures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        cb = (RetryHeartbeatStaleTrialCallback(max_retry=f.max_retry) if f.max_retry > 0
              else None)
    if url and "://" in url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=f.heartbeat_interval,
                                              grace_period=f.grace_period,
                                              heartbeat_stale_trial_callback=cb)
    path = Path(url) if url else study_dir / JOURNAL
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path) + ".lock"))
    return HeartbeatJournalStorage(backend, study_dir / "heartbeats", f.heartbeat_interval,
                                   f.grace_period, cb)


class _Heartbeat:
    """Beats for one trial while it runs (Study.optimize does this itself; we use ask/tell)."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self):
        if is_heartbeat_enabled(self.storage):
            interval = self.storage.get_heartbeat_interval()

            def beat():
                while True:
                    try:
                        self.storage.record_heartbeat(self.trial_id)
                    except Exception as e:  # noqa: BLE001 - a missed beat must not kill a run
                        log(f"heartbeat failed: {e}")
                    if self.stop.wait(interval):
                        return
            self.thread = threading.Thread(target=beat, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


# -- settings stored in the study dir -------------------------------------------------------------
def read_settings(study_dir: Path) -> dict:
    path = Path(study_dir) / SETTINGS
    if not path.exists():
        raise MissingFile(f"{study_dir} is not a search study directory (no {SETTINGS})")
    return json.loads(path.read_text())


def load_study(study_dir: Path, seed_offset: int = 0) -> tuple[optuna.Study, SearchSpace, dict]:
    study_dir = Path(study_dir)
    settings = read_settings(study_dir)
    space = load_space(study_dir / SPACE)
    storage = open_storage(settings["storage"], study_dir, space)
    study = optuna.load_study(study_name=settings["study_name"], storage=storage,
                              sampler=space.make_sampler(seed_offset),
                              pruner=space.make_pruner())
    return study, space, settings


def budget_used(trials: list) -> int:
    """Trials counted against n_trials: every sampled parameter set, a retry of a dead
    worker's trial not counted again."""
    return sum(1 for t in trials if "failed_trial" not in t.system_attrs)


# -- one worker ----------------------------------------------------------------------------------
def _next_trial(study: optuna.Study, lock: JournalFileOpenLock, n_trials: int):
    lock.acquire()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")           # experimental / "use optimize" warnings
            fail_stale_trials(study)                 # dead workers' trials -> FAIL (+ retry)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and budget_used(trials) >= n_trials:
                return None
            return study.ask()                        # a queued retry first, else a new trial
    finally:
        lock.release()


def trial_run_dir(study_dir: Path, trial: optuna.trial.FrozenTrial) -> Path:
    """Deterministic per trial; a retry continues the run directory of the trial it retries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    origin = trial.number if origin is None else origin
    return Path(study_dir).resolve() / "trials" / f"{int(origin):04d}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_trial(study: optuna.Study, space: SearchSpace, settings: dict, study_dir: Path,
              trial, worker: str) -> TrialState:
    import inspect

    from persistworld.search.space import compose_post_train
    from persistworld.trainers.post_train import Pruned, post_train, validate
    from persistworld.utils.io import read_jsonl
    frozen = study._storage.get_trial(trial._trial_id)
    run_dir = trial_run_dir(study_dir, frozen)
    params = space.suggest(trial)
    overrides = [*space.base_overrides, *settings["overrides"], *space.overrides(params),
                 *SEARCH_OVERRIDES, f"run_dir={run_dir}"]
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", worker)
    trial.set_user_attr("pid", os.getpid())
    log(f"worker {worker}: trial {trial.number} -> {run_dir.name} {space.overrides(params)}")
    try:
        cfg = compose_post_train(overrides)
        validate(cfg)
    except Exception as e:  # noqa: BLE001 - a joint setting the bounds check could not see
        trial.set_user_attr("error", str(e).splitlines()[0][:500])
        study.tell(trial, state=TrialState.FAIL)
        log(f"worker {worker}: trial {trial.number} FAILED (settings): {e}")
        return TrialState.FAIL
    obj = space.objectives[0]
    status = (_read_json(run_dir / "status.json") or {}).get("state")
    if status == "pruned":                   # pruned before its worker died: decision stands
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    report = not space.multi_objective       # Optuna takes intermediate values then only
    if report and (run_dir / "metrics.jsonl").exists():   # a retry resumes: re-report
        for row in read_jsonl(run_dir / "metrics.jsonl"):
            if row.get("split") == "eval" and obj.eval_key in row:
                if int(row["step"]) not in frozen.intermediate_values:
                    trial.report(float(row[obj.eval_key]), int(row["step"]))

    def on_eval(step: int, metrics: dict) -> None:
        if obj.eval_key not in metrics:
            raise KeyError(f"in-training check has no {obj.eval_key!r} "
                           f"(has {sorted(metrics)[:8]})")
        trial.report(float(metrics[obj.eval_key]), int(step))
        if trial.should_prune():
            raise Pruned(f"trial {trial.number} pruned at step {step}")

    try:
        kw = {"on_eval": on_eval if report else None}
        if "overrides" in inspect.signature(post_train).parameters:
            kw["overrides"] = overrides[:-1]
        post_train(cfg, **kw)
        e = cfg.eval
        summary = _read_json(run_dir / "eval" / f"{e.mode}_{e.num_chunks}" / "summary.json")
        if summary is None:
            raise MissingFile(f"{run_dir} finished without eval/{e.mode}_{e.num_chunks}/"
                              f"summary.json")
        values = [o.final_value(summary) for o in space.objectives]
        study.tell(trial, values if space.multi_objective else values[0])
        log(f"worker {worker}: trial {trial.number} COMPLETE {values}")
        return TrialState.COMPLETE
    except Pruned:
        study.tell(trial, state=TrialState.PRUNED)
        log(f"worker {worker}: trial {trial.number} PRUNED")
        return TrialState.PRUNED
    except optuna.exceptions.UpdateFinishedTrialError:
        log(f"worker {worker}: trial {trial.number} was already finished by another worker "
            f"(its heartbeat was stale)")
        return TrialState.FAIL
    except Exception as e:  # noqa: BLE001 - one failed trial must not stop the search
        log(f"worker {worker}: trial {trial.number} FAILED: {e}")
        try:
            trial.set_user_attr("error", "".join(traceback.format_exception_only(type(e), e))
                                .strip()[:500])
            study.tell(trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass                                 # already failed as stale by another worker
        return TrialState.FAIL


def run_worker(study_dir: str | Path, worker: str | int = 0) -> dict:
    """The worker loop (a local process or a SLURM job): trials until the budget is spent and
    no other worker's trial is still running (it might die and need a retry)."""
    study_dir = Path(study_dir).resolve()
    worker = str(worker)
    study, space, settings = load_study(study_dir)
    # distinct sampler seeds per worker and per launch: no two workers replay one sequence
    n_start = len(study.get_trials(deepcopy=False))
    study.sampler = space.make_sampler(zlib.crc32(f"{worker}/{n_start}".encode()) % 100_000)
    lock = JournalFileOpenLock(str(study_dir / "ask.lock"))
    n_trials = int(settings["n_trials"])
    done: dict[str, int] = {}
    while True:
        trial = _next_trial(study, lock, n_trials)
        if trial is None:
            running = [t.number for t in study.get_trials(deepcopy=False,
                                                          states=(TrialState.RUNNING,))]
            if not running or not space.failures.wait_for_running:
                break
            time.sleep(space.failures.heartbeat_interval)   # maybe one dies and comes back
            continue
        with _Heartbeat(study._storage, trial._trial_id):
            state = run_trial(study, space, settings, study_dir, trial, worker)
        done[state.name] = done.get(state.name, 0) + 1
    log(f"worker {worker}: no trials left ({done or 'none run here'})")
    return done


# -- the controller ------------------------------------------------------------------------------
def _same_space(a: dict, b: dict) -> bool:
    runtime = ("n_trials", "workers", "launcher", "slurm", "description", "failures")
    return ({k: v for k, v in a.items() if k not in runtime}
            == {k: v for k, v in b.items() if k not in runtime})


def prepare(space_path: str | Path, study_dir: str | Path | None = None,
            storage: str | None = None, overrides: list[str] = (),
            n_trials: int | None = None) -> tuple[Path, SearchSpace]:
    """Validate the space and create (or reopen) the study and its directory."""
    import shutil
    import yaml
    space = load_space(space_path)
    overrides = list(overrides)
    for ov in overrides:
        if ov.split("=", 1)[0].lstrip("+~") in space.params:
            raise SpaceError(f"command-line override {ov!r} sets a searched parameter of "
                             f"{space.path}")
        if ov.split("=", 1)[0] == "run_dir":
            raise SpaceError("run_dir is set per trial by the search driver (use --study-dir)")
    validate_space(space, overrides)
    study_dir = Path(study_dir or Path("runs") / "search" / space.name).resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    settings_path = study_dir / SETTINGS
    if settings_path.exists():
        old = read_settings(study_dir)
        old_space = yaml.safe_load((study_dir / SPACE).read_text()) or {}
        if not _same_space(old_space, space.raw):
            raise SpaceError(f"{study_dir} holds a study of a different search space than "
                             f"{space.path}; relaunch with the same space or use another "
                             f"--study-dir")
        if old["overrides"] != overrides:
            raise SpaceError(f"{study_dir} was started with overrides {old['overrides']}, not "
                             f"{overrides}; relaunch with the same ones or use another "
                             f"--study-dir")
        if storage is not None and storage != old["storage"]:
            raise SpaceError(f"{study_dir} uses storage {old['storage'] or 'journal.log'}; "
                             f"--storage {storage} differs")
        settings = {**old, "n_trials": int(n_trials or space.n_trials)}
    else:
        settings = {"study_name": space.name, "storage": storage, "overrides": overrides,
                    "n_trials": int(n_trials or space.n_trials),
                    "directions": space.directions,
                    "objectives": [o.metric for o in space.objectives],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    shutil.copyfile(space.path, study_dir / SPACE)
    space = load_space(study_dir / SPACE)
    optuna.create_study(study_name=settings["study_name"],
                        storage=open_storage(settings["storage"], study_dir, space),
                        directions=space.directions, load_if_exists=True)
    tmp = settings_path.with_suffix(".tmp")            # written last: marks a ready study
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, settings_path)
    return study_dir, space


def launch_local(study_dir: Path, workers: int, launch: int) -> list[subprocess.Popen]:
    logs = study_dir / "workers"
    logs.mkdir(exist_ok=True)
    procs = []
    for i in range(workers):
        name = f"{launch}-{i}"
        out = open(logs / f"worker_{name}.log", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "persistworld.search.driver", str(study_dir), name],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        out.close()
        (logs / f"worker_{name}.pid").write_text(str(procs[-1].pid))
    return procs


def launch_slurm(study_dir: Path, space: SearchSpace, workers: int, launch: int) -> list:
    import submitit
    folder = study_dir / "workers" / f"slurm_{launch}"
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {"timeout_min": 60, "cpus_per_task": 1, "name": f"search-{space.name}",
              "slurm_array_parallelism": workers, **space.slurm}
    ex.update_parameters(**params)
    jobs = ex.map_array(run_worker, [str(study_dir)] * workers,
                        [f"{launch}-{i}" for i in range(workers)])
    (study_dir / "workers" / f"slurm_{launch}.json").write_text(
        json.dumps([j.job_id for j in jobs]) + "\n")
    log(f"submitted {workers} SLURM worker job(s): {[j.job_id for j in jobs]}")
    return jobs


def _progress(study_dir: Path) -> str:
    study, _, settings = load_study(study_dir)
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return (f"{budget_used(trials)}/{settings['n_trials']} sampled; "
            + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())))


def search(space_path: str | Path, workers: int | None = None, launcher: str | None = None,
           study_dir: str | Path | None = None, storage: str | None = None,
           overrides: list[str] = (), n_trials: int | None = None,
           report: bool = True) -> Path:
    study_dir, space = prepare(space_path, study_dir, storage, list(overrides), n_trials)
    workers = int(workers or space.workers)
    launcher = launcher or space.launcher
    launch = len(list((study_dir / "workers").glob("launch_*"))) if (study_dir / "workers") \
        .exists() else 0
    (study_dir / "workers").mkdir(exist_ok=True)
    (study_dir / "workers" / f"launch_{launch}").write_text(f"{launcher} x{workers}\n")
    log(f"study {study_dir} ({_progress(study_dir)}); {workers} {launcher} worker(s)")
    failed = 0
    if launcher == "local":
        procs = launch_local(study_dir, workers, launch)
        try:
            last = time.time()
            while any(p.poll() is None for p in procs):
                time.sleep(1.0)
                if time.time() - last > 30:
                    log(_progress(study_dir))
                    last = time.time()
        except KeyboardInterrupt:
            for p in procs:
                p.send_signal(signal.SIGINT)
            raise
        failed = sum(p.returncode != 0 for p in procs)
    elif launcher == "slurm":
        jobs = launch_slurm(study_dir, space, workers, launch)
        for j in jobs:
            try:
                j.result()
            except Exception as e:  # noqa: BLE001 - report, the study keeps what it has
                failed += 1
                log(f"SLURM worker {j.job_id} failed: {str(e).splitlines()[-1][:300]}")
    else:
        raise SpaceError(f"--launcher must be local or slurm, got {launcher!r}")
    log(f"workers finished ({failed} failed); {_progress(study_dir)}")
    if report:
        from persistworld.search.report import write_report
        write_report(study_dir)
    return study_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="persistworld search",
        description="Asynchronous Optuna search over `persistworld post-train` settings. "
                    "Rerun the same command to continue a study (no trial is lost or repeated).")
    p.add_argument("space", help="search space YAML (e.g. sweeps/optuna/mini.yaml)")
    p.add_argument("overrides", nargs="*", help="post-train Hydra overrides for every trial "
                   "(e.g. base_model=runs/base/default data.root=data/mini_droid)")
    p.add_argument("--workers", type=int, default=None, help="parallel workers (space default)")
    p.add_argument("--launcher", choices=("local", "slurm"), default=None)
    p.add_argument("--study-dir", default=None, help="default runs/search/<space name>")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: a database URL (sqlite:////abs/study.db, "
                        "postgresql://...) or a journal file path; default "
                        "<study-dir>/journal.log")
    p.add_argument("--n-trials", type=int, default=None, help="total trials (space default)")
    p.add_argument("--no-report", action="store_true", help="skip search-report at the end")
    a = p.parse_intermixed_args(argv)
    try:
        search(a.space, a.workers, a.launcher, a.study_dir, a.storage, a.overrides,
               a.n_trials, report=not a.no_report)
    except (SpaceError, FileNotFoundError) as e:
        print(f"persistworld search: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":   # a local worker: python -m persistworld.search.driver DIR NAME
    run_worker(sys.argv[1], sys.argv[2])
