"""Scripted controllers of the mini-DROID dataset: pick-and-place and push.

A controller is a list of Cartesian waypoints (grasp-point position, yaw about the world z
axis, gripper command, speed, hold time). Every recorded step it moves the commanded target
toward the current waypoint by at most ``speed / fps`` metres (and a bounded rotation change), holds
it for the waypoint's hold time once reached, then advances. When the task is done it idles
with small random motions, so any episode length is filled. The commanded target of step t is
the dataset's ``action[t]``; the robot tracks it with IK + joint position control.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from persistworld.data.sim.scene import HOME_POS, WORKSPACE_X, WORKSPACE_Y, SceneSpec
from persistworld.errors import UserError

TASKS: tuple[str, ...] = ("pick_place", "push")

MAX_ROT_RATE = 1.2        # rad/s of each commanded rotation-vector component
TILT_STD = 0.035          # rad, random tilt of free-space waypoints (grasping ones: a third)
Z_MIN = 0.012             # never command the grasp point lower than this (fingers vs table)


@dataclass
class Waypoint:
    pos: np.ndarray           # (3,) grasp-point target, metres
    yaw: float                # rad, about world z, relative to "gripper pointing down"
    grip: float               # 1 open, 0 closed
    speed: float              # m/s of the commanded target on the way to this waypoint
    hold: float               # seconds to hold once reached
    tilt: tuple[float, float] = (0.0, 0.0)   # small x/y rotation-vector components (rad)

    @property
    def rot(self) -> np.ndarray:
        """Rotation vector relative to "gripper pointing down" (docs/FORMATS.md)."""
        return np.array([self.tilt[0], self.tilt[1], self.yaw])


def _wrap_quarter(a: float) -> float:
    """Wrap an angle to [-pi/4, pi/4) modulo pi/2 (a cube's grasp yaw)."""
    return (a + math.pi / 4) % (math.pi / 2) - math.pi / 4


def sample_goal(rng: np.random.Generator, start: np.ndarray, min_dist: float,
                max_dist: float) -> np.ndarray:
    """A goal xy in the workspace between min_dist and max_dist from ``start``."""
    for _ in range(100):
        g = np.array([rng.uniform(*WORKSPACE_X), rng.uniform(*WORKSPACE_Y)])
        if min_dist <= np.linalg.norm(g - start[:2]) <= max_dist:
            return g
    # fall back: step from the start toward the workspace centre
    c = np.array([np.mean(WORKSPACE_X), np.mean(WORKSPACE_Y)])
    d = c - start[:2]
    n = np.linalg.norm(d)
    d = d / n if n > 1e-6 else np.array([0.0, 1.0])
    return start[:2] + d * min_dist


class ScriptedPolicy:
    """Waypoint follower for one episode (``task`` in ``TASKS``)."""

    def __init__(self, task: str, spec: SceneSpec, rng: np.random.Generator, fps: float,
                 start_pos: np.ndarray, start_rot: np.ndarray):
        if task not in TASKS:
            raise UserError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
        self.task, self.spec, self.rng, self.fps = task, spec, rng, float(fps)
        self.target_pos = np.asarray(start_pos, dtype=np.float64).copy()
        self.target_rot = np.asarray(start_rot, dtype=np.float64).copy()
        self.target_grip = 1.0
        self.info: dict = {"task": task}
        obj = np.array([spec.object_xy[0], spec.object_xy[1], spec.height / 2])
        self.waypoints = self._pick_place(obj) if task == "pick_place" else self._push(obj)
        for i, wp in enumerate(self.waypoints):   # small random tilts: trajectories differ
            scale = TILT_STD / 3 if (task, i) in (("pick_place", 1), ("pick_place", 2)) \
                else TILT_STD
            wp.tilt = tuple(float(x) for x in rng.normal(0.0, scale, size=2))
        # waypoints that only change the gripper / slide along a line keep the orientation
        same = ((1, 2), (6, 7)) if task == "pick_place" else ((1, 2), (2, 3))
        for a, b in same:
            self.waypoints[b].tilt = self.waypoints[a].tilt
        self.task_waypoints = len(self.waypoints)
        self._k = 0                       # current waypoint index
        self._held = 0                    # steps held at the current waypoint
        self.done_step: int | None = None

    # -- plans -----------------------------------------------------------------------------
    def _noise(self, scale: float, n: int = 3) -> np.ndarray:
        return self.rng.normal(0.0, scale, size=n)

    def _pick_place(self, obj: np.ndarray) -> list[Waypoint]:
        s, rng = self.spec, self.rng
        h = s.height
        if s.shape == "cube":
            yaw = _wrap_quarter(s.object_yaw)
        else:
            yaw = float(rng.uniform(-0.6, 0.6))
        yaw += float(rng.normal(0, 0.03))
        goal = sample_goal(rng, obj, 0.08, 0.22)
        v_free = float(rng.uniform(0.12, 0.20))
        v_fine = float(rng.uniform(0.06, 0.09))
        grasp_z = max(Z_MIN, min(h / 2, 0.032) + float(rng.normal(0, 0.002)))
        above = h + float(rng.uniform(0.05, 0.09))
        lift = h + float(rng.uniform(0.06, 0.11))
        place_z = grasp_z + float(rng.uniform(0.004, 0.012))
        gx, gy = goal
        ox, oy = obj[0] + float(rng.normal(0, 0.002)), obj[1] + float(rng.normal(0, 0.002))
        mid = np.array([(ox + gx) / 2, (oy + gy) / 2, lift + float(rng.uniform(0.0, 0.04))])
        mid[:2] += self._noise(0.015, 2)
        retreat = np.array([gx, gy, h + 0.08]) + self._noise(0.01)
        self.info.update(goal=[float(gx), float(gy)], grasp_yaw=yaw)
        return [
            Waypoint(np.array([ox, oy, above]) + self._noise(0.008) * [1, 1, 0.5], yaw, 1.0,
                     v_free, float(rng.uniform(0.0, 0.4))),
            Waypoint(np.array([ox, oy, grasp_z]), yaw, 1.0, v_fine, 0.4),
            Waypoint(np.array([ox, oy, grasp_z]), yaw, 0.0, v_fine, 0.8),
            Waypoint(np.array([ox, oy, lift]), yaw, 0.0, v_fine, 0.0),
            Waypoint(mid, yaw + float(rng.normal(0, 0.15)), 0.0, v_free, 0.0),
            Waypoint(np.array([gx, gy, lift]), yaw + float(rng.normal(0, 0.1)), 0.0, v_free, 0.2),
            Waypoint(np.array([gx, gy, place_z]), yaw, 0.0, v_fine, 0.4),
            Waypoint(np.array([gx, gy, place_z]), yaw, 1.0, v_fine, 0.6),
            Waypoint(retreat, yaw, 1.0, v_fine, 0.2),
        ]

    def _push(self, obj: np.ndarray) -> list[Waypoint]:
        s, rng = self.spec, self.rng
        r = s.size / 2
        goal = sample_goal(rng, obj, 0.07, 0.16)
        d = goal - obj[:2]
        dist = float(np.linalg.norm(d))
        d = d / max(dist, 1e-6)
        push_z = Z_MIN + 0.006 + float(rng.uniform(0.0, 0.004))   # low: tall objects do not tip
        yaw = float(math.atan2(d[1], d[0])) + math.pi / 2     # fingers across the push line
        yaw = (yaw + math.pi / 2) % math.pi - math.pi / 2
        yaw = float(np.clip(yaw + rng.normal(0, 0.1), -1.2, 1.2))
        v_free = float(rng.uniform(0.12, 0.20))
        v_push = float(rng.uniform(0.05, 0.08))
        start = obj[:2] - d * (r + float(rng.uniform(0.035, 0.05)))
        end = goal - d * (r + 0.012)
        above = s.height + float(rng.uniform(0.05, 0.08))
        self.info.update(goal=[float(goal[0]), float(goal[1])], push_dir=[float(d[0]),
                                                                          float(d[1])])
        return [
            Waypoint(np.array([start[0], start[1], above]) + self._noise(0.006) * [1, 1, 0.5],
                     yaw, 0.0, v_free, float(rng.uniform(0.0, 0.4))),
            Waypoint(np.array([start[0], start[1], push_z]), yaw, 0.0, v_push * 1.2, 0.2),
            Waypoint(np.array([end[0], end[1], push_z]), yaw, 0.0, v_push, 0.4),
            Waypoint(np.array([end[0], end[1], push_z]) - np.array([*d * 0.03, 0.0]), yaw, 0.0,
                     v_push, 0.0),
            Waypoint(np.array([end[0] - d[0] * 0.04, end[1] - d[1] * 0.04, s.height + 0.08])
                     + self._noise(0.01), yaw, float(rng.integers(0, 2)), v_push, 0.2),
        ]

    def _idle_waypoint(self) -> Waypoint:
        """A small random motion near the home position (after the task is done)."""
        rng = self.rng
        home = np.asarray(HOME_POS)
        pos = np.array([rng.uniform(home[0] - 0.04, home[0] + 0.08),
                        rng.uniform(home[1] - 0.10, home[1] + 0.10),
                        rng.uniform(home[2] - 0.07, home[2] + 0.0)])
        # stay close to the previous target: small motions, not a new task
        step = pos - self.target_pos
        n = float(np.linalg.norm(step))
        if n > 0.10:
            pos = self.target_pos + step / n * 0.10
        pos[2] = max(pos[2], 0.09)
        yaw = float(np.clip(self.target_rot[2] + rng.normal(0, 0.15), -1.0, 1.0))
        tilt = (float(rng.normal(0, TILT_STD)), float(rng.normal(0, TILT_STD)))
        return Waypoint(pos, yaw, self.target_grip, float(rng.uniform(0.04, 0.10)),
                        float(rng.uniform(0.0, 0.8)), tilt)

    # -- stepping --------------------------------------------------------------------------
    def act(self, t: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Commanded (position, rotation vector, gripper) for recorded step ``t``."""
        if self._k >= len(self.waypoints):
            if self.done_step is None:
                self.done_step = t
            self.waypoints.append(self._idle_waypoint())
        wp = self.waypoints[self._k]
        self.target_grip = float(wp.grip)
        max_step = wp.speed / self.fps
        delta = wp.pos - self.target_pos
        n = float(np.linalg.norm(delta))
        if n > max_step:
            self.target_pos = self.target_pos + delta / n * max_step
        else:
            self.target_pos = wp.pos.astype(np.float64).copy()
        max_drot = MAX_ROT_RATE / self.fps
        self.target_rot = self.target_rot + np.clip(wp.rot - self.target_rot, -max_drot, max_drot)
        reached = n <= max_step and bool(np.all(np.abs(wp.rot - self.target_rot) < 1e-9))
        if reached:
            if self._held >= int(round(wp.hold * self.fps)):
                self._k += 1
                self._held = 0
            else:
                self._held += 1
        self.target_pos[2] = max(self.target_pos[2], Z_MIN)
        return self.target_pos.copy(), self.target_rot.copy(), self.target_grip
