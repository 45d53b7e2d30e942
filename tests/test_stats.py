"""Statistics with the seed kept as the unit (persistworld.analysis.stats): per-seed paired
t-tests, their Stouffer combination, the hierarchical bootstrap (seeds, then episodes), Holm.

Expected numbers are computed by hand where the arithmetic is short (t with 2 degrees of
freedom has a closed-form CDF, ``F(t) = 1/2 + t / (2 sqrt(2 + t^2))``; the normal quantiles
come from the standard library), and checked against scipy where scipy has the same test.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from persistworld.analysis import stats

PHI = NormalDist()


def t2_sf(t: float) -> float:
    """P(T > t) for Student's t with 2 degrees of freedom, by its closed form."""
    return 0.5 - t / (2 * math.sqrt(2 + t * t))


# -- Holm ------------------------------------------------------------------------------------------
def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06:
    # the running maximum keeps the adjusted p in the order of the raw p)
    adj = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # clipping at 1: 2 x 0.5 = 1.0, 1 x 0.6 = 0.6 -> running max 1.0
    assert stats.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert stats.holm([0.7, 0.9, 0.8]) == pytest.approx([1.0, 1.0, 1.0])
    # NaN stays NaN and does not count in m (m = 2 here)
    out = stats.holm([0.01, np.nan, 0.02])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert stats.holm([0.2]) == pytest.approx([0.2])   # a family of one: unchanged
    assert stats.holm([]).shape == (0,)
    # ties: 0.01, 0.01, 0.04 -> 0.03, 0.03 (max(0.03, 0.02)), 0.04 -> 0.04
    assert stats.holm([0.01, 0.04, 0.01]) == pytest.approx([0.03, 0.04, 0.03])
    with pytest.raises(ValueError):
        stats.holm([0.5, 1.5])


def test_holm_properties_on_random_p():
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 9))
        adj = stats.holm(p)
        m = p.size
        assert np.all(adj >= p - 1e-15) and np.all(adj <= np.minimum(1, m * p) + 1e-15)
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(adj[order]) >= -1e-15)          # monotone in the raw p
        assert adj[order[0]] == pytest.approx(min(1.0, m * p.min()))   # = Bonferroni there


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    for size in (1, 2, 6, 13):
        p = rng.uniform(0, 0.3, size=size)
        ref = multitest.multipletests(p, method="holm")[1]
        assert stats.holm(p) == pytest.approx(ref)


# -- per-seed t-test and Stouffer ------------------------------------------------------------------
SEED0 = np.array([1.0, 2.0, 3.0])    # mean 2, sd 1: t = 2 / (1 / sqrt 3) = 2 sqrt 3
SEED1 = np.array([1.0, -1.0, 3.0])   # mean 1, sd 2: t = 1 / (2 / sqrt 3) = sqrt(3) / 2


def test_seed_test_by_hand_and_against_scipy():
    base = np.array([0.5, 0.6, 0.7])
    r = stats.seed_test(SEED0, higher_is_better=True)
    assert r["t"] == pytest.approx(2 * math.sqrt(3))
    assert r["p"] == pytest.approx(t2_sf(2 * math.sqrt(3)))          # 0.03709
    assert r["p"] == pytest.approx(0.037090, abs=1e-6)
    assert r["p"] == pytest.approx(sps.ttest_rel(base + SEED0, base,
                                                 alternative="greater").pvalue)
    assert r["z"] == pytest.approx(PHI.inv_cdf(1 - r["p"]))
    assert (r["n"], r["wins"], r["losses"], r["ties"], r["win_rate"]) == (3, 3, 0, 0, 1.0)
    assert r["wilcoxon_p"] == pytest.approx(sps.wilcoxon(SEED0).pvalue)   # 2/8 exact
    r1 = stats.seed_test(SEED1, higher_is_better=True)
    assert r1["t"] == pytest.approx(math.sqrt(3) / 2)
    assert r1["p"] == pytest.approx(t2_sf(math.sqrt(3) / 2))          # 0.23888
    assert r1["win_rate"] == pytest.approx(2 / 3) and r1["mean_delta"] == pytest.approx(1.0)
    # LPIPS (lower is better): the deltas of a better model are negative; ttest_rel "less"
    lp = stats.seed_test(-SEED0, higher_is_better=False)
    assert (lp["t"], lp["p"], lp["z"]) == pytest.approx((r["t"], r["p"], r["z"]))
    assert lp["p"] == pytest.approx(sps.ttest_rel(base - SEED0, base, alternative="less").pvalue)
    assert lp["mean_delta"] == pytest.approx(-2.0) and lp["wins"] == 3
    # the other directions
    worse = stats.seed_test(SEED0, higher_is_better=True, alternative="worse")
    assert worse["p"] == pytest.approx(1 - r["p"])
    two = stats.seed_test(SEED0, higher_is_better=True, alternative="two-sided")
    assert two["p"] == pytest.approx(2 * r["p"])
    assert two["p"] == pytest.approx(sps.ttest_rel(base + SEED0, base).pvalue)
    # a seed going the wrong way has a negative z, kept precise far in the tail
    bad = stats.seed_test(-np.array([10.0, 11.0, 12.0, 13.0]), higher_is_better=True)
    assert bad["t"] < 0 and bad["z"] == pytest.approx(sps.norm.ppf(sps.t.cdf(bad["t"], 3)))
    # undefined: one delta, or all deltas zero
    assert math.isnan(stats.seed_test([0.3], higher_is_better=True)["p"])
    assert math.isnan(stats.seed_test([0.0, 0.0], higher_is_better=True)["z"])


