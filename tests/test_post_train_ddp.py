"""Several processes per post-training run (torchrun, gloo on CPU): the same global batch gives
the same weights and logged metrics as one process (float tolerance), only rank 0 writes the run
directory, a run resumes under another process count, and the launcher environments
(torchrun, SLURM tasks) are read as documented."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_post_train import _compose, _post_overrides, _rows, _weights, base_model  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer.steps=4", "trainer.eval_every=2", "eval.enabled=false"]


def _launch_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _torchrun(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "persistworld.cli", "post-train", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_launch_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)
    ra, rb = _rows(a, "train"), _rows(b, "train")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "loss/pos", "loss/neg", "loss/kl", "grad_norm", "reward/mean",
                    "reward/std", "adv/abs_mean", "prefix/mean", "reward/lpips/external"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    ea, eb = _rows(a, "eval"), _rows(b, "eval")
    assert [r["step"] for r in ea] == [r["step"] for r in eb]
    for x, y in zip(ea, eb):
        assert y["val/external/lpips"] == pytest.approx(x["val/external/lpips"], abs=1e-4)


@pytest.fixture(scope="module")
def one_process(tiny_dataset, base_model, tmp_path_factory) -> Path:  # noqa: F811
    from persistworld.trainers.post_train import post_train
    run_dir = tmp_path_factory.mktemp("ddp") / "one"
    overrides = _post_overrides(tiny_dataset, base_model, run_dir, FAST)
    post_train(_compose("post_train", overrides), overrides=overrides)
    return run_dir


def test_two_processes_match_one(one_process, tiny_dataset, base_model, tmp_path):  # noqa: F811
    """trainer.batch_size=2 over 2 ranks (one prefix each) == 1 process with batch 2; then a
    2-process run resumed from the 1-process run's step-2 checkpoint ends the same too."""
    two = tmp_path / "two"
    proc = _torchrun(_post_overrides(tiny_dataset, base_model, two, FAST))
    assert "distributed: 2 processes (torchrun, gloo)" in proc.stdout
    assert json.loads((two / "status.json").read_text())["state"] == "completed"
    _same_run(one_process, two)
    # rank 0 alone writes: each step logged once, one log line about the processes
    assert [r["step"] for r in _rows(two, "train")] == [1, 2, 3, 4]
    assert "2 processes (torchrun, gloo), 1 prefix(es) each" in (two / "log.txt").read_text()

    # resume with another process count: all ranks load rank 0's checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(one_process, resumed)
    (resumed / "model.pt").unlink()
    (resumed / "checkpoints" / "step_000004.pt").unlink()
    (resumed / "status.json").write_text(json.dumps({"state": "interrupted", "step": 3}))
    _torchrun(_post_overrides(tiny_dataset, base_model, resumed, FAST))
    assert "resumed from step 2" in (resumed / "log.txt").read_text()
    _same_run(one_process, resumed)


def test_two_processes_with_micro_batches_match_one(one_process, tiny_dataset, base_model,
                                                    tmp_path):  # noqa: F811
    """trainer.micro_batch=1 on 2 ranks: every rank makes the same number of backward
    passes, all but the last under DDP's no_sync; the run still equals one process (which
    updates all candidates at once)."""
    run = tmp_path / "micro"
    _torchrun(_post_overrides(tiny_dataset, base_model, run, FAST + ["trainer.micro_batch=1"]))
    _same_run(one_process, run)


def test_two_processes_with_batch_adv_norm_match_one(tiny_dataset, base_model,
                                                     tmp_path):  # noqa: F811
    """reward.adv_norm=batch takes one std over the step's B groups, every rank's: 2 ranks of
    one prefix each equal one process of 2 (a rank-local std would be its one group's)."""
    from persistworld.trainers.post_train import post_train
    extra = FAST + ["reward.adv_norm=batch"]
    one = tmp_path / "one_batch"
    overrides = _post_overrides(tiny_dataset, base_model, one, extra)
    post_train(_compose("post_train", overrides), overrides=overrides)
    two = tmp_path / "two_batch"
    _torchrun(_post_overrides(tiny_dataset, base_model, two, extra))
    _same_run(one, two)


def test_two_slurm_tasks_match_one(one_process, tiny_dataset, base_model, tmp_path):  # noqa: F811
    """A run launched by `srun -n 2` on the local SLURM cluster (slurm/local_cluster.sh):
    the ranks come from SLURM_PROCID / SLURM_STEP_NUM_TASKS, the rendezvous from the step's
    node list and job id, and the run ends as the 1-process run."""
    from slurm_support import PARTITION, require_cluster
    require_cluster()
    run = tmp_path / "srun"
    cmd = ["srun", "-p", PARTITION, "-n", "2", "--cpus-per-task=1", "--time=10",
           "--kill-on-bad-exit=1", sys.executable, "-m", "persistworld.cli", "post-train",
           *_post_overrides(tiny_dataset, base_model, run, FAST)]
    proc = subprocess.run(cmd, cwd=REPO, env=_launch_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distributed: 2 processes (slurm, gloo)" in proc.stdout
    assert "2 processes (slurm, gloo), 1 prefix(es) each" in (run / "log.txt").read_text()
    _same_run(one_process, run)


def test_batch_not_divisible_by_processes_is_rejected(
        tiny_dataset, base_model, tmp_path, monkeypatch):  # noqa: F811
    from persistworld.trainers.post_train import post_train
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "run"
    overrides = _post_overrides(tiny_dataset, base_model, run_dir, ["trainer.batch_size=3"])
    with pytest.raises(ValueError, match=r"trainer\.batch_size=3 .*divisible.*\(2\)"):
        post_train(_compose("post_train", overrides), overrides=overrides)
    assert not run_dir.exists()
    # trainer.distributed=off ignores the launcher: one process, nothing to divide
    from persistworld.trainers.distributed import Dist
    assert not Dist.plan("off").enabled and Dist.plan("auto").world == 2
    with pytest.raises(ValueError, match=r"trainer\.distributed"):
        Dist.plan("on")


def test_launcher_environments():
    from persistworld.trainers.distributed import first_host, launch_env
    assert first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert first_host("node7,node8") == "node7"
    assert first_host("rack[2-3]-n[010-012]") == "rack2-n010"
    assert launch_env({}) is None
    assert launch_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    tr = launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                     "MASTER_ADDR": "h0", "MASTER_PORT": "29400",
                     "SLURM_NTASKS": "8", "SLURM_PROCID": "5"})     # torchrun inside SLURM
    assert (tr["rank"], tr["world"], tr["local_rank"], tr["addr"], tr["port"],
            tr["launcher"]) == (3, 4, 1, "h0", 29400, "torchrun")
    sl = launch_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
                     "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "123456"})
    assert (sl["rank"], sl["world"], sl["local_rank"], sl["addr"], sl["port"],
            sl["launcher"]) == (2, 4, 0, "gpu03", 15000 + 123456 % 20000, "slurm")
    assert launch_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    # the step's task count wins over the allocation's
    assert launch_env({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1",
                       "SLURM_PROCID": "0"}) is None
