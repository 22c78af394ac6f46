"""Logging: readable at a terminal, one JSON object per line in batch jobs.

Batch jobs write their stderr to a file that admins grep and ship to log
stores, so off a terminal every event is a single JSON line with a fixed set
of keys (``ts``, ``level``, ``event``, ``msg`` and the event's fields).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any

LOGGER_NAME = "hpcckpt"
_HOST = socket.gethostname()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.name),
            "msg": record.getMessage(),
            "host": _HOST,
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, sort_keys=False)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", None)
        extra = ""
        if fields:
            extra = " " + " ".join(f"{k}={v}" for k, v in fields.items())
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"[{stamp}] hpcckpt: {prefix}{record.getMessage()}{extra}"
        if record.exc_info and record.levelno >= logging.DEBUG and os.environ.get("HPCCKPT_DEBUG"):
            text += "\n" + self.formatException(record.exc_info)
        return text


def want_json(stream: Any = None) -> bool:
    """JSON when asked (HPCCKPT_LOG_FORMAT=json) or when stderr is not a terminal."""
    fmt = os.environ.get("HPCCKPT_LOG_FORMAT", "auto").lower()
    if fmt in ("json", "human"):
        return fmt == "json"
    stream = stream or sys.stderr
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def setup(level: str | int | None = None, *, json_lines: bool | None = None) -> logging.Logger:
    """Configure the ``hpcckpt`` logger once; later calls only change the level."""
    logger = logging.getLogger(LOGGER_NAME)
    lvl = level or os.environ.get("HPCCKPT_LOG_LEVEL", "INFO")
    logger.setLevel(lvl.upper() if isinstance(lvl, str) else lvl)
    if not any(getattr(h, "_hpcckpt", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._hpcckpt = True  # type: ignore[attr-defined]
        use_json = want_json() if json_lines is None else json_lines
        handler.setFormatter(JsonFormatter() if use_json else HumanFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def get(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def event(logger: logging.Logger, name: str, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event: ``name`` is a stable key scripts can match on."""
    logger.log(level, msg, extra={"event": name, "fields": fields})
