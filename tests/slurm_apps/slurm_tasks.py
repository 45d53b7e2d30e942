"""Small tasks that tests/test_slurm_cluster.py submits to the local SLURM cluster.

The test pickles this module by value (cloudpickle.register_pickle_by_value), so the job
process does not need `tests/` on its sys.path.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import submitit


def describe_job(x: int) -> dict:
    """Returns a value computed in the job plus where it ran."""
    return {
        "value": x * x + 1,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "partition": os.environ.get("SLURM_JOB_PARTITION"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def sleep_then_return(seconds: float, marker: str) -> str:
    """Touches `marker` once running, then sleeps (the scancel test kills it first)."""
    Path(marker).write_text(os.environ.get("SLURM_JOB_ID", ""))
    time.sleep(seconds)
    return "not cancelled"


def advance(acc: int, step: int) -> int:
    """One deterministic, order-dependent step of the counted computation."""
    return (acc * 31 + step * step + 7) % 1_000_003


def reference_result(n_steps: int) -> int:
    """The same computation done uninterrupted, without sleeping."""
    acc = 1
    for i in range(n_steps):
        acc = advance(acc, i)
    return acc


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class StepCounter(submitit.helpers.Checkpointable):
    """Counts `n_steps` steps of `step_s` seconds, saving (step, acc) after every step.

    On SIGUSR2 (time limit near) submitit calls `checkpoint` (the inherited one resubmits
    `self` with the same arguments) and requeues the job; the next run resumes from
    progress.json. Every run appends a line to runs.jsonl.
    """

    def __init__(self, workdir: str, n_steps: int, step_s: float) -> None:
        self.workdir = workdir
        self.n_steps = n_steps
        self.step_s = step_s

    def _progress(self) -> dict:
        path = Path(self.workdir) / "progress.json"
        if path.exists():
            return json.loads(path.read_text())
        return {"step": 0, "acc": 1}

    def __call__(self) -> dict:
        work = Path(self.workdir)
        state = self._progress()
        with open(work / "runs.jsonl", "a") as f:
            f.write(json.dumps({
                "from_step": state["step"],
                "job_id": os.environ.get("SLURM_JOB_ID"),
                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                "time": time.time(),
            }) + "\n")
        step, acc = state["step"], state["acc"]
        while step < self.n_steps:
            time.sleep(self.step_s)
            acc = advance(acc, step)
            step += 1
            _write_json_atomic(work / "progress.json", {"step": step, "acc": acc})
        return {"acc": acc, "steps": step}

    def checkpoint(self, *args, **kwargs):
        state = self._progress()
        with open(Path(self.workdir) / "checkpoints.jsonl", "a") as f:
            f.write(json.dumps({"at_step": state["step"], "time": time.time()}) + "\n")
        return super().checkpoint(*args, **kwargs)
