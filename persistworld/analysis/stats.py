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

Seeds x episodes (the claim "A beats B" across training seeds and evaluation episodes)
--------------------------------------------------------------------------------------
An "episode" here is an evaluation sample (``episode``, ``start``): the unit of the per-sample
tables. The seed is the unit of replication of the training, so it is kept, not averaged away:

* Pairing (``pair_runs``): seed s of the model is compared with seed s of the baseline (same
  seed = same initialisation and data order); a side with a single run (a trivial baseline, or
  one seed) is compared with every run of the other side. Runs without a partner are left out
  and counted.
* Per seed (``seed_test``): the per-episode deltas of that seed, their mean, win rate, a paired
  t-test and (two-sided, as a robustness check) a Wilcoxon signed-rank p. The t-test is chosen
  over Wilcoxon because it tests the same quantity the interval is about (the mean delta), and
  its p-values are continuous: an exact Wilcoxon p is 1 for a seed whose deltas are all
  negative, which maps to z = -inf and vetoes any combination.
* Direction: tests run on the deltas oriented so that positive = the model is better
  (``delta`` for SSIM/PSNR, ``-delta`` for LPIPS). ``alternative="better"`` (default, the
  one-sided claim "A beats B"), ``"worse"`` or ``"two-sided"``.
* Combination over seeds (``stouffer``): Stouffer's method on signed z, unweighted (each seed is
  one replicate of equal standing): ``z_s = Phi^-1(1 - p_s)`` with ``p_s`` the seed's one-sided
  p for "better", ``Z = sum_s z_s / sqrt(S)``, combined one-sided p = ``1 - Phi(Z)`` (``Phi(Z)``
  for "worse", ``2 min`` of the two for two-sided). Chosen over Fisher because signed z let
  seeds that disagree cancel (Fisher's ``-2 sum log p`` is carried by the single smallest p: one
  seed at p = 1e-6 and two going the other way is "significant" for Fisher, not for Stouffer),
  and because with one seed it is exactly that seed's test. Seeds whose test is undefined
  (fewer than two deltas, or all deltas zero) are left out; a seed whose deltas are all equal
  and non-zero has z = +-inf.
* Interval (``hierarchical_bootstrap``): resample seeds with replacement, then, within each
  drawn seed, its episodes with replacement; statistic = the mean over the drawn seeds of their
  mean delta (seeds weigh equally; with equal episode counts this is the pooled mean);
  percentile interval. With one seed there is nothing to resample at the top level: it is the
  episode bootstrap, and ``SeedComparison.note`` says so.
* Caveat, stated in the report too: all seeds are scored on the *same* episodes (a crossed, not
  a nested design). Stouffer assumes independent per-seed tests and the hierarchical bootstrap
  resamples each seed's episodes independently, so a component of the delta shared by all
  seeds on an episode (an episode that is easy for the model whatever its seed) is counted as
  if each seed had fresh episodes: both are somewhat optimistic when that component is large.
* Multiple metrics (``holm``): Holm-Bonferroni step-down over the metrics of one comparison
  (the 2 camera groups x 3 metrics of a model vs its baseline): sort the m p-values, multiply
  the i-th smallest by ``m - i + 1``, make the sequence non-decreasing (running maximum) and
  clip at 1. It controls the family-wise error rate under any dependence between the metrics.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

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


# -- seeds x episodes: per-seed tests, Stouffer, hierarchical bootstrap, Holm ----------------------
ALTERNATIVES = ("better", "worse", "two-sided")


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    With the m non-NaN p-values sorted ascending, ``p_(1) <= ... <= p_(m)``:
    ``adj_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``. NaNs stay NaN and do not count in m.
    Reject at level alpha where ``adj <= alpha``: this controls the family-wise error rate."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    if np.any((q < 0) | (q > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    adj = np.empty(m)
    adj[order] = adj_sorted
    out[ok] = adj
    return out


