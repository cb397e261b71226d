"""The job store: every job's record and events in SQLite, so they outlive the process.

One file, data_dir/jobs.sqlite3, in WAL mode. Writes go through one writer thread that commits
whatever has piled up in one transaction: the worker hands over a progress event per sampler
step and never waits for the disk. The two writes that matter for what a client was told wait
for their commit: a job's insert (Submit returns its id only once it is stored) and its end
(no watcher sees a terminal event the store could lose). With synchronous=NORMAL a commit
survives the process being killed; a power cut may lose the last transactions.

Output images are not in the database: they are content-addressed files (Workspace.save_image),
and stored Output events keep only each image's id, filename, size and kind. Preview bytes and
the images uploaded with a request are not kept at all.

Schema (user_version 1):
    jobs(n INTEGER PRIMARY KEY, id TEXT UNIQUE, created_at, priority, status, omit_image_bytes,
         graph TEXT (API-format JSON), workflow TEXT (the editor file, or NULL), started_at,
         finished_at, error, outputs TEXT (JSON list of image refs with node_id),
         nodes TEXT (JSON node_id -> {class_type, status, seconds}))
    events(job_id, seq, time, kind (the payload's class name), payload TEXT (JSON)),
           primary key (job_id, seq)
`n` is insertion order: ListJobs pages newest first by it, with the last `n` as the page token.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, get_args

from plinth.nodes.core.context import ImageRef
from plinth.server.engine import events as ev
from plinth.server.engine.executor import NodeRun
from plinth.server.jobs.job import Job, JobStatus, stopped_reason

log = logging.getLogger("plinth.store")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    n INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    omit_image_bytes INTEGER NOT NULL,
    graph TEXT NOT NULL,
    workflow TEXT,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',
    nodes TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, n);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""
JOB_COLUMNS = "n, id, created_at, priority, status, omit_image_bytes, started_at, finished_at, error, outputs, nodes"
PAYLOADS = {cls.__name__: cls for cls in get_args(ev.EventPayload)}
# Most writes the writer thread puts in one transaction.
BATCH = 2000
# Seconds an unwaited write waits for others to share its commit: a job's events (a sampler
# step each) go in a few transactions instead of one each, which took CPU from the run.
LINGER = 0.005

Statement = tuple[str, tuple[Any, ...]]


class StoreError(RuntimeError):
    """The job store cannot be used: closed, or its data directory held by another server."""


class JobStore:
    """Jobs and their events in one SQLite file. Thread-safe: any thread may write (writes are
    queued to the writer thread, in the order they are made) or read (one reading connection
    behind a lock; WAL lets it read while the writer commits)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_file = _hold_lock(self.path.with_name(self.path.name + ".lock"))
        self._db = _connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise StoreError(f"{self.path} has schema version {version}; this Plinth knows {SCHEMA_VERSION}")
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._read_lock = threading.Lock()
        self._writes: queue.SimpleQueue[tuple[list[Statement], Future | None] | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # no write is queued behind the writer's stop
        self._writer = threading.Thread(
            target=self._write_loop, args=(_connect(self.path),), name="plinth-store", daemon=True
        )
        self._writer.start()

    # startup

    def recover(self) -> list[str]:
        """Mark the jobs a previous process left queued or running as failed, with the reason
        and a Failed event, and return their ids. Run once, before this process takes jobs.

        Failing them rather than queueing them again: their uploaded images are gone, and a
        client that saw the server go away decides itself whether to submit again.
        """
        now = time.time()
        with self._read_lock:
            left = self._db.execute(
                "SELECT id, status FROM jobs WHERE status IN (?, ?) ORDER BY n",
                (JobStatus.QUEUED.value, JobStatus.RUNNING.value),
            ).fetchall()
            statements = []
            for job_id, status in left:
                reason = stopped_reason(JobStatus(status))
                seq = self._db.execute(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM events WHERE job_id = ?", (job_id,)
                ).fetchone()[0]
                failed = ev.Event(job_id, seq, now, ev.Failed(reason, error_type="ServerStopped"))
                statements += [
                    (
                        "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                        (JobStatus.FAILED.value, reason, now, job_id),
                    ),
                    _event_row(failed),
                ]
        self._write(statements, wait=True)
        return [job_id for job_id, _ in left]

    # writes (the JobJournal a live job records itself in)

    def add(self, job: Job) -> None:
        """Store a new job; returns once committed, raises if it could not be."""
        graph = job.plan.graph
        self._write(
            [
                (
                    "INSERT INTO jobs (id, created_at, priority, status, omit_image_bytes, graph, workflow)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.id,
                        job.created_at,
                        job.priority,
                        job.status.value,
                        int(job.omit_image_bytes),
                        json.dumps(graph.raw),
                        None if graph.workflow is None else json.dumps(graph.workflow),
                    ),
                )
            ],
            wait=True,
        )

    def event(self, event: ev.Event) -> None:
        """Queue one event; the worker never waits for it (one a sampler step)."""
        self._write([_event_row(event)], wait=False)

    def started(self, job: Job) -> None:
        """Queue the job's move to running (not waited for: recovery fails queued and running alike)."""
        self._write(
            [("UPDATE jobs SET status = ?, started_at = ? WHERE id = ?", (job.status.value, job.started_at, job.id))],
            wait=False,
        )

    def finished(self, job: Job, status: JobStatus, event: ev.Event) -> None:
        """The job's end and its terminal event, in one transaction; waits for the commit. A
        failed write is logged, not raised: the job still ends for those watching it."""
        outputs = [
            {
                "id": i.id,
                "node_id": job.output_nodes.get(i.id, ""),
                "filename": i.filename,
                "width": i.width,
                "height": i.height,
                "kind": i.kind,
            }
            for i in job.outputs
        ]
        nodes = {k: dataclasses.asdict(v) for k, v in job.nodes.items()}
        try:
            self._write(
                [
                    (
                        "UPDATE jobs SET status = ?, started_at = ?, finished_at = ?, error = ?, outputs = ?, nodes = ?"
                        " WHERE id = ?",
                        (
                            status.value,
                            job.started_at,
                            job.finished_at,
                            job.error,
                            json.dumps(outputs),
                            json.dumps(nodes),
                            job.id,
                        ),
                    ),
                    _event_row(event),
                ],
                wait=True,
            )
        except (sqlite3.Error, StoreError):
            log.exception("could not store the end of job %s", job.id)

    def flush(self) -> None:
        """Return once every write made before this call is committed."""
        self._write([], wait=True)

    # reads

    def load(self, job_id: str) -> Job | None:
        """A stored job with its events (Output images without their bytes), or None."""
        with self._read_lock:
            row = self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            events = self._db.execute(
                "SELECT seq, time, kind, payload FROM events WHERE job_id = ? ORDER BY seq", (job_id,)
            ).fetchall()
        job = _job(row)
        job.events = [ev.Event(job_id, seq, t, _payload(kind, payload)) for seq, t, kind, payload in events]
        return job

    def list(
        self, statuses: Iterable[JobStatus] = (), limit: int = 100, before: int | None = None
    ) -> tuple[list[Job], int | None]:
        """Up to `limit` jobs newest first, only those in `statuses` if any are given, starting
        after the cursor `before`; and the cursor for the next page (None on the last one). The
        jobs are summaries: their events are not loaded. Flushes first, so the page includes
        every job submitted and every change made before the call."""
        self.flush()
        wanted = [s.value for s in statuses]
        where = ["n < ?"] if before is not None else []
        params: list[Any] = [before] if before is not None else []
        if wanted:
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            params += wanted
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY n DESC LIMIT ?"
        )
        with self._read_lock:
            rows = self._db.execute(sql, (*params, limit + 1)).fetchall()
        page = rows[:limit]
        return [_job(r) for r in page], (page[-1][0] if len(rows) > limit else None)

    def close(self) -> None:
        """Commit what is queued, stop the writer and release the data directory."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._writes.put(None)
        self._writer.join()
        with self._read_lock:
            self._db.close()
        self._lock_file.close()

    # the writer thread

    def _write(self, statements: list[Statement], wait: bool) -> None:
        done: Future | None = Future() if wait else None
        with self._closing:
            if self._closed:
                if not statements:
                    return  # a flush: close() committed everything
                if wait:
                    raise StoreError(f"the job store {self.path} is closed")
                log.warning("job store closed; dropped %d write(s)", len(statements))
                return
            self._writes.put((statements, done))
        if done is not None:
            done.result()

    def _write_loop(self, db: sqlite3.Connection) -> None:
        """Take what is queued (up to BATCH writes) and commit it as one transaction; when that
        fails, commit each write alone so one bad write does not lose the others."""
        closing = False
        while not closing:
            batch = [self._writes.get()]
            linger_until = time.monotonic() + LINGER
            while len(batch) < BATCH and batch[-1] is not None:
                # Unwaited writes (events) linger a little to share a commit; a waited one
                # (a submit, a job's end) is committed at once with whatever is queued.
                remaining = linger_until - time.monotonic() if batch[-1][1] is None else 0.0
                try:
                    batch.append(self._writes.get(timeout=remaining) if remaining > 0 else self._writes.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:
                closing = True
                batch.pop()
            try:
                _commit(db, [s for statements, _ in batch for s in statements])
            except sqlite3.Error:
                for statements, done in batch:
                    try:
                        _commit(db, statements)
                    except sqlite3.Error as exc:
                        log.exception("job store write failed")
                        if done is not None:
                            done.set_exception(exc)
                        continue
                    if done is not None:
                        done.set_result(None)
                continue
            for _, done in batch:
                if done is not None:
                    done.set_result(None)
        db.close()


def _connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) usable from any thread."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _hold_lock(path: Path):
    """An exclusive lock on `path`, held while the returned file is open: two servers on one
    data directory would each take the other's live jobs for leftovers of a crash. The OS
    drops the lock when the process dies, however it dies."""
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StoreError(f"{path.parent} is in use by another Plinth server (it holds {path})") from None
    return handle


def _commit(db: sqlite3.Connection, statements: list[Statement]) -> None:
    if not statements:
        return
    db.execute("BEGIN")
    try:
        for sql, params in statements:
            db.execute(sql, params)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _event_row(event: ev.Event) -> Statement:
    p = event.payload
    if isinstance(p, ev.Output):
        data: dict[str, Any] = {
            "node_id": p.node_id,
            "images": [
                {"id": i.id, "filename": i.filename, "width": i.width, "height": i.height, "kind": i.kind}
                for i in p.images
            ],
        }
    else:
        data = dataclasses.asdict(p)
    return (
        "INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
        (event.job_id, event.seq, event.time, type(p).__name__, json.dumps(data)),
    )


def _payload(kind: str, payload: str) -> ev.EventPayload:
    data = json.loads(payload)
    if kind == "Output":
        return ev.Output(data["node_id"], [ImageRef(png=b"", **i) for i in data["images"]])
    return PAYLOADS[kind](**data)


def _job(row: tuple) -> Job:
    """A stored job without plan, request or events."""
    _, job_id, created_at, priority, status, omit, started_at, finished_at, error, outputs, nodes = row
    images = json.loads(outputs)
    return Job(
        None,
        None,
        priority,
        omit_image_bytes=bool(omit),
        id=job_id,
        status=JobStatus(status),
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        error=error,
        outputs=[ImageRef(i["id"], i["filename"], i["width"], i["height"], b"", i["kind"]) for i in images],
        output_nodes={i["id"]: i["node_id"] for i in images},
        nodes={k: NodeRun(**v) for k, v in json.loads(nodes).items()},
    )
