"""``persistworld policy-eval``: rank policies in the simulator and in a world model.

    persistworld policy-eval --data data/mini_droid [--model M [M ...]] \
        [--policies expert expert@0.01 ...] [--split test] [--starts 8] [--chunks 14] \
        [--steps N] [--judge FILE.pt | module:function | none] [--out runs/policy_eval]

Every policy runs from the same start states (the first frames of ``--starts`` episodes of
``--split``) for ``--chunks`` chunks of L frames, closed loop:

* in the simulator (``SimRollout``): the true outcome, staged progress from the physics state;
* in each world model (``--model``, e.g. base and post-trained): the policy sees the generated
  views, the world model is conditioned on the poses the policy commands (as in Ctrl-World's
  policy-in-the-loop script), and the judge scores the generated video.

The judge (``--judge``: a file written by ``persistworld train-judge``, by default the repo's
``models/stage_judge.pt``, or any ``module:function``) is
``judge(frames, start) -> (T, S) bool stage flags`` (frames (T, V, h, w, 3) uint8, VIEWS
order; ``start`` gives the task, its goal and the object; ``judge.py``); the in-order
progress is computed from its flags exactly as from the simulator's. Without a judge (``--judge
none``, or no judge file) the world-model rollouts and videos are still written, and the
ranking statistics are left out. With one, the judge also scores a still video (the start frame
throughout, "nothing moves") from every start: the progress it grants a world model in which
nothing happens, the floor the world models' progress is read against.

Outputs in ``--out``: ``config.json`` (the settings and their fingerprint),
``rollouts/<env>/<policy>/ep<id>.json`` (one per rollout, written atomically; a rerun with the
same settings skips the ones that exist, so an interrupted run resumes; ``rollouts/still/``:
the judged still videos), ``frames/<env>/<policy>/ep<id>.npz`` (every rollout's frames,
``rgb`` (T, V, h, w, 3) uint8, which the records point to), ``videos/<policy>_ep<id>.gif`` (simulator | each world model, the first start of
each policy), ``summary.json`` and ``summary.md`` (per-policy progress and success with
bootstrap intervals; Pearson, Spearman, MMRV and false-success rate per world model) and
``policy_eval.png`` (world-model vs simulator progress per policy, the paper's Fig. 8).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from persistworld.errors import UserError
from persistworld.policy_eval.policies import DEFAULT_POLICIES, make_policy, policy_label
from persistworld.policy_eval.progress import STAGES, stages_in_order, stage_flags


def _args(argv):
    ap = argparse.ArgumentParser(prog="persistworld policy-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a rendered dataset (data.root)")
    ap.add_argument("--model", nargs="*", default=[], help="model.pt files or run directories")
    ap.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    ap.add_argument("--split", default="test", help="where the start states come from")
    ap.add_argument("--starts", type=int, default=8, help="start states (episodes) per policy")
    ap.add_argument("--chunks", type=int, default=14)
    ap.add_argument("--steps", type=int, default=None,
                    help="sampler steps per chunk (default: each model's own)")
    ap.add_argument("--judge", default=None,
                    help="a judge file (.pt), module:function scoring generated video, or "
                         "none (default: models/stage_judge.pt when it exists)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--out", default="runs/policy_eval")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def render_config(store, data) -> dict:
    """The simulator settings of a rendered dataset (its manifest), or a clear error."""
    from persistworld.data.render import RENDER_KEYS
    rc = store.manifest.get("config") or {}
    if not store.has_masks or any(k not in rc for k in RENDER_KEYS):
        raise UserError(f"--data {data}: policy evaluation needs a dataset rendered by "
                        "`persistworld render` (its simulator gives the true outcome); "
                        "converted real data has none")
    return dict(rc)


def default_future() -> int:
    """L, the chunk length the simulator-only evaluation steps by: the data config's."""
    from omegaconf import OmegaConf
    conf = Path(__file__).resolve().parents[1] / "conf" / "data" / "mini_droid.yaml"
    return int(OmegaConf.load(conf).future)


