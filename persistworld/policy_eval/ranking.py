"""How well world-model policy evaluation agrees with the simulator (paper App. C).

Per policy, the mean staged progress (0..1) over N rollouts in the simulator ("real") and in
the world model. Agreement across policies:

* Pearson r and Spearman rho of the per-policy means;
* MMRV, SimplerEnv's mean maximum rank violation: for each policy i, the largest real-progress
  gap |real_i - real_j| over the policies j the world model orders the other way round, averaged
  over i (0 = the world model ranks every pair as reality does; lower is better);
* the false-success rate: of the rollouts that FAIL in the simulator, the fraction that the
  world model's judge calls a success (a world model "fixing" a failure).

Intervals are percentile bootstraps over rollouts: each resample draws the starts with
replacement, the same starts for every policy and both environments (rollouts are paired by
start), and recomputes every statistic.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def mmrv(world: np.ndarray, real: np.ndarray) -> float:
    """Mean maximum rank violation of per-policy scores ``world`` against ``real``."""
    world, real = np.asarray(world, float), np.asarray(real, float)
    flip = (world[:, None] < world[None, :]) != (real[:, None] < real[None, :])
    return float((np.abs(real[:, None] - real[None, :]) * flip).max(axis=1).mean())


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")                   # undefined for a constant score
    return float(fn(a, b)[0])


def agreement(world: np.ndarray, real: np.ndarray, world_done: np.ndarray,
              real_done: np.ndarray) -> dict[str, float]:
    """``world``/``real``: (P, N) progress in [0, 1] of P policies x N paired starts;
    ``*_done``: (P, N) bool success. -> the statistics of the module doc (point values)."""
    wm, rm = world.mean(1), real.mean(1)
    failed = ~real_done
    return {"pearson": _corr(stats.pearsonr, wm, rm),
            "spearman": _corr(stats.spearmanr, wm, rm),
            "mmrv": mmrv(wm, rm),
            "false_success": float((world_done & failed).sum() / failed.sum())
            if failed.any() else float("nan")}


def bootstrap(world: np.ndarray, real: np.ndarray, world_done: np.ndarray,
              real_done: np.ndarray, n_boot: int = 2000, seed: int = 0,
              level: float = 0.95) -> dict[str, dict[str, float]]:
    """Point value and percentile interval of every statistic of ``agreement``."""
    point = agreement(world, real, world_done, real_done)
    rng = np.random.default_rng(seed)
    n = world.shape[1]
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for k, v in agreement(world[:, idx], real[:, idx], world_done[:, idx],
                              real_done[:, idx]).items():
            draws[k].append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, v in point.items():
        d = np.asarray(draws[k])
        d = d[np.isfinite(d)]
        out[k] = {"value": v, "lo": float(np.percentile(d, lo)) if d.size else float("nan"),
                  "hi": float(np.percentile(d, hi)) if d.size else float("nan")}
    return out
