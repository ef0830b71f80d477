"""Access to personal data on the running stack (docs/privacy.md): a customer with personal fields sent
through the ingestion API lies sealed everywhere analysts can look; the export (API and `crm privacy
export`) gives back what was sent; a support read works with a support key and is refused to an app
key; an erasure request is folded by the worker, after which export and support read answer 410 Gone.
Every one of these, allowed or refused, is on crm.audit.

The erasure part needs the worker to carry out `customer_erasure_requested` (shred the customer's data
keys in crm.customer-keys): it waits for the tombstones."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from streams import topics
from streams.config import PROJECT_ROOT
from tests.integration.conftest import records_on
from tests.integration.test_sql_http import writer_endpoint  # noqa: F401 (fixture: `crm` in another process reads through it)

pytestmark = pytest.mark.integration

TAG = uuid.uuid4().hex[:10]
CUSTOMER = f"priv-{TAG}"
REGISTERED = {"name": f"Prudence Zwickelmeyer {TAG}", "email": f"prudence.{TAG}@example.org", "phone": "+4930901820",
              "birthday": "1980-04-02", "address": {"line1": f"Geheimweg {TAG}", "city": "Quedlinburg",
                                                    "postal_code": "06484", "country": "DE"}}
UPDATED = {"email": f"p.zwickel.{TAG}@example.net", "locale": "de-DE"}
PLAIN_VALUES = [REGISTERED["name"], REGISTERED["email"], UPDATED["email"], f"Geheimweg {TAG}"]


def event(type_: str, payload: dict, occurred_at: str) -> dict:
    return {"event_id": str(uuid.uuid4()), "type": type_, "schema_version": 1, "customer_id": CUSTOMER,
            "occurred_at": occurred_at, "source": {"channel": "app"}, "payload": payload}


def post(api, path: str, body, key: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{api.url}{path}", content=orjson.dumps(body), headers=headers, timeout=120)


def get(api, path: str, key: str | None, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{api.url}{path}", params=params, headers=headers, timeout=120)


def crm(*argv: str) -> subprocess.CompletedProcess:
    """`crm` in a process of its own: the writer (in the test process) owns the engine, so it reads
    through the writer's SQL endpoint as the local admin, as it would beside `crm start`."""
    return subprocess.run([sys.executable, "-m", "services.cli", *argv], capture_output=True, env=dict(os.environ),
                          cwd=PROJECT_ROOT, timeout=300)


def audit_records(stack, customer_key: str) -> list[dict]:
    found = [orjson.loads(record.value) for record in records_on(stack.settings.kafka_bootstrap, topics.AUDIT.name)]
    return [record for record in found if record.get("customer_key") == customer_key]


def audited(stack, customer_key: str, **wanted) -> list[dict]:
    return [r for r in audit_records(stack, customer_key) if all(r.get(k) == v for k, v in wanted.items())]


@pytest.fixture(scope="module")
def keys(api):
    made = {}
    for name, source, role in (("support", "backoffice", "support"), ("officer", "backoffice", "privacy_officer"),
                               ("app", "app", ""), ("producer", "backoffice", "")):
        key, secret = api.keys.create(source, f"privacy-test-{name}", role=role)
        made[name] = (key.key_id, secret)
    return made


@pytest.fixture(scope="module")
def person(stack, api, keys):
    """The customer, registered and updated through the API, in ClickHouse."""
    sent = [event("customer_registered", REGISTERED, "2026-03-01T10:00:00+00:00"),
            event("profile_updated", UPDATED, "2026-03-05T10:00:00+00:00"),
            event("consent_changed", {"channel": "email", "granted": True, "purpose": "marketing"}, "2026-03-06T10:00:00+00:00")]
    response = post(api, "/v1/events/batch", {"events": sent}, keys["producer"][1])
    assert response.status_code == 200 and response.json()["accepted"] == 3, response.text
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE customer_key = {c:String}",
                                       {"c": CUSTOMER})[0][0] == 3, what="the customer's 3 events in ClickHouse")
    return sent


def test_analysts_sql_holds_no_personal_value_in_clear(stack, person):
    tokens = stack.query("SELECT JSONExtractString(payload, 'email') FROM events FINAL WHERE customer_key = {c:String} "
                         "AND type = 'customer_registered'", {"c": CUSTOMER})
    assert tokens[0][0].startswith("pii1."), "the API sealed the e-mail"
    tables = [row[0] for row in stack.query("SELECT name FROM system.tables WHERE database = currentDatabase() "
                                            "ORDER BY name")]
    assert "events" in tables and "customer_profiles" in tables
    holding = {}
    for table in tables:
        count = stack.query(f"SELECT count() FROM `{table}` WHERE multiSearchAnyCaseInsensitiveUTF8("
                            f"formatRowNoNewline('TSV', *), {{v:Array(String)}})", {"v": PLAIN_VALUES})[0][0]
        if count:
            holding[table] = count
    assert holding == {}, f"plain personal values in {holding}"