def test_stouffer_combination_by_hand():
    p0, p1 = t2_sf(2 * math.sqrt(3)), t2_sf(math.sqrt(3) / 2)
    z0, z1 = PHI.inv_cdf(1 - p0), PHI.inv_cdf(1 - p1)     # 1.7855, 0.7099
    big_z = (z0 + z1) / math.sqrt(2)                      # 1.7645
    expected_p = 1 - PHI.cdf(big_z)                       # 0.0388
    assert expected_p == pytest.approx(0.03882, abs=2e-5)
    res = stats.seed_comparison({"0": SEED0, "1": SEED1}, higher_is_better=True,
                                rng=np.random.default_rng(0), n_resamples=500)
    assert res.combined_z == pytest.approx(big_z) and res.combined_p == pytest.approx(expected_p)
    ref = sps.combine_pvalues([p0, p1], method="stouffer")
    assert (res.combined_z, res.combined_p) == pytest.approx((ref.statistic, ref.pvalue))
    assert res.mean_delta == pytest.approx((2 + 1) / 2)   # mean of the seed means
    assert res.win_rate == pytest.approx((1 + 2 / 3) / 2)
    assert (res.n_seeds, res.n_episodes, res.n_seeds_tested, res.note) == (2, 6, 2, "")
    assert list(res.per_seed["seed"]) == ["0", "1"]
    assert res.per_seed["p"].tolist() == pytest.approx([p0, p1])
    assert "per_seed" not in res.as_dict() and res.as_dict()["combined_p"] == res.combined_p
    # LPIPS, the same evidence with the signs flipped: the same z and p
    lp = stats.seed_comparison({"0": -SEED0, "1": -SEED1}, higher_is_better=False,
                               rng=np.random.default_rng(0), n_resamples=500)
    assert (lp.combined_z, lp.combined_p) == pytest.approx((big_z, expected_p))
    assert lp.mean_delta == pytest.approx(-1.5)
    worse = stats.seed_comparison({"0": SEED0, "1": SEED1}, higher_is_better=True,
                                  rng=np.random.default_rng(0), alternative="worse",
                                  n_resamples=500)
    assert worse.combined_p == pytest.approx(PHI.cdf(big_z))
    two = stats.seed_comparison({"0": SEED0, "1": SEED1}, higher_is_better=True,
                                rng=np.random.default_rng(0), alternative="two-sided",
                                n_resamples=500)
    assert two.combined_p == pytest.approx(2 * expected_p)
    with pytest.raises(ValueError):
        stats.seed_comparison({"0": SEED0}, higher_is_better=True,
                              rng=np.random.default_rng(0), alternative="greater")


def test_stouffer_lets_disagreeing_seeds_cancel_where_fisher_does_not():
    """The reason for Stouffer on signed z: one seed at p = 1e-6 and two seeds going the
    other way do not make "A beats B" across seeds; Fisher would call it significant."""
    p = [1e-6, 0.9, 0.9]
    z = [PHI.inv_cdf(1 - q) for q in p]                    # 4.753, -1.282, -1.282
    big_z, p_comb = stats.stouffer(z)
    assert big_z == pytest.approx(sum(z) / math.sqrt(3))   # 1.264
    assert p_comb == pytest.approx(1 - PHI.cdf(sum(z) / math.sqrt(3))) and p_comb > 0.1
    assert sps.combine_pvalues(p, method="fisher").pvalue < 0.01
    # NaN z are left out; +inf and -inf together have no direction
    assert stats.stouffer([1.0, np.nan]) == pytest.approx((1.0, 1 - PHI.cdf(1.0)))
    assert all(math.isnan(v) for v in stats.stouffer([math.inf, -math.inf]))
    assert all(math.isnan(v) for v in stats.stouffer([]))


