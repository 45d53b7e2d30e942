"""The local SLURM cluster of `slurm/local_cluster.sh`, as the `slurm`-marked tests see it.

Developers without the cluster get a skip that says how to start it; under CI=true (where
`.ci/run` starts it) a missing cluster is a failure, never a skip."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

STATE_DIR = Path(os.environ.get("PERSISTWORLD_SLURM_DIR", "/tmp/persistworld-slurm"))
START_HINT = "local SLURM cluster not running: start it with `bash slurm/local_cluster.sh start`"
PARTITION = "debug"
IN_CI = os.environ.get("CI") == "true"

# the clients find the local cluster through SLURM_CONF (start also links /etc/slurm/slurm.conf)
if "SLURM_CONF" not in os.environ and (STATE_DIR / "etc" / "slurm.conf").exists():
    os.environ["SLURM_CONF"] = str(STATE_DIR / "etc" / "slurm.conf")


def slurm_problem() -> str | None:
    """None when `sinfo` answers and the debug partition has a usable node, else why not."""
    try:
        out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%t"], capture_output=True,
                             text=True, timeout=20)
    except FileNotFoundError:
        return "`sinfo` is not installed"
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 20 s"
    if out.returncode != 0:
        return f"`sinfo` failed: {(out.stderr or out.stdout).strip()[:300]}"
    states = out.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mix", "alloc", "comp") for s in states):
        return f"partition {PARTITION!r} has no usable node (states: {states or 'none'})"
    return None


def skip_module_without_cluster() -> str | None:
    """At module level: skip the module when the cluster is down, except under CI=true, where
    the problem is returned so that each test fails with ``require_cluster``."""
    problem = slurm_problem()
    if problem is not None and not IN_CI:
        pytest.skip(f"{START_HINT} ({problem})", allow_module_level=True)
    return problem


def require_cluster(problem: str | None = None) -> None:
    """In a test: fail under CI=true, skip elsewhere, when the cluster is not usable."""
    problem = slurm_problem() if problem is None else problem
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but the {START_HINT} ({problem})", pytrace=False)
    pytest.skip(f"{START_HINT} ({problem})")
