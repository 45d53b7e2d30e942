"""The function every sweep job runs (under any Hydra launcher): one post-training run.

- A completed run whose fingerprint matches is skipped without loading the model; a stale one
  fails with the differing settings (the pre-flight refuses those before any submission).
- A launch of a subset (`persistworld sweep --resubmit-failed`) lists the selected run
  directories in the file named by $PERSISTWORLD_SWEEP_SELECT; the other jobs exit at once.
- `<run_dir>/job.json` records where the job runs (SLURM job id, host), so a sweep's status
  can ask SLURM about jobs that died without writing their status (cancelled, killed).
- Under submitit on SLURM, SIGUSR2 before the time limit checkpoints at the next step boundary
  and requeues the job (persistworld.utils.preempt); the requeued job resumes in the same
  run directory. Failures are left to Hydra: `run_job` records the exception as the job's
  result and the other jobs go on; post_train has marked the run `failed` with its error.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from omegaconf import DictConfig

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")


def _status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("state", "missing")
    except (OSError, ValueError):
        return "missing"


def _grace_s() -> float:
    """Seconds the training loop gets to take the SIGUSR2 flag before the job requeues anyway:
    half the launcher's signal delay (the checkpoint must fit in the rest)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return max(5.0, 0.5 * float(HydraConfig.get().launcher.signal_delay_s))
    except Exception:
        return 30.0


def write_job_record(run_dir: Path) -> None:
    from persistworld.utils.io import atomic_write_json
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = {k.lower(): os.environ[k] for k in SLURM_VARS if k in os.environ}
    rec["host"] = socket.gethostname()
    rec["pid"] = os.getpid()
    atomic_write_json(run_dir / "job.json", rec)


def sweep_job(cfg: DictConfig) -> dict:
    from persistworld.trainers.post_train import post_train
    from persistworld.utils import preempt

    from omegaconf import OmegaConf

    from persistworld.sweeps.command import SELECT_ENV
    from persistworld.trainers.post_train import run_plan
    from persistworld.utils.fingerprint import run_identity

    run_dir = Path(cfg.run_dir)
    select = os.environ.get(SELECT_ENV)
    if select and str(run_dir.resolve()) not in json.loads(Path(select).read_text()):
        print(f"{run_dir}: not selected for this launch, skipped")
        return {"run_dir": str(run_dir), "state": _status(run_dir), "skipped": True}
    identity = run_identity(OmegaConf.to_container(cfg, resolve=True))
    if run_plan(run_dir, identity, cfg) == "completed":
        print(f"{run_dir}: completed, skipped")
        return {"run_dir": str(run_dir), "state": "completed", "skipped": True}
    write_job_record(run_dir)
    on_slurm = "SLURM_JOB_ID" in os.environ
    preempt.reset()
    if on_slurm:
        preempt.install(grace_s=_grace_s())
    try:
        post_train(cfg)
    except KeyboardInterrupt:
        if preempt.requested():
            print(f"{run_dir}: checkpoint saved at the time-limit signal; requeueing")
            preempt.requeue()          # submitit: pickle the job, scontrol requeue, exit
        raise
    return {"run_dir": str(run_dir), "state": _status(run_dir), "skipped": False}
