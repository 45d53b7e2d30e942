"""Post-training step cost: the step against the sum of its stages run alone, and peak memory
against K and the prefix length.

    .venv/bin/python benchmarks/post_train_step.py parts  [--steps 4] [--threads 2] [-- OVERRIDES]
    .venv/bin/python benchmarks/post_train_step.py memory [--k 2 4 8 16] [--prefix 0 2 4 8]
    .venv/bin/python benchmarks/post_train_step.py held [-- OVERRIDES]

``parts``: builds the trainer of ``experiment=mini`` (or the overrides given after ``--``),
times whole steps as the training loop runs them (S0-S5 with the bookkeeping between), then
each stage timed alone for the same steps (S0 starts, S1+S2 rollouts, S3 score + S3b
select, S4 update, S5 EMA; the same starts and prefix lengths, which set a step's cost), means
over ``--steps``. Overhead = step - sum of stages: the loop's bookkeeping (metrics, gathers,
checks, the progress bar, the final checkpoint).

``memory``: one fresh process per setting (peak resident memory only grows within a
process), each running one step of 2 prefixes with K candidates each and a fixed prefix length
P; prints the peak RSS above the process's own after loading (CPU), or
``torch.cuda.max_memory_allocated`` with ``--device cuda``. Expect linear in K (candidates are a
batch) and flat in P (the prefix is rolled out without gradients, one chunk at a time).

``held``: the float tensors the built trainer holds (every distinct storage reachable from it,
``persistworld/utils/census.py``), by part, against the base model's own weights.

A benchmark, not a test: numbers depend on the machine and its load (run it alone).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build(overrides: list[str], run_dir: str):
    from hydra import compose, initialize_config_module
    from persistworld.trainers.post_train import PostTrainer
    ov = ["experiment=mini", f"base_model={REPO / 'models/mini_droid_base.pt'}",
          f"data.root={REPO / 'data/mini_droid'}", f"run_dir={run_dir}",
          "trainer.progress=false", "eval.enabled=false", *overrides]
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        cfg = compose("post_train", overrides=ov)
    return PostTrainer(cfg, overrides=ov)


def one_step(tr) -> dict:
    """One training step as ``PostTrainer.train`` runs it, with each stage timed."""
    from persistworld.rewards.group import best_of_n
    t0 = time.perf_counter()
    batch, P, seeds = tr.stage_starts(tr.progress)                       # S0
    t1 = time.perf_counter()
    cands, truth = tr.stage_rollouts(batch, P, seeds)                    # S1 + S2
    t2 = time.perf_counter()
    R, A, r, info = tr.stage_score(cands, truth)                         # S3
    keep = best_of_n(R, tr.cfg.rollout.best_of_n)                        # S3b
    t3 = time.perf_counter()
    tr.stage_update(cands, keep, r, tr.progress)                         # S4
    t4 = time.perf_counter()
    tr.stage_ema(tr.progress)                                            # S5
    tr.progress = tr.progress.advanced(tr.setup.batch_prefixes)
    t5 = time.perf_counter()
    return {"starts": t1 - t0, "rollouts": t2 - t1, "score": t3 - t2, "update": t4 - t3,
            "ema": t5 - t4, "inputs": (batch, P, seeds, cands, truth, keep, r)}


def parts(a, overrides: list[str]) -> None:
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tr = build([*overrides, f"trainer.num_threads={a.threads}"], tmp)
        one_step(tr)                                                     # warm-up
        # whole steps through the trainer's own loop (metrics, checkpoints, progress bar)
        tr.cfg.trainer.steps = tr.step + a.steps
        tr.cfg.trainer.ckpt_every = 10 ** 9
        t = time.perf_counter()
        done = tr.progress
        _loop(tr)
        step = (time.perf_counter() - t) / (tr.step - done.step)
        # each stage alone, timed on its own, for the SAME steps (same starts and prefix
        # lengths: the cost of a step depends on its P)
        tr.progress = done
        alone = {k: [] for k in ("starts", "rollouts", "score", "update", "ema")}
        for _ in range(a.steps):
            s = one_step(tr)
            for k in alone:
                alone[k].append(s[k])
        med = {k: statistics.mean(v) for k, v in alone.items()}
        total = sum(med.values())
        print(f"{tr.setup.describe()}; {a.threads} threads")
        print(" | ".join(f"{k} {v:.3f} s" for k, v in med.items()))
        print(f"step in the training loop {step:.3f} s (mean of {a.steps}); sum of stages alone "
              f"{total:.3f} s; orchestration overhead {(step - total) / step * 100:+.1f}%")


def _loop(tr) -> None:
    """PostTrainer.train without the run-directory start-up and the final model/evaluation."""
    import persistworld.trainers.post_train as pt
    finish, plan = tr.finish, tr.plan_start
    tr.finish = lambda: None
    tr.plan_start = lambda: ("train", None)
    tr.record_identity = lambda: None
    try:
        pt.PostTrainer.train(tr)
    finally:
        tr.finish, tr.plan_start = finish, plan


def held(overrides: list[str]) -> None:
    from persistworld.utils.census import held_tensors, storage_key
    from persistworld.world_model import load_world_model

    def mb(obj) -> float:
        return sum({storage_key(t): t.untyped_storage().nbytes() for t in held_tensors(obj)
                    if t.is_floating_point()}.values()) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tr = build(overrides, tmp)
        base = sum(p.numel() * p.element_size()
                   for p in load_world_model(tr.cfg.base_model).parameters()) / 1e6
        print(f"base model weights {base:.2f} MB; the trainer holds {mb(tr):.2f} MB of float "
              f"tensors ({mb(tr) / base:.2f}x): model + adapters + encoders "
              f"{mb([tr.model, tr.roles]):.2f} MB, reward (LPIPS) {mb(tr.reward):.2f} MB, "
              f"roles {tr.roles.roles}")


def memory_one(k: int, p: int, device: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tr = build([f"rollout.group_size={k}", "rollout.best_of_n=null", "trainer.batch_size=2",
                    f"rollout.prefix.low={p}", f"rollout.prefix.high={p}",
                    "rollout.start_pool_chunks=9", f"trainer.device={device}",
                    f"trainer.num_threads={threads}"], tmp)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = time.perf_counter()
        one_step(tr)
        sec = time.perf_counter() - t
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"k": k, "prefix": p, "peak_mb": peak / 2 ** 20, "sec": sec}


def memory(a) -> None:
    rows = []
    for k, p in [(k, a.prefix[0]) for k in a.k] + [(a.k[0], p) for p in a.prefix[1:]]:
        out = subprocess.run([sys.executable, __file__, "_memory_one", str(k), str(p),
                              a.device, str(a.threads)], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"K={r['k']:3d} P={r['prefix']:2d}: peak +{r['peak_mb']:8.1f} MB  ({r['sec']:.1f} s)",
              flush=True)
    ks = [r for r in rows if r["prefix"] == a.prefix[0]]
    if len(ks) > 1:
        slope = (ks[-1]["peak_mb"] - ks[0]["peak_mb"]) / (ks[-1]["k"] - ks[0]["k"])
        pred = [ks[0]["peak_mb"] + slope * (r["k"] - ks[0]["k"]) for r in ks]
        dev = max(abs(r["peak_mb"] - q) / max(r["peak_mb"], 1e-9) for r, q in zip(ks, pred))
        print(f"vs K: {slope:.1f} MB per candidate; largest deviation from the line through "
              f"the ends {dev * 100:.1f}%")
    ps = [r for r in rows if r["k"] == a.k[0]]
    if len(ps) > 1:
        lo, hi = min(r["peak_mb"] for r in ps), max(r["peak_mb"] for r in ps)
        print(f"vs P (K={a.k[0]}): peak from {lo:.1f} to {hi:.1f} MB over P = "
              f"{[r['prefix'] for r in ps]}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_one":
        k, p, device, threads = sys.argv[2:6]
        print(json.dumps(memory_one(int(k), int(p), device, int(threads))))
        return
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["parts", "memory", "held"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--prefix", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.what == "held":
        held(overrides)
    else:
        parts(a, overrides) if a.what == "parts" else memory(a)


if __name__ == "__main__":
    main()