def _check(a, store) -> tuple[dict, list[int]]:
    """Every setting before any rollout starts."""
    rc = render_config(store, a.data)
    for name in a.policies:
        make_policy(name)
    if len({policy_label(p) for p in a.policies}) != len(a.policies):
        raise UserError(f"--policies lists a policy twice: {a.policies}")
    if a.starts < 2 or a.chunks < 1 or a.boot < 1:
        raise UserError("--starts must be >= 2, --chunks >= 1 and --boot >= 1")
    if a.steps is not None and a.steps < 1:
        raise UserError(f"--steps {a.steps}: sampler steps per chunk must be >= 1 (leave it "
                        f"out for each model's own)")
    ids = store.episode_ids(a.split)
    if a.starts > len(ids):
        raise UserError(f"--starts {a.starts}: the {a.split} split has {len(ids)} episodes")
    return rc, ids[:a.starts]


def _model_id(m: str) -> str:
    """A model by content: a retrained model at the same path is another model."""
    from persistworld.utils.io import sha256_file
    f = Path(m) if Path(m).is_file() else Path(m) / "model.pt"
    return sha256_file(f) if f.is_file() else str(Path(m).resolve())


def _policy_id(name: str) -> str:
    from persistworld.utils.io import sha256_file
    return f"bc:{sha256_file(name[3:])}" if name.startswith("bc:") else name


def _fingerprint(a, models: list[str], judge) -> str:
    """What the stored rollouts depend on; the judge by content (a retrained judge file
    invalidates the world-model scores)."""
    from persistworld.utils.io import sha256_file
    judge_id = (sha256_file(judge.path) if hasattr(judge, "path") else
                getattr(judge, "__qualname__", None))
    keys = {"data": str(Path(a.data).resolve()), "models": models, "split": a.split,
            "chunks": a.chunks, "steps": a.steps, "seed": a.seed, "judge": judge_id}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _record(task: str, flags: np.ndarray, frames_file: str, judged: bool, pid: str) -> dict:
    first = stages_in_order(flags)
    return {"task": task, "stages": list(STAGES[task]), "first_frame": first.tolist(),
            "progress": int((first >= 0).sum()) / len(STAGES[task]),
            "success": bool((first >= 0).all()), "frames": frames_file, "judged": judged,
            "policy_id": pid}


def _sim_rollout(rc, ep_id, attempt, policy, horizon, chunks):
    """-> (frames (T, V, h, w, 3) uint8, flags, task) of one closed-loop simulator rollout."""
    from persistworld.policy_eval.simulator import SimRollout
    sim = SimRollout(rc, ep_id, attempt)
    act = policy.controller(sim)
    for chunk in range(chunks):
        sim.step(act(sim.views(), sim.pose, chunk, horizon))
    return np.stack(sim.frames), stage_flags(sim.state()), sim.task


