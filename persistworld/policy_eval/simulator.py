"""Closed-loop rollouts of a policy in the simulator that rendered the data.

``SimRollout(render_cfg, episode_id)`` rebuilds the start state of a rendered episode exactly
(``data.render.start_episode`` with the episode's seed and redraw): its first frame is the
episode's frame 0, byte for byte. ``step(targets)`` executes one chunk of commanded
end-effector targets (L, 7) at the dataset's control rate, renders every frame and records the
ground-truth state that ``progress`` scores. Replaying an episode's recorded actions therefore
reproduces its frames (tested); any other policy gets the simulator's true outcome.
"""
from __future__ import annotations

from typing import Any, Mapping

import copy

import numpy as np

from persistworld.errors import UserError
from persistworld.policy_eval.progress import SimState, stage_flags, staged_progress


class SimRollout:
    """One closed-loop simulator rollout from the start of episode ``episode_id``."""

    def __init__(self, render_cfg: Mapping[str, Any], episode_id: int, attempt: int = 0):
        from persistworld.data.render import (episode_rng, episode_seed, start_episode,
                                              validate_config)
        self.rc = validate_config(render_cfg)
        self.episode_id = int(episode_id)
        start = start_episode(self.rc, episode_rng(episode_seed(self.rc["seed"], episode_id),
                                                   int(attempt)))
        self.scene, self.task, self.spec = start["scene"], start["task"], start["spec"]
        self._expert = copy.deepcopy(start["policy"])   # the scripted plan of this start
        self.num_steps = start["num_steps"]
        self.goal = np.asarray(self._expert.info["goal"], np.float64)
        self.substeps = self.rc["physics_hz"] // self.rc["fps"]
        self.frames: list[np.ndarray] = []
        self.measured: list[np.ndarray] = []     # eef_pose of every frame
        self.commanded: list[np.ndarray] = []    # the targets executed so far
        self._state: dict[str, list] = {k: [] for k in ("eef", "opening", "obj", "fingers",
                                                        "touch")}
        self._record()

    def fresh_expert(self):
        """The scripted expert of this start (privileged: it knows the scene), in its state
        before its first action; every call returns an independent copy."""
        return copy.deepcopy(self._expert)

    # -- recording -------------------------------------------------------------------------
    def _record(self) -> None:
        from persistworld.data.sim.scene import quat_to_relrot
        rgb, _ = self.scene.render()
        pos, quat, opening = self.scene.eef_state()
        quat = quat if quat[3] >= 0 else -quat
        fingers, touch = self.scene.contacts()
        self.frames.append(rgb)
        self.measured.append(np.concatenate([pos, quat_to_relrot(quat), [opening]]).astype(
            np.float32))
        for k, v in (("eef", pos), ("opening", opening), ("obj", self.scene.object_pose()[0]),
                     ("fingers", fingers), ("touch", touch)):
            self._state[k].append(v)

    def views(self) -> np.ndarray:
        """(V, h, w, 3) uint8: the newest frame of every view (VIEWS order)."""
        return self.frames[-1]

    @property
    def pose(self) -> np.ndarray:
        """(7,) the conditioning pose of the newest frame, as the dataset defines it
        (``Episode.poses``: the measured pose at the start, then the last commanded target),
        so a policy sees the same pose here as in a world-model rollout."""
        return (self.commanded[-1] if self.commanded else self.measured[0]).astype(np.float64)

    def step(self, targets: np.ndarray) -> None:
        """Execute commanded targets (n, 7): xyz, rotation vector relative to gripper-down,
        gripper (1 open); one recorded frame per target."""
        from persistworld.data.sim.scene import relrot_to_quat
        targets = np.asarray(targets, np.float64)
        if targets.ndim != 2 or targets.shape[1] != 7 or not np.isfinite(targets).all():
            raise UserError(f"the policy returned targets of shape {targets.shape} (or NaN/inf);"
                            " expected finite (L, 7)")
        for t in targets:
            self.scene.command(t[:3], relrot_to_quat(t[3:6]), float(np.clip(t[6], 0, 1)))
            self.scene.step(self.substeps)
            self.commanded.append(t.copy())
            self._record()

    # -- ground truth ----------------------------------------------------------------------
    def state(self) -> SimState:
        s = {k: np.asarray(v, np.float64) for k, v in self._state.items()}
        return SimState(task=self.task, goal=self.goal, size=float(self.spec.size),
                        height=float(self.spec.height), **s)

    def progress(self) -> int:
        return staged_progress(stage_flags(self.state()))

    def close(self) -> None:
        from persistworld.data.sim.scene import disconnect_client
        disconnect_client()