def _directional_p(p_upper: float, p_lower: float, alternative: str) -> float:
    """The p-value in ``alternative`` from the two one-sided ones (upper = "better")."""
    if alternative == "better":
        return p_upper
    if alternative == "worse":
        return p_lower
    if alternative == "two-sided":
        return min(1.0, 2.0 * min(p_upper, p_lower))
    raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def stouffer(z: Sequence[float] | np.ndarray, *,
             alternative: str = "better") -> tuple[float, float]:
    """Stouffer's combination of signed per-seed z (positive = the model is better):
    ``Z = sum z_s / sqrt(S)`` (NaN z left out) and its p-value in ``alternative``
    (``"better"``: ``1 - Phi(Z)``, ``"worse"``: ``Phi(Z)``, two-sided: twice the smaller).
    Returns ``(Z, p)``; both NaN when no z is usable. With one z, ``Z = z``."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    z = np.asarray(z, dtype=float).ravel()
    z = z[~np.isnan(z)]
    if z.size == 0:
        return math.nan, math.nan
    with np.errstate(invalid="ignore"):
        big_z = float(np.sum(z) / math.sqrt(z.size))
    if math.isnan(big_z):          # +inf and -inf together: no direction is certain
        return math.nan, math.nan
    return big_z, _directional_p(float(sps.norm.sf(big_z)), float(sps.norm.cdf(big_z)),
                                 alternative)


def seed_test(delta: Sequence[float] | np.ndarray, *, higher_is_better: bool,
              alternative: str = "better") -> dict[str, Any]:
    """One seed's paired test on its per-episode deltas ``model - baseline`` (NaNs dropped).

    ``n, mean_delta, wins, losses, ties, win_rate``; ``t`` and ``df`` of the paired t-test on
    the deltas oriented so that positive = the model is better (``delta`` or ``-delta``, so
    ``t`` is positive when the model is better, whatever the metric's direction); ``p`` in
    ``alternative`` (equal to ``scipy.stats.ttest_rel(model, baseline, alternative=...)`` with
    ``"greater"`` for SSIM/PSNR "better", ``"less"`` for LPIPS "better"); ``z = Phi^-1(1 -
    p_better)``, computed from the smaller tail so that it keeps its precision for either sign;
    ``wilcoxon_p``: two-sided ``scipy.stats.wilcoxon`` on the deltas. Fewer than two deltas,
    or all deltas zero: ``t, p, z`` NaN."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    d = np.asarray(delta, dtype=float).ravel()
    d = d[~np.isnan(d)]
    better = d if higher_is_better else -d
    n = int(d.size)
    wins, losses = int(np.sum(better > 0)), int(np.sum(better < 0))
    out: dict[str, Any] = {
        "n": n, "mean_delta": float(np.mean(d)) if n else math.nan, "wins": wins,
        "losses": losses, "ties": n - wins - losses,
        "win_rate": wins / n if n else math.nan, "t": math.nan, "df": max(n - 1, 0),
        "p": math.nan, "z": math.nan, "wilcoxon_p": math.nan}
    if n >= 2:
        mean, sd = float(np.mean(better)), float(np.std(better, ddof=1))
        if sd > 0:
            t = mean / (sd / math.sqrt(n))
            p_up, p_low = float(sps.t.sf(t, n - 1)), float(sps.t.cdf(t, n - 1))
        elif mean != 0:            # every delta equal and non-zero: the direction is certain
            t = math.copysign(math.inf, mean)
            p_up, p_low = (0.0, 1.0) if mean > 0 else (1.0, 0.0)
        else:
            t = p_up = p_low = math.nan
        if not math.isnan(t):
            z = float(sps.norm.isf(p_up)) if t >= 0 else float(sps.norm.ppf(p_low))
            out.update(t=t, p=_directional_p(p_up, p_low, alternative), z=z)
    if wins + losses:
        try:
            out["wilcoxon_p"] = float(sps.wilcoxon(d).pvalue)
        except ValueError:
            pass
    return out


def hierarchical_resamples(deltas: Sequence[Sequence[float] | np.ndarray],
                           rng: np.random.Generator, *, n_resamples: int = 10_000,
                           batch: int = 1_000) -> np.ndarray:
    """The hierarchical bootstrap distribution of the mean delta, ``(n_resamples,)``.

    ``deltas``: one array of per-episode deltas per seed (NaNs dropped; seeds without any left
    out; lengths may differ). Each resample draws S seeds with replacement out of the S, then,
    for each drawn seed with n_s episodes, n_s of its episodes with replacement; its statistic
    is the mean over the drawn seeds of their resampled mean. With one seed only the episodes
    are resampled (the episode bootstrap)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError("pass an explicit numpy.random.Generator (np.random.default_rng(seed))")
    groups = [g[~np.isnan(g)] for g in (np.asarray(d, dtype=float).ravel() for d in deltas)]
    groups = [g for g in groups if g.size]
    if not groups:
        return np.full(n_resamples, np.nan)
    n = np.array([g.size for g in groups])
    padded = np.zeros((len(groups), int(n.max())))
    for i, g in enumerate(groups):
        padded[i, :g.size] = g
    out = np.empty(n_resamples)
    cols = np.arange(padded.shape[1])
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        seeds = (rng.integers(0, len(groups), size=(b, len(groups))) if len(groups) > 1
                 else np.zeros((b, 1), dtype=int))
        n_sel = n[seeds]                                                   # (b, S)
        idx = rng.integers(0, n_sel[..., None], size=(*seeds.shape, padded.shape[1]))
        used = cols < n_sel[..., None]                                     # first n_s draws
        vals = np.where(used, padded[seeds[..., None], idx], 0.0)
        out[start:start + b] = np.mean(vals.sum(axis=-1) / n_sel, axis=-1)
    return out


def hierarchical_bootstrap(deltas: Sequence[Sequence[float] | np.ndarray],
                           rng: np.random.Generator, *, n_resamples: int = 10_000,
                           level: float = 0.95) -> Interval:
    """Percentile interval of the mean delta from ``hierarchical_resamples`` (seeds, then
    episodes within each drawn seed). ``estimate`` is the mean over seeds of their mean delta,
    ``n`` the number of deltas. Fewer than two deltas in all: NaN bounds."""
    groups = [g[~np.isnan(g)] for g in (np.asarray(d, dtype=float).ravel() for d in deltas)]
    groups = [g for g in groups if g.size]
    total = int(sum(g.size for g in groups))
    if not groups:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    est = float(np.mean([g.mean() for g in groups]))
    if total < 2:
        return Interval(est, math.nan, math.nan, total, level)
    dist = hierarchical_resamples(groups, rng, n_resamples=n_resamples)
    alpha = (1 - level) / 2
    low, high = np.quantile(dist, [alpha, 1 - alpha])
    return Interval(est, float(low), float(high), total, level)


@dataclass(frozen=True)
class SeedComparison:
    """``model`` vs ``baseline`` with the seed kept as the unit of replication: the headline
    (hierarchical-bootstrap interval of the mean delta, Stouffer-combined p) and the per-seed
    rows it is made of."""
    n_seeds: int               # seeds with at least one paired delta
    n_episodes: int            # paired deltas over all seeds
    higher_is_better: bool
    alternative: str
    mean_delta: float          # mean over seeds of the seed's mean (model - baseline)
    ci_low: float              # hierarchical bootstrap (seeds, then episodes) of that mean
    ci_high: float
    win_rate: float            # mean over seeds of the seed's win rate
    combined_z: float          # Stouffer Z of the seeds' signed z (positive = model better)
    combined_p: float          # its p-value in ``alternative``
    n_seeds_tested: int        # seeds whose t-test is defined (those in Z)
    note: str = ""
    per_seed: pd.DataFrame = field(repr=False, compare=False,
                                   default_factory=lambda: pd.DataFrame())

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "per_seed"}


def seed_comparison(deltas: Mapping[Any, Sequence[float] | np.ndarray | pd.Series], *,
                    higher_is_better: bool, rng: np.random.Generator,
                    alternative: str = "better", n_resamples: int = 10_000,
                    level: float = 0.95) -> SeedComparison:
    """Per-seed tests (``seed_test``), their Stouffer combination and the hierarchical
    bootstrap interval, from ``{seed: per-episode deltas (model - baseline)}``. With a single
    seed the combined test is that seed's t-test and the interval the episode bootstrap; the
    ``note`` says so (between-seed variation is then not measured)."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    rows = [{"seed": seed, **seed_test(np.asarray(d, dtype=float), alternative=alternative,
                                       higher_is_better=higher_is_better)}
            for seed, d in deltas.items()]
    per_seed = pd.DataFrame(rows, columns=["seed", "n", "mean_delta", "wins", "losses", "ties",
                                           "win_rate", "t", "df", "p", "z", "wilcoxon_p"])
    per_seed = per_seed[per_seed["n"] > 0].reset_index(drop=True)
    ci = hierarchical_bootstrap([np.asarray(deltas[s], dtype=float) for s in per_seed["seed"]],
                                rng, n_resamples=n_resamples, level=level)
    big_z, p = stouffer(per_seed["z"].to_numpy(dtype=float), alternative=alternative)
    n_seeds, tested = len(per_seed), int(per_seed["z"].notna().sum())
    notes = []
    if n_seeds == 1:
        notes.append("1 seed: hierarchical bootstrap = episode bootstrap, combined test = that "
                     "seed's paired t-test (between-seed variation not measured)")
    elif n_seeds == 0:
        notes.append("no paired seeds")
    if tested < n_seeds:
        notes.append(f"{n_seeds - tested} seed(s) without a defined t-test left out of Z")
    return SeedComparison(
        n_seeds=n_seeds, n_episodes=int(per_seed["n"].sum()),
        higher_is_better=higher_is_better, alternative=alternative,
        mean_delta=ci.estimate, ci_low=ci.low, ci_high=ci.high,
        win_rate=float(per_seed["win_rate"].mean()) if n_seeds else math.nan,
        combined_z=big_z, combined_p=p, n_seeds_tested=tested, note="; ".join(notes),
        per_seed=per_seed)


