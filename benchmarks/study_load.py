"""Load test of the 2AFC study server on loopback: N simulated raters voting concurrently.

    .venv/bin/python benchmarks/study_load.py [--raters 20] [--votes 100] [--out FILE.json]

Builds a synthetic study (15 models x 1 sample: 105 pairs, so 100 distinct trials per rater),
starts `persistworld study serve` as a real process, lets every rater vote its trials at once
(each also re-sends 5 acknowledged votes, which must be refused), then compares the database
with the acknowledged votes. Prints counts (lost / duplicated must be 0) and vote latency
percentiles (ms, client side, including the fsync of each committed vote).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    from persistworld.study.create import create_study
    from persistworld.study.loadtest import Server, run_load, synthetic_eval_dirs
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raters", type=int, default=20)
    ap.add_argument("--votes", type=int, default=100, help="votes per rater (<= 105)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = synthetic_eval_dirs(Path(tmp) / "runs", models=15, samples=1, frames=3)
        study = create_study(runs, Path(tmp) / "study", raters=a.raters, pairs_per_rater=a.votes,
                             repeats=0, progress=False)
        with Server(study) as server:
            res = run_load(server.url, study, votes_per_rater=a.votes)
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    if res["lost"] or res["duplicates"] or res["acknowledged"] != a.raters * a.votes:
        raise SystemExit("study_load: votes lost or duplicated")


if __name__ == "__main__":
    main()
