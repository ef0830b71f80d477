"""A read-only SQL client of the projections, the way `crm sql` gets one: the embedded engine when
this process may open it (the stack stopped, or this process is the writer), else the running
writer's SQL endpoint as the local admin (docs/sql-http.md); with CRM_CLICKHOUSE_DSN, that server."""

from __future__ import annotations

from typing import Any

from streams.config import Settings


class NoReader(RuntimeError):
    """Neither the engine nor the writer's endpoint can be read; the message says why."""


def sql_client(settings: Settings, write: bool = False, claim: bool = True) -> tuple[Any, dict[str, Any] | None]:
    """(client, settings for its queries). `write`: the engine itself, for `crm sql --write`.
    `claim=False` (a long-lived process such as the API): never take the embedded engine's lock, which
    would keep the writer from starting until this process ends; read through the writer's endpoint
    unless this process already owns the engine."""
    from projections import clickhouse
    from services.sql_http import EndpointUnavailable, admin_client

    readonly = None if write else {"readonly": 2}
    if claim or settings.clickhouse_dsn or clickhouse._owner_lock is not None:  # noqa: SLF001 - read only
        try:
            return clickhouse.connect(settings), readonly
        except clickhouse.EmbeddedDatabaseBusy as busy:
            if write:
                raise NoReader(f"{busy}\n`crm sql --write` changes data, which only the writer does while it runs.") from None
            try:
                return admin_client(settings), None  # the endpoint is read-only
            except EndpointUnavailable as why:
                raise NoReader(f"{busy}\n{why}") from None
    try:
        return admin_client(settings), None
    except EndpointUnavailable as why:
        raise NoReader(f"The projection writer is not serving SQL: {why}") from None
