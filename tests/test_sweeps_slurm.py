"""`persistworld sweep` on the real single-node SLURM cluster (slurm/local_cluster.sh):
hydra-submitit-launcher job arrays, checkpoint + requeue on the time-limit signal, and a
cancelled job reported as failed.

Start the cluster first: `bash slurm/local_cluster.sh start`. Without a usable `sinfo` these
tests skip, except under CI (CI=true), where they fail: CI must start the cluster.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm_support import require_cluster, skip_module_without_cluster
from sweep_utils import TINY_POST, make_tiny_base, model_weights, run_sweep, status, sweep_cmd

pytestmark = pytest.mark.slurm
_PROBLEM = skip_module_without_cluster()


@pytest.fixture(scope="module", autouse=True)
def _cluster_up():
    require_cluster(_PROBLEM)


@pytest.fixture(scope="module")
def tiny_base(tiny_dataset, tmp_path_factory) -> Path:
    return make_tiny_base(tiny_dataset, tmp_path_factory.mktemp("sweep_base") / "base")


def _common(data: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"base_model={base}", f"sweep.out={out}", *TINY_POST, *extra]


def _slurm_id(run_dir: Path) -> str:
    rec = json.loads((run_dir / "job.json").read_text())
    if "slurm_array_task_id" in rec:
        return f"{rec['slurm_array_job_id']}_{rec['slurm_array_task_id']}"
    return rec["slurm_job_id"]


def _train_rows(run_dir: Path) -> int:
    try:
        return sum('"train"' in line for line in (run_dir / "metrics.jsonl").open())
    except OSError:
        return 0


def _wait(pred, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _sacct_states(job: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job, "-o", "State"],
                         capture_output=True, text=True, timeout=20).stdout
    return [s.split()[0] for s in out.split()]


def _popen(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(sweep_cmd(*args), cwd=cwd, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)


def test_sweep_runs_as_a_slurm_job_array_and_is_collected(tmp_path, tiny_dataset, tiny_base):
    from persistworld.analysis.collect import collect_runs
    out = tmp_path / "out"
    r = run_sweep("lr", "--profile", "local", "seed=0", *_common(tiny_dataset, tiny_base, out),
                  cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Submitit 'slurm'" in r.stdout + r.stderr
    runs = collect_runs(out)
    assert len(runs) == 2 and set(runs["status"]) == {"completed"}
    assert sorted(runs["cfg.optim.lr"]) == [1e-4, 3e-4]
    for rd in (out / "lr").glob("*/seed=0"):
        rec = json.loads((rd / "job.json").read_text())
        assert "slurm_job_id" in rec
        jid = _slurm_id(rd)
        _wait(lambda: _sacct_states(jid)[-1:] == ["COMPLETED"], 60, f"sacct COMPLETED for {jid}")


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(tmp_path, tiny_dataset,
                                                                      tiny_base):
    """SIGUSR2 (what SLURM sends `signal_delay_s` before the time limit; here sent at once with
    `scancel --signal=USR2`) mid-training: checkpoint at the step boundary, requeue, resume in
    the same run directory, and the same final weights as an uninterrupted run."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    long = ["row=lr/1e-4", "seed=0", "trainer.steps=30", "trainer.ckpt_every=100"]
    job = _popen(["lr", "--profile", "local", *_common(tiny_dataset, tiny_base, out, *long)],
                 tmp_path, tmp_path / "slurm.log")
    reference = _popen(["lr", *_common(tiny_dataset, tiny_base, ref, *long)], tmp_path,
                       tmp_path / "ref.log")
    rd = out / "lr" / "1e-4" / "seed=0"
    try:
        _wait(lambda: _train_rows(rd) >= 3, 120, "3 training steps on SLURM")
        slurm_id = _slurm_id(rd)
        subprocess.run(["scancel", "--signal=USR2", slurm_id], check=True, timeout=20)
        _wait(lambda: status(rd)["state"] == "interrupted", 60, "the checkpoint at the signal")
        at = status(rd)["step"]
        assert 3 <= at < 30 and (rd / "checkpoints" / f"step_{at:06d}.pt").exists()
        assert job.wait(timeout=180) == 0, (tmp_path / "slurm.log").read_text()[-3000:]
        assert reference.wait(timeout=180) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        for p in (job, reference):
            if p.poll() is None:
                p.kill()
    assert status(rd)["state"] == "completed" and status(rd)["step"] == 30
    _wait(lambda: _sacct_states(slurm_id)[-1:] == ["COMPLETED"], 60, "sacct COMPLETED")
    assert "REQUEUED" in _sacct_states(slurm_id)
    assert f"resumed from step {at}" in (rd / "log.txt").read_text()
    assert json.loads((rd / "job.json").read_text()).get("slurm_restart_count") == "1"
    a, b = model_weights(rd), model_weights(ref / "lr" / "1e-4" / "seed=0")
    import torch
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cancelled_job_is_reported_failed(tmp_path, tiny_dataset, tiny_base):
    from persistworld.analysis.collect import collect_runs, problem_runs
    out = tmp_path / "out"
    args = ["lr", "--profile", "local", "seed=0",
            *_common(tiny_dataset, tiny_base, out, "trainer.steps=30", "trainer.ckpt_every=10")]
    cmd = _popen(args, tmp_path, tmp_path / "sweep.log")
    victim, other = out / "lr" / "3e-4" / "seed=0", out / "lr" / "1e-4" / "seed=0"
    try:
        _wait(lambda: _train_rows(victim) >= 1, 120, "the first run to train")
        subprocess.run(["scancel", _slurm_id(victim)], check=True, timeout=20)
        assert cmd.wait(timeout=120) == 1, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if cmd.poll() is None:
            cmd.kill()
    _wait(lambda: status(other)["state"] == "completed", 120, "the other run")
    assert status(victim)["state"] == "failed"
    assert "CANCELLED" in status(victim)["error"]
    r = run_sweep(*args, "--status", cwd=tmp_path)
    rows = {line.split()[-1]: line.split() for line in r.stdout.splitlines()
            if line.strip().endswith("seed=0")}
    assert r.returncode == 1, r.stdout
    assert rows[str(victim)][0] == "failed" and rows[str(other)][0] == "completed", r.stdout
    assert rows[str(victim)][2] == "same" and _slurm_id(victim) in rows[str(victim)]
    assert "CANCELLED" in r.stdout
    runs = collect_runs(out)
    bad = problem_runs(runs)
    assert len(bad) == 1 and bad["status"].iloc[0] == "failed"
    assert "CANCELLED" in bad["problems"].iloc[0]