def _wm_rollouts(model, a, eps: list[int], rc, attempts, policy, judge):
    """Closed-loop world-model rollouts of ``policy`` from the starts ``eps``, in one batch
    -> [(frames, flags, task)] in the order of ``eps``."""
    from persistworld.policy_eval.simulator import SimRollout
    from persistworld.rollout.interactive import BatchSession
    starts, acts = [], []
    for ep in eps:                               # the policy's start (scene, goal, expert plan)
        start = SimRollout(rc, ep, attempts[ep])
        starts.append(start)
        acts.append(policy.controller(start))
    session = BatchSession(model, a.data, eps, 0, [a.seed + ep for ep in eps], a.steps)
    for chunk in range(a.chunks):
        views, poses = session.latest_views(), session.pose.copy()
        session.step(np.stack([act(views[b], poses[b], chunk, model.future)
                               for b, act in enumerate(acts)]))
    out = []
    for b, start in enumerate(starts):
        frames = session.video(b)
        flags = (np.asarray(judge(frames, start), bool) if judge else
                 np.zeros((len(frames), len(STAGES[start.task])), bool))
        out.append((frames, flags, start.task))
    return out


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from persistworld.data.dataset import EpisodeStore
    from persistworld.utils.io import atomic_write_json, atomic_write_text
    a = _args(argv)
    store = EpisodeStore(a.data)
    rc, starts = _check(a, store)
    models = {}
    from persistworld.world_model import load_world_model
    for i, m in enumerate(a.model):
        if not Path(m).exists():
            raise UserError(f"--model {m}: no such file or run directory")
        models[f"wm{i}:{Path(m).stem if Path(m).is_file() else Path(m).name}"] = \
            load_world_model(m)
    from persistworld.policy_eval.judge import load_judge
    judge = load_judge(a.judge) if models else None       # the simulator needs none
    horizon = next(iter(models.values())).future if models else default_future()
    out = Path(a.out)
    fp = _fingerprint(a, [_model_id(m) for m in a.model], judge)
    cfg_file = out / "config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()).get("fingerprint") != fp:
        raise UserError(f"{out} holds a policy evaluation with other settings; pass another "
                        f"--out or delete {out}")
    atomic_write_json(cfg_file, {"fingerprint": fp, **vars(a)})
    attempts = {e: int(store.load(e).meta.get("attempt", 0)) for e in starts}
    envs = ["sim", *models]
    from persistworld.utils.io import atomic_write_bytes, npz_bytes

    def rec_path(env, label, ep):
        return out / "rollouts" / env.split(":")[0] / label / f"ep{ep}.json"

    def done(path, pid):
        return path.exists() and json.loads(path.read_text()).get("policy_id") == pid

    groups = [(env, p) for env in envs for p in a.policies]
    for env, pname in tqdm(groups, desc="policies x environments", disable=a.no_progress):
        label, pid = policy_label(pname), _policy_id(pname)
        todo = [ep for ep in starts if not done(rec_path(env, label, ep), pid)]
        if not todo:                                  # resumed: rolled out before
            continue
        policy = make_policy(pname, a.seed)
        if env == "sim":
            results = [_sim_rollout(rc, ep, attempts[ep], policy, horizon, a.chunks)
                       for ep in todo]
        else:
            results = _wm_rollouts(models[env], a, todo, rc, attempts, policy, judge)
        for ep, (frames, flags, task) in zip(todo, results):
            frames_file = f"frames/{env.split(':')[0]}/{label}/ep{ep}.npz"
            atomic_write_bytes(out / frames_file, npz_bytes({"rgb": frames}))
            atomic_write_json(rec_path(env, label, ep),
                              _record(task, flags, frames_file, env == "sim" or judge is not None,
                                      pid))
    if judge is not None and models:               # the judge's floor: nothing moves
        from persistworld.policy_eval.simulator import SimRollout
        for ep in starts:
            path = out / "rollouts" / "still" / f"ep{ep}.json"
            if path.exists():
                continue
            start = SimRollout(rc, ep, attempts[ep])
            still = np.repeat(start.views()[None], 1 + a.chunks * horizon, 0)
            atomic_write_json(path, _record(start.task, np.asarray(judge(still, start), bool),
                                            "", True, "nothing moves"))
    # every record in start order: rollouts are paired by start across policies and envs
    table = {env: {policy_label(p): [json.loads(rec_path(env, policy_label(p), ep).read_text())
                                     for ep in starts] for p in a.policies} for env in envs}
    labels = [policy_label(p) for p in a.policies]
    summary = summarise(table, labels, models, judge is not None, a.boot, a.seed)
    if judge is not None and models:
        still = [json.loads((out / "rollouts" / "still" / f"ep{ep}.json").read_text())
                 for ep in starts]
        summary["nothing_moves"] = {"progress": float(np.mean([r["progress"] for r in still])),
                                    "success": float(np.mean([r["success"] for r in still])),
                                    "n": len(still)}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    write_videos(out, table, labels, starts[0], envs)
    if models and judge is not None:
        figure(out / "policy_eval.png", summary)
    print(summary_markdown(summary))
    print(f"written to {out}")
    return 0


def _matrix(table_env: dict[str, list[dict]], policies, key) -> np.ndarray:
    return np.array([[r[key] for r in table_env[p]] for p in policies], dtype=float)


