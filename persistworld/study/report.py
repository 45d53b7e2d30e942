"""``persistworld study report``: the study's statistics from the votes database.

Every number the paper reports for its 2AFC study (App. D), and the checks a reviewer asks for:

* win rate per model pair, pooled and per rater: exact binomial test against 50% and the
  Wilson and Clopper-Pearson intervals (``stats.preference_test`` / ``proportion_interval``);
* Elo as in the paper (start 800, K = 32) averaged over seeded shuffles of the vote order (the
  order effect removed; ``stats.elo_over_orders``) and Bradley-Terry on the Elo scale with
  bootstrap intervals (``stats.bradley_terry``);
* inter-rater agreement: Fleiss' kappa over raters (items = pairs, category = the preferred
  model) and Cohen's kappa per rater pair on the pairs both rated;
* intra-rater consistency on the repeated pairs (shown again later with the sides swapped);
* position bias: the share of "left" answers with its binomial test.

Repeated trials count only for consistency; every other statistic uses each rater's first vote
on a pair. Outputs (``<study>/report`` unless ``--out``): ``report.md``, ``tables/*.{md,csv,tex}``,
``figures/win_rates.{png,pdf}`` and ``votes.csv`` (the raw append-only rows).
"""
from __future__ import annotations

import argparse
import html
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from persistworld.analysis import stats
from persistworld.errors import UserError
from persistworld.study import DB_FILE
from persistworld.study.create import load_study
from persistworld.study.db import connect, read_votes, sqlite_url
from persistworld.utils.io import atomic_path, atomic_write_text

POOLED = "pooled"


def first_votes(votes: pd.DataFrame) -> pd.DataFrame:
    return votes[~votes["is_repeat"].astype(bool)]


def win_rates(votes: pd.DataFrame, *, prefer: str | None = None,
              level: float = 0.95) -> pd.DataFrame:
    """One row per (rater or pooled, model pair): wins of each side, rate of ``model``, binomial
    p, Wilson and Clopper-Pearson intervals. Two-sided, pairs in sorted order; with ``prefer``
    the pairs that contain it put it first and the tests and intervals are one-sided ("it is
    preferred", as the paper's p = 3.5e-20) -- name it before looking, not after."""
    v = first_votes(votes)
    rows = []
    models = sorted(set(v["winner"]) | set(v["loser"]))
    if prefer is not None and prefer not in models:
        raise UserError(f"--prefer {prefer}: not a model of this study ({', '.join(models)})")
    raters = [POOLED, *sorted(v["rater"].unique())]
    for a, b in itertools.combinations(models, 2):
        if b == prefer:
            a, b = b, a
        alternative = "greater" if a == prefer else "two-sided"
        in_pair = v[((v["winner"] == a) & (v["loser"] == b)) |
                    ((v["winner"] == b) & (v["loser"] == a))]
        for r in raters:
            sub = in_pair if r == POOLED else in_pair[in_pair["rater"] == r]
            wa, wb = int((sub["winner"] == a).sum()), int((sub["winner"] == b).sum())
            if wa + wb == 0:
                continue
            test = stats.preference_test(wa, wb, alternative=alternative, level=level)
            rows.append({"rater": r, "model": a, "vs": b, "wins": wa, "losses": wb,
                         "n": wa + wb, "rate": wa / (wa + wb), "p_value": test["p_value"],
                         **stats.proportion_interval(wa, wa + wb, level=level,
                                                     alternative=alternative)})
    return pd.DataFrame(rows)


def agreement(votes: pd.DataFrame) -> tuple[float, pd.DataFrame]:
    """Fleiss' kappa over raters and Cohen's kappa per rater pair (first votes per pair)."""
    v = first_votes(votes)
    counts = pd.crosstab(v["pair"], v["winner"])
    fleiss = stats.fleiss_kappa(counts.to_numpy()) if len(counts) else float("nan")
    label = v.set_index(["rater", "pair"])["winner"]
    rows = []
    for r1, r2 in itertools.combinations(sorted(v["rater"].unique()), 2):
        common = sorted(set(label[r1].index) & set(label[r2].index))
        if not common:
            continue
        a, b = label[r1].loc[common].to_numpy(), label[r2].loc[common].to_numpy()
        rows.append({"rater": r1, "other": r2, "pairs": len(common),
                     "agreement": float(np.mean(a == b)), "cohen_kappa": stats.cohen_kappa(a, b)})
    return fleiss, pd.DataFrame(rows)


