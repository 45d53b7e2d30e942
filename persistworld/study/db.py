"""The votes database: one append-only row per vote (SQLAlchemy Core; SQLite by default).

    votes(id, rater, trial, trial_index, sample, pair, left_model, right_model, choice,
          winner, loser, is_repeat, response_ms, created_at)      UNIQUE(rater, trial)

* Append-only, as public arenas store votes: the code only INSERTs and SELECTs, and on SQLite
  triggers refuse UPDATE and DELETE, so a bug cannot rewrite history.
* One vote per (rater, trial): a replayed request hits the unique constraint and is refused,
  never counted twice, whatever the timing (the constraint, not a read-then-write check, decides).
* Durable: SQLite in WAL mode with ``synchronous=FULL``; a vote is acknowledged only after its
  transaction committed, so ``kill -9`` of the server loses nothing it acknowledged.
* Any SQLAlchemy URL works for a shared server (``--db postgresql+psycopg://...``); the
  SQLite-only pragmas and triggers are then skipped (grant the server INSERT/SELECT only).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from persistworld.errors import UserError

metadata = sa.MetaData()
votes = sa.Table(
    "votes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rater", sa.String(64), nullable=False),
    sa.Column("trial", sa.String(64), nullable=False),
    sa.Column("trial_index", sa.Integer, nullable=False),
    sa.Column("sample", sa.String(128), nullable=False),
    sa.Column("pair", sa.String(64), nullable=False),
    sa.Column("left_model", sa.String(128), nullable=False),
    sa.Column("right_model", sa.String(128), nullable=False),
    sa.Column("choice", sa.String(8), nullable=False),
    sa.Column("winner", sa.String(128), nullable=False),
    sa.Column("loser", sa.String(128), nullable=False),
    sa.Column("is_repeat", sa.Boolean, nullable=False),
    sa.Column("response_ms", sa.Integer, nullable=True),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.UniqueConstraint("rater", "trial", name="one_vote_per_trial"),
    sa.CheckConstraint("choice IN ('left', 'right')", name="choice_is_a_side"),
)

_APPEND_ONLY = [
    "CREATE TRIGGER IF NOT EXISTS votes_no_update BEFORE UPDATE ON votes "
    "BEGIN SELECT RAISE(ABORT, 'votes are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS votes_no_delete BEFORE DELETE ON votes "
    "BEGIN SELECT RAISE(ABORT, 'votes are append-only'); END",
]


class DuplicateVote(Exception):
    """The rater already voted on this trial."""


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def connect(url: str) -> sa.Engine:
    """An engine with the schema in place (created if missing)."""
    try:
        engine = sa.create_engine(url, future=True)
    except (sa.exc.ArgumentError, ImportError, ModuleNotFoundError) as e:
        raise UserError(f"--db {url!r}: not a usable SQLAlchemy URL ({e})") from None
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DB-API connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()
    try:
        metadata.create_all(engine)
        if engine.dialect.name == "sqlite":
            with engine.begin() as conn:
                for stmt in _APPEND_ONLY:
                    conn.exec_driver_sql(stmt)
    except sa.exc.OperationalError as e:
        raise UserError(f"cannot open the votes database {url!r}: {e.orig}") from None
    return engine


def add_vote(engine: sa.Engine, row: dict[str, Any]) -> int:
    """Insert one vote and commit; returns its id. Raises ``DuplicateVote`` on a second vote of
    the same rater on the same trial."""
    row = {**row, "created_at": row.get("created_at")
           or dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")}
    try:
        with engine.begin() as conn:
            res = conn.execute(votes.insert().values(**row))
            return int(res.inserted_primary_key[0])
    except sa.exc.IntegrityError as e:
        raise DuplicateVote(str(e.orig)) from None


def voted_trials(engine: sa.Engine, rater: str) -> set[str]:
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(sa.select(votes.c.trial).where(votes.c.rater == rater))}


def read_votes(engine: sa.Engine) -> pd.DataFrame:
    """All votes in casting order (id)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(votes).order_by(votes.c.id)).mappings().all()
    cols = [c.name for c in votes.columns]
    return pd.DataFrame([dict(r) for r in rows], columns=cols)
