"""Config groups, typed schemas, presets, the paper's ablation sweeps and `persistworld sweep`
with local launchers (the SLURM side is tests/test_sweeps_slurm.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sweep_utils import REPO, TINY_POST, make_tiny_base, run_sweep, status

CONF = REPO / "persistworld" / "conf"
SWEEPS = REPO / "sweeps"
SEEDS = 3
# METHOD.md §7: rows per ablation table (Tables 3-11)
PAPER_ROWS = {"lr": 2, "reward_mix": 5, "prefix_strategy": 5, "group_size": 5,
              "branch_horizon": 2, "view_weight": 2, "kl": 2, "old_policy_ema": 2,
              "policy_ema": 2}
# tables beyond the paper (not in all.yaml): the post-training loss
EXTRA_ROWS = {"objective": 2}
GROUPS = ("rollout", "reward", "objective", "old_policy", "policy_ema", "lora", "optim",
          "trainer", "eval", "launcher", "experiment")


def _compose(overrides=(), name="post_train"):
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _options(group: str) -> list[str]:
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


# -- config structure -----------------------------------------------------------------------
def test_key_paths_and_defaults_unchanged():
    cfg = _compose()
    assert cfg.optim.lr == 1e-4 and cfg.optim.name == "adamw"
    assert cfg.rollout.group_size == 8 and cfg.rollout.best_of_n == 2
    assert cfg.rollout.prefix.strategy == "uniform" and cfg.rollout.prefix.high == 9
    assert cfg.reward.w_lpips == 1.0 and cfg.reward.w_psnr == 0.03125
    assert cfg.objective.w_kl == 1e-4 and cfg.old_policy.schedule == "paper"
    assert cfg.lora.rank == 16 and list(cfg.lora.target_modules) == ["to_q", "to_k", "to_v",
                                                                      "to_out.0"]
    assert cfg.trainer.steps == 200 and cfg.eval.num_chunks == 10 and cfg.seed == 0
    cfg = _compose(["optim.lr=3e-4", "rollout.group_size=16", "rollout.prefix.strategy=fixed",
                    "reward.w_lpips=0", "objective.w_kl=0", "rollout.best_of_n=null"])
    assert (cfg.optim.lr, cfg.rollout.group_size, cfg.rollout.prefix.strategy,
            cfg.reward.w_lpips, cfg.objective.w_kl, cfg.rollout.best_of_n) == (
        3e-4, 16, "fixed", 0.0, 0.0, None)


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_instantiates(group):
    from persistworld.conf.schema import PostTrainConf
    from persistworld.trainers.post_train import validate
    options = _options(group)
    assert options, group
    if group not in ("launcher", "experiment"):
        assert "default" in options
    for opt in options:
        if opt == "schema":
            continue
        cfg = _compose([f"{group}={opt}"])
        obj = OmegaConf.to_object(cfg)                  # the typed dataclasses
        assert isinstance(obj, PostTrainConf)
        validate(cfg)


def test_every_row_preset_composes_and_validates():
    from persistworld.trainers.post_train import validate
    rows = _options("row")
    assert len(rows) == sum(PAPER_ROWS.values()) + sum(EXTRA_ROWS.values())
    for row in rows:
        for exp in ("paper", "mini", "bench"):
            cfg = _compose([f"experiment={exp}", f"row={row}"])
            validate(cfg)
            assert f"{cfg.sweep.table}/{cfg.sweep.row}" == row


def test_presets_match_the_paper():
    p = _compose(["experiment=paper"])
    assert (p.rollout.group_size, p.rollout.best_of_n, p.rollout.prefix.strategy,
            p.rollout.prefix.low, p.rollout.prefix.high, p.rollout.branch_chunks) == (
        16, 5, "uniform", 0, 9, 1)
    assert (p.lora.rank, p.lora.alpha, p.optim.name, p.optim.lr) == (64, 64, "muon", 1e-4)
    assert (p.trainer.batch_size, p.trainer.steps, p.eval.num_chunks) == (64, 8000, 10)
    assert p.objective.w_kl > 0 and p.old_policy.schedule == "paper"
    m = _compose(["experiment=mini"])
    assert (m.rollout.group_size, m.rollout.best_of_n, m.rollout.prefix.high,
            m.rollout.sampler_steps, m.trainer.steps, m.trainer.batch_size) == (8, 2, 3, 5,
                                                                                16, 8)
    # the curriculum ramp is the whole run (a literal: `trainer.steps=N` extends a run, and an
    # extension must not change the ramp of the steps already trained)
    assert (m.rollout.prefix.ramp_steps, p.rollout.prefix.ramp_steps) == (16, 8000)
    # the embedded benchmark: mini's recipe with K=16 best-of-2 and Table 1's evaluation; its
    # Table 6 row k16_bo2 is the preset itself (docs/results/bench/ reads Table 1 from it)
    b = _compose(["experiment=bench"])
    assert (b.rollout.group_size, b.rollout.best_of_n, b.eval.num_chunks, b.eval.max_samples,
            b.optim.lr, b.trainer.steps) == (16, 2, 14, None, m.optim.lr, m.trainer.steps)
    assert b.rollout.sampler_steps == 10            # as docs/results/bench/ was measured
    k = _compose(["experiment=bench", "row=group_size/k16_bo2"])
    drop = lambda c: {key: v for key, v in OmegaConf.to_container(c).items() if key != "sweep"}
    assert drop(k) == drop(b)


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", "lrr"),                              # typo'd key
    ("trainer.steps=abc", "trainer.steps"),              # wrong type
    ("rollout.prefix.low=1.5", "rollout.prefix.low"),
    ("lora.train_action_encoder=maybe", "train_action_encoder"),
])
def test_typo_or_wrong_type_fails_at_compose(override, words):
    with pytest.raises(ConfigCompositionException) as e:
        _compose([override])
    assert words in str(e.value) + str(e.value.__cause__)


def test_typo_in_a_preset_file_fails_at_compose(tmp_path):
    (tmp_path / "bad.yaml").write_text("defaults:\n  - post_train\n  - _self_\n"
                                       "hydra:\n  searchpath: [pkg://persistworld.conf]\n"
                                       "optim:\n  lrr: 3.0e-4\n")
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        with pytest.raises(Exception, match="lrr"):
            compose("bad")


# -- sweeps ---------------------------------------------------------------------------------
def _jobs(name: str, *overrides: str) -> list[list[str]]:
    from persistworld.sweeps.command import expand, find_yaml
    return expand(find_yaml(name, "sweeps"), list(overrides))


@pytest.mark.parametrize("name", [*PAPER_ROWS, *EXTRA_ROWS, "all"])
def test_sweep_job_count_and_run_dirs(name):
    from persistworld.trainers.post_train import validate
    jobs = _jobs(name)
    rows = sum(PAPER_ROWS.values()) if name == "all" else {**PAPER_ROWS, **EXTRA_ROWS}[name]
    assert len(jobs) == rows * SEEDS
    run_dirs = set()
    with initialize_config_dir(str(SWEEPS), version_base="1.3"):
        for ov in jobs:
            cfg = compose(name, ov)
            validate(cfg)
            assert cfg.run_dir == (f"sweeps_out/paper/{cfg.sweep.table}/{cfg.sweep.row}/"
                                   f"seed={cfg.seed}")
            run_dirs.add(cfg.run_dir)
            if name != "all":
                assert cfg.sweep.table == name
    assert len(run_dirs) == len(jobs)
    assert len(_jobs(name, "seed=0,1,2,3,4")) == rows * 5


def test_coupled_rows():
    group_jobs, ema_jobs = _jobs("group_size", "seed=0"), _jobs("policy_ema", "seed=0")
    with initialize_config_dir(str(SWEEPS), version_base="1.3"):
        got = {}
        for ov in group_jobs:
            c = compose("group_size", ov)
            got[c.sweep.row] = (c.rollout.group_size, c.rollout.best_of_n)
        assert got == {"k4": (4, None), "k8": (8, None), "k16": (16, None),
                       "k16_bo5": (16, 5), "k16_bo2": (16, 2)}
        for ov in ema_jobs:
            c = compose("policy_ema", ov)
            assert (c.rollout.group_size, c.rollout.best_of_n) == (16, 2)
            assert c.policy_ema.decay == (0.9 if c.sweep.row == "ema0.9" else 0.0)


def test_profiles_select_the_submitit_slurm_launcher():
    from persistworld.sweeps.command import find_yaml, hydra_overrides
    for prof in ("local", "gpu_cluster"):
        ov = hydra_overrides(find_yaml("lr", "sweeps"), find_yaml(prof, "profiles"), ["seed=0"])
        with initialize_config_dir(str(SWEEPS), version_base="1.3"):
            cfg = compose("lr", ov, return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
        assert launcher.partition == ("debug" if prof == "local" else "gpu")


# -- the command, locally -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tiny_dataset, tmp_path_factory) -> Path:
    return make_tiny_base(tiny_dataset, tmp_path_factory.mktemp("sweep_base") / "base")


def test_preflight_rejects_bad_jobs_before_launching(tmp_path, tiny_dataset, tiny_base):
    out = tmp_path / "out"
    common = [f"data.root={tiny_dataset}", f"base_model={tiny_base}", f"sweep.out={out}",
              *TINY_POST]
    r = run_sweep("lr", "seed=0", *common, "rollout.best_of_n=3", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "rollout.best_of_n=3" in r.stdout and "nothing was submitted" in r.stderr
    r = run_sweep("lr", "seed=0", *common, "data.root=/nonexistent", cwd=tmp_path)
    assert r.returncode == 2 and "manifest.json" in r.stdout
    r = run_sweep("lr", "seed=0", *common, "optim.lrr=1", cwd=tmp_path)
    assert r.returncode == 2 and "lrr" in r.stdout + r.stderr
    r = run_sweep("lr", "seed=0", *common, "rollout.prefix.high=9", cwd=tmp_path)
    assert r.returncode == 2 and "frames" in r.stdout
    assert not any(out.rglob("status.json"))


def test_raw_hydra_multirun_route_gets_the_same_preflight(tmp_path, tiny_dataset, tiny_base):
    """`persistworld post-train -m --config-dir sweeps --config-name lr` is checked like
    `persistworld sweep lr`: one bad job stops the launch before any run starts."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "persistworld.cli", "post-train", "-m", "--config-dir",
           str(SWEEPS), "--config-name", "lr", "seed=0", f"base_model={tiny_base}",
           f"sweep.out={out}", *TINY_POST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*cmd, "data.root=/nonexistent"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=240, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "manifest.json" in r.stdout and "nothing was launched" in r.stderr
    r = subprocess.run([*cmd, f"data.root={tiny_dataset}", "rollout.best_of_n=3"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 2 and "rollout.best_of_n=3" in r.stdout, r.stdout + r.stderr
    assert not any(out.rglob("status.json"))


def test_local_sweep_end_to_end_relaunch_and_collect(tmp_path, tiny_dataset, tiny_base):
    from persistworld.analysis.collect import collect_runs, infer_factors
    out = tmp_path / "out"
    args = ["lr", "seed=0", f"data.root={tiny_dataset}", f"base_model={tiny_base}",
            f"sweep.out={out}", *TINY_POST]
    t = time.time()
    r = run_sweep(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = time.time() - t
    runs = [out / "lr" / "3e-4" / "seed=0", out / "lr" / "1e-4" / "seed=0"]
    for rd in runs:
        assert status(rd)["state"] == "completed"
        assert (rd / "eval" / "autoregressive_2" / "summary.json").exists()
        assert "row=" + "/".join(rd.parts[-3:-1]) in (rd / "overrides.yaml").read_text()
    mtimes = [(rd / "model.pt").stat().st_mtime_ns for rd in runs]
    t = time.time()
    r = run_sweep(*args, cwd=tmp_path)                     # relaunch: nothing to do
    assert r.returncode == 0 and "skip (completed)" in r.stdout
    assert time.time() - t < first
    assert mtimes == [(rd / "model.pt").stat().st_mtime_ns for rd in runs]
    table = collect_runs(out)
    assert len(table) == 2 and set(table["status"]) == {"completed"}
    assert "cfg.optim.lr" in infer_factors(table)
    assert sorted(table["cfg.optim.lr"]) == [1e-4, 3e-4]


def test_failed_run_does_not_stop_the_others(tmp_path, tiny_dataset, tiny_base):
    # a sweep whose first job fails at run time: its 9-chunk evaluation needs longer episodes
    # than the tiny dataset has, which only the final evaluation finds out
    (tmp_path / "failing.yaml").write_text(
        "defaults:\n  - sweep_base\n  - _self_\n"
        "sweep:\n  table: failing\n"
        "run_dir: ${sweep.out}/${sweep.table}/c${eval.num_chunks}/seed=${seed}\n"
        "hydra:\n  searchpath: [pkg://persistworld.conf]\n"
        "  sweep:\n    subdir: ${sweep.table}/c${eval.num_chunks}/seed=${seed}\n"
        "  sweeper:\n    params:\n      eval.num_chunks: 9,2\n      seed: '0'\n")
    out = tmp_path / "out"
    post = [o for o in TINY_POST if not o.startswith("eval.num_chunks=")]
    r = run_sweep(str(tmp_path / "failing.yaml"), f"data.root={tiny_dataset}",
                  f"base_model={tiny_base}", f"sweep.out={out}", *post, cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    bad, good = status(out / "failing" / "c9" / "seed=0"), status(out / "failing" / "c2" /
                                                                   "seed=0")
    assert bad["state"] == "failed" and "long enough" in bad["error"]
    assert good["state"] == "completed"
    assert "1 of 2 runs completed" in r.stdout


def test_relaunch_extends_refuses_stale_runs_and_fresh_starts_them_anew(tmp_path, tiny_dataset,
                                                                        tiny_base):
    import json

    from persistworld.analysis.collect import collect_runs
    out = tmp_path / "out"
    args = ["lr", "seed=0", f"data.root={tiny_dataset}", f"base_model={tiny_base}",
            f"sweep.out={out}", *TINY_POST]
    runs = [out / "lr" / "3e-4" / "seed=0", out / "lr" / "1e-4" / "seed=0"]
    assert run_sweep(*args, cwd=tmp_path).returncode == 0
    # more steps of the same runs: sound, so they are extended
    r = run_sweep(*args, "trainer.steps=5", cwd=tmp_path)
    assert r.returncode == 0 and "[extend]" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert [status(rd)["step"] for rd in runs] == [5, 5]
    # another setting: refused before anything is submitted, naming runs and settings
    mtimes = [(rd / "model.pt").stat().st_mtime_ns for rd in runs]
    r = run_sweep(*args, "trainer.steps=5", "objective.beta=0.5", cwd=tmp_path)
    assert r.returncode == 2 and "--fresh" in r.stderr
    assert r.stdout.count("objective.beta") == 2 and str(runs[0]) in r.stdout
    assert mtimes == [(rd / "model.pt").stat().st_mtime_ns for rd in runs]
    r = run_sweep(*args, "trainer.steps=5", "objective.beta=0.5", "--status", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout.count("STALE") == 2, r.stdout
    r = run_sweep(*args, "trainer.steps=5", "--status", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("same") == 2 and "ext LPIPS" in r.stdout
    # --fresh: the stale runs are kept aside (hidden from reports) and run again
    r = run_sweep(*args, "trainer.steps=5", "objective.beta=0.5", "--fresh", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert (out / ".stale" / "lr" / "3e-4" / "seed=0-0" / "model.pt").exists()
    assert all("beta: 0.5" in (rd / "config.yaml").read_text() for rd in runs)
    table = collect_runs(out)
    assert len(table) == 2 and set(table["cfg.objective.beta"]) == {0.5}
    # --resubmit-failed launches the failed run only (not the interrupted one)
    failed, interrupted = runs
    for rd, state in ((failed, "failed"), (interrupted, "interrupted")):
        st = json.loads((rd / "status.json").read_text())
        (rd / "status.json").write_text(json.dumps({**st, "state": state, "step": 4}))
        (rd / "model.pt").unlink()
    r = run_sweep(*args, "trainer.steps=5", "objective.beta=0.5", "--resubmit-failed",
                  cwd=tmp_path)
    assert "not selected" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert status(failed)["state"] == "completed" and status(interrupted)["state"] == \
        "interrupted"


def test_rows_of_one_table_draw_from_one_start_pool(tiny_dataset, tmp_path):
    """Table 5's rows differ in the prefix only, not in where their episodes start."""
    from persistworld.sweeps.command import expand, preflight
    from persistworld.trainers.post_train import start_pool, validate
    pools = {}
    for row in ("fixed3", "uniform0-9", "uniform0-4"):
        cfg = _compose(["experiment=mini", f"row=prefix_strategy/{row}", "data.future=1",
                        f"data.root={tiny_dataset}"])
        setup = validate(cfg)[0]
        pools[row] = start_pool(cfg.data, setup).index
    assert pools["fixed3"] == pools["uniform0-9"] == pools["uniform0-4"]
    cfg = _compose(["experiment=mini", "rollout.prefix.strategy=fixed", "rollout.prefix.low=3",
                    "rollout.prefix.high=3", "data.future=1", f"data.root={tiny_dataset}"])
    assert start_pool(cfg.data, validate(cfg)[0]).index != pools["fixed3"]   # without it
    # a table whose rows would not share a pool is refused by the pre-flight
    (tmp_path / "mixed.yaml").write_text(
        "defaults:\n  - sweep_base\n  - _self_\nsweep:\n  table: mixed\n  row: f${rollout."
        "branch_chunks}\nhydra:\n  searchpath: [pkg://persistworld.conf]\n  sweeper:\n    "
        "params:\n      rollout.branch_chunks: 1,2\n      seed: '0'\n")
    sweep = tmp_path / "mixed.yaml"
    jobs = preflight(sweep, expand(sweep, ["experiment=mini", f"data.root={tiny_dataset}",
                                           "data.future=1", f"sweep.out={tmp_path}"]))
    assert all(any("different pools" in e for e in j.errors) for j in jobs)


def test_submitit_local_launcher(tmp_path, tiny_dataset, tiny_base):
    out = tmp_path / "out"
    r = run_sweep("kl", "seed=0", "launcher=submitit_local", f"data.root={tiny_dataset}",
                  f"base_model={tiny_base}", f"sweep.out={out}", *TINY_POST, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / ".submitit").is_dir()
    for row in ("on", "off"):
        assert status(out / "kl" / row / "seed=0")["state"] == "completed"


# -- the preemption flag --------------------------------------------------------------------
def test_preempt_flag_and_fallback_requeue():
    from persistworld.utils import preempt
    calls = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        preempt.reset()
        assert preempt.install(grace_s=0.3)
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert preempt.requested() and calls == []       # only the flag, no requeue yet
        time.sleep(0.6)                                  # the loop never took it: requeue
        assert calls == [signal.SIGUSR2]
        preempt.requeue()                                # at most once
        assert calls == [signal.SIGUSR2]
    finally:
        preempt.reset()
        signal.signal(signal.SIGUSR2, old)
