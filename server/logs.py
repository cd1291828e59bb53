"""Log lines: one JSON object per line for a log pipeline (``LOG_FORMAT=json``,
the default), or plain text for a terminal (``LOG_FORMAT=text``).

Each line has time (UTC, ISO 8601), level, logger, message and pid; a line
written while a call runs also has the call's ``call_id``, ``method`` and
``user`` (set by the dispatcher, server/dispatch.py, in a context variable
that the call's task and whatever it starts inherit). Keys passed with
``extra=`` become fields of their own, e.g. the ``ref`` of an ``internal``
reply, which is the call's id.

The JSON goes through python-json-logger: it formats the standard library's
records, so every module keeps ``logging.getLogger`` and nothing else changes.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import secrets
import sys
from dataclasses import dataclass

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("json", "text")


@dataclass(frozen=True, slots=True)
class CallContext:
    call_id: str
    method: str
    user: str | None


CALL: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("hangout_call", default=None)


def new_call_id() -> str:
    """64 random bits, hex: unique enough to grep one call out of a day's logs."""
    return secrets.token_hex(8)


def _utc(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class CallFields(logging.Filter):
    """Adds the running call's fields to every record that passes the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = CALL.get()
        if call is not None:
            record.call_id = call.call_id
            record.method = call.method
            record.user = call.user
        return True


class JsonLines(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(process)d",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"},
            json_ensure_ascii=False,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _utc(record)


class TextLines(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _utc(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        call_id = getattr(record, "call_id", None)
        if call_id is None:
            return text
        head, newline, rest = text.partition("\n")  # the context before a traceback
        context = f" [call={call_id} method={record.method} user={record.user or '-'}]"
        return head + context + newline + rest


def setup(log_format: str, level: str) -> None:
    """Log to stderr in ``log_format`` (one of ``FORMATS``) from ``level`` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if log_format == "json" else TextLines())
    handler.addFilter(CallFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
