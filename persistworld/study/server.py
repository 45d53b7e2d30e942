"""``persistworld study serve``: the 2AFC web app (FastAPI + uvicorn; votes in ``db.py``).

Pages (HTML + one script from ``persistworld/assets/study``):
    /r/<token>            instructions for the rater, then "start"
    /r/<token>/trial      the trial page: reference on top, two candidates below (sides as
                          assigned, labels "A" / "B" only), one clock and one frame scrubber for
                          every video, keys left / right (and space: play / pause)
    /admin/<admin token>  progress per rater and the study's statistics (``report.py``)
JSON API (what the page uses):
    GET  /api/r/<token>/state   progress and the next unvoted trial (a reload resumes there)
    POST /api/r/<token>/vote    {"trial": "t0007", "choice": "left"|"right", "response_ms": 812}
Media: GET /media/<random name>.webm, only names the study lists (nothing else under the study
directory, or outside it, is reachable).

Refusals, each with a JSON ``detail`` saying why: 404 unknown rater link / media, 403 a trial
not assigned to this rater or a wrong admin token, 409 a trial already voted (a replayed or
double-sent request; the database's unique constraint decides), 422 a malformed body. The model
names never leave the server: trials carry only video URLs and the side labels.
"""

import argparse
import secrets
from pathlib import Path
from typing import Literal

from persistworld.errors import UserError
from persistworld.study import DB_FILE, MEDIA_DIR
from persistworld.study.create import load_study
from persistworld.study.db import DuplicateVote, add_vote, connect, read_votes, sqlite_url, \
    voted_trials

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "study"


def create_app(study_dir: str | Path, db_url: str | None = None):
    """The FastAPI application of one study directory."""
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
        from pydantic import BaseModel, ConfigDict, Field
    except ImportError as e:  # pragma: no cover - installed by scripts/install.sh
        raise UserError("the study server needs fastapi and uvicorn: pip install "
                        "'persistworld[study]'") from e

    study_dir = Path(study_dir).resolve()
    study = load_study(study_dir)
    media_dir = (study_dir / MEDIA_DIR).resolve()
    engine = connect(db_url or sqlite_url(study_dir / DB_FILE))
    by_token = {r["token"]: name for name, r in study["raters"].items()}
    trials = {name: {t["trial"]: (i, t) for i, t in enumerate(r["trials"])}
              for name, r in study["raters"].items()}
    allowed_media = {f for s in study["videos"].values() for who in s.values()
                     for f in who.values()}
    views = study["views"]

    class Vote(BaseModel):
        model_config = ConfigDict(extra="forbid")
        trial: str = Field(pattern=r"^t[0-9]{4,6}$")
        choice: Literal["left", "right"]
        response_ms: int | None = Field(default=None, ge=0, le=24 * 3600 * 1000)

    app = FastAPI(title="persistworld 2AFC study", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine

    def rater_of(token: str) -> str:
        name = by_token.get(token)
        if name is None:
            raise HTTPException(404, "unknown rater link: use the link you were given")
        return name

    def page(name: str) -> HTMLResponse:
        return HTMLResponse((ASSETS / name).read_text(), headers={"Cache-Control": "no-store"})

    def urls(sample: str, who: str) -> dict[str, str]:
        return {v: f"/media/{study['videos'][sample][who][v]}" for v in views}

    def state(rater: str) -> dict:
        done = voted_trials(engine, rater)
        seq = study["raters"][rater]["trials"]
        nxt = next((t for t in seq if t["trial"] not in done), None)
        out = {"done": len(done), "total": len(seq), "views": views, "fps": study["fps"],
               "num_frames": study["num_frames"], "frame_size": study["frame_size"],
               "next": None}
        if nxt is not None:
            out["next"] = {"trial": nxt["trial"], "index": trials[rater][nxt["trial"]][0] + 1,
                           "reference": urls(nxt["sample"], "reference"),
                           "left": urls(nxt["sample"], nxt["left"]),
                           "right": urls(nxt["sample"], nxt["right"])}
        return out

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse("<!DOCTYPE html><title>persistworld study</title><p>This is a "
                            "persistworld 2AFC study. Open the rater link you were given.</p>")

    @app.get("/r/{token}", response_class=HTMLResponse)
    def instructions(token: str):
        rater_of(token)
        return page("instructions.html")

    @app.get("/r/{token}/trial", response_class=HTMLResponse)
    def trial_page(token: str):
        rater_of(token)
        return page("trial.html")

    @app.get("/static/{name}")
    def static(name: str):
        f = ASSETS / name
        if name not in {"study.js", "study.css"} or not f.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(f, headers={"Cache-Control": "no-store"})

    @app.get("/api/r/{token}/state")
    def get_state(token: str):
        return JSONResponse(state(rater_of(token)), headers={"Cache-Control": "no-store"})

    @app.post("/api/r/{token}/vote")
    def vote(token: str, body: Vote):
        rater = rater_of(token)
        found = trials[rater].get(body.trial)
        if found is None:
            raise HTTPException(403, f"trial {body.trial} is not assigned to this rater")
        index, t = found
        winner, loser = (t["left"], t["right"]) if body.choice == "left" else \
            (t["right"], t["left"])
        try:
            vote_id = add_vote(engine, {
                "rater": rater, "trial": t["trial"], "trial_index": index, "sample": t["sample"],
                "pair": t["pair"], "left_model": t["left"], "right_model": t["right"],
                "choice": body.choice, "winner": winner, "loser": loser,
                "is_repeat": t["repeat_of"] is not None, "response_ms": body.response_ms})
        except DuplicateVote:
            raise HTTPException(409, f"trial {body.trial} was already voted; reload to "
                                     f"continue") from None
        return {"ok": True, "vote": vote_id, "state": state(rater)}

    @app.get("/media/{name}")
    def media(name: str):
        f = (media_dir / name).resolve()
        if name not in allowed_media or f.parent != media_dir or not f.is_file():
            raise HTTPException(404, "no such video")
        return FileResponse(f, media_type="video/webm",
                            headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/admin/{token}", response_class=HTMLResponse)
    def admin(token: str):
        if not secrets.compare_digest(token, study["admin_token"]):
            raise HTTPException(403, "wrong admin token (see links.txt in the study directory)")
        from persistworld.study.report import summary_html
        return HTMLResponse(summary_html(study, read_votes(engine)),
                            headers={"Cache-Control": "no-store"})

    return app


def serve(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8765,
          db_url: str | None = None) -> None:
    import uvicorn
    app = create_app(study_dir, db_url)
    study = load_study(study_dir)
    base = f"http://{host}:{port}"
    print(f"study: serving {study_dir} on {base} (votes: {app.state.engine.url!r})")
    for name, r in study["raters"].items():
        done = len(voted_trials(app.state.engine, name))
        print(f"  {name}: {base}/r/{r['token']}  ({done}/{len(r['trials'])} voted)")
    print(f"  results: {base}/admin/{study['admin_token']}")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def add_serve_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("study", help="the study directory from `persistworld study create`")
    ap.add_argument("--host", default="127.0.0.1",
                    help="interface to bind (default loopback only; 0.0.0.0 exposes it)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--db", default=None,
                    help="SQLAlchemy URL of the votes database (default: <study>/votes.sqlite)")


def serve_main(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: not a port number")
    serve(args.study, args.host, args.port, args.db)
    return 0