def seed_label(value: Any) -> str:
    """A seed as text: ``2.0`` (a seed column made float by missing values) -> ``"2"``."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def pair_runs(model_runs: Sequence[str], baseline_runs: Sequence[str],
              seed_of: Mapping[str, Any] | None = None
              ) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Pair the runs of a model with those of its baseline by seed: ``(seed, model run,
    baseline run)`` triples and the runs left without a partner.

    A side with a single run is paired with every run of the other side (a trivial baseline is
    one evaluation; the seed is then the other side's; one run against one run takes the seed
    of whichever has one). Otherwise runs are matched on equal seeds (``seed_of[run]``, via
    ``seed_label``; a run without a seed is its own label)."""
    def seed(run: str) -> str | None:
        v = (seed_of or {}).get(run)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else seed_label(v)

    def label(run: str, other: str | None = None) -> str:
        """The run's seed, else (one run against one run) the other run's, else the run."""
        return seed(run) or (other is not None and seed(other)) or str(run)

    if len(baseline_runs) == 1:
        b = baseline_runs[0]
        return [(label(m, b if len(model_runs) == 1 else None), m, b) for m in model_runs], []
    if len(model_runs) == 1:
        return [(label(b), model_runs[0], b) for b in baseline_runs], []
    by_seed_m: dict[str, list[str]] = {}
    by_seed_b: dict[str, list[str]] = {}
    for r in model_runs:
        by_seed_m.setdefault(label(r), []).append(r)
    for r in baseline_runs:
        by_seed_b.setdefault(label(r), []).append(r)
    pairs, unpaired = [], []
    for s, ms in by_seed_m.items():
        bs = by_seed_b.get(s, [])
        if len(ms) == 1 and len(bs) == 1:
            pairs.append((s, ms[0], bs[0]))
        else:                        # no partner, or several runs with one seed: ambiguous
            unpaired += ms
    unpaired += [b for s, bs in by_seed_b.items() if s not in {p[0] for p in pairs} for b in bs]
    return pairs, unpaired


