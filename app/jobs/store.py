"""The job store: SQLite (WAL), one file under the data directory, safe across processes and ``kill -9``.

Every state change is one committed transaction; a job accepted with 202 is in the database before the
answer leaves. Connections are opened per operation, so threads and worker processes never share one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    model TEXT NOT NULL,
    options TEXT NOT NULL,
    inputs TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    delete_requested INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    artifacts TEXT NOT NULL DEFAULT '[]',
    timings TEXT NOT NULL DEFAULT '{}',
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
CREATE TABLE IF NOT EXISTS workers (
    slot INTEGER PRIMARY KEY,
    pid INTEGER,
    device TEXT,
    ready INTEGER NOT NULL DEFAULT 0,
    heartbeat REAL
);
"""


@dataclass
class Job:
    id: str
    owner: str
    state: str
    model: str
    options: dict[str, Any]
    inputs: list[str]
    created_at: float
    stage: str | None = None
    progress: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: int | None = None
    cancel_requested: bool = False
    delete_requested: bool = False
    error_code: str | None = None
    error_message: str | None = None
    warnings: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    purged_at: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        for name in ("options", "inputs", "warnings", "artifacts", "timings"):
            data[name] = json.loads(data[name])
        data["cancel_requested"] = bool(data["cancel_requested"])
        data["delete_requested"] = bool(data["delete_requested"])
        return cls(**data)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class Recovery:
    requeued: list[str]
    failed: list[str]


