"""`persistworld search`: an asynchronous Optuna study over tiny post-train runs.

- a 6-trial study, 2 local worker processes, median pruning on the in-training checks;
- SIGKILL of a worker mid-trial: its RUNNING trial goes stale (heartbeat), is failed and
  retried (resuming the same run directory), the budget is respected, and a relaunch of the
  same command adds nothing;
- the space is validated before any work, with one message naming the setting;
- (marker slurm) the same study with 2 workers as SLURM jobs via submitit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_train_base import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]

TINY_BASE = [
    "rollout.prefix.high=2", "rollout.group_size=4", "rollout.sampler_steps=3",
    "trainer.steps=4", "trainer.batch_size=2", "trainer.ckpt_every=2", "trainer.num_threads=1",
    "trainer.progress=false", "lora.rank=4", "lora.alpha=4", "eval.num_chunks=2",
    "eval.max_samples=2", "eval.num_steps=3", "eval.num_videos=0", "trainer.eval_every=2",
    "trainer.eval_chunks=1", "trainer.eval_samples=2",
]


def _space(path: Path, **changes) -> Path:
    space = {
        "name": "tiny", "n_trials": 6, "workers": 2, "base_overrides": TINY_BASE,
        "objectives": [{"metric": "external/lpips", "direction": "minimize"}],
        "params": {"optim.lr": {"type": "float", "low": 1.0e-5, "high": 1.0, "log": True},
                   "objective.beta": {"type": "float", "low": 0.1, "high": 1.0},
                   "rollout.best_of_n": {"type": "categorical", "choices": [1, 2]}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "failures": {"heartbeat_interval": 1, "grace_period": 4, "max_retry": 1},
        **changes,
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def base_model(tiny_dataset, tmp_path_factory) -> Path:
    from hydra import compose, initialize_config_module
    from persistworld.trainers.base import train_base
    run_dir = tmp_path_factory.mktemp("search_base") / "base"
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        cfg = compose("train_base", overrides=[f"data.root={tiny_dataset}", f"run_dir={run_dir}",
                                               *TINY_OVERRIDES, "trainer.eval_every=0"])
    train_base(cfg)
    return run_dir


def _env_overrides(tiny_dataset: Path, base_model: Path) -> list[str]:
    return [f"data.root={tiny_dataset}", f"base_model={base_model}"]


def _trials(study_dir: Path):
    from persistworld.search.driver import load_study
    return load_study(study_dir)[0].get_trials()


def _check_budget_and_dirs(study_dir: Path, n_trials: int):
    """Every sampled parameter set finished exactly once, each in its own run directory."""
    from optuna.trial import TrialState
    trials = _trials(study_dir)
    fresh = [t for t in trials if "failed_trial" not in t.system_attrs]
    assert len(fresh) == n_trials, [(t.number, t.state) for t in trials]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials, [(t.number, t.state.name) for t in trials]
    dirs = [t.user_attrs["run_dir"] for t in finished]
    assert len(set(dirs)) == n_trials
    for t in finished:
        status = json.loads((Path(t.user_attrs["run_dir"]) / "status.json").read_text())
        assert status["state"] == ("completed" if t.state == TrialState.COMPLETE else "pruned")
        assert t.intermediate_values, t.number            # in-training checks were reported
    return trials


def test_space_validation_names_the_setting(tmp_path):
    from persistworld.search.space import SpaceError, load_space, validate_space
    bad_key = _space(tmp_path / "a.yaml", params={"optim.lrr": {"type": "float", "low": 1e-5,
                                                                "high": 1e-3}})
    with pytest.raises(SpaceError, match=r"params\.optim\.lrr: no such setting"):
        validate_space(load_space(bad_key))
    # best_of_n=3 keeps 6 of a group of 4: the bound is sampled and post_train.validate says no
    bad_bound = _space(tmp_path / "b.yaml", params={
        "rollout.best_of_n": {"type": "categorical", "choices": [1, 3]}})
    with pytest.raises(SpaceError, match=r"params\.rollout\.best_of_n=3: rollout\.best_of_n=3"):
        validate_space(load_space(bad_bound))
    bad_beta = _space(tmp_path / "c.yaml", params={
        "objective.beta": {"type": "float", "low": 0.0, "high": 1.0}})
    with pytest.raises(SpaceError, match=r"params\.objective\.beta=0\.0: objective\.beta must"):
        validate_space(load_space(bad_beta))
    multi_pruned = _space(tmp_path / "d.yaml", objectives=[
        {"metric": "external/lpips", "direction": "minimize"},
        {"metric": "wrist/ssim", "direction": "maximize"}])
    with pytest.raises(SpaceError, match="single-objective"):
        load_space(multi_pruned)
    on_test = _space(tmp_path / "f.yaml", base_overrides=[*TINY_BASE, "eval.split=test"])
    with pytest.raises(SpaceError, match=r"eval\.split=test: set by the search driver .*val"):
        validate_space(load_space(on_test))
    bad_metric = _space(tmp_path / "e.yaml", objectives=[{"metric": "external/fid"}])
    with pytest.raises(SpaceError, match=r"objectives\[0\]: metric 'external/fid'"):
        load_space(bad_metric)
    # the CLI: one line naming the setting, exit status 2, no study created
    out = subprocess.run([sys.executable, "-m", "persistworld.cli", "search", str(bad_key),
                          "--study-dir", str(tmp_path / "study")], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "params.optim.lrr: no such setting" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "study").exists()


def test_local_study_with_pruning(tiny_dataset, base_model, tmp_path):
    """6 trials, 2 asynchronous local workers, median pruning on the in-training checks (two
    queued trials first, so the pruner has its 2 startup trials early)."""
    from optuna.trial import TrialState
    from persistworld.search.driver import load_study, prepare, search
    space = _space(tmp_path / "tiny.yaml")
    study_dir = tmp_path / "study"
    env = _env_overrides(tiny_dataset, base_model)
    prepare(space, study_dir, overrides=env)
    study = load_study(study_dir)[0]
    for p in ({"optim.lr": 1e-4, "objective.beta": 0.5, "rollout.best_of_n": 1},
              {"optim.lr": 2e-4, "objective.beta": 0.5, "rollout.best_of_n": 2}):
        study.enqueue_trial(p)
    t0 = time.time()
    search(space, study_dir=study_dir, overrides=env)
    print(f"6-trial study with 2 workers: {time.time() - t0:.1f} s")
    trials = _check_budget_and_dirs(study_dir, 6)
    states = [t.state for t in trials]
    assert trials[0].state == trials[1].state == TrialState.COMPLETE, states   # startup
    print("states:", [s.name for s in states])         # which others are pruned depends on values
    assert len({t.user_attrs["worker"] for t in trials}) == 2   # both workers took trials
    # the report: table, preset, plots
    df = __import__("pandas").read_parquet(study_dir / "trials.parquet")
    assert len(df) == 6 and {"run_dir", "run_status", "params_optim.lr", "value"} <= set(df)
    best = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert (study_dir / "best.yaml").read_text().startswith("# @package _global_")
    assert best["trainer"]["steps"] == 4
    best_trial = load_study(study_dir)[0].best_trial
    trial_cfg = yaml.safe_load((Path(best_trial.user_attrs["run_dir"]) / "config.yaml")
                               .read_text())
    assert trial_cfg["eval"]["split"] == "val"          # selection on val, never on test
    assert "eval" not in best or "split" not in best["eval"]
    assert best.get("optim", {}).get("lr", 1e-4) == pytest.approx(best_trial.params["optim.lr"])
    for png in ("history.png", "importance.png", "intermediate.png"):
        assert (study_dir / "plots" / png).stat().st_size > 1000
    # the preset composes: post-train with --config-dir STUDY experiment=best
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    import persistworld.conf as conf
    with initialize_config_dir(str(Path(conf.__file__).parent), version_base="1.3"):
        cfg = compose("post_train", overrides=["experiment=best", *env,
                                               f"hydra.searchpath=[file://{study_dir}]"])
    assert cfg.optim.lr == pytest.approx(best_trial.params["optim.lr"])
    assert cfg.trainer.steps == 4
    # the run directories are ordinary ones for persistworld.analysis
    from persistworld.analysis.collect import collect_runs
    runs = collect_runs(study_dir / "trials")
    assert sorted(runs["status"]) == sorted(df["run_status"])


def test_pruned_trial_stops_its_run(tiny_dataset, base_model, tmp_path):
    """The pruning path, deterministically: LPIPS > 0 always, so ThresholdPruner(upper=0) prunes
    at the first check; the run stops there with status "pruned", the trial is PRUNED."""
    from optuna.trial import TrialState
    from persistworld.search.driver import prepare, run_worker
    space = _space(tmp_path / "tiny.yaml", n_trials=1,
                   pruner={"name": "threshold", "upper": 0.0, "n_warmup_steps": 0})
    study_dir, _ = prepare(space, tmp_path / "study",
                           overrides=_env_overrides(tiny_dataset, base_model))
    assert run_worker(study_dir, "w") == {"PRUNED": 1}
    (trial,) = _trials(study_dir)
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [2]
    status = json.loads((Path(trial.user_attrs["run_dir"]) / "status.json").read_text())
    assert status["state"] == "pruned" and status["step"] == 2
    assert not (Path(trial.user_attrs["run_dir"]) / "model.pt").exists()


def _early(t) -> bool:
    """A RUNNING trial whose post-train has started but not reached step 2 of 4: killing its
    worker now surely catches it mid-run."""
    run_dir = Path(t.user_attrs.get("run_dir", "/nonexistent"))
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return False
    rows = (run_dir / "metrics.jsonl").read_text().splitlines() \
        if (run_dir / "metrics.jsonl").exists() else []
    return status.get("state") == "running" and all(json.loads(r)["step"] < 2 for r in rows)


def _wait(cond, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_killed_worker_trial_is_retried_and_relaunch_continues(tiny_dataset, base_model,
                                                               tmp_path):
    from optuna.trial import TrialState
    space = _space(tmp_path / "tiny.yaml", n_trials=4, pruner={"name": "none"})
    study_dir = tmp_path / "study"
    cmd = [sys.executable, "-m", "persistworld.cli", "search", str(space), "--study-dir",
           str(study_dir), *_env_overrides(tiny_dataset, base_model)]
    ctl = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        def running_trial():
            if not (study_dir / "study.json").exists():
                return None
            for t in _trials(study_dir):
                if t.state == TrialState.RUNNING and "pid" in t.user_attrs and _early(t):
                    return t
            return None
        victim = _wait(running_trial, 120, "a running trial")
        os.kill(victim.user_attrs["pid"], signal.SIGKILL)
        out, _ = ctl.communicate(timeout=240)
    finally:
        if ctl.poll() is None:
            ctl.kill()
    assert ctl.returncode == 0, out
    assert "1 failed" in out, out
    trials = _check_budget_and_dirs(study_dir, 4)
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == victim.params
    assert retries[0].user_attrs["run_dir"] == victim.user_attrs["run_dir"]   # resumed there
    values = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    # relaunch: nothing lost, nothing repeated, nothing added
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    after = _trials(study_dir)
    assert len(after) == len(trials)
    assert {t.number: t.value for t in after if t.state == TrialState.COMPLETE} == values


def test_killed_controller_and_workers_relaunch(tiny_dataset, base_model, tmp_path):
    """SIGKILL the controller and both workers mid-study (SQLite storage this time), relaunch:
    completed trials are kept, the dead RUNNING trials are failed and retried, the budget holds."""
    from optuna.trial import TrialState
    space = _space(tmp_path / "tiny.yaml", n_trials=4, pruner={"name": "none"})
    study_dir = tmp_path / "study"
    cmd = [sys.executable, "-m", "persistworld.cli", "search", str(space), "--study-dir",
           str(study_dir), "--storage", f"sqlite:///{tmp_path}/study.db",
           *_env_overrides(tiny_dataset, base_model)]
    ctl = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        def state():
            if not (study_dir / "study.json").exists():
                return None
            trials = _trials(study_dir)
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING and _early(t)]
            return (done, running) if done and running else None
        _wait(state, 180, "a completed and a freshly started trial")
    finally:
        os.killpg(ctl.pid, signal.SIGKILL)
        ctl.wait()
    running = [t for t in _trials(study_dir) if t.state == TrialState.RUNNING]
    assert running                                          # the kill caught a trial mid-run
    before = {t.number: t.value for t in _trials(study_dir) if t.state == TrialState.COMPLETE}
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = _check_budget_and_dirs(study_dir, 4)
    after = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    assert before.items() <= after.items()                  # nothing completed was lost
    for t in running:
        assert trials[t.number].state == TrialState.FAIL
        retry = [r for r in trials if r.system_attrs.get("failed_trial") == t.number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE


# -- SLURM ------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_slurm_workers(tiny_dataset, base_model, tmp_path):
    from slurm_support import require_cluster
    require_cluster()
    from optuna.trial import TrialState
    from persistworld.search.driver import search
    space = _space(tmp_path / "tiny.yaml", n_trials=4, launcher="slurm",
                   slurm={"slurm_partition": "debug", "timeout_min": 10, "cpus_per_task": 1})
    study_dir = tmp_path / "study"
    t0 = time.time()
    search(space, study_dir=study_dir, overrides=_env_overrides(tiny_dataset, base_model))
    print(f"4-trial study with 2 SLURM workers: {time.time() - t0:.1f} s")
    trials = _check_budget_and_dirs(study_dir, 4)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    jobs = json.loads((study_dir / "workers" / "slurm_0.json").read_text())
    assert len(jobs) == 2
    assert len({t.user_attrs["worker"] for t in trials}) >= 1
    assert (study_dir / "best.yaml").exists()