def _seed_sort_key(labels: pd.Series) -> pd.Series:
    num = pd.to_numeric(labels, errors="coerce")
    return num if num.notna().all() else labels.astype(str)


SEED_TABLE_COLUMNS = ["model", "baseline", "group", "mask", "metric", "n_seeds", "n_episodes",
                      "episodes_per_seed", "mean_delta", "hier_ci_low", "hier_ci_high",
                      "win_rate", "combined_z", "combined_p", "holm_p", "alternative",
                      "n_seeds_tested", "unpaired_runs", "note"]


def seed_paired_table(frames: pd.DataFrame, model: str, baseline: str, rng: np.random.Generator,
                      *, seeds: Mapping[str, Any] | None = None, by: str = "condition",
                      groups: Sequence[str] = GROUPS, metrics: Sequence[str] = METRICS,
                      mask: str | None = None, alternative: str = "better",
                      n_resamples: int = 10_000, level: float = 0.95
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``model`` vs ``baseline`` (values of column ``by``) on every group x metric, with the
    seeds kept: the runs of each are paired by seed (``pair_runs``, ``seeds`` maps run ->
    seed), each pair gives per-episode deltas of the whole-rollout values, and
    ``seed_comparison`` makes the headline. ``holm_p`` is Holm over the ``combined_p`` of this
    table's rows (the family: this comparison's group x metric cells).

    Returns (one row per group x metric, ``SEED_TABLE_COLUMNS``; the long per-seed table
    ``model, baseline, group, mask, metric, seed, model_run, baseline_run, n, mean_delta, wins,
    losses, ties, win_rate, t, df, p, z, wilcoxon_p``)."""
    sub = frames[frames[by].isin([model, baseline])]
    if by == "run" or "run" not in sub:
        m_runs, b_runs = [model], [baseline]
        run_col = by
    else:
        runs_of = sub.drop_duplicates("run").groupby(by, sort=False)["run"].agg(list)
        m_runs, b_runs = runs_of.get(model, []), runs_of.get(baseline, [])
        run_col = "run"
    pairs, unpaired = pair_runs(m_runs, b_runs, seeds) if m_runs and b_runs else ([], [])
    rows, seed_rows = [], []
    for group in groups:
        for metric in metrics:
            if not pairs:
                continue
            scores = sample_scores(sub, group=group, metric=metric, mask=mask, by=run_col)
            if scores.empty:
                continue
            deltas = {s: (scores[m] - scores[b]).dropna().to_numpy()
                      for s, m, b in pairs if m in scores and b in scores}
            if not deltas:
                continue
            res = seed_comparison(deltas, higher_is_better=HIGHER_IS_BETTER[metric], rng=rng,
                                  alternative=alternative, n_resamples=n_resamples,
                                  level=level)
            run_of = {s: (m, b) for s, m, b in pairs}
            per = res.per_seed.sort_values("seed", key=_seed_sort_key, kind="stable")
            n_per = per["n"]
            head = {"model": model, "baseline": baseline, "group": group, "mask": mask or "",
                    "metric": metric}
            rows.append({**head, "n_seeds": res.n_seeds, "n_episodes": res.n_episodes,
                         "episodes_per_seed": (str(n_per.min()) if n_per.min() == n_per.max()
                                               else f"{n_per.min()}-{n_per.max()}")
                         if len(n_per) else "",
                         "mean_delta": res.mean_delta, "hier_ci_low": res.ci_low,
                         "hier_ci_high": res.ci_high, "win_rate": res.win_rate,
                         "combined_z": res.combined_z, "combined_p": res.combined_p,
                         "alternative": alternative, "n_seeds_tested": res.n_seeds_tested,
                         "unpaired_runs": len(unpaired), "note": res.note})
            for rec in per.to_dict("records"):
                m, b = run_of[rec["seed"]]
                seed_rows.append({**head, "seed": rec["seed"], "model_run": m,
                                  "baseline_run": b, **{k: v for k, v in rec.items()
                                                        if k != "seed"}})
    table = pd.DataFrame(rows, columns=[c for c in SEED_TABLE_COLUMNS if c != "holm_p"])
    table.insert(SEED_TABLE_COLUMNS.index("holm_p"), "holm_p",
                 holm(table["combined_p"].to_numpy(dtype=float)))
    seed_cols = ["model", "baseline", "group", "mask", "metric", "seed", "model_run",
                 "baseline_run", "n", "mean_delta", "wins", "losses", "ties", "win_rate", "t",
                 "df", "p", "z", "wilcoxon_p"]
    return table, pd.DataFrame(seed_rows, columns=seed_cols)


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


def proportion_interval(successes: int, n: int, *, level: float = 0.95,
                        alternative: str = "two-sided") -> dict[str, float]:
    """Wilson score and Clopper-Pearson (exact) intervals of a proportion
    (``scipy.stats.binomtest(...).proportion_ci``); ``alternative="greater"`` gives the
    one-sided lower bounds (upper end 1), as the paper's "95% CI [72%, 100%]" is written."""
    if n == 0:
        return {"wilson_low": math.nan, "wilson_high": math.nan, "cp_low": math.nan,
                "cp_high": math.nan}
    res = sps.binomtest(int(successes), int(n), 0.5, alternative=alternative)
    w = res.proportion_ci(confidence_level=level, method="wilson")
    cp = res.proportion_ci(confidence_level=level, method="exact")
    return {"wilson_low": float(w.low), "wilson_high": float(w.high), "cp_low": float(cp.low),
            "cp_high": float(cp.high)}


