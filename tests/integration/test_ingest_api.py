"""The ingestion API against the real broker: every rule in docs/ingestion.md, checked on what
reaches `crm.events` and the dead-letter topic."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest

from privacy.secrets import identity_secret
from streams import topics
from tests.factories import submitted as event  # the API takes what producers submit: personal values plain
from tests.integration.conftest import records_on

pytestmark = pytest.mark.integration


def on_topic(stack, topic: str, wanted: set[str]) -> dict[str, list]:
    """Records of `topic` whose event_id (or dead-letter request id) is in `wanted`, by that id."""
    found: dict[str, list] = {}
    for record in records_on(stack.settings.kafka_bootstrap, topic):
        try:
            body = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            body = {}
        ident = body.get("event_id") if isinstance(body, dict) else None
        ident = ident if isinstance(ident, str) else None
        headers = dict(record.headers or [])
        for candidate in (ident, headers.get("crm.dlq.api.request_id", b"").decode()):
            if candidate in wanted:
                found.setdefault(candidate, []).append((record, body))
    return found


def post(api, path: str, body, key: str | None, **headers) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(f"{api.url}{path}", content=content, headers={"Content-Type": "application/json", **auth, **headers},
                      timeout=60)


def now(**delta) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def test_a_batch_gets_a_result_per_event_and_accepted_events_are_on_the_topic_once(stack, api):
    key = api.key("backoffice")
    good = event("purchase_completed", customer_id="ing-1", occurred_at=now(minutes=-1))
    late = event("daily_sign_in", customer_id="ing-1", occurred_at=now(days=-10))
    invalid = event("purchase_completed", customer_id="ing-1", occurred_at=now())
    invalid["payload"]["lines"][0]["quantity"] = -3
    unknown = {**event("daily_sign_in", customer_id="ing-1", occurred_at=now()), "type": "teleported"}
    future = event("daily_sign_in", customer_id="ing-1", occurred_at=now(hours=2))
    changed = {**good, "payload": {**good["payload"], "order_id": "another"}}
    batch = {"events": [good, late, invalid, unknown, good, future, changed, 42]}
    response = post(api, "/v1/events/batch", batch, key, **{"X-Request-ID": "req-batch-1"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == "req-batch-1"
    body = response.json()
    statuses = [(r["status"], r.get("reason"), r["late"]) for r in body["results"]]
    assert statuses == [("accepted", None, False), ("accepted", None, True), ("rejected", "schema_invalid", False),
                        ("rejected", "unknown_type", False), ("duplicate", None, False),
                        ("rejected", "occurred_in_future", False), ("rejected", "conflicting_duplicate", False),
                        ("rejected", "not_an_object", False)]
    assert body["results"][2]["errors"][0]["field"] == "payload.lines.0.quantity"
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 1, 5)

    # The same batch again (a client retry): nothing new reaches the topic.
    again = post(api, "/v1/events/batch", batch, key).json()
    assert [r["status"] for r in again["results"][:2]] == ["duplicate", "duplicate"]

    written = on_topic(stack, topics.EVENTS.name, {good["event_id"], late["event_id"], invalid["event_id"]})
    assert {k: len(v) for k, v in written.items()} == {good["event_id"]: 1, late["event_id"]: 1}
    record, sent = written[good["event_id"]][0]
    assert record.key == b"ing-1" and sent["received_at"]
    letters = on_topic(stack, topics.DEAD_LETTERS.name, {"req-batch-1"})["req-batch-1"]
    reasons = sorted(dict(r.headers)["crm.dlq.reason"].decode() for r, _ in letters)
    assert reasons == sorted(["schema_invalid", "unknown_type", "occurred_in_future", "conflicting_duplicate",
                              "not_an_object"])
    assert all(dict(r.headers)["crm.dlq.api.key_id"] for r, _ in letters)
    assert any(body == invalid for _, body in letters), "the original body is in the dead letter"
    # Accepted events flow on through the worker into ClickHouse.
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE event_id = {e:UUID}",
                                       {"e": good["event_id"]})[0][0] == 1, timeout=120, what="the event in ClickHouse")


def test_keys_authenticate_rotate_and_revoke(api):
    body = event("daily_sign_in", customer_id="ing-2", occurred_at=now())
    assert post(api, "/v1/events", body, None).status_code == 401
    assert post(api, "/v1/events", body, "crm_nokey_nothing").status_code == 401
    key, secret = api.keys.create("app", "rotating")
    assert post(api, "/v1/events", body, secret).status_code == 200
    new_secret = api.keys.rotate(key.key_id)
    assert post(api, "/v1/events", {**body, "event_id": str(uuid.uuid4())}, secret).status_code == 401
    assert post(api, "/v1/events", {**body, "event_id": str(uuid.uuid4())}, new_secret).status_code == 200
    api.keys.revoke(key.key_id)
    assert post(api, "/v1/events", {**body, "event_id": str(uuid.uuid4())}, new_secret).status_code == 401
    assert "crm_" not in str(api.keys.list()), "secrets are not stored"


def test_scopes_bind_types_and_a_pos_key_to_its_store(api):
    app_key = api.key("app")
    refused = post(api, "/v1/events", event("points_adjusted", customer_id="ing-3", occurred_at=now(),
                                            payload={"adjustment_id": "a-1", "points": 5, "reason": "x"}), app_key)
    assert refused.status_code == 422 and refused.json()["results"][0]["reason"] == "type_not_allowed"
    pos_key = api.key("pos", store_id="store-7")
    other = event("purchase_completed", customer_id="ing-3", occurred_at=now())  # source store-1
    assert post(api, "/v1/events", other, pos_key).json()["results"][0]["reason"] == "store_not_allowed"
    unnamed = event("purchase_completed", customer_id="ing-3", occurred_at=now())
    unnamed["source"] = {"channel": "pos", "terminal_id": "t-9"}
    assert post(api, "/v1/events", unnamed, pos_key).json()["results"][0]["status"] == "accepted"


def test_rate_limits_answer_429_with_retry_after(api):
    key = api.key("app", rate_per_second=1, burst=5)
    batch = {"events": [event("daily_sign_in", customer_id="ing-4", occurred_at=now()) for _ in range(5)]}
    assert post(api, "/v1/events/batch", batch, key).status_code == 200
    limited = post(api, "/v1/events/batch", {"events": [event("daily_sign_in", customer_id="ing-4",
                                                               occurred_at=now())]}, key)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "rate_limited"


def test_normalisation_of_currency_email_and_phone(stack, api):
    key = api.key("backoffice")
    purchase = event("purchase_completed", customer_id="ing-5", occurred_at=now())
    purchase["payload"]["currency"] = "eur"
    registered = event("customer_registered", customer_id="ing-5", occurred_at=now(),
                       payload={"email": "  Ada.Lovelace@Example.COM ", "phone": "030 1234567"})
    bad_phone = event("customer_registered", customer_id="ing-5", occurred_at=now(), payload={"phone": "12"})
    results = post(api, "/v1/events/batch", {"events": [purchase, registered, bad_phone]}, key).json()["results"]
    assert [r["status"] for r in results] == ["accepted", "accepted", "rejected"]
    assert results[2]["errors"] == [{"field": "payload.phone", "message": "not a valid phone"}]
    written = on_topic(stack, topics.EVENTS.name, {purchase["event_id"], registered["event_id"]})
    assert written[purchase["event_id"]][0][1]["payload"]["currency"] == "EUR"
    identifiers = written[registered["event_id"]][0][1]["identifiers"]
    secret = identity_secret(stack.settings.state_dir)
    assert identifiers["email_hash"] == hmac.new(secret, b"ada.lovelace@example.com", hashlib.sha256).hexdigest()
    assert identifiers["phone_hash"] == hmac.new(secret, b"+49301234567", hashlib.sha256).hexdigest()
    assert identifiers["email_hash"] != hashlib.sha256(b"ada.lovelace@example.com").hexdigest()


def test_personal_values_reach_the_log_only_sealed_and_dead_letters_only_redacted(stack, api):
    from privacy.fields import unseal_event
    from privacy.keystore import KeyStore
    from privacy.secrets import master_keyring
    from schemas.codec import decode_event
    from schemas.envelope import Envelope

    key = api.key("backoffice")
    registered = event("customer_registered", customer_id="ing-sealed", occurred_at=now(),
                       payload={"name": "Grace Hopper", "email": "Grace.Hopper@Example.org", "phone": "030 7654321",
                                "birthday": "1906-12-09", "address": {"line1": "Navy Yard 1", "city": "Arlington"}})
    only_email = event("purchase_completed", occurred_at=now())
    only_email.pop("customer_id")
    only_email["identifiers"] = {"email": "grace.hopper@example.org"}
    refused = event("customer_registered", customer_id="ing-sealed", occurred_at=now(hours=2),
                    payload={"name": "Grace Hopper", "email": "grace.hopper@example.org"})
    response = post(api, "/v1/events/batch", {"events": [registered, only_email, refused]}, key,
                    **{"X-Request-ID": "req-sealed"})
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "accepted", "rejected"]

    written = on_topic(stack, topics.EVENTS.name, {registered["event_id"], only_email["event_id"]})
    plain = [b"Grace", b"Hopper", b"example.org", b"Example.org", b"+49307654321", b"1906-12-09", b"Navy Yard",
             b"Arlington"]
    for [(record, body)] in written.values():
        assert not any(value in record.value for value in plain), record.value
        assert isinstance(decode_event(record.value), Envelope)  # the worker takes it
    sealed = written[registered["event_id"]][0][1]
    assert all(sealed["payload"][name].startswith("pii1.") for name in ("name", "email", "phone", "birthday", "address"))
    assert sealed["payload"]["birth_month"] == 12
    secret = identity_secret(stack.settings.state_dir)
    email_hash = hmac.new(secret, b"grace.hopper@example.org", hashlib.sha256).hexdigest()
    assert written[only_email["event_id"]][0][0].key == f"email_hash:{email_hash}".encode()
    assert written[only_email["event_id"]][0][1]["identifiers"] == {"email_hash": email_hash}
    # The tokens open with the customer's data key from the key store, and give the normalised values.
    with KeyStore(stack.settings.kafka_bootstrap, master_keyring(stack.settings.state_dir)) as keys:
        opened = unseal_event(sealed, keys.data_key)
    assert opened["payload"]["email"] == "grace.hopper@example.org" and opened["payload"]["phone"] == "+49307654321"
    assert opened["payload"]["name"] == "Grace Hopper" and opened["payload"]["birthday"] == "1906-12-09"
    # The refused one's dead letter keeps its shape, not its personal values.
    [(letter, kept)] = on_topic(stack, topics.DEAD_LETTERS.name, {"req-sealed"})["req-sealed"]
    assert kept["payload"] == {"name": "[redacted]", "email": "[redacted]"}
    assert kept["event_id"] == refused["event_id"] and not any(value in letter.value for value in plain)


def test_limits_malformed_bodies_health_and_openapi(stack, api):
    key = api.key("backoffice")
    too_many = {"events": [event("daily_sign_in", customer_id="ing-6", occurred_at=now()) for _ in range(501)]}
    assert post(api, "/v1/events/batch", too_many, key).status_code == 413
    assert post(api, "/v1/events/batch", b"x" * (5 * 1024 * 1024 + 1), key).status_code == 413
    malformed = post(api, "/v1/events", b'{"type": "daily_sign_in",', key, **{"X-Request-ID": "req-malformed"})
    assert malformed.status_code == 400 and malformed.json()["error"] == "malformed_json"
    letters = on_topic(stack, topics.DEAD_LETTERS.name, {"req-malformed"})["req-malformed"]
    assert letters[0][0].value == b'{"type": "daily_sign_in",'
    assert post(api, "/v1/events/batch", {"items": []}, key).status_code == 400
    assert httpx.get(f"{api.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{api.url}/ready").json()["partitions"] == topics.EVENT_PARTITIONS
    paths = httpx.get(f"{api.url}/openapi.json").json()["paths"]
    assert {"/v1/events", "/v1/events/batch", "/health", "/ready"} <= set(paths)


def test_dead_letters_are_listed_shown_and_sent_again_after_a_fix(stack, api, tmp_path):
    from services import dlq

    key = api.key("backoffice")
    broken = event("purchase_completed", customer_id="ing-7", occurred_at=now())
    broken["payload"]["currency"] = "EURO"
    response = post(api, "/v1/events", broken, key, **{"X-Request-ID": "req-fix-me"})
    assert response.json()["results"][0]["reason"] == "schema_invalid"
    letter = next(x for x in dlq.read(stack.settings, reason="schema_invalid")
                  if x.headers.get("crm.dlq.api.request_id") == "req-fix-me")
    shown = dlq.describe(letter)
    assert shown["original"] == broken and "currency" in shown["detail"] and "api key" in shown["source"]
    # Sending it again unchanged still fails; with the fix it reaches crm.events.
    assert getattr(dlq.resubmit(stack.settings, letter), "reason", None) == "schema_invalid"
    fixed = tmp_path / "fixed.json"
    fixed.write_bytes(orjson.dumps({**broken, "payload": {**broken["payload"], "currency": "EUR"}}))
    sent = dlq.resubmit(stack.settings, letter, fixed)
    assert str(sent.event_id) == broken["event_id"] and sent.topic == topics.EVENTS.name
    assert len(on_topic(stack, topics.EVENTS.name, {broken["event_id"]})[broken["event_id"]]) == 1

    # A refused registration keeps its personal values only redacted; corrected by hand, it goes to
    # the intake topic, whose agent seals it.
    registration = event("customer_registered", customer_id="ing-8", occurred_at=now())
    registration["payload"] = {"email": "ing8@example.org", "locale": 12}
    post(api, "/v1/events", registration, key, **{"X-Request-ID": "req-fix-me-too"})
    letter = next(x for x in dlq.read(stack.settings, reason="schema_invalid")
                  if x.headers.get("crm.dlq.api.request_id") == "req-fix-me-too")
    assert b"ing8@example.org" not in letter.value
    assert getattr(dlq.resubmit(stack.settings, letter), "reason", None) == "redacted"
    fixed.write_bytes(orjson.dumps({**registration, "payload": {"email": "ing8@example.org", "locale": "de"}}))
    sent = dlq.resubmit(stack.settings, letter, fixed)
    assert sent.topic == topics.INTAKE.name and sent.customer_key == "ing-8"
    assert len(on_topic(stack, topics.INTAKE.name, {registration["event_id"]})[registration["event_id"]]) == 1