def consistency(votes: pd.DataFrame) -> pd.DataFrame:
    """Per rater (and pooled): repeated pairs voted twice and how often the same model won."""
    first = first_votes(votes).set_index(["rater", "pair"])["winner"]
    rep = votes[votes["is_repeat"].astype(bool)]
    rows = []
    for r, sub in [(POOLED, rep), *sorted(rep.groupby("rater"))]:
        same = n = 0
        for _, row in sub.iterrows():
            key = (row["rater"], row["pair"])
            if key in first.index:
                n += 1
                same += int(first.loc[key] == row["winner"])
        if n:
            rows.append({"rater": r, "repeated": n, "same_choice": same, "consistency": same / n})
    return pd.DataFrame(rows)


def position_bias(votes: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Share of "left" answers per rater and pooled, two-sided binomial test against 50%."""
    v = first_votes(votes)
    rows = []
    for r, sub in [(POOLED, v), *sorted(v.groupby("rater"))]:
        left, n = int((sub["choice"] == "left").sum()), len(sub)
        test = stats.preference_test(left, n - left, level=level)
        rows.append({"rater": r, "left": left, "n": n, "left_rate": left / n,
                     "p_value": test["p_value"]})
    return pd.DataFrame(rows)


def analyse(votes: pd.DataFrame, *, seed: int = 0, prefer: str | None = None,
            level: float = 0.95, n_resamples: int = 2_000) -> dict:
    if votes.empty:
        raise UserError("no votes yet: nothing to report")
    rng = np.random.default_rng(seed)
    v = first_votes(votes)
    fleiss, cohen = agreement(votes)
    return {
        "win_rates": win_rates(votes, prefer=prefer, level=level),
        "elo": stats.elo_over_orders(v, rng, n_orders=n_resamples, level=level),
        "bradley_terry": stats.bradley_terry(v, rng, n_resamples=n_resamples, level=level),
        "fleiss_kappa": fleiss, "cohen": cohen, "consistency": consistency(votes),
        "position": position_bias(votes, level), "n_votes": len(votes), "n_first": len(v),
        "raters": int(votes["rater"].nunique()), "prefer": prefer, "level": level,
        "seed": seed, "n_resamples": n_resamples,
    }


# -- rendering ---------------------------------------------------------------------------------
def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        if c == "p_value":
            out[c] = out[c].map(lambda p: f"{p:.2g}")
        elif pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda x: "" if pd.isna(x) else f"{x:.3f}")
    return out.astype(str)


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(none)\n"
    s = _fmt(df)
    lines = ["| " + " | ".join(s.columns) + " |", "|" + "|".join("---" for _ in s.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in s.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, caption: str) -> str:
    s = _fmt(df)
    esc = lambda x: str(x).replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    body = "\n".join(" & ".join(esc(x) for x in row) + r" \\" for row in s.itertuples(index=False))
    return ("\\begin{table}[t]\n\\centering\n\\caption{" + esc(caption) + "}\n\\begin{tabular}{"
            + "l" * len(s.columns) + "}\n\\toprule\n" + " & ".join(esc(c) for c in s.columns)
            + r" \\" + "\n\\midrule\n" + body + "\n\\bottomrule\n\\end{tabular}\n\\end{table}\n")


def _figure(res: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wr = res["win_rates"]
    fig, ax = plt.subplots(figsize=(6, 0.45 * max(3, len(wr)) + 1))
    labels = [f"{r.rater}: {r.model} vs {r.vs} (n={r.n})" for r in wr.itertuples()]
    y = np.arange(len(wr))[::-1]
    ax.errorbar(wr["rate"], y, xerr=[wr["rate"] - wr["wilson_low"], wr["wilson_high"] - wr["rate"]],
                fmt="o", color="C0", capsize=3)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"win rate of the first model ({res['level']:.0%} Wilson interval)")
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        p = out / "figures" / f"win_rates.{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        paths.append(p)
    plt.close(fig)
    return paths


def write_report(study_dir: str | Path, out: str | Path | None = None, *, db_url: str | None = None,
                 **kw) -> Path:
    study_dir = Path(study_dir)
    study = load_study(study_dir)
    out = Path(out) if out else study_dir / "report"
    engine = connect(db_url or sqlite_url(study_dir / DB_FILE))
    votes = read_votes(engine)
    res = analyse(votes, **kw)
    tables = {"win_rates": res["win_rates"], "elo": res["elo"],
              "bradley_terry": res["bradley_terry"], "cohen_kappa": res["cohen"],
              "consistency": res["consistency"], "position_bias": res["position"]}
    captions = {"win_rates": "Win rate (first vote per pair), exact binomial test, Wilson and "
                             "Clopper-Pearson intervals",
                "elo": "Elo (start 800, K = 32), mean over shuffled vote orders",
                "bradley_terry": "Bradley-Terry on the Elo scale, bootstrap interval",
                "cohen_kappa": "Cohen's kappa per rater pair",
                "consistency": "Intra-rater consistency on repeated pairs (sides swapped)",
                "position_bias": "Share of left answers"}
    for name, df in tables.items():
        for ext, text in (("md", to_markdown(df)), ("csv", df.to_csv(index=False)),
                          ("tex", to_latex(df, captions[name]))):
            atomic_write_text(out / "tables" / f"{name}.{ext}", text)
    atomic_write_text(out / "votes.csv", votes.to_csv(index=False))
    fig = _figure(res, out)
    side = (f"one-sided ({res['prefer']} preferred) for pairs with {res['prefer']}, two-sided "
            f"otherwise" if res["prefer"] else "two-sided")
    md = [f"# 2AFC study: {', '.join(study['models'])}\n",
          f"{res['n_votes']} votes by {res['raters']} raters ({res['n_first']} first votes; "
          f"{res['n_votes'] - res['n_first']} on repeated pairs, used for consistency only). "
          f"Tests are {side} at level {res['level']}; resampling seed {res['seed']}, "
          f"{res['n_resamples']} resamples / orders.\n"]
    for name, df in tables.items():
        md += [f"## {captions[name]}\n", to_markdown(df)]
        if name == "cohen_kappa":
            md.append(f"Fleiss' kappa over raters: {res['fleiss_kappa']:.3f} (undefined, nan, "
                      f"with fewer than two raters on a pair)\n")
    md.append(f"![win rates]({fig[0].relative_to(out).as_posix()})\n")
    atomic_write_text(out / "report.md", "\n".join(md))
    return out


def summary_html(study: dict, votes: pd.DataFrame) -> str:
    """The admin page: progress per rater and the pooled win rates (no resampling: fast)."""
    prog = pd.DataFrame([{"rater": r, "voted": int((votes["rater"] == r).sum()) if len(votes)
                          else 0, "trials": len(x["trials"])} for r, x in study["raters"].items()])
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>study results</title>"
             "<link rel='stylesheet' href='/static/study.css'></head><body><main class='narrow'>",
             f"<h1>Study results: {html.escape(', '.join(study['models']))}</h1>",
             f"<p>{len(votes)} votes.</p><h2>Progress</h2>",
             prog.to_html(index=False, border=0)]
    if len(votes):
        parts += ["<h2>Win rates</h2>", _fmt(win_rates(votes)).to_html(index=False, border=0)]
    parts.append("<p>Full report: <code>persistworld study report STUDY_DIR</code></p>"
                 "</main></body></html>")
    return "\n".join(parts)


def add_report_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("study", help="the study directory")
    ap.add_argument("--out", default=None, help="default: <study>/report")
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default <study>/votes.sqlite)")
    ap.add_argument("--prefer", default=None, metavar="MODEL",
                    help="one-sided tests that MODEL is preferred (the paper's p is one-sided)")
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)


def report_main(args: argparse.Namespace) -> int:
    if not 0 < args.level < 1 or args.resamples < 1:
        raise UserError("need 0 < --level < 1 and --resamples >= 1")
    out = write_report(args.study, args.out, db_url=args.db, seed=args.seed,
                       prefer=args.prefer,
                       level=args.level, n_resamples=args.resamples)
    print(f"study report: {out / 'report.md'}")
    return 0