def test_one_seed_degrades_to_the_seeds_own_test_and_episode_bootstrap():
    d = np.random.default_rng(5).normal(0.3, 1.0, size=40)
    res = stats.seed_comparison({"7": d}, higher_is_better=True, rng=np.random.default_rng(1),
                                n_resamples=20_000)
    own = sps.ttest_1samp(d, 0.0, alternative="greater")
    assert res.combined_p == pytest.approx(own.pvalue) and res.n_seeds == 1
    assert res.combined_z == pytest.approx(PHI.inv_cdf(1 - own.pvalue))
    assert "1 seed" in res.note and "episode bootstrap" in res.note
    ref = sps.bootstrap((d,), np.mean, n_resamples=20_000, method="percentile",
                        rng=np.random.default_rng(2)).confidence_interval
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert res.ci_low == pytest.approx(ref.low, abs=0.1 * se)     # same interval, other draws
    assert res.ci_high == pytest.approx(ref.high, abs=0.1 * se)


# -- hierarchical bootstrap ------------------------------------------------------------------------
def test_hierarchical_bootstrap_resamples_seeds_exact_distribution():
    """Seeds of constant deltas 1 and 3: resampling within a seed changes nothing, so the
    statistic is the mean of two seeds drawn with replacement: 1 (p 1/4), 2 (1/2), 3 (1/4).
    An episode-only bootstrap would always give 2."""
    deltas = [[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]]
    dist = stats.hierarchical_resamples(deltas, np.random.default_rng(0), n_resamples=8000)
    values, counts = np.unique(dist, return_counts=True)
    assert values.tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert (counts / dist.size).tolist() == pytest.approx([0.25, 0.5, 0.25], abs=0.02)
    ci = stats.hierarchical_bootstrap(deltas, np.random.default_rng(0), n_resamples=4000)
    assert (ci.estimate, ci.low, ci.high, ci.n) == (2.0, 1.0, 3.0, 6)
    # a pooled bootstrap of the 6 deltas: 2.5% quantile of 1 + 2 Binom(6, 1/2) / 6 is 4/3
    pooled = stats.bootstrap_ci(np.ravel(deltas), np.random.default_rng(0), n_resamples=4000)
    assert pooled.low == pytest.approx(4 / 3) and pooled.high == pytest.approx(8 / 3)


def test_hierarchical_bootstrap_variance_with_unequal_seeds_by_hand():
    """Seed A = {0, 10} (2 episodes), seed B = {4, 4, 4, 4}. A drawn seed's resampled mean X
    is A's mean of 2 draws (mean 5, variance 25 / 2) or 4, each with probability 1/2:
    E X = 4.5, Var X = 12.5 / 2 + 0.25 = 6.5; the statistic is the mean of two such X:
    variance 3.25 (drawing 4 episodes from A, as many as B has, would give 1.69)."""
    dist = stats.hierarchical_resamples([[0.0, 10.0], [4.0] * 4], np.random.default_rng(11),
                                        n_resamples=40_000)
    assert dist.mean() == pytest.approx(4.5, abs=0.05)
    assert dist.var() == pytest.approx(3.25, rel=0.05)
    est = stats.hierarchical_bootstrap([[0.0, 10.0], [4.0] * 4, [np.nan]],
                                       np.random.default_rng(0), n_resamples=100)
    assert est.estimate == pytest.approx(4.5) and est.n == 6   # seeds weigh equally; NaN out


def test_hierarchical_bootstrap_is_reproducible_and_uses_the_generator():
    rng_data = np.random.default_rng(0)
    deltas = [rng_data.normal(m, 1.0, size=15) for m in (0.2, 0.5, 0.1)]
    a = stats.hierarchical_resamples(deltas, np.random.default_rng(42), n_resamples=2000)
    b = stats.hierarchical_resamples(deltas, np.random.default_rng(42), n_resamples=2000)
    c = stats.hierarchical_resamples(deltas, np.random.default_rng(43), n_resamples=2000)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ia = stats.hierarchical_bootstrap(deltas, np.random.default_rng(42), n_resamples=2000)
    assert ia == stats.hierarchical_bootstrap(deltas, np.random.default_rng(42),
                                              n_resamples=2000)
    assert ia != stats.hierarchical_bootstrap(deltas, np.random.default_rng(43),
                                              n_resamples=2000)
    # batching does not change the draws' distribution, only their grouping
    assert stats.hierarchical_resamples(deltas, np.random.default_rng(42), n_resamples=2000,
                                        batch=2000).shape == (2000,)
    with pytest.raises(TypeError):
        stats.hierarchical_resamples(deltas, 42)
    empty = stats.hierarchical_bootstrap([[], [np.nan]], np.random.default_rng(0))
    assert empty.n == 0 and math.isnan(empty.estimate) and math.isnan(empty.low)


