"""The run directory: the unit of record (docs/FORMATS.md).

Every stage (base training, post-training, evaluation) writes through ``RunDir`` so that
resolved config, append-only metrics, numbered atomic checkpoints and a status marker look
the same everywhere, and a rerun of the same command resumes from the latest checkpoint.
"""
from __future__ import annotations

import datetime as _dt
import json
import random
import re
import socket
import traceback
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from persistworld.utils.io import append_jsonl, atomic_path, atomic_write_json, atomic_write_text
from persistworld.errors import UserError

_CKPT_RE = re.compile(r"^step_(\d{6,})\.pt$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.status_extra: dict = {}     # written into every status (fingerprint, code)

    # -- paths ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name

    # -- config and status -----------------------------------------------------------------
    def write_config(self, config_yaml: str, overrides: Iterable[str] = ()) -> None:
        atomic_write_text(self.root / "config.yaml", config_yaml)
        atomic_write_json(self.root / "overrides.yaml", list(overrides))

    def read_status(self) -> dict:
        if not self.status_path.exists():
            return {"state": "missing"}
        try:
            return json.loads(self.status_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.status_path} is corrupt ({e}); delete it to rerun") from e

    def set_status(self, state: str, step: int = 0, error: str | None = None, **extra) -> None:
        assert state in ("running", "evaluating", "completed", "failed", "interrupted",
                         "pruned"), state
        atomic_write_json(self.status_path, {"state": state, "step": int(step), "error": error,
                                             "updated": _now(), "host": socket.gethostname(),
                                             **self.status_extra, **extra})

    def is_completed(self) -> bool:
        return self.read_status().get("state") == "completed"

    def mark_failed(self, exc: BaseException, step: int = 0) -> None:
        err = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.set_status("failed", step=step, error=err)
        self.log("FAILED\n" + "".join(traceback.format_exception(type(exc), exc,
                                                                  exc.__traceback__)))

    # -- metrics and log --------------------------------------------------------------------
    def log_metrics(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step), "split": split}
        for k, v in metrics.items():
            row[k] = float(v) if isinstance(v, (int, float, np.floating, np.integer)) or (
                torch.is_tensor(v) and v.numel() == 1) else v
        append_jsonl(self.metrics_path, row)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metrics logged after the checkpoint we resume from (they will be
        logged again), so metrics.jsonl never holds the same step twice."""
        if not self.metrics_path.exists():
            return
        from persistworld.utils.io import read_jsonl
        rows = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                     for r in rows))

    def log(self, message: str) -> None:
        with open(self.root / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"[{_now()}] {message}\n")

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.checkpoint_dir.exists():
            return []
        found = []
        for p in self.checkpoint_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save_checkpoint(self, step: int, state: Mapping[str, Any], keep_last: int = 2) -> Path:
        path = self.checkpoint_dir / f"step_{step:06d}.pt"
        with atomic_path(path) as tmp:
            torch.save(dict(state, step=int(step)), tmp)
        for _, old in self.checkpoints()[:-keep_last] if keep_last > 0 else []:
            old.unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self, map_location: str | torch.device = "cpu") -> dict | None:
        ckpts = self.checkpoints()
        if not ckpts:
            return None
        step, path = ckpts[-1]
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - report which file and what to do
            raise RuntimeError(f"checkpoint {path} cannot be read ({e}); delete it to resume "
                               f"from the previous one") from e


# -- RNG state: a checkpoint must restore every generator so resumed runs match exactly -----
def hydra_overrides() -> list[str]:
    """The command-line overrides of the running Hydra app ([] outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError):
        return []


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                       ignore: Iterable[str] = (), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees (``ignore``: dotted
    keys or prefixes that may change between a run and its resumption)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}{k}"
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, ignore, key + ".")
        elif a != b:
            out.append(key)
    return out


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
