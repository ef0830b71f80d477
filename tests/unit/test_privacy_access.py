"""Personal-data access without Kafka or ClickHouse: roles, audit records, the erasure event, and the
export and support read over a fake SQL client with tokens sealed for real (privacy/fields.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from privacy.fields import seal_event
from privacy.seal import new_key, new_key_id
from schemas.privacy import AuditRecord
from services.ingest.keys import ApiKeyStore, KeyProblem, Role, SourceKind
from services.privacy import audit
from services.privacy.access import Gone, Reader, TokenRejected, UnknownCustomer, jsonable
from services.privacy.erasure import erasure_event
from services.privacy.roles import OPERATOR, may, refusal, role_of


# --- roles -------------------------------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path: Path):
    store = ApiKeyStore(tmp_path / "ingest.sqlite")
    yield store
    store.close()


def test_roles_decide_who_reads_exports_and_erases(keys):
    support, _ = keys.create("backoffice", "alice", role="support")
    officer, _ = keys.create("backoffice", "dpo", role="privacy_officer")
    plain, _ = keys.create("backoffice", "crm")
    pos, _ = keys.create("pos", "till", store_id="store-1")
    app, _ = keys.create("app", "app")
    assert (support.role, officer.role, plain.role) == (Role.SUPPORT, Role.PRIVACY_OFFICER, Role.NONE)
    table = {role_of(k): [may(role_of(k), a) for a in ("read_personal", "export", "erase", "rotate_master_key")]
             for k in (support, officer, plain, pos, app)}
    assert table == {
        "support": [True, True, False, False],
        "privacy_officer": [True, True, True, False],
        "none:backoffice": [False, False, False, False],
        "none:pos": [False, False, False, False],
        "none:app": [False, False, False, False],
    }
    assert may(OPERATOR, "rotate_master_key") and may(OPERATOR, "erase")
    assert "privacy_officer" in refusal("support", "erase")


def test_only_back_office_keys_get_a_role_and_no_key_sends_erasure_events(keys):
    for source, options in (("pos", {"store_id": "s"}), ("app", {})):
        with pytest.raises(KeyProblem, match="back-office keys only"):
            keys.create(source, "x", role="support", **options)
    with pytest.raises(KeyProblem, match="unknown role"):
        keys.create("backoffice", "x", role="admin")
    with pytest.raises(KeyProblem, match="crm privacy erase"):
        keys.create("backoffice", "x", event_types=frozenset({"customer_erasure_requested"}))
    key, secret = keys.create("backoffice", "x")
    assert "customer_erasure_requested" not in key.event_types
    assert keys.authenticate(secret).role is Role.NONE


def test_keys_made_before_roles_keep_working(tmp_path: Path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("""CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL UNIQUE, source TEXT NOT NULL,
                  name TEXT NOT NULL, store_id TEXT, event_types TEXT NOT NULL, rate_per_second REAL NOT NULL,
                  burst INTEGER NOT NULL, created_at REAL NOT NULL, revoked_at REAL)""")
    db.execute("INSERT INTO api_keys VALUES ('k1', 'h', 'backoffice', 'old', NULL, ?, 200, 2000, 0, NULL)",
               (orjson.dumps(["daily_sign_in", "customer_erasure_requested"]).decode(),))
    db.commit()
    db.close()
    store = ApiKeyStore(path)
    old = store.get("k1")
    assert (old.role, old.source, old.event_types) == (Role.NONE, SourceKind.BACKOFFICE, frozenset({"daily_sign_in"}))
    store.close()


# --- audit -------------------------------------------------------------------------------------------

def test_an_audit_record_says_who_what_whom_why_and_how_it_ended():
    at = datetime(2026, 5, 1, 12, tzinfo=UTC)
    record = audit.build("k123", "support", "read_personal", "refused", "c-9", "  ticket 42 ", "no", at=at)
    key, value = audit.encode(record)
    assert key == b"c-9"
    back = audit.decode(value)
    assert isinstance(back, AuditRecord) and back == record
    assert (back.actor, back.role, back.action, back.customer_key, back.reason, back.outcome, back.at) == (
        "k123", "support", "read_personal", "c-9", "ticket 42", "refused", at)
    # A refusal without a reason is still recorded; actions on no customer are keyed by the actor.
    anonymous = audit.build("cli:ops", OPERATOR, "rotate_master_key", "allowed", reason=None)
    assert anonymous.reason == audit.NO_REASON and audit.encode(anonymous)[0] == b"cli:ops"
    assert audit.cli_actor().startswith("cli:")
    with pytest.raises(ValueError):
        audit.build("k", "support", "delete_everything", "allowed", "c", "r")


# --- the erasure request -------------------------------------------------------------------------------

def test_the_erasure_event_is_keyed_by_the_customer_or_its_alias():
    by_id = erasure_event("c-1", "REQ-7", "k1", datetime(2026, 5, 1, tzinfo=UTC))
    assert by_id["customer_id"] == "c-1" and by_id["type"] == "customer_erasure_requested"
    assert by_id["payload"] == {"request_id": "REQ-7", "requested_by": "k1"}
    by_alias = erasure_event("loyalty_card:L-1", "REQ-8", "cli:ops")
    assert by_alias["identifiers"] == {"loyalty_card": "L-1"} and "customer_id" not in by_alias
    with pytest.raises(ValueError):
        erasure_event("", "REQ", "k1")


# --- export and support read over a fake client ----------------------------------------------------------

class Result:
    def __init__(self, rows: list[dict]):
        self.column_names = list(rows[0]) if rows else []
        self.result_rows = [tuple(row.values()) for row in rows]


class FakeClickHouse:
    """Answers the Reader's queries from tables of dicts, by the table the query reads."""

    def __init__(self, tables: dict[str, list[dict]]):
        self.tables = tables

    def query(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> Result:
        parameters = parameters or {}
        if "system.tables" in sql:
            return Result([{"n": int(parameters["t"] in self.tables)}])
        table = sql.split(" FROM ", 1)[1].split()[0]
        rows = self.tables.get(table, [])
        wanted = set(parameters.get("k", [parameters.get("c")]))
        if "merged_into" in sql and "DISTINCT" in sql:
            return Result([{"customer_key": r["customer_key"]} for r in rows if r.get("merged_into") == parameters["c"]])
        found = [r for r in rows if r.get("customer_key", r.get("record_key")) in wanted]
        if "t" in parameters:
            found = [r for r in found if r["type"] in parameters["t"]]
        if "count()" in sql:
            return Result([{"n": len(found)}])
        return Result(found)


def sealed_row(customer_key: str, type_: str, payload: dict, key_id: str, key: bytes, when: str) -> dict:
    event_id = str(uuid.uuid4())
    event = seal_event({"event_id": event_id, "type": type_, "payload": payload}, key_id, key)
    return {"event_id": uuid.UUID(event_id), "type": type_, "customer_key": customer_key,
            "occurred_at": datetime.fromisoformat(when), "received_at": datetime.fromisoformat(when),
            "amount": Decimal("0.00"), "payload": orjson.dumps(event["payload"]).decode(), "attributed_from": ""}


@pytest.fixture
def world():
    key_id, key = new_key_id(), new_key()
    rows = [
        sealed_row("c-1", "customer_registered", {"name": "Ada L", "email": "ada@example.com"}, key_id, key,
                   "2026-01-01T10:00:00+00:00"),
        sealed_row("c-1", "profile_updated", {"email": "ada@new.example", "address": {"city": "Berlin"}}, key_id, key,
                   "2026-02-01T10:00:00+00:00"),
        sealed_row("c-1", "consent_changed", {"channel": "email", "granted": True, "purpose": "marketing"}, key_id, key,
                   "2026-02-02T10:00:00+00:00"),
    ]
    tables = {"events": rows, "customer_profiles": [{"customer_key": "c-1", "merged_into": "", "marketing_consent": ["email"]}],
              "points_balances": [{"customer_key": "c-1", "available": 10}], "points_ledger": [], "tier_changes": [],
              "segment_changes": [], "churn_alerts": [], "dead_letters": []}
    keys = {key_id: key}
    return tables, keys, key_id


def reader(tables: dict, keys: dict) -> Reader:
    return Reader(FakeClickHouse(tables), {"readonly": 2}, keys.get)


def test_support_read_gives_the_latest_value_of_each_personal_field(world):
    tables, keys, _ = world
    answer = reader(tables, keys).personal("c-1")
    assert answer["fields"] == {"name": "Ada L", "email": "ada@new.example", "address": {"city": "Berlin"}}
    assert answer["sources"]["email"]["occurred_at"] == "2026-02-01T10:00:00+00:00"


def test_the_export_opens_every_event_and_is_json(world):
    tables, keys, _ = world
    document = reader(tables, keys).export("c-1", now=datetime(2026, 3, 1, tzinfo=UTC))
    orjson.dumps(document)  # every value is JSON
    assert [e["type"] for e in document["events"]] == ["customer_registered", "profile_updated", "consent_changed"]
    assert document["events"][0]["payload"] == {"name": "Ada L", "email": "ada@example.com"}
    assert document["personal"]["email"] == "ada@new.example"
    assert document["consents"]["changes"][0]["channel"] == "email"
    assert document["points"]["balance"] == {"customer_key": "c-1", "available": 10}
    assert "pii1." not in orjson.dumps(document).decode()


def test_an_altered_token_names_its_field_and_an_erased_customer_is_gone(world):
    tables, keys, key_id = world
    row = tables["events"][1]
    payload = orjson.loads(row["payload"])
    token = payload["email"]
    payload["email"] = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    tables["events"][1] = {**row, "payload": orjson.dumps(payload).decode()}
    with pytest.raises(TokenRejected, match="payload.email") as rejected:
        reader(tables, keys).personal("c-1")
    assert rejected.value.field == "payload.email" and rejected.value.event_id == str(row["event_id"])
    # Keys shredded: gone, without a date while the erasures table has no row.
    with pytest.raises(Gone, match="nothing personal remains"):
        reader(tables, {}).export("c-1")
    tables["erasures"] = [{"customer_key": "c-1", "erased_at": datetime(2026, 4, 1, tzinfo=UTC), "request_id": "R"}]
    with pytest.raises(Gone, match="erased on 2026-04-01T00:00:00"):
        reader(tables, keys).personal("c-1")


def test_a_customer_the_platform_never_saw_is_unknown(world):
    tables, keys, _ = world
    with pytest.raises(UnknownCustomer):
        reader(tables, keys).export("nobody")
    with pytest.raises(UnknownCustomer):
        reader(tables, keys).personal("nobody")


def test_jsonable_keeps_decimals_exact_and_times_in_utc():
    assert jsonable({"a": Decimal("1.10"), "t": datetime(2026, 1, 1), "u": uuid.UUID(int=1), 3: (1, 2)}) == {
        "a": "1.10", "t": "2026-01-01T00:00:00+00:00", "u": "00000000-0000-0000-0000-000000000001", "3": [1, 2]}


def test_a_customer_back_after_erasure_sees_only_what_they_gave_since(world):
    tables, keys, old_key_id = world
    new_id, fresh = new_key_id(), new_key()
    tables["events"].append(sealed_row("c-1", "profile_updated", {"name": "Ada Again"}, new_id, fresh,
                                       "2026-06-01T10:00:00+00:00"))
    tables["erasures"] = [{"customer_key": "c-1", "erased_at": datetime(2026, 5, 1, tzinfo=UTC), "request_id": "R"}]
    back = Reader(FakeClickHouse(tables), None, {new_id: fresh}.get, live_keys=lambda c: [new_id])
    document = back.export("c-1")
    assert document["personal"] == {"name": "Ada Again"}
    assert {v["field"] for v in document["values_erased"]} >= {"payload.name", "payload.email"}
    assert document["erasures"][0]["request_id"] == "R"
    assert "Ada L" not in orjson.dumps(document).decode()
