"""Vision policies trained by behaviour cloning on the rendered episodes.

Like the paper's policies, a ``BCPolicy`` sees the wrist view and one external view (ext1) of
the newest frame, plus the conditioning pose (``Episode.poses``), the task and its goal (the
instruction: the goal is not visible), and outputs the next L end-effector targets (as offsets
from the pose, in the dataset's normalised units). Quality is graded by the training data and
steps (``persistworld train-policy --episodes N --steps S``); the five levels kept in the repo
and how they were made are in ``models/README.md``.

Policy names: ``bc:PATH`` (a file written by ``train-policy``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from persistworld.errors import UserError
from persistworld.policy_eval.progress import STAGES

POLICY_VIEWS = ("wrist", "ext1")


class BCNet(nn.Module):
    def __init__(self, horizon: int = 5, width: int = 16):
        super().__init__()
        layers, c = [], 3 * len(POLICY_VIEWS)
        for w in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(c, w, 3, 2, 1), nn.GroupNorm(4, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, 1, 1), nn.GroupNorm(4, w), nn.SiLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c * 16 + 7 + 2 + len(STAGES), 256), nn.SiLU(),
                                  nn.Linear(256, horizon * 7))
        self.config = {"horizon": horizon, "width": width}

    def forward(self, img, pose, goal, task):
        f = nn.functional.adaptive_avg_pool2d(self.features(img), 4).flatten(1)
        out = self.head(torch.cat([f, pose, goal, task], 1))
        return out.view(len(img), -1, 7)


def _inputs(views: np.ndarray, view_idx: list[int]) -> torch.Tensor:
    """(N, V, h, w, 3) uint8 -> (N, 3 * len(POLICY_VIEWS), h, w) float."""
    x = torch.from_numpy(np.ascontiguousarray(views[:, view_idx])).float().div(255)
    n, v, h, w, _ = x.shape
    return x.permute(0, 1, 4, 2, 3).reshape(n, v * 3, h, w)


class BCPolicy:
    """A ``train-policy`` file behind the policy factory contract (``policies.py``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        from persistworld.policy_eval.judge import load_net
        self.net, ck = load_net(self.path, BCNet, "policy", "train-policy")
        self.lo, self.hi = np.asarray(ck["lo"], np.float32), np.asarray(ck["hi"], np.float32)
        self.goal_lo, self.goal_hi = np.asarray(ck["goal_lo"]), np.asarray(ck["goal_hi"])
        self.info = ck.get("trained_on", {})
        self.name = f"bc:{self.path}"

    def _norm(self, x):
        span = np.where(self.hi - self.lo > 1e-6, self.hi - self.lo, 1.0)
        return np.clip(2.0 * (x - self.lo) / span - 1.0, -1.0, 1.0).astype(np.float32)

    def _denorm(self, y):
        span = np.where(self.hi - self.lo > 1e-6, self.hi - self.lo, 1.0)
        return (np.asarray(y) + 1.0) / 2.0 * span + self.lo

    def controller(self, start, rollout_index: int = 0):
        from persistworld.data.sim.scene import VIEWS
        view_idx = [VIEWS.index(v) for v in POLICY_VIEWS]
        goal = torch.from_numpy(((start.goal - self.goal_lo) / (self.goal_hi - self.goal_lo)
                                 * 2 - 1).astype(np.float32))[None]
        task = torch.zeros(1, len(STAGES))
        task[0, list(STAGES).index(start.task)] = 1
        L = self.net.config["horizon"]

        @torch.no_grad()
        def act(views, pose, chunk, horizon):
            p = self._norm(np.asarray(pose, np.float32))
            d = self.net(_inputs(views[None], view_idx), torch.from_numpy(p)[None], goal,
                         task)[0].numpy()
            out = self._denorm(np.clip(p[None] + d, -1.0, 1.0))
            if horizon > L:                                   # hold the last target
                out = np.concatenate([out, np.repeat(out[-1:], horizon - L, 0)])
            return out[:horizon].astype(np.float64)
        return act


def training_samples(store, ids: list[int], horizon: int):
    """Every frame t of the episodes: views, pose_t, goal, task -> action[t : t + L]
    (padded with the last action), normalised as the dataset normalises poses."""
    from persistworld.data.sim.scene import VIEWS
    view_idx = [VIEWS.index(v) for v in POLICY_VIEWS]
    views, poses, goals, tasks, targets = [], [], [], [], []
    for e in ids:
        ep = store.load(e)
        T = ep.num_steps
        act = np.concatenate([ep.action, np.repeat(ep.action[-1:], horizon, 0)])
        views.append(ep.rgb[:, view_idx])
        poses.append(ep.poses)
        goals.append(np.repeat(np.asarray(ep.meta["goal_xy"], np.float32)[None], T, 0))
        tasks.append(np.full(T, list(STAGES).index(ep.meta["task"])))
        targets.append(np.stack([act[t:t + horizon] for t in range(T)]))
    return (np.concatenate(views), np.concatenate(poses), np.concatenate(goals),
            np.concatenate(tasks), np.concatenate(targets))


def train_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="persistworld train-policy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--episodes", type=int, default=None, help="train episodes used (all)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--horizon", type=int, default=5, help="targets per call (the chunk L)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from persistworld.data.dataset import EpisodeStore
    from persistworld.data.sim.scene import WORKSPACE_X, WORKSPACE_Y
    from persistworld.policy_eval.judge import fit
    from persistworld.utils.io import atomic_path
    if a.steps < 1 or a.batch < 1 or a.horizon < 1:
        raise UserError("--steps, --batch and --horizon must be >= 1")
    store = EpisodeStore(a.data)
    ids = store.episode_ids("train")
    if a.episodes is not None:
        if not 1 <= a.episodes <= len(ids):
            raise UserError(f"--episodes {a.episodes}: the train split has {len(ids)}")
        ids = ids[:a.episodes]
    t0 = time.time()
    views, poses, goals, tasks, targets = training_samples(store, ids, a.horizon)
    lo = np.asarray(store.norm_stats["action"]["p01"], np.float32)
    hi = np.asarray(store.norm_stats["action"]["p99"], np.float32)
    goal_lo = np.array([WORKSPACE_X[0], WORKSPACE_Y[0]]) - 0.25   # goals lie near the workspace
    goal_hi = np.array([WORKSPACE_X[1], WORKSPACE_Y[1]]) + 0.25
    torch.manual_seed(a.seed)
    net = BCNet(horizon=a.horizon)
    pol = BCPolicy.__new__(BCPolicy)
    pol.lo, pol.hi = lo, hi
    p_n = torch.from_numpy(pol._norm(poses))
    y_n = torch.from_numpy(pol._norm(targets)) - p_n[:, None]
    g_n = torch.from_numpy(((goals - goal_lo) / (goal_hi - goal_lo) * 2 - 1).astype(np.float32))
    t_1h = nn.functional.one_hot(torch.from_numpy(tasks), len(STAGES)).float()

    def loss_fn(idx, g):
        x = torch.from_numpy(views[idx.numpy()]).float().div(255)
        x = x.permute(0, 1, 4, 2, 3).reshape(len(idx), -1, *x.shape[2:4])
        return nn.functional.mse_loss(net(x, p_n[idx], g_n[idx], t_1h[idx]), y_n[idx])
    loss = fit(net, loss_fn, len(views), a.steps, a.batch, 1e-3, a.seed, "train policy")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save({"config": net.config, "state_dict": net.state_dict(), "lo": lo.tolist(),
                    "hi": hi.tolist(), "goal_lo": goal_lo.tolist(), "goal_hi": goal_hi.tolist(),
                    "trained_on": {"data": str(a.data), "episodes": len(ids), "steps": a.steps,
                                   "batch": a.batch, "seed": a.seed, "final_loss": loss,
                                   "seconds": time.time() - t0}}, tmp)
    print(f"policy written to {out} ({time.time() - t0:.0f} s, final loss {loss:.5f})")
    return 0
