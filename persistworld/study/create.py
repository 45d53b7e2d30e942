"""``persistworld study create``: pairs, videos, a seeded assignment and tokens -> a study dir.

Inputs are evaluations that wrote their shown samples' frames (``eval/<name>/videos/*.npz``,
``truth`` and ``pred``, uint8 (T, V, h, w, 3); ``eval.num_videos`` sets how many). The samples
shown are those every run has, and their ground truth must be identical across runs (the same
held-out starts), else the comparison is refused.

* Pairs: every sample x unordered model pair (``--max-samples`` subsamples the samples, seeded).
* Assignment (seeded by ``--seed``): each rater gets every pair (or ``--pairs-per-rater`` of
  them, spread so that every pair is rated about equally often) in a random order, sides drawn
  per trial; then ``--repeats`` of the rater's pairs again, later in the sequence and with the
  sides swapped, for intra-rater consistency (a rater who always presses "left" is inconsistent
  on them, not consistent).
* Blindness: videos get random file names; model names stay in ``study.json`` on the server.
* Tokens: one random URL-safe token per rater (``secrets``, not seeded) and one admin token.

``study.json`` is written last: a killed ``create`` leaves no study (rerun it); a directory that
already holds a study is never overwritten.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from persistworld.errors import MissingFile, UserError
from persistworld.study import DB_FILE, MEDIA_DIR, STUDY_FILE, STUDY_FORMAT
from persistworld.study.db import connect, sqlite_url
from persistworld.study.media import write_webm
from persistworld.utils.io import atomic_write_json, atomic_write_text

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def resolve_eval_dir(path: str | Path, eval_name: str) -> Path:
    """An evaluation directory with ``videos/*.npz``: the path itself or ``<run>/eval/<name>``."""
    p = Path(path)
    for cand in (p, p / "eval" / eval_name):
        if any((cand / "videos").glob("*.npz")):
            return cand
    if not p.exists():
        raise MissingFile(f"{p}: no such run or evaluation directory")
    raise MissingFile(f"{p}: no rollout frames (videos/*.npz) here or in {p / 'eval' / eval_name}; "
                      f"evaluate with eval.num_videos=N (N samples are written)")


def load_samples(eval_dirs: dict[str, Path]) -> tuple[list[str], dict[str, dict[str, np.ndarray]],
                                                      dict[str, np.ndarray]]:
    """Common sample names, predictions per model, and the (checked identical) ground truth."""
    names = None
    for d in eval_dirs.values():
        here = {f.stem for f in (d / "videos").glob("*.npz")}
        names = here if names is None else names & here
    samples = sorted(names or [])
    if not samples:
        raise UserError("the runs share no shown sample (videos/*.npz): evaluate them on the same "
                        "split with the same eval.seed and eval.num_videos")
    preds: dict[str, dict[str, np.ndarray]] = {m: {} for m in eval_dirs}
    truth: dict[str, np.ndarray] = {}
    for s in samples:
        for m, d in eval_dirs.items():
            f = d / "videos" / f"{s}.npz"
            try:
                with np.load(f) as z:
                    t, p = z["truth"], z["pred"]
            except Exception as e:  # noqa: BLE001 - a corrupt file, named
                raise UserError(f"{f}: unreadable rollout frames ({e}); re-run the evaluation") \
                    from None
            if p.shape != t.shape or p.dtype != np.uint8 or t.ndim != 5:
                raise UserError(f"{f}: truth {t.shape} / pred {p.shape} {p.dtype} are not two "
                                f"(T, V, h, w, 3) uint8 arrays")
            if s in truth and not np.array_equal(truth[s], t):
                raise UserError(f"sample {s}: {m}'s ground truth differs from the other runs' "
                                f"(another split, start or data): not the same held-out samples")
            truth[s] = t
            preds[m][s] = p
    return samples, preds, truth


def assign(pairs: list[dict], raters: list[str], rng: np.random.Generator,
           pairs_per_rater: int | None, repeats: int) -> dict[str, list[dict]]:
    """Trials per rater: ``{"trial", "pair", "sample", "left", "right", "repeat_of"}``."""
    n = len(pairs)
    k = n if pairs_per_rater is None else min(int(pairs_per_rater), n)
    deck = list(rng.permutation(n))             # dealt round-robin: coverage as even as can be
    out: dict[str, list[dict]] = {}
    for r_i, rater in enumerate(raters):
        chosen = [int(deck[(r_i * k + j) % n]) for j in range(k)] if k < n else list(range(n))
        order = [chosen[i] for i in rng.permutation(len(chosen))]
        trials = []
        for idx in order:
            a, b = pairs[idx]["models"]
            left, right = (a, b) if rng.random() < 0.5 else (b, a)
            trials.append({"pair": pairs[idx]["pair"], "sample": pairs[idx]["sample"],
                           "left": left, "right": right, "repeat_of": None})
        reps = min(int(repeats), len(trials))
        originals = [trials[j] for j in sorted(rng.choice(len(trials), size=reps,
                                                          replace=False).tolist())]
        for orig in originals:
            j = next(i for i, t in enumerate(trials) if t is orig)
            # after the original, and in the second half of the sequence
            lo = max(j + 1, len(trials) // 2)
            pos = int(rng.integers(lo, len(trials) + 1))
            trials.insert(pos, {**orig, "left": orig["right"], "right": orig["left"],
                                "repeat_of": orig["pair"]})
        for i, t in enumerate(trials):
            t["trial"] = f"t{i + 1:04d}"
        out[rater] = trials
    return out


def create_study(runs: dict[str, str | Path], out: str | Path, *, raters: int = 8,
                 pairs_per_rater: int | None = None, repeats: int = 4,
                 max_samples: int | None = None, seed: int = 0, eval_name: str =
                 "autoregressive_14", fps: int = 5, scale: int = 2,
                 progress: bool = True) -> Path:
    """Build the study directory; returns its path (see the module docstring)."""
    out = Path(out)
    # -- S0 settings, checked before any work ------------------------------------------------
    if len(runs) < 2:
        raise UserError("a 2AFC study needs at least two runs: --run NAME=DIR --run NAME=DIR")
    for name in runs:
        if not NAME.match(name):
            raise UserError(f"--run {name}=...: names are 1-64 of A-Z a-z 0-9 _ . -")
    if raters < 1 or repeats < 0 or (pairs_per_rater is not None and pairs_per_rater < 1):
        raise UserError("need --raters >= 1, --repeats >= 0 and --pairs-per-rater >= 1")
    if max_samples is not None and max_samples < 1:
        raise UserError("--max-samples must be >= 1")
    if fps < 1 or scale < 1:
        raise UserError("need --fps >= 1 and --scale >= 1")
    if (out / STUDY_FILE).exists() or (out / DB_FILE).exists():
        raise UserError(f"{out} already holds a study (and perhaps votes); choose another --out")
    eval_dirs = {m: resolve_eval_dir(p, eval_name) for m, p in runs.items()}
    # -- S1 samples and pairs ----------------------------------------------------------------
    samples, preds, truth = load_samples(eval_dirs)
    rng = np.random.default_rng(seed)
    if max_samples is not None and max_samples < len(samples):
        samples = sorted(rng.choice(samples, size=max_samples, replace=False).tolist())
    models = sorted(runs)
    pairs = [{"pair": f"p{i + 1:04d}", "sample": s, "models": list(ab)}
             for i, (s, ab) in enumerate(itertools.product(samples,
                                                            itertools.combinations(models, 2)))]
    rater_ids = [f"rater{i + 1:02d}" for i in range(raters)]
    trials = assign(pairs, rater_ids, rng, pairs_per_rater, repeats)
    # -- S2 videos (random names: nothing in a URL tells a model) -----------------------------
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out / MEDIA_DIR, ignore_errors=True)   # a killed create's leftovers
    from persistworld.world_model.interface import VIEWS
    media = out / MEDIA_DIR
    views = list(VIEWS)[: truth[samples[0]].shape[1]]
    videos: dict[str, dict] = {}
    jobs = [(s, who) for s in samples for who in ["reference", *models]]
    t0 = time.time()
    for s, who in tqdm(jobs, desc="study videos", unit="rollout", disable=not progress):
        frames = truth[s] if who == "reference" else preds[who][s]
        entry = {}
        for v, view in enumerate(views):
            name = f"{secrets.token_hex(8)}.webm"
            write_webm(media / name, frames[:, v], fps=fps, scale=scale)
            entry[view] = name
        videos.setdefault(s, {})[who] = entry
    # -- S3 tokens, database, study.json (last) -------------------------------------------------
    tokens = {r: secrets.token_urlsafe(16) for r in rater_ids}
    study = {
        "format": STUDY_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": seed,
        "models": {m: {"source": str(eval_dirs[m].resolve())} for m in models},
        "views": views, "fps": fps, "num_frames": int(truth[samples[0]].shape[0]),
        "frame_size": [int(x) * scale for x in truth[samples[0]].shape[2:4]],
        "samples": samples, "pairs": pairs, "videos": videos,
        "raters": {r: {"token": tokens[r], "trials": trials[r]} for r in rater_ids},
        "admin_token": secrets.token_urlsafe(16),
        "settings": {"raters": raters, "pairs_per_rater": pairs_per_rater, "repeats": repeats,
                     "max_samples": max_samples, "eval_name": eval_name, "scale": scale},
        "media_seconds": round(time.time() - t0, 2),
    }
    connect(sqlite_url(out / DB_FILE)).dispose()
    atomic_write_text(out / "links.txt", "".join(
        f"{r}\t/r/{tokens[r]}\n" for r in rater_ids) + f"admin\t/admin/{study['admin_token']}\n")
    atomic_write_json(out / STUDY_FILE, study)
    return out


def load_study(study_dir: str | Path) -> dict:
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise MissingFile(f"{path}: no study here; create one with `persistworld study create`")
    try:
        study = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt study file ({e}); create the study again") from None
    if study.get("format") != STUDY_FORMAT:
        raise UserError(f"{path}: not a {STUDY_FORMAT} study file")
    return study


def add_create_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR", required=True,
                    help="an evaluated run (or its eval/<name> directory); two or more")
    ap.add_argument("--out", required=True, help="the new study directory")
    ap.add_argument("--raters", type=int, default=8)
    ap.add_argument("--pairs-per-rater", type=int, default=None,
                    help="default: every pair for every rater")
    ap.add_argument("--repeats", type=int, default=4,
                    help="pairs shown twice per rater (sides swapped) for consistency")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", dest="eval_name", default="autoregressive_14",
                    help="evaluation used when --run names a run directory")
    ap.add_argument("--fps", type=int, default=5)
    ap.add_argument("--scale", type=int, default=2, help="integer enlargement of the frames")


def create_main(args: argparse.Namespace) -> int:
    runs = {}
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--run {spec!r}: expected NAME=DIR")
        if name in runs:
            raise UserError(f"--run {name}=...: given twice")
        runs[name] = path
    out = create_study(runs, args.out, raters=args.raters, pairs_per_rater=args.pairs_per_rater,
                       repeats=args.repeats, max_samples=args.max_samples, seed=args.seed,
                       eval_name=args.eval_name, fps=args.fps, scale=args.scale)
    study = load_study(out)
    n = sum(len(r["trials"]) for r in study["raters"].values())
    print(f"study: {out}: {len(study['pairs'])} pairs of {len(study['samples'])} samples x "
          f"{len(study['models'])} models; {len(study['raters'])} raters, {n} trials; "
          f"links in {out / 'links.txt'}; next: persistworld study serve {out}")
    return 0
