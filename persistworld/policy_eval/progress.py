"""Staged task progress from the simulator's ground-truth state (paper App. C: Reach -> Grasp
-> Lift -> Move close -> Inside).

The stages of each mini-DROID task, in order:

    pick_place  reach, grasp, lift, move_close, place
    push        reach, contact, move_close, at_goal

A stage counts only once every earlier stage has been reached (at the same frame or before),
so ``staged_progress`` is the number of stages reached in order, 0 .. len(stages), and a
rollout succeeds when it reaches them all. The flags are computed per recorded frame from a
``SimState`` (what ``simulator.SimRollout`` records); the thresholds below are in metres and are
the one definition of "done" for both policy evaluation and the judge's training labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAGES: dict[str, tuple[str, ...]] = {
    "pick_place": ("reach", "grasp", "lift", "move_close", "place"),
    "push": ("reach", "contact", "move_close", "at_goal"),
}
REACH_MARGIN = 0.02        # grasp point within object radius + this (xy), at object height
LIFT_HEIGHT = 0.03         # object raised this far above its start height, held by both fingers
CLOSE_DIST = 0.05          # object centre within this of the goal (xy)
GOAL_DIST = 0.03           # ... within this for place / at_goal
REST_HEIGHT = 0.01         # placed: object back within this of its start height, released
PUSH_CLOSE_FRACTION = 0.5  # push move_close: the object covered half the way to the goal


@dataclass
class SimState:
    """Per-frame ground truth of one rollout (T frames) and its episode constants."""

    task: str
    goal: np.ndarray          # (2,) goal xy
    size: float               # object footprint (m)
    height: float             # object height (m)
    eef: np.ndarray           # (T, 3) grasp-point position
    opening: np.ndarray       # (T,) gripper opening in [0, 1]
    obj: np.ndarray           # (T, 3) object centre
    fingers: np.ndarray       # (T,) fingers touching the object (0-2)
    touch: np.ndarray         # (T,) any robot link touches the object

    def __post_init__(self) -> None:
        if self.task not in STAGES:
            raise ValueError(f"unknown task {self.task!r} (choose from {', '.join(STAGES)})")


def stage_flags(s: SimState) -> np.ndarray:
    """(T, S) bool: which stage condition holds at each frame (not yet in order)."""
    goal_d = np.linalg.norm(s.obj[:, :2] - s.goal[None], axis=1)
    near_xy = np.linalg.norm(s.eef[:, :2] - s.obj[:, :2], axis=1) < s.size / 2 + REACH_MARGIN
    low = s.eef[:, 2] < s.obj[:, 2] + s.height / 2 + REACH_MARGIN
    z0 = s.obj[0, 2]
    if s.task == "pick_place":
        held = s.fingers >= 2
        flags = [near_xy & low, held, held & (s.obj[:, 2] > z0 + LIFT_HEIGHT),
                 goal_d < CLOSE_DIST,
                 (goal_d < GOAL_DIST) & (s.fingers == 0) & (s.obj[:, 2] < z0 + REST_HEIGHT)]
    else:
        near = np.linalg.norm(s.eef[:, :2] - s.obj[:, :2], axis=1) < s.size / 2 + 3 * REACH_MARGIN
        flags = [near & low, s.touch.astype(bool),
                 goal_d < PUSH_CLOSE_FRACTION * goal_d[0], goal_d < GOAL_DIST]
    return np.stack(flags, axis=1)


def stages_in_order(flags: np.ndarray) -> np.ndarray:
    """(T, S) bool flags -> (S,) first frame each stage is reached in order (-1 = never)."""
    first = np.full(flags.shape[1], -1)
    t = 0
    for k in range(flags.shape[1]):
        hits = np.flatnonzero(flags[t:, k])
        if hits.size == 0:
            break
        t = t + int(hits[0])
        first[k] = t
    return first


def staged_progress(flags: np.ndarray) -> int:
    """The number of stages reached in order (0 .. S)."""
    return int((stages_in_order(flags) >= 0).sum())
