"""Statistics over the collected tables: pure functions, randomness passed in.

Every resampling function takes an explicit ``numpy.random.Generator`` (``rng``) and nothing
reads global random state, so a report is reproducible from its seed (STYLE.md point 11).

Conventions
-----------
* Bootstrap: ``scipy.stats.bootstrap`` with ``method="percentile"`` (the plain percentile
  interval; BCa is available through ``method=``), 10,000 resamples unless told otherwise,
  two-sided ``level`` = 0.95. Fewer than two observations give a NaN interval (no interval is
  better than a fake one).
* Metric directions: SSIM and PSNR higher is better, LPIPS lower (``HIGHER_IS_BETTER``).
* Paired deltas are ``model - baseline`` in the metric's own units; "win" means the model is
  better on that sample in the metric's direction; ties are neither wins nor losses.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from persistworld.analysis.collect import (GROUPS, METRICS, condition_labels, sample_keys,
                                           sample_scores, step_scores)

HIGHER_IS_BETTER = {"ssim": True, "psnr": True, "lpips": False}


def higher_is_better(metric_or_column: str) -> bool:
    """Direction of a metric given its name or any column ending in it
    (``eval/external/lpips`` -> False)."""
    leaf = metric_or_column.rsplit("/", 1)[-1].split("_")[0].lower()
    if leaf not in HIGHER_IS_BETTER:
        raise KeyError(f"unknown metric direction for {metric_or_column!r}")
    return HIGHER_IS_BETTER[leaf]


# -- bootstrap -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95


def bootstrap_ci(x: Sequence[float] | np.ndarray, rng: np.random.Generator, *,
                 statistic: Callable[..., Any] = np.mean, n_resamples: int = 10_000,
                 level: float = 0.95, method: str = "percentile") -> Interval:
    """Bootstrap confidence interval of ``statistic`` over the 1-D sample ``x`` (NaNs
    dropped). ``statistic`` must accept ``axis=`` (NumPy reductions do)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError("pass an explicit numpy.random.Generator (np.random.default_rng(seed))")
    x = np.asarray(x, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    est = float(statistic(x, axis=0))
    if x.size < 2:
        return Interval(est, math.nan, math.nan, int(x.size), level)
    if np.all(x == x[0]):  # degenerate: every resample gives the same value
        return Interval(est, est, est, int(x.size), level)
    res = sps.bootstrap((x,), statistic, n_resamples=n_resamples, confidence_level=level,
                        method=method, vectorized=True, axis=-1, rng=rng)
    ci = res.confidence_interval
    return Interval(est, float(ci.low), float(ci.high), int(x.size), level)


def bootstrap_ci_columns(data: np.ndarray, rng: np.random.Generator, *,
                         n_resamples: int = 2_000, level: float = 0.95,
                         batch: int = 250) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap of the NaN-aware mean of each column of ``data`` (samples x steps),
    resampling whole rows (samples) jointly. Returns (mean, low, high), each (steps,).
    Columns with fewer than two non-NaN values get a NaN interval."""
    data = np.asarray(data, dtype=float)
    if not isinstance(rng, np.random.Generator):
        raise TypeError("pass an explicit numpy.random.Generator")
    n_obs = np.sum(~np.isnan(data), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mean = np.nanmean(data, axis=0)
        low = np.full(data.shape[1], np.nan)
        high = np.full(data.shape[1], np.nan)
        if data.shape[0] >= 2:
            res = sps.bootstrap((data,), lambda a, axis: np.nanmean(a, axis=axis),
                                n_resamples=n_resamples, confidence_level=level,
                                method="percentile", vectorized=True, axis=0, batch=batch,
                                rng=rng)
            low, high = np.asarray(res.confidence_interval.low, dtype=float), \
                np.asarray(res.confidence_interval.high, dtype=float)
    ok = n_obs >= 2
    low, high = np.where(ok, low, np.nan), np.where(ok, high, np.nan)
    const = ok & (np.nanmax(np.where(np.isnan(data), -np.inf, data), axis=0)
                  == np.nanmin(np.where(np.isnan(data), np.inf, data), axis=0))
    low, high = np.where(const, mean, low), np.where(const, mean, high)
    return mean, low, high


# -- conditions over seeds -------------------------------------------------------------------------
def summarize_conditions(runs: pd.DataFrame, factors: Sequence[str], columns: Sequence[str], *,
                         seed_key: str = "cfg.seed", rng: np.random.Generator | None = None,
                         n_resamples: int = 10_000, level: float = 0.95,
                         statuses: Sequence[str] = ("completed",)) -> pd.DataFrame:
    """Mean, std (ddof=1) and n over seeds for every condition (factor setting) and column.

    Only runs whose ``status`` is in ``statuses`` count; a run missing a column just does not
    count towards that column's n. With ``rng``, adds a bootstrap interval over seeds (with 2-3
    seeds such an interval is rough: report n next to it). Long table: ``condition``, the
    factor columns, ``column``, ``mean``, ``std``, ``n``, ``seeds`` [, ``ci_low``, ``ci_high``].
    """
    runs = runs[runs["status"].isin(list(statuses))]
    labels = condition_labels(runs, factors)
    rows = []
    for label, sub in runs.groupby(labels, sort=False):
        first = sub.iloc[0]
        for col in columns:
            vals = pd.to_numeric(sub[col], errors="coerce") if col in sub else pd.Series([], float)
            ok = vals.notna()
            seeds = sub.loc[ok[ok].index, seed_key] if seed_key in sub else pd.Series([], dtype=object)
            row = {"condition": label, **{f: first[f] for f in factors}, "column": col,
                   "mean": vals[ok].mean() if ok.any() else math.nan,
                   "std": vals[ok].std(ddof=1) if ok.sum() > 1 else math.nan,
                   "n": int(ok.sum()), "seeds": ",".join(map(str, seeds.tolist()))}
            if rng is not None:
                ci = bootstrap_ci(vals[ok].to_numpy(), rng, n_resamples=n_resamples,
                                  level=level)
                row.update(ci_low=ci.low, ci_high=ci.high)
            rows.append(row)
    cols = ["condition", *factors, "column", "mean", "std", "n", "seeds"]
    return pd.DataFrame(rows, columns=cols + (["ci_low", "ci_high"] if rng is not None else []))


# -- paired comparison -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedComparison:
    """``model`` vs ``baseline`` on the same evaluation samples."""
    n: int
    higher_is_better: bool
    mean_delta: float          # mean of (model - baseline)
    median_delta: float
    ci_low: float              # bootstrap interval of the mean delta
    ci_high: float
    wins: int                  # samples where the model is better (in the metric's direction)
    losses: int
    ties: int
    win_rate: float            # wins / n
    sign_p: float              # two-sided exact binomial (sign) test on wins vs losses
    wilcoxon_p: float          # two-sided Wilcoxon signed-rank test on the deltas
    delta: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("delta")
        return d


def paired_comparison(model: Sequence[float] | pd.Series, baseline: Sequence[float] | pd.Series,
                      *, higher_is_better: bool, rng: np.random.Generator,
                      n_resamples: int = 10_000, level: float = 0.95) -> PairedComparison:
    """Per-sample paired comparison (paper Fig. 4: "better on ~98% of samples, p < 1e-6").

    Two Series are aligned on their index (the sample keys); arrays must be in the same sample
    order. Samples where either value is NaN are dropped. The sign test is
    ``scipy.stats.binomtest(wins, wins + losses, 0.5)`` (ties dropped, the usual convention);
    the Wilcoxon test is ``scipy.stats.wilcoxon(delta)`` (zero deltas dropped, "wilcox").
    """
    if isinstance(model, pd.Series) and isinstance(baseline, pd.Series):
        model, baseline = model.align(baseline, join="inner")
    a, b = np.asarray(model, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    delta = a[keep] - b[keep]
    better = delta if higher_is_better else -delta
    wins, losses = int(np.sum(better > 0)), int(np.sum(better < 0))
    ties = int(delta.size - wins - losses)
    sign_p = sps.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else math.nan
    try:
        wilcoxon_p = float(sps.wilcoxon(delta).pvalue) if wins + losses else math.nan
    except ValueError:
        wilcoxon_p = math.nan
    ci = bootstrap_ci(delta, rng, n_resamples=n_resamples, level=level)
    return PairedComparison(
        n=int(delta.size), higher_is_better=higher_is_better,
        mean_delta=float(np.mean(delta)) if delta.size else math.nan,
        median_delta=float(np.median(delta)) if delta.size else math.nan,
        ci_low=ci.low, ci_high=ci.high, wins=wins, losses=losses, ties=ties,
        win_rate=wins / delta.size if delta.size else math.nan,
        sign_p=float(sign_p), wilcoxon_p=wilcoxon_p, delta=delta)


def paired_table(frames: pd.DataFrame, model: str, baseline: str, rng: np.random.Generator, *,
                 by: str = "run", groups: Sequence[str] = GROUPS,
                 metrics: Sequence[str] = METRICS, mask: str | None = None,
                 n_resamples: int = 10_000) -> tuple[pd.DataFrame, dict[str, PairedComparison]]:
    """Paired comparisons of ``model`` vs ``baseline`` (two values of column ``by`` of the
    frames table) on every group x metric, on the whole-rollout value of each sample.
    Returns a tidy table and the comparisons keyed ``"<group>/<metric>"`` (for the figure)."""
    rows, results = [], {}
    for group in groups:
        for metric in metrics:
            scores = sample_scores(frames, group=group, metric=metric, mask=mask, by=by)
            if model not in scores or baseline not in scores:
                continue
            res = paired_comparison(scores[model], scores[baseline], rng=rng,
                                    higher_is_better=HIGHER_IS_BETTER[metric],
                                    n_resamples=n_resamples)
            key = f"{group}/{metric}" if mask is None else f"{mask}/{group}/{metric}"
            results[key] = res
            rows.append({"model": model, "baseline": baseline, "group": group,
                         "mask": mask or "", "metric": metric, **res.as_dict()})
    return pd.DataFrame(rows), results


# -- rollout-time curves ---------------------------------------------------------------------------
def step_curves(frames: pd.DataFrame, rng: np.random.Generator, *, by: str = "run",
                x: str = "chunk", groups: Sequence[str] = GROUPS,
                metrics: Sequence[str] = METRICS, mask: str | None = None,
                n_resamples: int = 2_000, level: float = 0.95) -> pd.DataFrame:
    """Metric vs rollout time (paper Fig. 5 / 11): for each value of ``by`` (model, condition
    or run), group, metric and step ``x``, the mean over evaluation samples with a bootstrap
    interval over samples. A sample's value at a step is the mean over the step's frames and
    the group's views (and over the seeds of a condition when ``by`` pools several runs).
    Long table ``by, group, mask, metric, x, mean, ci_low, ci_high, n``."""
    rows = []
    for group in groups:
        for metric in metrics:
            long = step_scores(frames, group=group, metric=metric, mask=mask, by=by, x=x)
            keys = sample_keys(long)
            for name, sub in long.groupby(by, sort=False):
                wide = sub.set_index(keys + [x])["value"].unstack(x)  # (samples, steps)
                mean, low, high = bootstrap_ci_columns(wide.to_numpy(), rng, level=level,
                                                       n_resamples=n_resamples)
                n = np.sum(~np.isnan(wide.to_numpy()), axis=0)
                for j, step in enumerate(wide.columns):
                    rows.append({by: name, "group": group, "mask": mask or "", "metric": metric,
                                 x: step, "mean": mean[j], "ci_low": low[j], "ci_high": high[j],
                                 "n": int(n[j])})
    return pd.DataFrame(rows)


# -- human preference study: Elo, binomial test, kappa --------------------------------------------
def expected_score(r_i: float, r_j: float) -> float:
    """``E_i = 1 / (1 + 10^((R_j - R_i) / 400))`` (paper eq. 38)."""
    return 1.0 / (1.0 + 10.0 ** ((r_j - r_i) / 400.0))


@dataclass(frozen=True)
class EloResult:
    ratings: dict[str, float]
    history: pd.DataFrame = field(repr=False)  # one row per match: winner, loser, ratings after


def _as_matches(matches: pd.DataFrame | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(matches, pd.DataFrame):
        return list(zip(matches["winner"].astype(str), matches["loser"].astype(str)))
    return [(str(w), str(l)) for w, l in matches]


def elo_ratings(matches: pd.DataFrame | Iterable[tuple[str, str]], *, start: float = 800.0,
                k: float = 32.0, players: Iterable[str] = ()) -> EloResult:
    """Sequential Elo over ``(winner, loser)`` matches in the given order (a DataFrame needs
    ``winner`` and ``loser`` columns): every vote is one match, ``R_i <- R_i + K (S_i - E_i)``
    with S = 1 for the preferred model and 0 for the other (paper App. D: start 800, K = 32).
    The result depends on the order of the votes; ``elo_interval`` shows how much."""
    seq = _as_matches(matches)
    ratings = {p: float(start) for p in players}
    hist = []
    for w, l in seq:
        ratings.setdefault(w, float(start))
        ratings.setdefault(l, float(start))
        e_w = expected_score(ratings[w], ratings[l])
        delta = k * (1.0 - e_w)  # winner gains K (1 - E_w); loser loses K (0 - E_l) = same
        ratings[w] += delta
        ratings[l] -= delta
        hist.append({"winner": w, "loser": l, "expected_winner": e_w,
                     "rating_winner": ratings[w], "rating_loser": ratings[l]})
    return EloResult(ratings=ratings, history=pd.DataFrame(hist))


def elo_interval(matches: pd.DataFrame | Iterable[tuple[str, str]], rng: np.random.Generator,
                 *, n_resamples: int = 1_000, level: float = 0.95, start: float = 800.0,
                 k: float = 32.0) -> pd.DataFrame:
    """Bootstrap interval of the final Elo rating: resample the votes with replacement (which
    also draws a random order) and rerun ``elo_ratings``. Returns ``player, elo, low, high``
    (``elo`` is the rating for the votes in their recorded order)."""
    seq = _as_matches(matches)
    players = sorted({p for m in seq for p in m})
    point = elo_ratings(seq, start=start, k=k, players=players).ratings
    finals = np.empty((n_resamples, len(players)))
    for b in range(n_resamples):
        idx = rng.integers(0, len(seq), size=len(seq))
        r = elo_ratings([seq[i] for i in idx], start=start, k=k, players=players).ratings
        finals[b] = [r[p] for p in players]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(finals, [alpha, 1 - alpha], axis=0)
    return pd.DataFrame({"player": players, "elo": [point[p] for p in players],
                         "low": lo, "high": hi})


def preference_test(wins: int, losses: int, *, alternative: str = "two-sided",
                    level: float = 0.95) -> dict[str, float]:
    """Exact binomial test of a 2AFC preference rate against 50% and its Clopper-Pearson
    interval (``scipy.stats.binomtest``). The paper's "p = 3.5e-20" for 174 vs 43 is the
    one-sided test (``alternative="greater"``); two-sided gives 7.0e-20."""
    res = sps.binomtest(int(wins), int(wins + losses), 0.5, alternative=alternative)
    ci = res.proportion_ci(confidence_level=level, method="exact")
    return {"wins": int(wins), "losses": int(losses), "n": int(wins + losses),
            "rate": wins / (wins + losses), "p_value": float(res.pvalue),
            "ci_low": float(ci.low), "ci_high": float(ci.high), "alternative": alternative}


def fleiss_kappa(counts: np.ndarray | pd.DataFrame) -> float:
    """Fleiss' kappa from an items x categories matrix of rating counts.

    Items may have different numbers of raters (in the paper's study raters chose which pairs
    to rate); each item's agreement ``P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1))`` uses its
    own ``n_i``, chance agreement uses the pooled category shares ``p_j``, and items rated
    fewer than twice carry no agreement information and are dropped. With a constant number of
    raters this is exactly Fleiss (1971). ``kappa = (mean P_i - sum p_j^2) / (1 - sum p_j^2)``.
    Caveat: with one option strongly preferred (80/20), chance agreement is high and kappa is
    low even when raters mostly agree (the "kappa paradox").
    """
    n = np.asarray(counts, dtype=float)
    n_i = n.sum(axis=1)
    n = n[n_i >= 2]
    n_i = n_i[n_i >= 2]
    if n.shape[0] == 0:
        return math.nan
    p_i = (np.sum(n * (n - 1), axis=1)) / (n_i * (n_i - 1))
    p_j = n.sum(axis=0) / n.sum()
    p_e = float(np.sum(p_j ** 2))
    if p_e == 1.0:
        return math.nan  # every rating in one category: agreement beyond chance undefined
    return (float(np.mean(p_i)) - p_e) / (1.0 - p_e)


def preference_study(votes: pd.DataFrame, rng: np.random.Generator, *, item: str = "item",
                     start: float = 800.0, k: float = 32.0, alternative: str = "two-sided",
                     level: float = 0.95, n_resamples: int = 1_000) -> dict[str, Any]:
    """Everything the paper reports about a 2AFC study, from one vote per row (columns
    ``winner``, ``loser`` [, ``rater``, ``item``], in the order the votes were cast):
    per-model wins, the binomial test with its interval (two models only), Elo (start 800,
    K = 32) with a bootstrap interval, and Fleiss' kappa over items (the category of a vote is
    the model it preferred; needs an ``item`` column and items rated at least twice)."""
    models = sorted(set(votes["winner"].astype(str)) | set(votes["loser"].astype(str)))
    wins = votes["winner"].astype(str).value_counts().reindex(models, fill_value=0)
    out: dict[str, Any] = {"models": models, "n_votes": int(len(votes)),
                           "wins": {m: int(wins[m]) for m in models}}
    if len(models) == 2:
        a, b = wins.sort_values(ascending=False).index
        out["binomial"] = {"model": a, **preference_test(int(wins[a]), int(wins[b]),
                                                         alternative=alternative, level=level)}
    out["elo"] = elo_interval(votes, rng, n_resamples=n_resamples, level=level, start=start,
                              k=k)
    if item in votes:
        counts = pd.crosstab(votes[item], votes["winner"].astype(str))
        out["fleiss_kappa"] = fleiss_kappa(counts.to_numpy())
        out["n_items_rated_twice"] = int((counts.sum(axis=1) >= 2).sum())
    return out


# -- policy evaluation: world model vs real world --------------------------------------------------
def mmrv(wm: Sequence[float], real: Sequence[float]) -> float:
    """Mean Maximum Rank Violation (SIMPLER, Li et al. 2024; used by Ctrl-World).

    For policies i, j with world-model scores ``S`` and real scores ``R``:
    ``RankViolation(i, j) = |R_i - R_j| * 1[(S_i > S_j) != (R_i > R_j)]`` and
    ``MMRV = (1/N) sum_i max_j RankViolation(i, j)``: each policy contributes the largest real
    performance gap over which the world model orders it wrongly against another policy, and
    these are averaged. 0 = the world model ranks the policies exactly as the real world does;
    lower is better; in the units of the progress/success rate. Comparisons are strict, as in
    SIMPLER's code, so a tie in one ranking but not in the other counts as a violation (for
    the policy that is ahead in the other ranking).
    """
    s, r = np.asarray(wm, dtype=float), np.asarray(real, dtype=float)
    if s.shape != r.shape or s.ndim != 1:
        raise ValueError("wm and real must be 1-D and of equal length")
    if s.size == 0:
        return math.nan
    violated = (s[:, None] > s[None, :]) != (r[:, None] > r[None, :])      # (N, N)
    gap = np.abs(r[:, None] - r[None, :])
    return float(np.mean(np.max(np.where(violated, gap, 0.0), axis=1)))


def policy_agreement(wm: Sequence[float], real: Sequence[float]) -> dict[str, float]:
    """Pearson r (``scipy.stats.pearsonr``) and MMRV between per-policy task progress in the
    world model and in the real world. r is NaN for fewer than two policies or constant
    scores."""
    s, r = np.asarray(wm, dtype=float), np.asarray(real, dtype=float)
    out = {"n_policies": int(s.size), "pearson_r": math.nan, "pearson_p": math.nan,
           "mmrv": mmrv(s, r)}
    if s.size >= 2 and np.ptp(s) > 0 and np.ptp(r) > 0:
        res = sps.pearsonr(s, r)
        out["pearson_r"], out["pearson_p"] = float(res.statistic), float(res.pvalue)
    return out


def policy_agreement_table(data: pd.DataFrame | str | Path, *,
                           real: str = "real") -> pd.DataFrame:
    """Agreement of each world model with the real world, from a CSV (or DataFrame) of task
    progress. Accepted layouts (several rows per policy, e.g. one per rollout, are averaged):

    * long: ``policy, source, progress`` [, ``task``]; ``source`` is ``real`` or a world-model
      name;
    * wide: ``policy`` [, ``task``], ``real``, then one column per world model.

    Returns one row per (world model, task) plus, with several tasks, a pooled row
    ``task="all"`` over every (task, policy) pair: ``source, task, n_policies, pearson_r,
    pearson_p, mmrv``, and the mean progress in the world model and in the real world.
    """
    df = pd.read_csv(data) if isinstance(data, (str, Path)) else data.copy()
    if "task" not in df:
        df["task"] = "all"
    if "source" not in df:
        value_cols = [c for c in df.columns if c not in ("policy", "task")]
        df = df.melt(id_vars=["policy", "task"], value_vars=value_cols, var_name="source",
                     value_name="progress")
    mean = df.groupby(["task", "policy", "source"])["progress"].mean().unstack("source")
    if real not in mean:
        raise KeyError(f"no {real!r} scores in the policy-evaluation table")
    tasks = list(mean.index.get_level_values("task").unique())
    rows = []
    for src in [c for c in mean.columns if c != real]:
        scopes = [(t, mean.xs(t, level="task")) for t in tasks]
        if len(tasks) > 1:
            scopes.append(("all", mean))
        for task, sub in scopes:
            sub = sub[[src, real]].dropna()
            rows.append({"source": src, "task": task, **policy_agreement(sub[src], sub[real]),
                         "mean_wm": sub[src].mean(), "mean_real": sub[real].mean()})
    return pd.DataFrame(rows)
