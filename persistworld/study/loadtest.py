"""Load test of a running study server on loopback: concurrent simulated raters, every vote
accounted for (``benchmarks/study_load.py`` and ``tests/test_study.py`` drive it).

Each simulated rater is one thread with its own HTTP connection; it votes its trials in order
(random side, seeded) and re-sends some of its acknowledged votes, which must come back 409.
Afterwards the database must hold exactly the acknowledged votes: none lost, none twice.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from persistworld.study import DB_FILE
from persistworld.study.create import load_study
from persistworld.study.db import connect, read_votes, sqlite_url


def synthetic_eval_dirs(root: Path, models: int, samples: int, frames: int = 4,
                        size: int = 16, seed: int = 0) -> dict[str, Path]:
    """Evaluation directories with ``videos/*.npz`` (the shape evaluations write): a moving
    square on a grey ground per view; each model's prediction is offset by its index."""
    rng = np.random.default_rng(seed)
    out = {}
    truths = []
    for s in range(samples):
        t = np.full((frames, 3, size, size, 3), 90, np.uint8)
        x0 = int(rng.integers(0, size // 2))
        for f in range(frames):
            t[f, :, 4:8, (x0 + f) % (size - 4):(x0 + f) % (size - 4) + 4] = (200, 40, 40)
        truths.append(t)
    for m in range(models):
        d = root / f"model{m:02d}" / "eval" / "autoregressive_14"
        (d / "videos").mkdir(parents=True, exist_ok=True)
        for s, t in enumerate(truths):
            pred = np.clip(t.astype(int) + rng.integers(-8 * m, 8 * m + 1, t.shape), 0, 255)
            np.savez_compressed(d / "videos" / f"ep{s:05d}_t000.npz", truth=t,
                                pred=pred.astype(np.uint8))
        out[f"model{m:02d}"] = d.parents[1]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``persistworld study serve`` as a real process on a free loopback port."""

    def __init__(self, study_dir: Path, port: int | None = None, log: Path | None = None):
        self.study_dir, self.port = Path(study_dir), port or free_port()
        self.log = log or self.study_dir / "serve.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Server":
        import httpx
        exe = Path(sys.executable).with_name("persistworld")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "persistworld.cli"]
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen([*cmd, "study", "serve", str(self.study_dir), "--port",
                                      str(self.port)], stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"study server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"study server not up after {timeout} s ({self.log})")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._log.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_load(base_url: str, study_dir: Path, votes_per_rater: int | None = None,
             replays: int = 5, seed: int = 0) -> dict:
    """Every rater of the study votes concurrently; returns counts and latency percentiles (ms)
    and checks the database against the acknowledged votes."""
    import httpx
    study = load_study(study_dir)
    raters = study["raters"]
    acked: dict[tuple[str, str], int] = {}
    latencies: list[float] = []
    errors: list[str] = []
    replay_codes: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(len(raters))

    def rater(i: int, name: str) -> None:
        rng = np.random.default_rng([seed, i])
        trials = raters[name]["trials"][:votes_per_rater]
        mine = []
        with httpx.Client(base_url=base_url, timeout=30.0) as c:
            start.wait()
            for t in trials:
                body = {"trial": t["trial"], "choice": "left" if rng.random() < 0.5 else "right",
                        "response_ms": int(rng.integers(300, 5000))}
                t0 = time.perf_counter()
                r = c.post(f"/api/r/{raters[name]['token']}/vote", json=body)
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(dt)
                    if r.status_code == 200:
                        acked[(name, t["trial"])] = r.json()["vote"]
                        mine.append(body)
                    else:
                        errors.append(f"{name} {t['trial']}: {r.status_code} {r.text[:100]}")
            for body in mine[:replays]:
                r = c.post(f"/api/r/{raters[name]['token']}/vote", json=body)
                with lock:
                    replay_codes.append(r.status_code)

    threads = [threading.Thread(target=rater, args=(i, n)) for i, n in enumerate(raters)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    db = read_votes(connect(sqlite_url(Path(study_dir) / DB_FILE)))
    stored = {(r.rater, r.trial): int(r.id) for r in db.itertuples()}
    lat = np.asarray(latencies)
    return {"raters": len(raters), "votes_sent": len(latencies), "acknowledged": len(acked),
            "stored": len(db), "lost": sum(1 for k, v in acked.items() if stored.get(k) != v),
            "duplicates": int(db.duplicated(["rater", "trial"]).sum()),
            "unacknowledged_stored": len(set(stored) - set(acked)),
            "replays": len(replay_codes), "replays_refused": replay_codes.count(409),
            "errors": errors[:10], "wall_s": round(wall, 2),
            "votes_per_s": round(len(latencies) / wall, 1),
            "latency_ms": {q: round(float(np.percentile(lat, p)), 2) for q, p in
                           (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}}