class JobStore:
    """Jobs, API keys and worker heartbeats in one SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def ping(self) -> None:
        with self._connect() as db:
            db.execute("SELECT 1").fetchone()

    # --- API keys ------------------------------------------------------------------------------

    def add_key(self, key_id: str, name: str, key_hash: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
                       (key_id, name, key_hash, time.time()))

    def key_for_hash(self, key_hash: str) -> ApiKey | None:
        with self._connect() as db:
            row = db.execute("SELECT id, name, created_at, revoked_at FROM api_keys WHERE key_hash = ? "
                             "AND revoked_at IS NULL", (key_hash,)).fetchone()
        return ApiKey(**dict(row)) if row else None

    def list_keys(self) -> list[ApiKey]:
        with self._connect() as db:
            rows = db.execute("SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at").fetchall()
        return [ApiKey(**dict(row)) for row in rows]

    def revoke_key(self, id_or_name: str) -> ApiKey | None:
        with self._transaction() as db:
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                       (time.time(), id_or_name, id_or_name))
            row = db.execute("SELECT id, name, created_at, revoked_at FROM api_keys WHERE id = ? OR name = ?",
                             (id_or_name, id_or_name)).fetchone()
        return ApiKey(**dict(row)) if row else None

    # --- jobs ----------------------------------------------------------------------------------

    def add_job(self, job: Job, max_queued: int) -> bool:
        """Insert a queued job unless ``max_queued`` jobs already wait; the check and insert are atomic."""
        with self._transaction() as db:
            (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
            if queued >= max_queued:
                return False
            db.execute(
                "INSERT INTO jobs (id, owner, state, model, options, inputs, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.owner, "queued", job.model, json.dumps(job.options), json.dumps(job.inputs),
                 job.created_at))
        return True

    def count_queued(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0])

    def mean_run_seconds(self, recent: int = 20, default: float = 60.0) -> float:
        """How long the last ``recent`` succeeded jobs ran, on average (for Retry-After)."""
        with self._connect() as db:
            rows = db.execute("SELECT finished_at - started_at FROM jobs WHERE state = 'succeeded' AND started_at "
                              "IS NOT NULL ORDER BY finished_at DESC LIMIT ?", (recent,)).fetchall()
        return sum(r[0] for r in rows) / len(rows) if rows else default

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list_for(self, owner: str, limit: int = 100, offset: int = 0) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE owner = ? AND delete_requested = 0 "
                              "ORDER BY created_at DESC LIMIT ? OFFSET ?", (owner, limit, offset)).fetchall()
        return [Job.from_row(row) for row in rows]

    def queue_position(self, job: Job) -> int | None:
        """Queued jobs ahead of ``job`` (``None`` unless it is queued)."""
        if job.state != "queued":
            return None
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND created_at < ?",
                                  (job.created_at,)).fetchone()[0])

    def deleted_ids(self) -> list[str]:
        """Finished jobs whose owner asked for deletion while they ran: their files and rows can go."""
        with self._connect() as db:
            rows = db.execute("SELECT id FROM jobs WHERE delete_requested = 1 AND state IN "
                              "('succeeded', 'failed', 'cancelled')").fetchall()
        return [row[0] for row in rows]

    def jobs_in(self, *states: str) -> list[Job]:
        marks = ", ".join("?" for _ in states)
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at", states).fetchall()
        return [Job.from_row(row) for row in rows]

    def claim_next(self, worker: int, *, count_attempt: bool = True) -> Job | None:
        """The oldest queued job, now running on ``worker``; ``None`` when nothing waits. A job claimed to be read
        ahead (``count_attempt=False``) has its attempt counted only when its prediction starts
        (:meth:`count_attempt`): a crash while it only waited is not held against it."""
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', worker = ?, started_at = ?, attempts = attempts + ?, "
                       "stage = 'starting', progress = 0 WHERE id = ?",
                       (worker, time.time(), int(count_attempt), row["id"]))
            claimed = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return Job.from_row(claimed)

    def count_attempt(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ? AND state = 'running'", (job_id,))

    def report_progress(self, job_id: str, stage: str, progress: float) -> bool:
        """Record progress; returns whether a cancel has been asked for."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET stage = ?, progress = ? WHERE id = ? AND state = 'running'",
                       (stage, round(progress, 4), job_id))
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row is None or row["cancel_requested"])

    def finish(self, job_id: str, state: str, *, error_code: str | None = None, error_message: str | None = None,
               warnings: list[str] | None = None, artifacts: list[str] | None = None,
               timings: dict[str, float] | None = None) -> None:
        if state not in TERMINAL:
            raise ValueError(f"not a final state: {state}")
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error_code = ?, error_message = ?, warnings = ?, "
                "artifacts = ?, timings = ?, progress = CASE WHEN ? = 'succeeded' THEN 1 ELSE progress END, "
                "stage = CASE WHEN ? = 'succeeded' THEN 'done' ELSE stage END WHERE id = ?",
                (state, time.time(), error_code, error_message, json.dumps(warnings or []),
                 json.dumps(artifacts or []), json.dumps(timings or {}), state, state, job_id))

    def requeue(self, job_id: str, *, count_attempt: bool = True) -> None:
        """Back to the queue (a worker shut down or died under it)."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state = 'queued', worker = NULL, stage = NULL, progress = 0, "
                       "started_at = NULL, attempts = attempts - ? WHERE id = ? AND state = 'running'",
                       (0 if count_attempt else 1, job_id))

    def request_cancel(self, job_id: str, delete: bool) -> Job | None:
        """Ask a job to stop; a queued one is cancelled at once. Returns the job as it now stands."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET cancel_requested = 1, delete_requested = MAX(delete_requested, ?) "
                       "WHERE id = ?", (int(delete), job_id))
            db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ? AND state = 'queued'",
                       (time.time(), job_id))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self, max_attempts: int) -> Recovery:
        """After a restart: jobs left running were interrupted; they run again, unless they keep crashing."""
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempts, cancel_requested FROM jobs WHERE state = 'running'").fetchall()
            requeued, failed = [], []
            for row in rows:
                if row["cancel_requested"]:
                    db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?",
                               (time.time(), row["id"]))
                elif row["attempts"] >= max_attempts:
                    db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error_code = 'JOB_CRASHED', "
                               "error_message = ? WHERE id = ?",
                               (time.time(), f"the job was interrupted {row['attempts']} times (server or worker "
                                             "crashed while it ran); not retried again", row["id"]))
                    failed.append(row["id"])
                else:
                    db.execute("UPDATE jobs SET state = 'queued', worker = NULL, stage = NULL, progress = 0, "
                               "started_at = NULL WHERE id = ?", (row["id"],))
                    requeued.append(row["id"])
            db.execute("DELETE FROM workers")
        return Recovery(requeued, failed)

    def known_ids(self) -> set[str]:
        with self._connect() as db:
            return {row[0] for row in db.execute("SELECT id FROM jobs").fetchall()}

    def expired(self, finished_before: float) -> list[str]:
        with self._connect() as db:
            rows = db.execute("SELECT id FROM jobs WHERE finished_at < ? AND purged_at IS NULL",
                              (finished_before,)).fetchall()
        return [row[0] for row in rows]

    def studies_in_use(self) -> set[str]:
        """The DICOMweb studies that jobs whose files are kept (queued, running, or finished within retention) were
        made from: their inputs lie in the server's DICOMweb cache."""
        with self._connect() as db:
            rows = db.execute("SELECT DISTINCT json_extract(options, '$.pacs.study') FROM jobs WHERE purged_at IS NULL "
                              "AND json_extract(options, '$.pacs.study') IS NOT NULL").fetchall()
        return {str(row[0]) for row in rows}

    def mark_purged(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET purged_at = ?, artifacts = '[]' WHERE id = ?", (time.time(), job_id))

    # --- workers -------------------------------------------------------------------------------

    def worker_beat(self, slot: int, pid: int, device: str, ready: bool) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO workers (slot, pid, device, ready, heartbeat) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (slot) DO UPDATE SET pid = excluded.pid, device = excluded.device, "
                       "ready = excluded.ready, heartbeat = excluded.heartbeat",
                       (slot, pid, device, int(ready), time.time()))

    def workers(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            return [dict(row) for row in db.execute("SELECT * FROM workers ORDER BY slot").fetchall()]
