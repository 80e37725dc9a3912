"""dynvllm's logging, the same in every process `serve` starts: `--log-level` for dynvllm's own
loggers (other libraries stay at WARNING), `--log-format text|json`, and the id of the request
being served on each line logged while serving it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

#: The request a task is serving (set by the frontend once a request is admitted, by a worker
#: when a call arrives); log records carry it.
REQUEST_ID: ContextVar[str | None] = ContextVar("dynvllm_request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, process, message, request_id, exception."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self.process,
            "pid": record.process,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


def setup(level: str = "warning", fmt: str = "text", process: str = "") -> None:
    """Configure this process's logging (replaces what was set before)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestId())
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else _TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("dynvllm").setLevel(level.upper())


def with_request_id(endpoint: str, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A worker endpoint whose calls log with their request id (set in the call's own task)."""
    log = logging.getLogger("dynvllm.worker")

    def call(payload: Any) -> Any:
        if isinstance(payload, dict) and isinstance(payload.get("request_id"), str):
            REQUEST_ID.set(payload["request_id"])
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s call of %d prompt tokens", endpoint, len(payload.get("token_ids") or ()))
        return handler(payload)

    return call


def uvicorn_config(fmt: str) -> dict | None:
    """uvicorn's `log_config`: its own default for text; none for JSON, so its loggers reach
    ours through the root logger and come out as JSON too."""
    if fmt == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
