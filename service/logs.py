"""Logging setup: text or JSON lines, each carrying the request id of the request being served."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
MAX_REQUEST_ID = 256  # characters of a client's request id the server keeps (logs, headers, echoed ids)
_SAFE_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID}}}")


def request_id_for(*given: str | None) -> str:
    """The id of a request in the logs and the X-Request-Id header, every protocol alike: the first id the
    client gave that is 1..MAX_REQUEST_ID characters of [A-Za-z0-9._:-], else a fresh one."""
    for candidate in given:
        if isinstance(candidate, str) and _SAFE_ID.fullmatch(candidate):
            return candidate
    return uuid.uuid4().hex


@contextlib.contextmanager
def bound(rid: str) -> Iterator[None]:
    """Log records made inside carry `rid`."""
    token = request_id.set(rid)
    try:
        yield
    finally:
        request_id.reset(token)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # our middleware logs requests
