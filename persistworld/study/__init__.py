"""The human preference study (paper App. D): a blind two-alternative forced choice (2AFC).

Data flow, one module per stage:

    evaluated runs (eval/<name>/videos/*.npz: truth + prediction of each shown sample)
      -> create.py    pairs (sample x model pair), WebM videos per view, a seeded assignment
                      of pairs to raters (sides randomised, repeated pairs), rater/admin tokens:
                      one study directory (study.json, media/, votes.sqlite)
      -> server.py    FastAPI app: instructions, the trial page (reference on top, two
                      candidates below, synchronised playback + frame scrubber, keyboard),
                      votes appended to the database (db.py), results page behind the admin token
      -> report.py    win rates with exact binomial tests and Wilson / Clopper-Pearson
                      intervals (pooled and per rater), Elo over shuffled orders, Bradley-Terry
                      with bootstrap intervals, Fleiss' / Cohen's kappa, intra-rater
                      consistency, position bias -> Markdown / LaTeX / CSV / figures

    persistworld study create --run base=runs/base/eval/autoregressive_14 \\
                              --run persistworld=runs/post/eval/autoregressive_14 --out studies/s1
    persistworld study serve studies/s1          # prints the rater links; 127.0.0.1 by default
    persistworld study report studies/s1
"""
STUDY_FORMAT = "persistworld.study/1"
STUDY_FILE = "study.json"
MEDIA_DIR = "media"
DB_FILE = "votes.sqlite"
