"""World models behind one contract (``interface.py``): build from config, save, load.

``model.pt`` (written by base training and post-training) is the artefact later stages load:
``{"format": "persistworld.world_model", "format_version": 1, "config": {...world_model
settings, resolved...}, "state_dict": {...}}``. ``load_world_model`` accepts that file or the
run directory holding it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from persistworld.world_model import edm
from persistworld.world_model.ctrl_world import CtrlWorldConfig, CtrlWorldModel
from persistworld.world_model.embedded import ActionEncoder, EmbeddedConfig, EmbeddedWorldModel
from persistworld.world_model.interface import VIEWS, HistoryBuffer, WorldModel
from persistworld.errors import MissingFile, UserError

MODEL_FILE = "model.pt"
FORMAT = "persistworld.world_model"
FORMAT_VERSION = 1
BACKENDS = {"embedded": (EmbeddedConfig, EmbeddedWorldModel),
            "ctrl_world": (CtrlWorldConfig, CtrlWorldModel)}

__all__ = ["VIEWS", "HistoryBuffer", "WorldModel", "EmbeddedConfig", "EmbeddedWorldModel",
           "ActionEncoder", "CtrlWorldConfig", "CtrlWorldModel", "edm", "build_world_model",
           "save_world_model", "load_world_model",
           "world_model_config", "MODEL_FILE"]


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


def world_model_config(cfg: Any):
    """The typed settings (e.g. ``EmbeddedConfig``) of a ``world_model`` config node."""
    plain = _plain(cfg)
    name = plain.get("name", "embedded")
    if name not in BACKENDS:
        raise UserError(f"world_model.name={name!r} is not a known backend; known: "
                        f"{sorted(BACKENDS)}")
    return BACKENDS[name][0].from_mapping(plain)


def build_world_model(cfg: Any) -> WorldModel:
    """A freshly initialised world model from a ``world_model`` config node (a mapping or
    DictConfig; random init draws from torch's global generator: seed it first)."""
    settings = world_model_config(cfg)
    return BACKENDS[settings.name][1](settings)


def save_world_model(model: WorldModel, path: str | Path,
                     state_dict: Mapping[str, torch.Tensor] | None = None,
                     extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.pt`` atomically: the model's config + ``state_dict`` (default: the model's
    own; post-training passes merged LoRA weights)."""
    from persistworld.utils.io import atomic_path
    path = Path(path)
    sd = model.state_dict() if state_dict is None else state_dict
    blob = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in sd.items()}, **dict(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


def load_world_model(path_or_run_dir: str | Path, map_location: str | torch.device = "cpu"
                     ) -> WorldModel:
    """Load ``model.pt`` (or ``<run_dir>/model.pt``) into a ready model in eval mode."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise MissingFile(f"no world model at {path}: train one with "
                          f"`persistworld train-base` (it writes <run_dir>/{MODEL_FILE})")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - name the file and the fix
        raise UserError(f"{path} cannot be read as a world model ({e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"{path} is not a persistworld world model file (no format marker)")
    model = build_world_model(blob["config"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:      # weights of another architecture than the file's settings
        first = str(e).split("\n\t")[1:2] or [str(e)[:200]]
        raise UserError(f"{path}: its weights do not fit the model its settings build "
                        f"({first[0].strip()[:200]}); it was probably written by an older "
                        f"persistworld whose defaults differed: add the missing settings to "
                        f"its 'config' (e.g. frame_head: 0 for files without a FrameHead) or "
                        f"retrain it") from e
    return model.eval()


# world-model settings that only the sampler reads: changing them never changes the weights,
# so they may be chosen after training (export-model --sampler KEY=VALUE)
SAMPLER_KEYS = ("sampler", "sampler_start", "num_steps", "sigma_min", "sigma_max", "rho")


def export_world_model(source: str | Path, out: str | Path, half: bool = True,
                       extra: Mapping[str, Any] | None = None,
                       sampler: Mapping[str, Any] | None = None) -> Path:
    """Copy a trained ``model.pt`` (or a run directory's) into a compact file to ship or share:
    the same format, weights in float16 when ``half`` (they load back into float32 models),
    plus ``extra`` keys (e.g. the data settings it was trained for and the command).
    ``sampler``: new values of ``SAMPLER_KEYS`` settings (checked like any config)."""
    model = load_world_model(source)
    if sampler:
        bad = sorted(set(sampler) - set(SAMPLER_KEYS))
        if bad:
            raise UserError(f"--sampler {', '.join(bad)}: only sampler settings may change "
                            f"after training ({', '.join(SAMPLER_KEYS)})")
        cfg = type(model.cfg).from_mapping({**model.config_dict(), **sampler})
        model.cfg = cfg
    sd = {k: (v.half() if half and v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    return save_world_model(model, out, state_dict=sd, extra=extra)
