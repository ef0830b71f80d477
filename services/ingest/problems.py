"""How every HTTP service of the edge answers an error: a `Problem` raised anywhere becomes the JSON
body `ErrorBody` (request id, machine-readable error, detail) with its status and headers. Shared by
the events endpoints (services/ingest/api.py) and the privacy endpoints (services/privacy/api.py)."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorBody(BaseModel):
    request_id: str
    error: str
    detail: str


class Problem(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}