def summarise(table, policies, models, judged: bool, n_boot: int, seed: int) -> dict:
    from persistworld.policy_eval.ranking import bootstrap
    rng = np.random.default_rng(seed)
    per_policy = {}
    for env, rows in table.items():
        for p in policies:
            prog = np.array([r["progress"] for r in rows[p]])
            succ = np.array([r["success"] for r in rows[p]], float)
            boots = rng.integers(0, len(prog), (n_boot, len(prog)))
            per_policy.setdefault(p, {})[env] = {
                "progress": float(prog.mean()), "success": float(succ.mean()),
                "progress_ci": [float(x) for x in np.percentile(prog[boots].mean(1),
                                                                 [2.5, 97.5])],
                "n": int(len(prog))}
    agreement = {}
    if judged:
        real = _matrix(table["sim"], policies, "progress")
        real_done = _matrix(table["sim"], policies, "success").astype(bool)
        for env in models:
            agreement[env] = bootstrap(_matrix(table[env], policies, "progress"), real,
                                       _matrix(table[env], policies, "success").astype(bool),
                                       real_done, n_boot=n_boot, seed=seed)
    return {"policies": per_policy, "agreement": agreement, "judged": judged,
            "models": list(models)}


def summary_markdown(s: dict) -> str:
    envs = ["sim", *s["models"]]
    lines = ["| policy | " + " | ".join(f"{e} progress [95% CI] | {e} success" for e in envs)
             + " |", "|---" * (1 + 2 * len(envs)) + "|"]
    for p, row in s["policies"].items():
        cells = []
        for e in envs:
            r = row[e]
            judged = e == "sim" or s["judged"]
            cells += ([f"{r['progress']:.3f} [{r['progress_ci'][0]:.3f}, "
                       f"{r['progress_ci'][1]:.3f}]", f"{r['success']:.2f}"]
                      if judged else ["(no judge)", "(no judge)"])
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if s["agreement"]:
        lines += ["", "| world model | Pearson r | Spearman rho | MMRV | false-success |",
                  "|---|---|---|---|---|"]
        for env, st in s["agreement"].items():
            lines.append(f"| {env} | " + " | ".join(
                f"{st[k]['value']:.3f} [{st[k]['lo']:.3f}, {st[k]['hi']:.3f}]"
                for k in ("pearson", "spearman", "mmrv", "false_success")) + " |")
    elif s["models"]:
        lines += ["", "World-model rollouts were recorded without a judge (--judge): no "
                      "ranking statistics."]
    if "nothing_moves" in s:
        n = s["nothing_moves"]
        lines += ["", f"The judge on a still video (the start frame throughout, nothing moves; "
                      f"{n['n']} starts): progress {n['progress']:.3f}, success "
                      f"{n['success']:.2f}. A world model's progress near this is the judge's "
                      f"floor, not the policy's."]
    return "\n".join(lines) + "\n"


def write_videos(out: Path, table, policies, ep: int, envs) -> None:
    """Simulator | world model(s) side by side, the first start of every policy."""
    from persistworld.evaluation.videos import side_by_side, write_gif
    for p in policies:
        rows = {}
        for env in envs:
            rec = next(r for r in table[env][p])
            with np.load(out / rec["frames"]) as z:
                rows[env.split(":")[-1]] = z["rgb"]
        T = min(len(v) for v in rows.values())
        write_gif(out / "videos" / f"{p}_ep{ep}.gif",
                  side_by_side({k: v[:T] for k, v in rows.items()}))


def figure(path: Path, s: dict) -> None:
    """World-model vs simulator mean progress per policy, one panel per world model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from persistworld.utils.io import atomic_path
    models = s["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    for ax, env in zip(axes[0], models):
        for p, row in s["policies"].items():
            ax.errorbar(row["sim"]["progress"], row[env]["progress"],
                        xerr=[[row["sim"]["progress"] - row["sim"]["progress_ci"][0]],
                              [row["sim"]["progress_ci"][1] - row["sim"]["progress"]]],
                        yerr=[[row[env]["progress"] - row[env]["progress_ci"][0]],
                              [row[env]["progress_ci"][1] - row[env]["progress"]]],
                        fmt="o", capsize=3, label=p)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        st = s["agreement"][env]
        ax.set_title(f"{env.split(':')[-1]}: r={st['pearson']['value']:.2f}, "
                     f"MMRV={st['mmrv']['value']:.2f}")
        ax.set_xlabel("simulator progress")
        ax.set_ylabel("world-model progress (judge)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
