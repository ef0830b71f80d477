"""The dashboard's one way to data: the projection writer's SQL endpoint (docs/sql-http.md), asked as a
client would, as the analyst who is looking at the page.

Never chdb: the writer owns the embedded database, and a second process opening it would be refused.
Each query is sent with its parameters as `param_*` (so a customer key is a value, never SQL), in
JSONCompact with 64-bit integers unquoted and decimals with their trailing zeros, so the numbers arrive
as JSON numbers and money keeps its cents; a float column's values are floats even when whole."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from services.sql_http import admin_file
from streams.config import Settings

TIMEOUT_SECONDS = 30.0
OUTPUT_SETTINGS = {"default_format": "JSONCompact", "output_format_json_quote_64bit_integers": "0",
                   "output_format_decimal_trailing_zeros": "1"}


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[list[Any]]


class QueryFailed(Exception):
    """The endpoint refused the query or did not answer; the message says which, for the page."""


def endpoint_url(settings: Settings) -> str:
    """Where the writer serves SQL now: the address it announced (services/sql_http.py; it serves on a
    free port when the configured one is taken, and may have restarted since), else the configured one."""
    try:
        announced = json.loads(admin_file(settings).read_text())
        host, port = announced["host"], announced["port"]
    except (OSError, ValueError, KeyError):
        host, port = settings.sql_host, settings.sql_port
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class SqlEndpoint:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.database = settings.clickhouse_database
        self._client = httpx.AsyncClient(timeout=TIMEOUT_SECONDS)

    async def query(self, sql: str, parameters: dict[str, str], user: str, password: str) -> Result:
        params = {"database": self.database, **OUTPUT_SETTINGS, **{f"param_{k}": v for k, v in parameters.items()}}
        url = endpoint_url(self.settings)
        try:
            response = await self._client.post(url, params=params, content=sql.encode(), auth=(user, password))
        except httpx.HTTPError as exc:
            raise QueryFailed(f"the SQL endpoint at {url} does not answer ({type(exc).__name__}); "
                              "is the writer running? (crm status)") from None
        if response.status_code != 200:
            raise QueryFailed(response.text.strip()[:500] or f"HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:   # the endpoint streams: a query that fails part-way ends the body early
            raise QueryFailed(f"the answer broke off: {response.text[-300:]}") from None
        floats = [n for n, column in enumerate(body["meta"]) if "Float" in column["type"]]
        for row in body["data"]:
            for n in floats:   # JSON writes a whole Float64 as 1, which would read as an int
                row[n] = float(row[n]) if isinstance(row[n], int) else row[n]
        return Result([column["name"] for column in body["meta"]], body["data"])

    async def close(self) -> None:
        await self._client.aclose()
