"""Structured logs: one JSON object per line, with the request's fields (request id, key id,
status, counts, milliseconds) at the top level, for log shippers to index."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"at": datetime.fromtimestamp(record.created, UTC).isoformat(), "level": record.levelname.lower(),
                "logger": record.name, "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_json_logs(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=level, handlers=[handler], force=True)
