"""End-to-end tests against a real single-node SLURM cluster (slurm/local_cluster.sh).

Start it first: `bash slurm/local_cluster.sh start`. Without a usable `sinfo` these tests
skip, except under CI (CI=true), where they fail: CI must start the cluster.

The requeue test needs about 100 s of wall time (a real time limit, SIGUSR2, requeue and
resume); its job is submitted when the module starts, so it runs while the other tests do.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_support import PARTITION, require_cluster, skip_module_without_cluster

REPO = Path(__file__).resolve().parents[1]
APPS = Path(__file__).resolve().parent / "slurm_apps"
pytestmark = pytest.mark.slurm
_PROBLEM = skip_module_without_cluster()

import cloudpickle  # noqa: E402
import submitit  # noqa: E402
from submitit.core.utils import UncompletedJobError  # noqa: E402

sys.path.insert(0, str(APPS))
import slurm_tasks  # noqa: E402

sys.path.remove(str(APPS))
# Jobs unpickle these tasks by value: no need for tests/ on the job's sys.path.
cloudpickle.register_pickle_by_value(slurm_tasks)


def _require_cluster() -> None:
    """Called first by every test: under CI=true a missing cluster is a test failure."""
    require_cluster(_PROBLEM)  # only fails under CI=true (else the module was skipped)


def _executor(folder: Path, max_num_timeout: int = 3, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_num_timeout)
    ex.update_parameters(slurm_partition=PARTITION, timeout_min=5, cpus_per_task=1,
                         name="persistworld-test")
    if params:
        ex.update_parameters(**params)
    return ex


def _logs(job) -> str:
    parts = []
    for name, fn in (("stdout", job.stdout), ("stderr", job.stderr)):
        try:
            text = fn() or ""
        except Exception as e:  # noqa: BLE001
            text = f"<unreadable: {e}>"
        parts.append(f"--- {name} of job {job.job_id}:\n{text[-3000:]}")
    return "\n".join(parts)


def _wait_done(job, timeout_s: float) -> None:
    """Waits until submitit sees the job finished (forcing sacct), failing after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job.job_id)], check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s:.0f} s "
                        f"(state {job.state})\n{_logs(job)}")
        time.sleep(0.5)


_UNFINISHED = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "UNKNOWN", "READY", "PREEMPTED")