def test_support_read_needs_a_support_key_and_a_reason_and_is_audited(stack, api, keys, person):
    path = f"/v1/privacy/customers/{CUSTOMER}/personal"
    answer = get(api, path, keys["support"][1], reason="ticket-1 caller asked for their address")
    assert answer.status_code == 200, answer.text
    assert answer.json()["fields"] == {**REGISTERED, "email": UPDATED["email"]}
    for name in ("app", "producer"):
        refused = get(api, path, keys[name][1], reason="curious")
        assert refused.status_code == 403, refused.text
    assert get(api, path, keys["support"][1]).status_code == 422  # no reason
    assert get(api, path, None, reason="x").status_code == 401
    records = audit_records(stack, CUSTOMER)
    reads = [(r["actor"], r["role"], r["outcome"]) for r in records if r["action"] == "read_personal"]
    assert (keys["support"][0], "support", "allowed") in reads
    assert (keys["app"][0], "none:app", "refused") in reads
    assert (keys["producer"][0], "none:backoffice", "refused") in reads
    allowed = next(r for r in records if r["actor"] == keys["support"][0] and r["outcome"] == "allowed")
    assert allowed["reason"] == "ticket-1 caller asked for their address" and allowed["at"]
    assert REGISTERED["name"] not in orjson.dumps(records).decode(), "the audit holds no personal value"


def test_export_by_api_and_by_cli_gives_back_what_was_sent(stack, api, keys, person, writer_endpoint, tmp_path):  # noqa: F811
    response = get(api, f"/v1/privacy/customers/{CUSTOMER}/export", keys["officer"][1], reason="DSAR-1")
    assert response.status_code == 200, response.text
    assert "attachment" in response.headers["content-disposition"]
    by_api = response.json()
    assert by_api["customer_key"] == CUSTOMER and by_api["format"] == "crm-export/1"
    opened = {e["event_id"]: e["payload"] for e in by_api["events"]}
    assert [opened[e["event_id"]] for e in person] == [e["payload"] | ({"birth_month": 4} if "birthday" in e["payload"]
                                                                        else {}) for e in person]
    assert by_api["personal"] == {**REGISTERED, "email": UPDATED["email"]}
    assert by_api["profile"]["customer_key"] == CUSTOMER
    assert by_api["consents"]["changes"][0]["channel"] == "email"
    assert "pii1." not in response.text
    refused = get(api, f"/v1/privacy/customers/{CUSTOMER}/export", keys["app"][1], reason="x")
    assert refused.status_code == 403

    out = tmp_path / "export.json"
    done = crm("privacy", "export", CUSTOMER, "--reason", "DSAR-1", "--out", str(out))
    assert done.returncode == 0, done.stderr.decode()
    by_cli = orjson.loads(out.read_bytes())
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    for document in (by_api, by_cli):
        document.pop("exported_at")
    assert by_cli == by_api
    exports = audited(stack, CUSTOMER, action="export")
    assert {(r["role"], r["outcome"]) for r in exports} >= {("privacy_officer", "allowed"), ("none:app", "refused"),
                                                            ("operator", "allowed")}
    assert any(r["actor"].startswith("cli:") for r in exports)


def test_an_unknown_customer_is_404_and_rotation_without_a_new_master_key_rewraps_nothing(stack, api, keys,
                                                                                          writer_endpoint):  # noqa: F811
    response = get(api, f"/v1/privacy/customers/never-seen-{TAG}/export", keys["support"][1], reason="x")
    assert response.status_code == 404, response.text
    done = crm("privacy", "rotate-master", "--reason", f"test-{TAG}")
    assert done.returncode == 0 and b"0 data keys rewrapped" in done.stdout, done.stderr.decode()


