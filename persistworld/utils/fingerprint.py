"""Run identity: a fingerprint of everything that changes a post-training run's result.

    fingerprint = sha256( resolved config minus NEUTRAL,
                          sha256 of the base model file,
                          sha256 of the dataset's train / val identity )

``<run_dir>/fingerprint.json`` holds it, its three parts, the fingerprinted config and the
code version (git commit, ``+dirty`` when the work tree differs; the package version outside a
checkout). A run is resumed only under the same fingerprint; a difference in code alone is
reported in the run's status, not refused (a bug fix must not orphan every run). The final
evaluation has an identity of its own (its settings and the evaluated split's episodes,
``summary.json["settings"]`` / ``["data"]``): a change re-runs only the evaluation.

NEUTRAL lists every setting the fingerprint leaves out, with the reason; ADDED lists settings
introduced after runs existed, left out only at the value older runs had; nothing else is left
out, so an unlisted new setting is fingerprinted by default.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Mapping

from persistworld.utils.io import atomic_write_json, sha256_file

FILE = "fingerprint.json"
# dotted key (or prefix) -> why it cannot change what the run computes
NEUTRAL: dict[str, str] = {
    "run_dir": "where the run is written, not what it computes",
    "trainer.gradient_checkpointing": "memory only: recomputed activations give the same "
                                      "gradients (tested)",
    "sweep": "the run's place in a sweep layout (out / table / row names); the row's settings "
             "themselves are in the config",
    "base_model": "a path: the model file's sha256 is fingerprinted instead",
    "data.root": "a path: the dataset's train / val episodes (their sha256) and render settings "
                 "are fingerprinted instead",
    "data.workers": "rendering processes; episodes are byte-identical for any number (tested)",
    "data.test_episodes": "adds test episodes only; training and in-training checks never read "
                          "them (the final evaluation's own identity covers them)",
    "trainer.steps": "when to stop: the learning rate is constant after warm-up and settings "
                     "derived from the step count are resolved into the config, so a larger "
                     "value extends the run (a smaller one than already trained is refused)",
    "trainer.progress": "the progress bar",
    "trainer.ckpt_every": "when checkpoints are written; a resume from any checkpoint "
                          "continues exactly (tested)",
    "trainer.num_threads": "CPU threads: the same computation, float rounding of reductions "
                           "at most",
    "trainer.device": "cpu or cuda: the same computation, float rounding at most (CPU / GPU "
                      "agreement: benchmarks/README.md)",
    "trainer.distributed": "data-parallel processes give the one-process run up to float "
                           "rounding (tests/test_post_train_ddp.py)",
    "trainer.eval_every": "in-training checks run without gradients on their own seeded "
                          "generators and never touch the weights or the training draws",
    "trainer.eval_chunks": "in-training checks (see trainer.eval_every)",
    "trainer.eval_samples": "in-training checks (see trainer.eval_every)",
    "eval": "the final evaluation has its own identity in its summary.json; a change re-runs "
            "only the evaluation",
}
# settings added after runs existed: dotted key -> the value every older run had. At that value
# the key is left out of the fingerprint, so an older run keeps its fingerprint and is resumed
# (and reported) as before; any other value is fingerprinted
ADDED: dict[str, Any] = {
    "objective.name": "nft",          # 2026-12-02: the loss was always x0-adapted NFT before
    "trainer.schedule_batch": None,   # 2026-12-03: the ramps were always in steps before
    "lora.init_seed": None,           # 2026-12-04: the LoRA init always drew from the run's seed
    "reward.adv_norm": "group",       # 2026-12-04: advantages were always in group-std units
    "reward.shuffle": False,          # 2026-12-04: rewards always went to their own candidates
}
# the settings post-training may continue under (the others must be equal)
EXTENDABLE = ("trainer.steps",)


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL)


def _strip(tree: Any, prefix: str = "") -> Any:
    if isinstance(tree, Mapping):
        return {k: _strip(v, f"{prefix}{k}.") for k, v in tree.items()
                if not _neutral(f"{prefix}{k}")}
    return copy.deepcopy(tree)


def _node(tree: dict, key: str) -> tuple[dict | None, str]:
    *path, last = key.split(".")
    for part in path:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return None, last
    return tree, last


def _without_added(settings: dict) -> dict:
    """``settings`` minus every ``ADDED`` key at the value older runs had (what is hashed)."""
    out = copy.deepcopy(settings)
    for key, value in ADDED.items():
        node, last = _node(out, key)
        if node is not None and last in node and node[last] == value:
            del node[last]
    return out


def _with_added(settings: Mapping[str, Any]) -> dict:
    """Recorded settings with every ``ADDED`` key they lack at its older value (compared)."""
    out = copy.deepcopy(dict(settings))
    for key, value in ADDED.items():
        node, last = _node(out, key)
        if node is not None:
            node.setdefault(last, value)
    return out


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per file version per process."""
    st = Path(path).stat()
    return _file_sha(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def model_file(base_model: str | Path) -> Path:
    p = Path(base_model)
    return p / "model.pt" if p.is_dir() else p


def dataset_sha256(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> str:
    """The identity of the episodes of ``splits``: their ids, splits and file sha256 from the
    manifest, and the render settings (minus the ones a dataset may grow in)."""
    from persistworld.data.render import GROWABLE_KEYS
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    config = {k: v for k, v in (manifest.get("config") or {}).items() if k not in GROWABLE_KEYS}
    episodes = sorted((e["id"], e["split"], e.get("sha256"), e.get("num_steps"))
                      for e in manifest["episodes"] if e["split"] in splits)
    return _sha({"config": config, "episodes": episodes})


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """git commit of the checkout (``+dirty`` with local changes), else the package version."""
    import persistworld
    repo = Path(persistworld.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                    "--untracked-files=no", "--", "persistworld"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"persistworld {getattr(persistworld, '__version__', 'unknown')}"


def run_identity(config: Mapping[str, Any]) -> dict:
    """The identity of a post-training run from its resolved config (a plain mapping)."""
    from persistworld.data.dataset import EpisodeStore
    from persistworld.errors import MissingFile
    settings = _without_added(_strip(config))
    model = model_file(config["base_model"])
    if not model.is_file():
        raise MissingFile(f"base_model={config['base_model']}: no world model at {model}; "
                          f"train one with `persistworld train-base` (it writes "
                          f"<run_dir>/model.pt)")
    EpisodeStore(config["data"]["root"], verify_checksums=False)    # names a missing dataset
    parts = {"config": _sha(settings), "base_model": file_sha256(model),
             "data": dataset_sha256(config["data"]["root"])}
    return {"fingerprint": _sha(parts), "parts": parts, "settings": settings,
            "steps": int(config["trainer"]["steps"]), "code": code_version()}


def read_identity(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        from persistworld.errors import UserError
        raise UserError(f"{path} is corrupt ({e}); delete the run directory to start afresh")\
            from e


def write_identity(run_dir: str | Path, identity: Mapping[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / FILE, dict(identity))


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two identities, by name: the settings (dotted keys), then
    "base model file" / "dataset" when their content differs. Empty: the same run."""
    from persistworld.utils.rundir import config_differences
    out = config_differences(_with_added(old.get("settings") or {}),
                             _with_added(new.get("settings") or {}))
    for part, name in (("base_model", "base model file (content)"),
                       ("data", "dataset (train / val episodes or render settings)")):
        if (old.get("parts") or {}).get(part) != (new.get("parts") or {}).get(part):
            out.append(name)
    return out
