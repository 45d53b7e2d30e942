"""Kill a training process with SIGKILL as soon as its first numbered checkpoint exists."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kill_9_after_first_checkpoint(cmd: list[str], run_dir: Path, timeout: float = 180) -> None:
    """Run ``cmd`` (from the repo root) and SIGKILL it once ``run_dir/checkpoints`` holds a
    checkpoint; asserts that it was killed, not finished."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt_dir = run_dir / "checkpoints"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt_dir.exists() and any(p.suffix == ".pt" for p in ckpt_dir.iterdir()):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {err[-2000:]!r}"