def _final_state(job, timeout_s: float = 30) -> str:
    """The job's final SLURM state from sacct (the result file can appear before it settles)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = job.watcher.get_state(job.job_id, mode="force")
        if state.upper() not in _UNFINISHED or time.monotonic() > deadline:
            return state
        time.sleep(0.3)


def _sacct_runs(job_id: str) -> list[dict]:
    """Every run of a job, requeued ones included (sacct --duplicates), allocation lines only."""
    out = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-j", str(job_id), "-o", "JobID,State,Start,End,Elapsed"],
        capture_output=True, text=True, check=True, timeout=30).stdout
    keys = ("job_id", "state", "start", "end", "elapsed")
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------- requeue job
# Timing (slurmctld checks time limits and --signal deadlines every ~30 s, and sends the signal
# at the first check where  now + signal_delay + 30 s >= end_time):  with timeout_min=2 and
# signal_delay_s=40, SIGUSR2 arrives 50-80 s into a run. The work takes 90 s uninterrupted,
# so the first run is always signalled (10 s margin) and the resumed run, at most
# 90 - 50 = 40 s, normally ends before its own signal (10 s margin; if not, submitit
# requeues once more and the test still passes, only slower).
REQUEUE_STEPS = 180
REQUEUE_STEP_S = 0.5
REQUEUE_TIMEOUT_MIN = 2
REQUEUE_SIGNAL_DELAY_S = 40
REQUEUE_TEST = "test_checkpointable_job_is_requeued_on_time_limit_and_resumes"


@pytest.fixture(scope="module")
def requeue_job(request, tmp_path_factory):
    """Submits the long requeue job once, early, so it runs while the other tests do."""
    if _PROBLEM is not None:
        yield None  # the test itself fails in _require_cluster()
        return
    work = tmp_path_factory.mktemp("requeue")
    ex = _executor(work / "submitit", timeout_min=REQUEUE_TIMEOUT_MIN,
                   slurm_signal_delay_s=REQUEUE_SIGNAL_DELAY_S, max_num_timeout=3)
    task = slurm_tasks.StepCounter(str(work), REQUEUE_STEPS, REQUEUE_STEP_S)
    job = ex.submit(task)
    submitted = time.monotonic()
    yield job, work, submitted
    if not job.done(force_check=True):
        job.cancel(check=False)


@pytest.fixture(scope="module", autouse=True)
def _start_requeue_job_early(request):
    if _PROBLEM is None and any(item.name == REQUEUE_TEST for item in request.session.items):
        request.getfixturevalue("requeue_job")


# --------------------------------------------------------------------------- tests
def test_submitit_job_returns_result(tmp_path):
    _require_cluster()
    ex = _executor(tmp_path / "submitit")
    t0 = time.monotonic()
    job = ex.submit(slurm_tasks.describe_job, 7)
    _wait_done(job, 60)
    out = job.result()
    latency = time.monotonic() - t0
    print(f"submit -> result latency: {latency:.2f} s")
    assert out["value"] == 50
    assert out["job_id"] == str(job.job_id)
    assert out["partition"] == PARTITION
    assert out["pid"] != os.getpid()
    assert _final_state(job) == "COMPLETED"


def test_hydra_multirun_with_submitit_slurm_launcher(tmp_path):
    _require_cluster()
    python = REPO / ".venv" / "bin" / "python"
    python = python if python.exists() else Path(sys.executable)
    sweep = tmp_path / "multirun"
    cmd = [
        str(python), str(APPS / "hydra_app.py"), "--multirun", "x=2,3",
        "hydra/launcher=submitit_slurm",
        f"hydra.launcher.partition={PARTITION}", "hydra.launcher.timeout_min=5",
        "hydra.launcher.cpus_per_task=1",
        f"hydra.sweep.dir={sweep}", f"hydra.launcher.submitit_folder={tmp_path}/submitit/%j",
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    print(f"hydra multirun (2 jobs) took {time.monotonic() - t0:.2f} s")
    assert proc.returncode == 0, f"multirun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    # Files written by the jobs, one per sweep point, each from a task of one job array.
    results = sorted((json.loads(p.read_text()) for p in sweep.glob("*/result.json")),
                     key=lambda r: r["x"])
    assert [(r["x"], r["value"]) for r in results] == [(2, 14), (3, 19)]
    assert all(r["job_id"] for r in results)
    assert len({r["array_job_id"] for r in results}) == 1
    assert sorted(r["array_task_id"] for r in results) == ["0", "1"]

    # Return values, as collected by submitit: ("success", hydra JobReturn) per job.
    pickles = sorted((tmp_path / "submitit").glob("*/*_result.pkl"))
    assert len(pickles) == 2, pickles
    returned = []
    for p in pickles:
        with open(p, "rb") as f:
            outcome, job_return = pickle.load(f)
        assert outcome == "success"
        returned.append(job_return.return_value)
    assert sorted(returned) == [14, 19]


def test_scancel_is_reported_as_cancelled(tmp_path):
    _require_cluster()
    ex = _executor(tmp_path / "submitit")
    marker = tmp_path / "running"
    job = ex.submit(slurm_tasks.sleep_then_return, 300, str(marker))
    deadline = time.monotonic() + 60
    while not marker.exists():  # running for real, not just allocated
        assert time.monotonic() < deadline, f"job never started (state {job.state})\n{_logs(job)}"
        assert not job.done(force_check=True), f"job ended early\n{_logs(job)}"
        time.sleep(0.3)
    subprocess.run(["scancel", str(job.job_id)], check=True, timeout=30)
    t0 = time.monotonic()
    _wait_done(job, 60)
    state = _final_state(job)
    assert state.startswith("CANCELLED"), state
    # result() must raise (not hang): submitit waits at most its 15 s for a result file.
    with pytest.raises(UncompletedJobError, match="has not produced any output"):
        job.result()
    print(f"scancel -> done {time.monotonic() - t0:.2f} s (result() raised)")
    assert not (tmp_path / "submitit" / f"{job.job_id}_0_result.pkl").exists()


def test_checkpointable_job_is_requeued_on_time_limit_and_resumes(requeue_job):
    _require_cluster()
    job, work, submitted = requeue_job
    # Uninterrupted 90 s + requeue wait (~10-15 s) + a possible second requeue (~50 s).
    _wait_done(job, 240)
    print(f"requeue job: submit -> done {time.monotonic() - submitted:.1f} s")
    state = _final_state(job)
    assert state == "COMPLETED", f"{state}\n{_logs(job)}"
    result = job.result()
    expected = slurm_tasks.reference_result(REQUEUE_STEPS)
    assert result == {"acc": expected, "steps": REQUEUE_STEPS}

    runs = [json.loads(line) for line in (work / "runs.jsonl").read_text().splitlines()]
    checkpoints = [json.loads(line) for line in (work / "checkpoints.jsonl").read_text().splitlines()]
    print(f"runs: {runs}\ncheckpoints: {checkpoints}")
    assert len(runs) >= 2, f"the job was never requeued: {runs}\n{_logs(job)}"
    assert len(checkpoints) == len(runs) - 1
    assert runs[0]["from_step"] == 0 and runs[0]["restart_count"] == 0
    for prev, nxt, ckpt in zip(runs, runs[1:], checkpoints):
        # Resumed from its saved progress (not from scratch), in the same SLURM job.
        assert nxt["job_id"] == runs[0]["job_id"]
        assert nxt["restart_count"] == prev["restart_count"] + 1
        assert 0 < nxt["from_step"] < REQUEUE_STEPS
        assert nxt["from_step"] >= ckpt["at_step"]

    # SLURM's own record: the first run(s) REQUEUED, the last COMPLETED (sacct --duplicates).
    deadline = time.monotonic() + 20
    while True:
        states = [r["state"] for r in _sacct_runs(job.job_id)]
        if states and states[-1] == "COMPLETED" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"sacct runs of job {job.job_id}: {states}")
    assert states.count("REQUEUED") == len(runs) - 1, states
    assert states[-1] == "COMPLETED", states
    assert re.fullmatch(r"\d+", str(job.job_id))
