"""Optimisers for the trainable parts: AdamW, or Muon for 2-D weights + AdamW for the rest.

``torch.optim.Muon`` refuses non-2D parameters (ENVIRONMENT.md), so ``muon`` splits the
parameters: matrices (LoRA A/B, linear weights) go to Muon, biases, norms and embeddings (also
2-D ones such as the action encoder's ``frame_embedding``: ``muon_eligible``) to AdamW. ``MultiOptimizer`` steps both and checkpoints both.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from persistworld.errors import UserError

OPTIMIZERS = ("adamw", "muon")


class MultiOptimizer:
    """A few optimisers behind one step / zero_grad / state_dict / lr interface."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for opt in optimizers:
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def set_lr_factor(self, factor: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise UserError("optimizer checkpoint does not match the configured optimizer")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)


def muon_eligible(name: str, p: torch.nn.Parameter) -> bool:
    """Muon orthogonalises the updates of weight matrices; embeddings (rows are independent
    vectors, e.g. the action encoder's ``frame_embedding``), biases and norms go to AdamW."""
    return p.ndim == 2 and "embedding" not in name.rsplit(".", 1)[-1]


def build_optimizer(params: Iterable[torch.nn.Parameter | tuple[str, torch.nn.Parameter]],
                    name: str = "adamw", lr: float = 1e-4,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    muon_lr: float | None = None, muon_momentum: float = 0.95) -> MultiOptimizer:
    """``params``: parameters, or (name, parameter) pairs (``named_parameters()``) so that
    Muon can tell embeddings from weight matrices (``muon_eligible``)."""
    named = [(p[0], p[1]) if isinstance(p, tuple) else ("", p) for p in params]
    named = [(n, p) for n, p in named if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise UserError("no trainable parameters: check the LoRA target modules")
    if name == "adamw":
        return MultiOptimizer([torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                                 betas=tuple(betas))])
    if name == "muon":
        mats = [p for n, p in named if muon_eligible(n, p)]
        rest = [p for n, p in named if not muon_eligible(n, p)]
        opts: list[torch.optim.Optimizer] = []
        if mats:
            # adjust_lr_fn="match_rms_adamw" makes Muon's update RMS match AdamW's, so the
            # same lr works for both groups (Moonlight's recipe).
            opts.append(torch.optim.Muon(mats, lr=muon_lr or lr, weight_decay=weight_decay,
                                         momentum=muon_momentum,
                                         adjust_lr_fn="match_rms_adamw"))
        if rest:
            opts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay,
                                          betas=tuple(betas)))
        return MultiOptimizer(opts)
    raise UserError(f"optim.name: unknown {name!r} (choose from {', '.join(OPTIMIZERS)})")


def warmup_cosine(step: float, warmup_steps: int, total_steps: float, final: float = 1.0) -> float:
    """LR factor: linear warm-up to 1, then cosine from 1 to ``final`` (1.0 = constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if final >= 1.0 or total_steps <= warmup_steps:
        return 1.0
    frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))