def test_seeds_that_disagree_give_a_wide_interval_where_pooling_is_narrow():
    rng = np.random.default_rng(1)
    up, down = 10 + 0.1 * rng.standard_normal(20), -10 + 0.1 * rng.standard_normal(20)
    hier = stats.hierarchical_bootstrap([up, down], np.random.default_rng(0), n_resamples=4000)
    naive = stats.bootstrap_ci(np.concatenate([up, down]), np.random.default_rng(0),
                               n_resamples=4000)
    assert hier.low < 0 < hier.high and hier.high - hier.low > 18   # ~[-10, 10]
    assert naive.high - naive.low < 8                                # ~ +-3: episodes as units
    res = stats.seed_comparison({"0": up, "1": down}, higher_is_better=True,
                                rng=np.random.default_rng(0), n_resamples=2000)
    assert res.combined_p > 0.2                       # the seeds' huge z cancel
    # one seed far better, one slightly worse: pooling the episodes claims an effect, the
    # hierarchical interval does not
    down2 = -1 + 0.1 * rng.standard_normal(20)
    hier2 = stats.hierarchical_bootstrap([up, down2], np.random.default_rng(0),
                                         n_resamples=4000)
    naive2 = stats.bootstrap_ci(np.concatenate([up, down2]), np.random.default_rng(0),
                                n_resamples=4000)
    assert naive2.low > 0 and hier2.low < 0 < hier2.high


# -- pairing runs by seed, and the table over groups x metrics -------------------------------------
def test_pair_runs_by_seed():
    seeds = {"a0": 0, "a1": 1, "a2": 2.0, "b0": 0.0, "b1": 1, "base": np.nan, "c": 5}
    pairs, unpaired = stats.pair_runs(["a0", "a1", "a2"], ["b0", "b1"], seeds)
    assert pairs == [("0", "a0", "b0"), ("1", "a1", "b1")] and unpaired == ["a2"]
    # a single-run side (a trivial baseline) is compared with every seed of the other
    pairs, unpaired = stats.pair_runs(["a0", "a2"], ["base"], seeds)
    assert pairs == [("0", "a0", "base"), ("2", "a2", "base")] and unpaired == []
    pairs, _ = stats.pair_runs(["base"], ["b0", "b1"], seeds)
    assert pairs == [("0", "base", "b0"), ("1", "base", "b1")]
    # one against one: the seed of whichever run has one (a trivial baseline as the model)
    assert stats.pair_runs(["base"], ["a2"], seeds)[0] == [("2", "base", "a2")]
    assert stats.pair_runs(["a1"], ["base"], seeds)[0] == [("1", "a1", "base")]
    assert stats.pair_runs(["x"], ["y"], {})[0] == [("x", "x", "y")]
    # no seeds known: the run is its own label, so nothing matches
    assert stats.pair_runs(["x", "y"], ["u", "v"], {}) == ([], ["x", "y", "u", "v"])
    # two model runs with one seed: ambiguous, left out and counted
    pairs, unpaired = stats.pair_runs(["a0", "c", "a1"], ["b0", "b1"],
                                      {**seeds, "c": 0})
    assert pairs == [("1", "a1", "b1")] and sorted(unpaired) == ["a0", "b0", "c"]
    assert stats.seed_label(3.0) == "3" and stats.seed_label("s1") == "s1"


def _frames(values: dict[tuple[str, str, int], list[float]]) -> pd.DataFrame:
    """A frames table: (condition, run, seed) -> whole-rollout SSIM per episode; one frame, an
    external view and a wrist view (wrist = external - 0.1), LPIPS = 1 - SSIM, PSNR = 20 SSIM."""
    rows = []
    for (cond, run, _), vals in values.items():
        for e, v in enumerate(vals):
            for view, group, shift in (("ext1", "external", 0.0), ("wrist", "wrist", -0.1)):
                rows.append({"run": run, "condition": cond, "eval": "val", "sample": e,
                             "episode": 100 + e, "start": 0, "frame": 0, "chunk": 0,
                             "view": view, "group": group, "ssim": v + shift,
                             "psnr": 20 * (v + shift), "lpips": 1 - (v + shift)})
    return pd.DataFrame(rows)


