"""The live feed: churn alerts as they open, from the alerts service's stream (docs/webhooks.md),
relayed by the dashboard server so that the browser needs no alerts API key.

The stream needs a backoffice key. CRM_DASHBOARD_ALERTS_KEY gives one; without it the dashboard uses a
key of its own, made once in this state directory's key store (`crm keys list` shows it as "dashboard
live feed") and kept in `$CRM_STATE_DIR/dashboard/alerts.key`, readable by its owner only. The key only
ever reads the stream.

The relay passes on the `opened` changes only (the feed shows alerts as they open), each with the
fields the feed shows and the change id as the event id. The upstream connection is open before the
browser gets its first byte, so an alert that opens after the browser's `open` event is in the feed;
a browser that reconnects sends its Last-Event-ID, which is passed on, so nothing in between is lost."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sse_starlette import ServerSentEvent

from services.ingest.keys import ApiKeyStore, SourceKind
from streams.config import Settings

FEED_FIELDS = ("change_id", "opened_at", "alert_type", "severity", "customer_key", "reasons", "store_id")
CONNECT_SECONDS = 10.0


def alerts_key(settings: Settings) -> str:
    """The backoffice key the relay reads the stream with (see the module's docstring)."""
    if settings.dashboard_alerts_key:
        return settings.dashboard_alerts_key
    path = settings.state_dir / "dashboard" / "alerts.key"
    store = ApiKeyStore(settings.ingest_db)
    try:
        secret = path.read_text().strip() if path.exists() else ""
        key = store.authenticate(secret) if secret else None
        if key is None or key.source is not SourceKind.BACKOFFICE:
            _, secret = store.create(SourceKind.BACKOFFICE, "dashboard live feed")
            _write_private(path, secret)
        return secret
    finally:
        store.close()


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


class Upstream:
    """One browser's connection to the alerts service's stream."""

    def __init__(self, client: httpx.AsyncClient, response: httpx.Response):
        self._client, self.response = client, response

    @classmethod
    async def open(cls, settings: Settings, key: str, last_event_id: str | None) -> Upstream:
        """Connected, or raises httpx.HTTPError (the service is down) / UpstreamRefused."""
        client = httpx.AsyncClient(timeout=httpx.Timeout(CONNECT_SECONDS, read=None))
        headers = {"Authorization": f"Bearer {key}", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        url = f"http://{settings.alerts_host}:{settings.alerts_port}/v1/alerts/stream"
        try:
            response = await client.send(client.build_request("GET", url, headers=headers), stream=True)
        except BaseException:
            await client.aclose()
            raise
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:300]
            await response.aclose()
            await client.aclose()
            raise UpstreamRefused(f"the alerts stream answered {response.status_code}: {detail}")
        return cls(client, response)

    async def opened_alerts(self) -> AsyncIterator[ServerSentEvent]:
        """The stream's `opened` changes as feed events, until either side goes away."""
        try:
            async for event, data in _events(self.response.aiter_lines()):
                if event == "alert":
                    change = json.loads(data)
                    if change.get("status") == "opened":
                        yield ServerSentEvent(data=json.dumps(feed_item(change)), id=change["change_id"], event="alert")
        finally:
            await self.response.aclose()
            await self._client.aclose()


class UpstreamRefused(Exception):
    pass


def feed_item(change: dict) -> dict:
    """An AlertChange as the feed shows it: the columns of the `latest_alerts` panel."""
    reasons = ", ".join(reason["code"] for reason in change.get("reasons", []))
    opened = datetime.fromisoformat(change["opened_at"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return {**{name: change.get(name) for name in FEED_FIELDS}, "opened_at": opened, "reasons": reasons}


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) per Server-Sent Event; comments (keep-alives) are skipped."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