def test_after_erasure_export_and_support_read_are_gone_and_audited(stack, api, keys, person, writer_endpoint):  # noqa: F811
    from privacy.keystore import KeyStore
    from privacy.secrets import master_keyring

    store = KeyStore(stack.settings.kafka_bootstrap, master_keyring(stack.settings.state_dir)).open(follow=False)
    assert store.key_ids_of(CUSTOMER), "the API made the customer a data key when it sealed their fields"
    path = f"/v1/privacy/customers/{CUSTOMER}/erasure"
    assert post(api, path, {"reason": "DSAR-2", "request_id": f"ER-{TAG}"}, keys["support"][1]).status_code == 403
    assert post(api, path, {"reason": "DSAR-2"}, keys["officer"][1]).status_code == 422
    accepted = post(api, path, {"reason": "DSAR-2", "request_id": f"ER-{TAG}"}, keys["officer"][1])
    assert accepted.status_code == 202, accepted.text
    erasures = audited(stack, CUSTOMER, action="erase")
    assert {(r["role"], r["outcome"]) for r in erasures} >= {("support", "refused"), ("privacy_officer", "allowed")}

    # The request shreds the keys the key store holds under the customer, the fold those its events name.
    try:
        deadline = time.monotonic() + 180
        while store.key_ids_of(CUSTOMER) and time.monotonic() < deadline:
            time.sleep(1)
            store.catch_up()
        assert not store.key_ids_of(CUSTOMER), (
            "the worker did not shred the erased customer's data keys within 180 s (the erasure fold)")
    finally:
        store.close()

    def gone() -> httpx.Response | None:
        answer = get(api, f"/v1/privacy/customers/{CUSTOMER}/personal", keys["support"][1], reason="after erasure")
        return answer if answer.status_code == 410 else None

    answer = stack.wait_for(gone, timeout=30, what="410 from the support read")
    assert f"customer {CUSTOMER} was erased" in answer.json()["detail"]
    assert "nothing personal remains" in answer.json()["detail"]
    export = get(api, f"/v1/privacy/customers/{CUSTOMER}/export", keys["officer"][1], reason="after erasure")
    assert export.status_code == 410, export.text
    done = crm("privacy", "export", CUSTOMER, "--reason", "after erasure")
    assert done.returncode == 3 and b"was erased" in done.stderr, done.stderr.decode()
    assert done.stdout == b""
    after = [r for r in audit_records(stack, CUSTOMER) if r["reason"] == "after erasure"]
    assert {(r["action"], r["outcome"]) for r in after} == {("read_personal", "refused"), ("export", "refused")}
    assert all("erased" in r["detail"] for r in after)


def test_erasing_a_customer_never_seen_is_allowed_audited_and_shreds_a_key_no_event_names(stack, writer_endpoint):  # noqa: F811
    from privacy.keystore import KeyStore
    from privacy.secrets import master_keyring

    stranger = f"stranger-{TAG}"
    # A key an edge made for the customer's first personal event, which the worker then refused:
    # no accepted event names it, so the fold cannot shred it; the erasure request does.
    with KeyStore(stack.settings.kafka_bootstrap, master_keyring(stack.settings.state_dir)) as store:
        orphan, _ = store.keys_for([stranger])[stranger]
    done = crm("privacy", "erase", stranger, "--reason", "DSAR-3", "--request-id", f"ER3-{TAG}")
    assert done.returncode == 0, done.stderr.decode()
    records = audited(stack, stranger, action="erase")
    assert [(r["role"], r["outcome"], r["reason"]) for r in records] == [("operator", "allowed", "DSAR-3")]
    assert records[0]["actor"].startswith("cli:")
    with KeyStore(stack.settings.kafka_bootstrap, master_keyring(stack.settings.state_dir)) as store:
        assert store.key_ids_of(stranger) == [] and store.data_key(orphan) is None


def test_an_altered_token_is_a_clear_error_naming_the_field(stack, api, keys):
    from privacy.fields import seal_event
    from privacy.keystore import KeyStore
    from privacy.secrets import master_keyring

    victim = f"forged-{TAG}"
    body = {**event("customer_registered", {"name": "Mallory", "email": f"m.{TAG}@example.org"},
                    "2026-03-01T10:00:00+00:00"), "customer_id": victim}
    with KeyStore(stack.settings.kafka_bootstrap, master_keyring(stack.settings.state_dir)) as store:
        key_id, data_key = store.keys_for([victim])[victim]
    sealed = seal_event(body, key_id, data_key)
    token = sealed["payload"]["email"]
    sealed["payload"]["email"] = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    stack.send(victim.encode(), orjson.dumps(sealed))
    stack.flush()
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE customer_key = {c:String}",
                                       {"c": victim})[0][0] == 1, what="the altered event in ClickHouse")
    answer = get(api, f"/v1/privacy/customers/{victim}/export", keys["support"][1], reason="forgery check")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "sealed_value_rejected" and "payload.email" in answer.json()["detail"]
    assert [r["outcome"] for r in audited(stack, victim, action="export")] == ["failed"]
