"""Policies of graded quality behind the interact controller contract
(``persistworld.rollout.interactive``):

    controller(views, pose, chunk, horizon) -> (horizon, 7) end-effector targets or None

A *policy* here is a factory: ``policy.controller(start)`` returns a fresh controller for one
rollout from ``start`` (a ``simulator.SimRollout``: the scene of an episode's first frame), so
stateful policies (the scripted expert's waypoint plan) start over for every rollout, and the
same controller can drive the simulator or the world model from the same start.

``expert``       the scripted expert that rendered the data: its waypoint plan of the start,
                 executed open loop (identical to the episode's recorded actions)
``bc:PATH``      a vision policy trained by behaviour cloning (``bc.py``)
``expert@E``     the expert with a calibration error of E metres: a fixed horizontal offset of
                 norm E (random direction, drawn per rollout from the policy seed) on every
                 target, plus per-step jitter of E/4. Larger E = worse; success drops when E
                 passes the object's radius. Five levels of graded quality, named like
                 ``expert@0.02``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persistworld.errors import UserError

DEFAULT_POLICIES = ("expert", "expert@0.01", "expert@0.02", "expert@0.03", "expert@0.05")
# what the judge is trained on: the graded policies and a worse one, for failures of every kind
JUDGE_POLICIES = (*DEFAULT_POLICIES, "expert@0.08")


@dataclass(frozen=True)
class ExpertPolicy:
    """The scripted expert with calibration error ``error`` (metres); see the module doc."""

    error: float = 0.0
    seed: int = 0

    @property
    def name(self) -> str:
        return "expert" if self.error == 0 else f"expert@{self.error:g}"

    def controller(self, start, rollout_index: int = 0):
        expert = start.fresh_expert()
        rng = np.random.default_rng([self.seed, start.episode_id, rollout_index])
        angle = rng.uniform(0, 2 * np.pi)
        bias = self.error * np.array([np.cos(angle), np.sin(angle), 0.0])
        t0 = [0]

        def act(views, pose, chunk, horizon):
            out = np.empty((horizon, 7))
            for i in range(horizon):
                pos, rot, grip = expert.act(t0[0])
                t0[0] += 1
                jitter = rng.normal(0.0, self.error / 4, 3) * [1, 1, 0.5] if self.error else 0.0
                out[i, :3], out[i, 3:6], out[i, 6] = pos + bias + jitter, rot, grip
            return out
        return act


def make_policy(name: str, seed: int = 0):
    """``expert``, ``expert@E`` (E in metres, >= 0) or ``bc:PATH`` -> the policy; anything else
    fails with the list of what exists."""
    if name.startswith("bc:"):
        from persistworld.policy_eval.bc import BCPolicy
        return BCPolicy(name[3:])
    base, _, arg = name.partition("@")
    if base != "expert":
        raise UserError(f"unknown policy {name!r}: choose expert, expert@E (E = calibration "
                        f"error in metres, e.g. {', '.join(DEFAULT_POLICIES)}) or bc:PATH "
                        f"(a `persistworld train-policy` file)")
    try:
        error = float(arg) if arg else 0.0
    except ValueError:
        raise UserError(f"policy {name!r}: E must be a number of metres") from None
    if not 0.0 <= error < 0.2:
        raise UserError(f"policy {name!r}: E must be in [0, 0.2) metres")
    return ExpertPolicy(error=error, seed=seed)


def policy_label(name: str) -> str:
    """A file-name-safe label of a policy name (``bc:models/policies/bc_L3.pt`` -> ``bc_L3``)."""
    from pathlib import Path
    return Path(name[3:]).stem if name.startswith("bc:") else name
