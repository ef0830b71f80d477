"""The alert service's HTTP API (services/alerts/api.py) served by the real service on a free
127.0.0.1 port, without Kafka (the tests write the alert log): webhooks and their dead letters, the
live stream with resume, filters and heartbeats, keys, and the `crm webhooks` commands."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from services.alerts.service import AlertService
from services.alerts.signing import verify
from services.alerts.store import AlertStore
from services.ingest.keys import ApiKeyStore
from streams.config import Settings
from tests.unit.test_alert_delivery import Receiver, alert, encoded


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(state_dir=tmp_path, alerts_backoff_base_seconds=0.02, alerts_backoff_cap_seconds=0.05,
                    alerts_max_attempts=2)


@pytest.fixture
def keys(settings) -> Iterator[dict[str, str]]:
    store = ApiKeyStore(settings.ingest_db)
    _, backoffice = store.create("backoffice", "crm team")
    _, pos = store.create("pos", "till", store_id="store-1")
    store.close()
    yield {"backoffice": backoffice, "pos": pos}


@pytest.fixture
def service(settings) -> Iterator[AlertService]:
    service = AlertService(settings, port=0, consume=False, heartbeat_seconds=0.3).start_in_thread()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def log(settings) -> Iterator[AlertStore]:
    """The alert log, opened as a second connection, as the CLI would."""
    store = AlertStore(settings.alerts_db)
    yield store
    store.close()


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class EventStream:
    """A Server-Sent Events client over httpx, enough for the tests: events and comments, in order."""

    def __init__(self, url: str, headers: dict[str, str], params: Any = None, read_timeout: float = 5.0):
        self._context = httpx.stream("GET", url, headers=headers, params=params,
                                     timeout=httpx.Timeout(5.0, read=read_timeout))
        self.response = self._context.__enter__()
        self._lines = self.response.iter_lines()
        self.comments: list[str] = []

    def close(self) -> None:
        self._context.__exit__(None, None, None)

    def next_event(self) -> dict[str, str]:
        event: dict[str, str] = {}
        for line in self._lines:
            if not line:
                if event:
                    return event
            elif line.startswith(":"):
                self.comments.append(line)
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                event[name] = f"{event[name]}\n{value}" if name == "data" and name in event else value
        raise AssertionError("the stream ended")


def stream(service: AlertService, secret: str, params: Any = None, headers: dict | None = None,
           read_timeout: float = 5.0) -> EventStream:
    return EventStream(f"{service.url}/v1/alerts/stream", {**auth(secret), **(headers or {})}, params, read_timeout)


def test_the_stream_resumes_after_last_event_id_with_exactly_the_later_changes(service, keys, log):
    alerts = [alert(f"c{n}") for n in range(5)]
    log.append([(a, encoded(a)) for a in alerts])
    for how in ({"headers": {"Last-Event-ID": str(alerts[1].change_id)}},
                {"params": {"last_event_id": str(alerts[1].change_id)}}):
        events = stream(service, keys["backoffice"], **how)
        try:
            assert events.response.headers["content-type"].startswith("text/event-stream")
            got = [events.next_event() for _ in alerts[2:]]
            assert [e["id"] for e in got] == [str(a.change_id) for a in alerts[2:]]
            assert {e["event"] for e in got} == {"alert"}
            assert [e["data"].encode() for e in got] == [encoded(a) for a in alerts[2:]]
            # Live: an alert logged now arrives within the half-second poll (here without the in-process
            # bell, since another connection wrote it).
            new = alert("c-new")
            log.append([(new, encoded(new))])
            started = time.monotonic()
            assert events.next_event()["id"] == str(new.change_id)
            assert time.monotonic() - started < 2.0
        finally:
            events.close()
        alerts = [*alerts, new]


def test_without_a_position_the_stream_sends_new_alerts_only_with_heartbeats(service, keys, log):
    old = alert("old")
    log.append([(old, encoded(old))])
    events = stream(service, keys["backoffice"])
    try:
        time.sleep(0.5)
        new = alert("new")
        log.append([(new, encoded(new))])
        assert events.next_event()["id"] == str(new.change_id)
        assert events.comments and events.comments[0].startswith(": ping")   # keep-alive comments meanwhile
    finally:
        events.close()


def test_the_stream_filters_and_reads_from_the_start(service, keys, log):
    churn = alert("a", alert_type="churn_risk", severity="critical", segments=("rfm:champions",))
    bad = alert("b", alert_type="bad_experience", severity="low", store_id="store-2", segments=("tag:detractor",))
    later = alert("c", alert_type="bad_experience", severity="high", store_id="store-2")
    log.append([(a, encoded(a)) for a in (churn, bad, later)])

    def first(params: Any) -> str:
        events = stream(service, keys["backoffice"], params)
        try:
            return events.next_event()["id"]
        finally:
            events.close()

    assert first({"from": "start"}) == str(churn.change_id)
    assert first({"from": "start", "type": "bad_experience"}) == str(bad.change_id)
    assert first([("from", "start"), ("type", "bad_experience"), ("min_severity", "high")]) == str(later.change_id)
    assert first([("from", "start"), ("store", "store-9"), ("store", "store-2")]) == str(bad.change_id)
    assert first({"from": "start", "segment": "detractor"}) == str(bad.change_id)
    # An id the log does not have: an error that says what to do, or the whole log with from=start.
    unknown = "7f1c2a9e-0000-4000-8000-000000000000"
    answer = httpx.get(f"{service.url}/v1/alerts/stream", headers={**auth(keys["backoffice"]), "Last-Event-ID": unknown})
    assert answer.status_code == 400 and answer.json()["error"] == "unknown_event_id"
    assert "from=start" in answer.json()["detail"]
    assert first({"last_event_id": unknown, "from": "start"}) == str(churn.change_id)
    bad_filter = httpx.get(f"{service.url}/v1/alerts/stream", params={"type": "churn"}, headers=auth(keys["backoffice"]))
    assert bad_filter.status_code == 400 and "unknown alert type" in bad_filter.json()["detail"]


def test_only_backoffice_keys_may_use_the_api(service, keys):
    url = f"{service.url}/v1/webhooks"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=auth("crm_nope_nope")).status_code == 401
    forbidden = httpx.get(url, headers=auth(keys["pos"]))
    assert forbidden.status_code == 403 and "backoffice" in forbidden.json()["detail"]
    assert httpx.get(f"{service.url}/v1/alerts/stream", headers=auth(keys["pos"])).status_code == 403
    assert httpx.get(url, headers=auth(keys["backoffice"])).status_code == 200
    assert httpx.get(f"{service.url}/health").json()["status"] == "ok"


def test_webhooks_through_the_api_from_subscription_to_dead_letter_to_redelivery(service, keys, log):
    headers = auth(keys["backoffice"])
    api = f"{service.url}/v1/webhooks"
    assert httpx.post(api, json={"url": "ftp://example.com"}, headers=headers).status_code == 422
    assert httpx.post(api, json={"url": "http://127.0.0.1:1/", "filters": {"min_severity": "dire"}},
                      headers=headers).status_code == 422
    failing = alert("c1", severity="high")
    with Receiver(poison={str(failing.change_id)}) as receiver:
        created = httpx.post(api, json={"url": receiver.url, "filters": {"min_severity": "high"}}, headers=headers)
        assert created.status_code == 201
        hook = created.json()
        assert hook["secret"].startswith("whsec_") and hook["filters"]["min_severity"] == "high"
        assert "secret" not in httpx.get(f"{api}/{hook['id']}", headers=headers).json()
        assert [h["id"] for h in httpx.get(api, headers=headers).json()["webhooks"]] == [hook["id"]]

        ignored, delivered = alert("c2", severity="low"), alert("c3", severity="critical")
        log.append([(a, encoded(a)) for a in (failing, ignored, delivered)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counts = httpx.get(f"{api}/{hook['id']}", headers=headers).json()["deliveries"]
            if counts == {"pending": 0, "delivered": 1, "dead": 1}:
                break
            time.sleep(0.05)
        assert counts == {"pending": 0, "delivered": 1, "dead": 1}
        [dead] = httpx.get(f"{api}/{hook['id']}/dead", headers=headers).json()["dead"]
        assert dead["change_id"] == str(failing.change_id) and dead["attempts"] == 2
        assert dead["response_status"] == 500 and dead["alert"] == orjson.loads(encoded(failing))

        receiver.poison.clear()
        again = httpx.post(f"{api}/{hook['id']}/dead/redeliver", params={"seq": dead["seq"]}, headers=headers)
        assert again.json() == {"redelivered": 1}
        deadline = time.monotonic() + 10
        while len(receiver.accepted()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {r.change_id for r in receiver.accepted()} == {str(failing.change_id), str(delivered.change_id)}
        assert all(verify(hook["secret"], r.headers["x-crm-signature"], r.body) for r in receiver.accepted())
        assert httpx.post(f"{api}/{hook['id']}/dead/redeliver", params={"seq": dead["seq"]},
                          headers=headers).status_code == 404

    assert httpx.delete(f"{api}/{hook['id']}", headers=headers).status_code == 204
    assert httpx.get(f"{api}/{hook['id']}", headers=headers).json()["active"] is False
    assert httpx.get(api, headers=headers).json()["webhooks"] == []
    assert httpx.delete(f"{api}/{hook['id']}", headers=headers).status_code == 404
    assert httpx.get(f"{api}/wh_unknown/dead", headers=headers).status_code == 404


def test_the_webhooks_command(tmp_path, monkeypatch, capsys):
    from services.cli import main

    monkeypatch.setenv("CRM_STATE_DIR", str(tmp_path))
    assert main(["webhooks", "add", "https://example.com/hook", "--type", "churn_risk", "--min-severity", "high",
                 "--segment", "champions"]) == 0
    out = capsys.readouterr().out
    hook_id = out.split()[1]
    assert "whsec_" in out and "shown once" in out
    assert main(["webhooks", "list", "--format", "csv"]) == 0
    listed = capsys.readouterr().out
    assert hook_id in listed and "churn_risk" in listed and "champions" in listed
    assert main(["webhooks", "add", "https://example.com", "--type", "churn"]) == 1
    assert "unknown alert type" in capsys.readouterr().err
    assert main(["webhooks", "dead", hook_id]) == 0
    assert main(["webhooks", "redeliver", hook_id]) == 0
    assert "0 dead deliveries" in capsys.readouterr().out
    assert main(["webhooks", "remove", hook_id]) == 0
    assert main(["webhooks", "remove", hook_id]) == 1
    assert "no active webhook" in capsys.readouterr().err