def elo_over_orders(matches: pd.DataFrame | Iterable[tuple[str, str]], rng: np.random.Generator,
                    *, n_orders: int = 1_000, level: float = 0.95, start: float = 800.0,
                    k: float = 32.0) -> pd.DataFrame:
    """Elo with the order effect removed: ``elo_ratings`` (start 800, K = 32, paper App. D) over
    ``n_orders`` seeded random orders of the same votes; ``elo`` is the mean final rating and
    ``low``/``high`` the spread over orders (percentiles at ``level``). This measures how much
    the casting order moves the rating, not sampling uncertainty (``bradley_terry`` with its
    bootstrap does that). Returns ``player, elo, low, high, elo_recorded_order``."""
    seq = _as_matches(matches)
    players = sorted({p for m in seq for p in m})
    recorded = elo_ratings(seq, start=start, k=k, players=players).ratings
    finals = np.empty((n_orders, len(players)))
    for b in range(n_orders):
        order = rng.permutation(len(seq))
        r = elo_ratings([seq[i] for i in order], start=start, k=k, players=players).ratings
        finals[b] = [r[p] for p in players]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(finals, [alpha, 1 - alpha], axis=0)
    return pd.DataFrame({"player": players, "elo": finals.mean(0), "low": lo, "high": hi,
                         "elo_recorded_order": [recorded[p] for p in players]})


