"""Structured logging: one JSON object per line, and the id of the job being run on every record
logged while it runs.

    from plinth.server import logs

    logs.configure(json=True, level="INFO")      # once, at start-up (`plinth serve`)
    with logs.job_context(job.id):               # around running a job (the worker thread)
        ...                                      # every record logged here carries job_id

The job id lives in a context variable, so it follows the code that runs the job (its thread,
and any asyncio task or `contextvars.copy_context()` started from it) and nothing else: records
from other threads at the same moment carry no job id, or their own.

A JSON line has: time (UTC, ISO 8601, milliseconds), level, logger, message, thread, job_id
when known, exception (the formatted traceback) when the record has one, stack when asked
for, and any `extra={...}` fields the call passed (values JSON cannot hold become strings).
"""

from __future__ import annotations

import json as _json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO

_JOB_ID: ContextVar[str | None] = ContextVar("plinth_job_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "job_id"}


@contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Within the block, records logged by this thread (or context) carry `job_id`."""
    token = _JOB_ID.set(job_id or None)
    try:
        yield
    finally:
        _JOB_ID.reset(token)


def current_job_id() -> str | None:
    """The job id of the enclosing job_context, if any."""
    return _JOB_ID.get()


class JobIdFilter(logging.Filter):
    """Sets `record.job_id` to the current job's id (None outside a job) unless the call gave one
    with extra={"job_id": ...}. Put it on handlers: filters on a logger do not see records that
    propagate to it from child loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _JOB_ID.get()
        return True


def _job_id(record: logging.LogRecord) -> str | None:
    """The record's job id: set by JobIdFilter, else the current context's."""
    job_id = getattr(record, "job_id", None)
    return job_id if job_id is not None else _JOB_ID.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks included, their newlines escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        job_id = _job_id(record)
        if job_id is not None:
            out["job_id"] = job_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        return _json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The human format, with `[job <id>]` before the message of records logged inside a job."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(job_tag)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job_id = _job_id(record)
        record.job_tag = f"[job {job_id}] " if job_id else ""
        return super().format(record)


def configure(json: bool = False, level: int | str = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Log to `stream` (default stderr) from the root logger at `level`, as JSON lines or as
    text, every record carrying the current job id. Calling it again replaces the handler it
    installed before; handlers others installed are left alone. Returns the handler."""
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"unknown log level {level!r}")
        level = logging.getLevelName(name)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_plinth_logs", False)]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._plinth_logs = True  # type: ignore[attr-defined]
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler
