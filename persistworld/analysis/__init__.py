"""Analysis: run directories -> tidy tables -> statistics, paper-layout tables, figures, report.

Data flow (each step a pure function of the previous table; randomness passed in as an explicit
``numpy.random.Generator``):

* ``collect``  run directories -> runs table (one row per run, failed ones included), long
  per-frame table (frames.parquet), long training-metrics table (metrics.jsonl);
* ``stats``    bootstrap intervals, seed summaries, paired per-sample comparisons, rollout-time
  curves, Elo / binomial test / Fleiss' kappa, policy-evaluation agreement (Pearson r, MMRV);
* ``tables``   the paper's table layouts as Markdown, LaTeX (booktabs), CSV, HTML;
* ``figures``  matplotlib figures returning ``(fig, ax)``;
* ``report``   ``python -m persistworld.analysis.report SWEEP_DIR`` renders all of it.

See ``analysis/README.md`` for commands.
"""
