"""Checkpoint-and-requeue on SLURM time limits and preemption (with submitit).

submitit asks SLURM for SIGUSR2 `signal_delay_s` seconds before a job's time limit
(`--signal=USR2@delay`) and, on that signal, pickles the job's callable (hydra-submitit-launcher's
`checkpoint()` resubmits the same Hydra job), runs `scontrol requeue` and exits. On its own that
loses the work done since the last periodic checkpoint, and it can interrupt a training step
half-way. `install()` wraps submitit's handler: the signal only raises a flag; the training loop
(`post_train`, one check per step) sees `requested()`, saves a checkpoint at the step boundary
and raises KeyboardInterrupt (status `interrupted`); the job function then calls `requeue()`,
which runs submitit's original handler (requeue + exit). If the loop does not take the flag
within `grace_s` (signal during model loading or the final evaluation, or a step slower than
the grace), a timer thread requeues anyway: the requeued job resumes from its last checkpoint.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable

_flag = threading.Event()
_done = threading.Lock()
_state: dict[str, Any] = {"orig": None, "timer": None, "signum": None}


def requested() -> bool:
    """True once SIGUSR2 arrived: checkpoint at the next step boundary and stop."""
    return _flag.is_set()


def install(grace_s: float = 60.0, signum: int = signal.SIGUSR2) -> bool:
    """Wrap the current handler of `signum` (submitit's) with the flag. False if there is no
    Python-level handler to wrap (not a submitit job): nothing is changed then."""
    orig = signal.getsignal(signum)
    if not callable(orig):
        return False
    _state.update(orig=orig, signum=signum)

    def handler(sig: int, frame: Any) -> None:
        if _flag.is_set():
            return
        _flag.set()
        timer = threading.Timer(grace_s, requeue)
        timer.daemon = True
        _state["timer"] = timer
        timer.start()

    signal.signal(signum, handler)
    return True


def requeue() -> None:
    """Run submitit's original handler once: pickle the job, `scontrol requeue`, exit."""
    if not _done.acquire(blocking=False):
        return
    timer = _state.get("timer")
    if timer is not None and threading.current_thread() is not timer:
        timer.cancel()
    orig: Callable | None = _state.get("orig")
    if orig is not None:
        orig(_state["signum"], None)


def reset() -> None:
    """Forget a previous signal (tests, or a second job in the same process)."""
    _flag.clear()
    if _done.locked():
        _done.release()
    timer = _state.get("timer")
    if timer is not None:
        timer.cancel()
    _state.update(orig=None, timer=None, signum=None)