def test_seed_paired_table_by_hand():
    base0, base1 = [0.5, 0.6, 0.7], [0.4, 0.5, 0.6]
    vals = {("post", "post/s0", 0): [b + d for b, d in zip(base0, SEED0 / 10)],
            ("post", "post/s1", 1): [b + d for b, d in zip(base1, SEED1 / 10)],
            ("post", "post/s2", 2): [0.9, 0.9, 0.9],       # its baseline seed failed
            ("base", "base/s0", 0): base0, ("base", "base/s1", 1): base1}
    frames = _frames(vals)
    seeds = {run: seed for (_, run, seed) in vals}
    table, per_seed = stats.seed_paired_table(frames, "post", "base", np.random.default_rng(0),
                                              seeds=seeds, n_resamples=500)
    assert len(table) == 6 and list(table.columns) == stats.SEED_TABLE_COLUMNS
    row = table.set_index(["group", "metric"])
    p0, p1 = t2_sf(2 * math.sqrt(3)), t2_sf(math.sqrt(3) / 2)
    expected = 1 - PHI.cdf((PHI.inv_cdf(1 - p0) + PHI.inv_cdf(1 - p1)) / math.sqrt(2))
    for group in ("external", "wrist"):
        for metric, scale in (("ssim", 0.1), ("psnr", 2.0), ("lpips", -0.1)):
            r = row.loc[(group, metric)]
            assert r["combined_p"] == pytest.approx(expected)          # t is scale-free
            assert r["mean_delta"] == pytest.approx(1.5 * scale)
            assert (r["n_seeds"], r["n_episodes"], r["episodes_per_seed"]) == (2, 6, "3")
            assert r["unpaired_runs"] == 1                             # post/s2
    # Holm over the 6 equal p: each becomes min(1, 6 p)
    assert table["holm_p"].tolist() == pytest.approx([min(1, 6 * expected)] * 6)
    assert table["holm_p"].tolist() == pytest.approx(stats.holm(table["combined_p"]).tolist())
    ps = per_seed[(per_seed["group"] == "external") & (per_seed["metric"] == "lpips")]
    assert ps["seed"].tolist() == ["0", "1"] and ps["model_run"].tolist() == ["post/s0",
                                                                             "post/s1"]
    assert ps["mean_delta"].tolist() == pytest.approx([-0.2, -0.1])
    assert ps["p"].tolist() == pytest.approx([p0, p1])
    # a trivial baseline (one run) is compared with every seed of the model
    triv = _frames({**vals, ("nothing", "baseline/nothing", None): [0.45, 0.55, 0.65]})
    t2, s2 = stats.seed_paired_table(triv, "post", "nothing", np.random.default_rng(0),
                                     seeds=seeds, metrics=("ssim",), groups=("external",),
                                     n_resamples=200)
    assert t2.loc[0, "n_seeds"] == 3 and s2["seed"].tolist() == ["0", "1", "2"]
    assert s2["baseline_run"].unique().tolist() == ["baseline/nothing"]
    assert s2["mean_delta"].tolist() == pytest.approx(
        [np.mean(vals[("post", "post/s0", 0)]) - 0.55, np.mean(vals[("post", "post/s1", 1)])
         - 0.55, 0.9 - 0.55])
    # one seed per side: the note says what the numbers are
    one = {k: v for k, v in vals.items() if k[2] == 0}
    t3, _ = stats.seed_paired_table(_frames(one), "post", "base", np.random.default_rng(0),
                                    seeds=seeds, n_resamples=200)
    assert (t3["n_seeds"] == 1).all() and t3["note"].str.contains("1 seed").all()
    assert t3["combined_p"].tolist() == pytest.approx([p0] * 6)
    # reproducible from the generator
    again, _ = stats.seed_paired_table(frames, "post", "base", np.random.default_rng(0),
                                       seeds=seeds, n_resamples=500)
    pd.testing.assert_frame_equal(table, again)
    # no common seed: an empty table with the columns, not an error
    none, _ = stats.seed_paired_table(frames, "post", "base", np.random.default_rng(0),
                                      seeds={}, n_resamples=100)
    assert none.empty and list(none.columns) == stats.SEED_TABLE_COLUMNS