def _bt_strengths(players: list[str], seq: list[tuple[str, str]], iters: int = 2_000,
                  tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry maximum likelihood by Hunter's (2004) MM iteration:
    p_i <- W_i / sum_j n_ij / (p_i + p_j), normalised to geometric mean 1. A player that never
    wins (or never loses) has no finite MLE; a 0.5-win pseudo-count against every opponent
    (the usual regularisation) keeps it finite and is applied to all pairs alike."""
    idx = {p: i for i, p in enumerate(players)}
    m = len(players)
    wins = np.zeros((m, m))
    for w, l in seq:
        wins[idx[w], idx[l]] += 1
    met = (wins + wins.T) > 0
    wins = wins + 0.5 * met                      # pseudo-counts on compared pairs only
    n = wins + wins.T
    w_tot = wins.sum(1)
    p = np.ones(m)
    for _ in range(iters):
        denom = (n / (p[:, None] + p[None, :])).sum(1)
        new = np.where(denom > 0, w_tot / np.where(denom > 0, denom, 1), p)
        new = new / np.exp(np.log(new).mean())
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    return p


def bradley_terry(matches: pd.DataFrame | Iterable[tuple[str, str]], rng: np.random.Generator,
                  *, n_resamples: int = 1_000, level: float = 0.95, scale: float = 400.0,
                  anchor: float = 800.0) -> pd.DataFrame:
    """Bradley-Terry ratings on the Elo scale (``anchor + scale log10 p_i``, mean ``anchor``; so
    a 200-point gap = 76% expected wins, as for Elo) with percentile bootstrap intervals over
    votes resampled with replacement (the arena practice). Order-free, unlike sequential Elo.
    Returns ``player, bt, low, high``."""
    seq = _as_matches(matches)
    players = sorted({p for m in seq for p in m})

    def rating(s: list[tuple[str, str]]) -> np.ndarray:
        return anchor + scale * np.log10(_bt_strengths(players, s))

    point = rating(seq)
    boots = np.empty((n_resamples, len(players)))
    for b in range(n_resamples):
        idx = rng.integers(0, len(seq), size=len(seq))
        boots[b] = rating([seq[i] for i in idx])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha], axis=0)
    return pd.DataFrame({"player": players, "bt": point, "low": lo, "high": hi})


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e) with p_e
    from each rater's own marginals; NaN when undefined (no items, or p_e = 1)."""
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    if len(a) == 0:
        return math.nan
    cats = sorted(set(a) | set(b), key=str)
    p_o = float(np.mean(a == b))
    p_e = float(sum(np.mean(a == c) * np.mean(b == c) for c in cats))
    return math.nan if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


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
