"""The 2AFC study: assignment, the web app's refusals and durability, the report's statistics,
a load test, and the page in a real headless Chromium (Debian's package, driven by selenium)."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from persistworld.errors import UserError
from persistworld.study.create import create_study, load_study
from persistworld.study.loadtest import Server, run_load, synthetic_eval_dirs

IN_CI = os.environ.get("CI") == "true"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    runs = synthetic_eval_dirs(root / "runs", models=3, samples=3, frames=6, size=32)
    return create_study(runs, root / "study", raters=3, repeats=2, seed=1, progress=False)


def test_assignment_is_seeded_complete_and_blind(tmp_path, study_dir):
    study = load_study(study_dir)
    assert len(study["pairs"]) == 3 * 3                      # 3 samples x C(3, 2) model pairs
    again = create_study({m: Path(d["source"]).parents[1] for m, d in study["models"].items()},
                         tmp_path / "again", raters=3, repeats=2, seed=1, progress=False)
    strip = lambda s: {r: x["trials"] for r, x in s["raters"].items()}  # noqa: E731
    assert strip(load_study(again)) == strip(study)          # same seed, same assignment
    for r in study["raters"].values():
        firsts = [t for t in r["trials"] if t["repeat_of"] is None]
        assert sorted(t["pair"] for t in firsts) == sorted(p["pair"] for p in study["pairs"])
        reps = [t for t in r["trials"] if t["repeat_of"] is not None]
        assert len(reps) == 2
        for rep in reps:
            orig = next(t for t in firsts if t["pair"] == rep["repeat_of"])
            assert (rep["left"], rep["right"]) == (orig["right"], orig["left"])  # sides swapped
            assert int(rep["trial"][1:]) > int(orig["trial"][1:])
    # blind: no model name in any file name the browser sees
    names = [f.name for f in (study_dir / "media").iterdir()]
    assert len(names) == 3 * 4 * 3 and not any("model" in n for n in names)
    sides = [t["left"] for r in study["raters"].values() for t in r["trials"]]
    assert len(set(sides)) == 3                              # sides are drawn, not fixed


def test_create_refuses_bad_input(tmp_path, study_dir):
    runs = synthetic_eval_dirs(tmp_path / "runs", models=2, samples=2)
    with pytest.raises(UserError, match="at least two runs"):
        create_study({"a": runs["model00"]}, tmp_path / "s")
    with pytest.raises(UserError, match="no rollout frames"):
        create_study({"a": runs["model00"], "b": tmp_path}, tmp_path / "s")
    with pytest.raises(UserError, match="already holds a study"):
        create_study(runs, study_dir)
    other = synthetic_eval_dirs(tmp_path / "other", models=1, samples=2, seed=5)
    with pytest.raises(UserError, match="ground truth differs"):
        create_study({"a": runs["model00"], "b": other["model00"]}, tmp_path / "s")
    bad = runs["model01"] / "eval" / "autoregressive_14" / "videos" / "ep00000_t000.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="unreadable rollout frames"):
        create_study(runs, tmp_path / "s")
    assert not (tmp_path / "s" / "study.json").exists()


def test_server_refuses_what_it_must_and_survives_kill9(tmp_path, study_dir):
    import httpx
    d = tmp_path / "study"
    shutil.copytree(study_dir, d)
    study = load_study(d)
    name, rater = next(iter(study["raters"].items()))
    api = f"/api/r/{rater['token']}"
    server = Server(d).start()
    try:
        c = httpx.Client(base_url=server.url, timeout=30)
        st = c.get(f"{api}/state").json()
        assert st["done"] == 0 and st["next"]["trial"] == "t0001"
        text = json.dumps(st) + c.get(f"/r/{rater['token']}/trial").text
        assert not any(m in text for m in study["models"])   # names never reach the browser
        assert c.get("/r/not-a-token").status_code == 404
        assert c.get("/api/r/not-a-token/state").status_code == 404
        acked = []
        for t in rater["trials"][:4]:
            r = c.post(f"{api}/vote", json={"trial": t["trial"], "choice": "left",
                                             "response_ms": 900})
            assert r.status_code == 200, r.text
            acked.append(r.json()["vote"])
        first = rater["trials"][0]["trial"]
        assert c.post(f"{api}/vote", json={"trial": first, "choice": "right"}).status_code == 409
        assert c.post(f"{api}/vote", json={"trial": "t0999", "choice": "left"}).status_code == 403
        for body in ({"trial": "t0005", "choice": "up"}, {"trial": "../x", "choice": "left"},
                     {"trial": "t0005", "choice": "left", "winner": "model00"}, {}):
            assert c.post(f"{api}/vote", json=body).status_code == 422
        assert c.post(f"{api}/vote", content=b"{not json",
                      headers={"content-type": "application/json"}).status_code == 422
        for path in ("/media/..%2Fstudy.json", "/media/study.json", "/static/..%2Fserver.py",
                     "/media/%2e%2e%2fvotes.sqlite"):
            assert c.get(path).status_code == 404, path
        video = st["next"]["reference"]["ext1"]
        r = c.get(video)
        assert r.status_code == 200 and r.headers["content-type"] == "video/webm"
        assert r.content[:4] == b"\x1a\x45\xdf\xa3"           # EBML header: a WebM file
        assert c.get("/admin/wrong").status_code == 403
        assert "Win rates" in c.get(f"/admin/{study['admin_token']}").text
        c.close()
        server.kill9()                                      # nothing acknowledged may be lost
        con = sqlite3.connect(d / "votes.sqlite")
        assert [r[0] for r in con.execute("select id from votes order by id")] == acked
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("update votes set choice = 'right'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("delete from votes")
        con.close()
        server.start()                                      # the rater resumes where they were
        st = httpx.get(f"{server.url}{api}/state").json()
        assert st["done"] == 4 and st["next"]["trial"] == rater["trials"][4]["trial"]
    finally:
        server.stop()


def test_report_statistics_and_paper_counts(tmp_path):
    from persistworld.study.report import analyse, consistency, position_bias, win_rates
    # the paper's study: 174 vs 43, one-sided binomial p = 3.5e-20
    votes = pd.DataFrame({"winner": ["ours"] * 174 + ["base"] * 43,
                          "loser": ["base"] * 174 + ["ours"] * 43})
    votes = votes.sample(frac=1.0, random_state=0).reset_index(drop=True)
    votes["rater"] = [f"r{i % 8}" for i in range(len(votes))]
    votes["pair"] = [f"p{i // 4:03d}" for i in range(len(votes))]
    votes["choice"] = np.where(np.arange(len(votes)) % 3 == 0, "left", "right")
    votes["is_repeat"] = False
    wr = win_rates(votes, prefer="ours").set_index("rater")
    pooled = wr.loc["pooled"]
    assert (pooled["model"], pooled["wins"], pooled["losses"]) == ("ours", 174, 43)
    assert pooled["p_value"] == pytest.approx(3.5e-20, rel=0.01)
    assert pooled["cp_high"] == 1.0 and pooled["cp_low"] == pytest.approx(0.7520, abs=1e-4)
    # the paper's "95% CI [72%, 100%]" is the exact one-sided bound at level 0.995
    paper = win_rates(votes, prefer="ours", level=0.995).set_index("rater").loc["pooled"]
    assert round(paper["cp_low"], 2) == 0.72
    two = win_rates(votes).set_index("rater").loc["pooled"]   # two-sided, sorted order
    assert two["model"] == "base" and two["p_value"] == pytest.approx(7.03e-20, rel=0.01)
    assert set(wr.index) == {"pooled", *[f"r{i}" for i in range(8)]}
    res = analyse(votes, prefer="ours", n_resamples=200)
    elo = res["elo"].set_index("player")
    assert elo.loc["ours", "elo"] + elo.loc["base", "elo"] == pytest.approx(1600)
    assert elo.loc["ours", "low"] < elo.loc["ours", "elo"] < elo.loc["ours", "high"]
    bt = res["bradley_terry"].set_index("player")
    # two models: BT win probability = the (pseudo-count smoothed) win share
    p = 1 / (1 + 10 ** ((bt.loc["base", "bt"] - bt.loc["ours", "bt"]) / 400))
    assert p == pytest.approx(174.5 / 218, abs=1e-6)
    pos = position_bias(votes).set_index("rater").loc["pooled"]
    assert pos["left"] == int((votes["choice"] == "left").sum()) and pos["p_value"] < 1e-3
    # consistency: rater a repeats two pairs, once the same winner, once not
    rep = pd.DataFrame({"rater": ["a"] * 4, "pair": ["p1", "p2", "p1", "p2"],
                        "winner": ["x", "x", "x", "y"], "loser": ["y", "y", "y", "x"],
                        "choice": ["left"] * 4, "is_repeat": [False, False, True, True]})
    c = consistency(rep).set_index("rater")
    assert c.loc["a", "repeated"] == 2 and c.loc["a", "consistency"] == 0.5


def test_kappas_by_hand():
    from persistworld.analysis.stats import cohen_kappa
    # p_o = 3/4; marginals a: x 3/4, y 1/4; b: x 1/2, y 1/2 -> p_e = 3/8 + 1/8 = 1/2
    assert cohen_kappa(list("xxxy"), list("xxyy")) == pytest.approx(0.5)
    assert cohen_kappa(list("xy"), list("xy")) == pytest.approx(1.0)


def test_load_20_raters_2000_votes(tmp_path):
    runs = synthetic_eval_dirs(tmp_path / "runs", models=15, samples=1, frames=3)
    study = create_study(runs, tmp_path / "study", raters=20, pairs_per_rater=100, repeats=0,
                         progress=False)
    with Server(study) as server:
        res = run_load(server.url, study, votes_per_rater=100)
    print("study load test:", json.dumps(res))
    assert res["acknowledged"] == res["stored"] == 2000, res["errors"]
    assert res["lost"] == res["duplicates"] == res["unacknowledged_stored"] == 0
    assert res["replays_refused"] == res["replays"] == 100


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        msg = "Debian's chromium and chromium-driver are not installed (bash scripts/install_browser.sh)"
        if IN_CI:
            pytest.fail(f"CI=true but {msg}", pytrace=False)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def test_rater_page_in_headless_chromium(tmp_path, study_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    d = tmp_path / "study"
    shutil.copytree(study_dir, d)
    study = load_study(d)
    rater = study["raters"]["rater02"]
    wait = WebDriverWait(browser, 30)
    with Server(d) as server:
        browser.get(f"{server.url}/r/{rater['token']}")
        assert "reference" in browser.page_source.lower()
        browser.find_element(By.ID, "start").click()
        wait.until(lambda b: b.execute_script("return document.body.dataset.trial") == "t0001")
        js_videos = "return Array.from(document.querySelectorAll('#trial video'))"
        # every video decodes (WebM / VP9 in this Chromium) at the study's frame size
        wait.until(lambda b: b.execute_script(
            js_videos + ".every(v => v.readyState >= 2 && v.videoWidth === 64)"))
        assert browser.execute_script(js_videos + ".length") == 9
        # playback: one clock moves every video, together
        t0 = browser.execute_script(js_videos + "[0].currentTime")
        wait.until(lambda b: b.execute_script(js_videos + "[0].currentTime") != t0)
        times = browser.execute_script(js_videos + ".map(v => v.currentTime)")
        assert max(times) - min(times) < 1e-6
        # the scrubber moves every video to its frame (frame 3 -> its middle, 3.5 / fps)
        browser.execute_script("const s = document.getElementById('scrubber'); s.value = 3;"
                               "s.dispatchEvent(new Event('input'));")
        wait.until(lambda b: b.execute_script(
            js_videos + ".every(v => Math.abs(v.currentTime - 3.5 / 5) < 1e-6 && !v.seeking)"))
        browser.save_screenshot(str(tmp_path / "trial.png"))
        assert (tmp_path / "trial.png").stat().st_size > 10_000
        # vote with the keyboard, then with the mouse
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
        wait.until(lambda b: b.execute_script("return document.body.dataset.trial") == "t0002")
        browser.find_element(By.ID, "vote-right").click()
        wait.until(lambda b: b.execute_script("return document.body.dataset.trial") == "t0003")
        # reload mid-study: continues at the first unvoted trial
        browser.refresh()
        wait.until(lambda b: b.execute_script("return document.body.dataset.trial") == "t0003")
        assert "2 of" in browser.find_element(By.ID, "progress-text").text
    con = sqlite3.connect(d / "votes.sqlite")
    rows = con.execute("select trial, choice, winner, left_model, right_model from votes "
                       "where rater = 'rater02' order by id").fetchall()
    t1, t2 = rater["trials"][:2]
    assert rows == [("t0001", "left", t1["left"], t1["left"], t1["right"]),
                    ("t0002", "right", t2["right"], t2["left"], t2["right"])]


def test_report_command_writes_tables_and_figures(tmp_path, study_dir, capsys):
    from persistworld.cli import main
    from persistworld.study.db import add_vote, connect, sqlite_url
    d = tmp_path / "study"
    shutil.copytree(study_dir, d)
    study = load_study(d)
    engine = connect(sqlite_url(d / "votes.sqlite"))
    for name, r in study["raters"].items():
        for i, t in enumerate(r["trials"]):
            choice = "left" if (i + len(name)) % 3 else "right"
            win, lose = (t["left"], t["right"]) if choice == "left" else (t["right"], t["left"])
            add_vote(engine, {"rater": name, "trial": t["trial"], "trial_index": i,
                              "sample": t["sample"], "pair": t["pair"], "left_model": t["left"],
                              "right_model": t["right"], "choice": choice, "winner": win,
                              "loser": lose, "is_repeat": t["repeat_of"] is not None,
                              "response_ms": 1000})
    with pytest.raises(SystemExit) as e:
        main(["study", "report", str(d), "--resamples", "50", "--prefer", "model00"])
    assert e.value.code == 0
    out = d / "report"
    md = (out / "report.md").read_text()
    assert "Fleiss' kappa" in md and "model00" in md
    for name in ("win_rates", "elo", "bradley_terry", "cohen_kappa", "consistency",
                 "position_bias"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0
    wr = pd.read_csv(out / "tables" / "win_rates.csv")
    assert set(wr["rater"]) == {"pooled", "rater01", "rater02", "rater03"}
    assert (out / "figures" / "win_rates.png").stat().st_size > 5_000
    assert len(pd.read_csv(out / "votes.csv")) == sum(len(r["trials"])
                                                      for r in study["raters"].values())
    with pytest.raises(SystemExit) as e:                    # a wrong model name: one line, exit 2
        main(["study", "report", str(d), "--prefer", "nobody"])
    assert e.value.code == 2 and "--prefer nobody" in capsys.readouterr().err
