"""The intake (`crm intake`, services/intake/) against the real broker and worker: a producer that
writes plain events to `crm.intake` gets them checked, sealed into `crm.events` and folded into
profiles; what the rules refuse lands in `crm.intake.deadletter` with the reason, and nothing plain
reaches the log (docs/intake.md)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from schemas.codec import decode_event
from schemas.envelope import Envelope
from streams import topics
from tests.factories import submitted
from tests.integration.conftest import CrmProcess, records_on

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def intake(stack):
    import os

    process = CrmProcess(["intake"], dict(os.environ), stack.settings.state_dir / "intake.log")
    process.start()
    yield process
    process.stop()


def records_of(stack, topic: str) -> list:
    return records_on(stack.settings.kafka_bootstrap, topic)


def with_event_ids(records: list, wanted: set[str]) -> dict[str, list]:
    found: dict[str, list] = {}
    for record in records:
        try:
            body = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(body, dict) and body.get("event_id") in wanted:
            found.setdefault(body["event_id"], []).append(record)
    return found


def test_plain_intake_records_are_sealed_into_the_log_and_folded_and_bad_ones_dead_lettered(stack, intake):
    now = datetime.now(UTC)
    customer = f"intake-{uuid.uuid4().hex[:8]}"
    email = f"{customer}@example.org"
    registered = submitted("customer_registered", customer_id=customer, occurred_at=(now - timedelta(days=400)).isoformat(),
                           payload={"name": "Ida Intake", "email": email.upper(), "birthday": "1985-04-02",
                                    "address": {"line1": "Kafkastrasse 9", "city": "Prag"}})
    purchase = submitted("purchase_completed", customer_id=customer, occurred_at=now.isoformat())
    by_email = submitted("daily_sign_in", occurred_at=now.isoformat())
    by_email.pop("customer_id")
    by_email["identifiers"] = {"email": email}
    future = submitted("daily_sign_in", customer_id=customer, occurred_at=(now + timedelta(hours=3)).isoformat())
    for body in (registered, purchase, by_email, future):
        stack.send(customer.encode(), orjson.dumps(body), topic=topics.INTAKE.name)
    stack.send(customer.encode(), b'{"type": "daily_sign_in", "payload": {"email": "' + email.encode(),
               topic=topics.INTAKE.name)
    stack.flush()

    # Sealed, keyed by customer, in crm.events; folded into a profile.
    stack.wait_for(lambda: stack.query("SELECT count() FROM customer_profiles FINAL WHERE customer_key = {c:String} "
                                       "AND purchase_count = 1", {"c": customer})[0][0] == 1,
                   timeout=300, what=f"the profile of {customer} from crm.intake; intake log: {intake.log_path}")
    wanted = {registered["event_id"], purchase["event_id"], by_email["event_id"]}
    written = stack.wait_for(lambda: (found := with_event_ids(records_of(stack, topics.EVENTS.name), wanted))
                             and len(found) == 3 and found, timeout=120, what="the three events in crm.events")
    plain = [b"Ida", b"Intake", email.encode(), email.upper().encode(), b"1985-04-02", b"Kafkastrasse", b"Prag"]
    for [record, *_] in written.values():
        assert not any(value in record.value for value in plain), record.value
        decoded = decode_event(record.value)
        assert isinstance(decoded, Envelope), decoded
        assert record.key == decoded.customer_key.encode()
    registration = orjson.loads(written[registered["event_id"]][0].value)
    assert registration["payload"]["email"].startswith("pii1.") and registration["payload"]["birth_month"] == 4
    assert registration["identifiers"]["email_hash"]  # the keyed hash, as the API adds it
    assert written[by_email["event_id"]][0].key == f"email_hash:{registration['identifiers']['email_hash']}".encode()
    # History is welcome (400 days ago), and nothing of it is refused by the worker.
    letters = [r for r in records_of(stack, topics.DEAD_LETTERS.name)
               if any(event_id.encode() in (r.value or b"") for event_id in wanted)]
    assert letters == []

    # The refused ones: in crm.intake.deadletter, as they came, with the reason and where they came from.
    def refused():
        found = [r for r in records_of(stack, topics.INTAKE_DEAD_LETTERS.name) if r.key == customer.encode()]
        return found if len(found) == 2 else None

    reasons = {dict(r.headers)["crm.dlq.reason"].decode(): r for r in stack.wait_for(refused, timeout=120,
                                                                                       what="two intake dead letters")}
    assert set(reasons) == {"occurred_in_future", "malformed_json"}
    headers = dict(reasons["occurred_in_future"].headers)
    assert headers["crm.dlq.source.topic"] == b"crm.intake" and b"occurred_at" in headers["crm.dlq.detail"]
    assert orjson.loads(reasons["occurred_in_future"].value)["event_id"] == future["event_id"]
    assert intake.running  # a refused record never stops it
