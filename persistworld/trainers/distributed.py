"""Several processes per post-training run: data parallel over the B prefixes of a step.

Launchers understood (first match wins):
    torchrun / torch.distributed.run   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    SLURM tasks (srun -n N ...)        SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
                                       SLURM_LOCALID; MASTER_ADDR defaults to the first host of
                                       SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, MASTER_PORT to
                                       15000 + SLURM_JOB_ID % 20000
    a process group already initialised by the caller (e.g. torch.multiprocessing.spawn)

``trainer.distributed=auto`` starts a group when one of those says more than one process;
``off`` ignores them (one process). Backend: nccl when trainer.device is CUDA (each process on
cuda:LOCAL_RANK), gloo otherwise. This module only holds the plumbing (who am I, torch DDP
around the trained call, collectives for metrics that are no-ops with one process); the split
of the work lives in ``trainers/post_train.py``.
"""
from __future__ import annotations

import datetime
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from persistworld.errors import UserError

MODES = ("auto", "off")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    host = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], host)


def launch_env(environ: Mapping[str, str] | None = None) -> dict | None:
    """(rank, world_size, local_rank, master_addr, master_port, launcher) from the launcher's
    environment, or None when it says one process (or nothing)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return None
        rank = int(env.get("RANK", 0))
        return dict(rank=rank, world=world, local_rank=int(env.get("LOCAL_RANK", rank)),
                    addr=env.get("MASTER_ADDR", "127.0.0.1"),
                    port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if ntasks and int(ntasks) > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", 0) or 0)
        return dict(rank=int(env["SLURM_PROCID"]), world=int(ntasks),
                    local_rank=int(env.get("SLURM_LOCALID", 0)),
                    addr=env.get("MASTER_ADDR") or first_host(nodes),
                    port=int(env.get("MASTER_PORT") or 15000 + job % 20000), launcher="slurm")
    return None


@dataclass
class Dist:
    """Who this process is in the run. With ``world == 1`` every collective is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "none"
    backend: str | None = None
    owns_group: bool = False          # we initialised it, so we destroy it
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # comm tensors
    _env: dict | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set up ----------------------------------------------------------------------------
    @classmethod
    def plan(cls, mode: str = "auto") -> "Dist":
        """What the environment asks for, WITHOUT starting anything (so settings can be
        validated against the world size first)."""
        if mode not in MODES:
            raise UserError(f"trainer.distributed: unknown {mode!r} (choose from "
                            f"{', '.join(MODES)})")
        import torch.distributed as dist
        if mode == "off":
            return cls()
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                       launcher="existing group", backend=dist.get_backend())
        env = launch_env()
        if env is None:
            return cls()
        return cls(rank=env["rank"], world=env["world"], local_rank=env["local_rank"],
                   launcher=env["launcher"], _env=env)

    def device_for(self, device: str) -> torch.device:
        """trainer.device for this process: CUDA processes use cuda:LOCAL_RANK."""
        d = torch.device(device)
        if self.enabled and d.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return d

    def start(self, device: torch.device) -> None:
        """Join (or create) the process group; no-op for one process."""
        if not self.enabled:
            return
        import torch.distributed as dist
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device if device.type == "cuda" else torch.device("cpu")
        if dist.is_initialized():
            self.backend = dist.get_backend()
            if self.backend == "nccl" and device.type != "cuda":
                raise UserError("trainer.device is not CUDA but the existing process group "
                                "uses nccl")
            return
        env = self._env or {}
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        for key, value in (("MASTER_ADDR", env.get("addr")), ("MASTER_PORT", env.get("port")),
                           ("RANK", self.rank), ("WORLD_SIZE", self.world),
                           ("LOCAL_RANK", self.local_rank)):
            if value is not None:
                os.environ.setdefault(key, str(value))
        if self.is_main:
            print(f"distributed: {self.world} processes ({self.launcher}, {self.backend}), "
                  f"rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                  flush=True)
        dist.init_process_group(self.backend, init_method="env://", rank=self.rank,
                                world_size=self.world,
                                timeout=datetime.timedelta(minutes=60))
        self.owns_group = True

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under torch DistributedDataParallel (one process: ``module`` itself).
        DDP registers the parameters that require gradients NOW, broadcasts rank 0's
        parameters and buffers once, and averages the gradients over the ranks in every
        backward pass outside ``no_sync``. Buffers are not re-broadcast per forward (they are
        constants here)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    # -- collectives (no-ops with one process) -----------------------------------------------
    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of ``t`` (any device); returns ``t``."""
        if not self.enabled:
            return t
        import torch.distributed as dist
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        buf = t.to(self.device)
        dist.all_reduce(buf, op=ops[op])
        if buf is not t:
            t.copy_(buf)
        return t

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` (same shape on all ranks) along dim 0, in rank
        order, on ``t``'s device."""
        if not self.enabled:
            return t
        import torch.distributed as dist
        buf = t.detach().contiguous().to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return torch.cat(parts).to(t.device)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def main_only(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only; every rank returns its result, or raises what it raised
        (so an error or Pruned on rank 0 stops the other ranks too instead of leaving them
        waiting in the next collective)."""
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to every rank, then re-raised
                error = e
        shared = self.broadcast_object((result, _portable(error)))
        if self.is_main:
            if error is not None:
                raise error
            return result
        if shared[1] is not None:
            raise shared[1]
        return shared[0]


def _portable(error: BaseException | None) -> BaseException | None:
    """An exception that survives pickling (to send it to the other ranks)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
