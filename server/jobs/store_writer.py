"""The job store's writer thread: every write to the job store goes through it, in the order
made, and what has piled up is committed in one transaction (see server/jobs/store.py).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger("plinth.store")

# Most writes the writer thread puts in one transaction.
BATCH = 2000
# Seconds an unwaited write waits for others to share its commit: a job's events (a sampler
# step each) go in a few transactions instead of one each, which took CPU from the run.
LINGER = 0.005

Statement = tuple[str, tuple[Any, ...]]


class StoreError(RuntimeError):
    """The job store cannot be used: closed, or its data directory held by another server."""


class StoreWriter:
    """Commits queued writes on its own thread and connection to the store at `path`."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self._writes: queue.SimpleQueue[tuple[list[Statement], Future | None] | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # no write is queued behind the writer's stop
        self._thread = threading.Thread(target=self._loop, args=(db,), name="plinth-store", daemon=True)
        self._thread.start()

    def close(self) -> bool:
        """Commit what is queued and stop the thread; False when it was already closed."""
        with self._closing:
            if self._closed:
                return False
            self._closed = True
            self._writes.put(None)
        self._thread.join()
        return True

    def write(self, statements: list[Statement], wait: bool) -> None:
        """Queue `statements` for one transaction; with `wait`, return once committed (raising
        what the commit raised)."""
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

    def _loop(self, db: sqlite3.Connection) -> None:
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
