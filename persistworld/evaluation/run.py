"""`persistworld evaluate`: the command around ``evaluate.evaluate``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from persistworld.evaluation.evaluate import TRIVIAL, EvalSettings, evaluate, model_predictor
from persistworld.errors import UserError


def settings_from(cfg_eval) -> EvalSettings:
    if isinstance(cfg_eval, DictConfig):
        cfg_eval = OmegaConf.to_container(cfg_eval, resolve=True)
    return EvalSettings(**dict(cfg_eval))


def default_out_dir(model: str, s: EvalSettings) -> Path:
    name = f"{s.mode}_{s.num_chunks}"
    if model in TRIVIAL:
        return Path("runs/baselines") / model / "eval" / name
    p = Path(model)
    return (p.parent if p.suffix == ".pt" else p) / "eval" / name


def evaluate_model(model: str, data_cfg, s: EvalSettings, out_dir: str | Path,
                   device: str = "cpu") -> dict:
    trivial = model in TRIVIAL
    if trivial:
        predictor, label = TRIVIAL[model](int(data_cfg.future)), model.replace("_", " ")
    else:
        from persistworld.world_model import load_world_model
        wm = load_world_model(model).to(torch.device(device)).eval()
        if wm.future != int(data_cfg.future):
            raise UserError(f"data.future={data_cfg.future} but the model {model} predicts "
                            f"{wm.future} frames per chunk")
        predictor, label = model_predictor(wm), "model"
    return evaluate(predictor, data_cfg.root, out_dir, s, future=int(data_cfg.future),
                    stride=int(data_cfg.stride), lpips_device=device, label=label,
                    baselines=not trivial)


def evaluate_main(cfg: DictConfig) -> dict:
    s = settings_from(cfg.eval)
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(str(cfg.model), s)
    summary = evaluate_model(str(cfg.model), cfg.data, s, out, cfg.device)
    print(json.dumps(summary["metrics"], indent=1))
    print(f"evaluation written to {out}")
    return summary
