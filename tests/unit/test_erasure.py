"""Erasure by deleting the key: a `customer_erasure_requested` event in the log makes the worker's
fold shred every data key the customer's events were sealed under, wipe the profile's personal
traces, unlink the aliases, forfeit the points, close the open alerts and say so in crm.erasures;
as a function of the log, so a replay does it alike and a redelivery changes nothing."""

import uuid
from datetime import UTC, datetime, timedelta

import orjson

from schemas.clock import clock_tick
from schemas.privacy import CustomerErased
from streams import topics
from streams.config import settings as crm_settings
from streams.erasure import partition_of
from streams.outputs import (
    REDACTED_HEADER, Accepted, AlertChanged, DeadLetter, Erased, Forward, KeyShredded, LedgerEntry, ProfileChanged,
)
from streams.pipeline import load_customer, process
from streams.records import SourceRecord
from streams.rulebooks import load_rulebooks
from tests.factories import encoded, event, sealed, submitted, test_key

RULES = load_rulebooks(crm_settings())
T0 = datetime(2026, 3, 2, 10, tzinfo=UTC)
PARTITIONS = topics.EVENT_PARTITIONS
CUSTOMER = "erase-me"


def alias_in(partition: int, same: bool) -> str:
    """A loyalty card whose alias key lies in `partition` (same) or in another one."""
    for n in range(1000):
        card = f"LC{n}"
        if (partition_of(f"loyalty_card:{card}") == partition) == same:
            return card
    raise AssertionError("no such card")


class Log:
    """A small events topic of PARTITIONS partitions, each with its own state as in the worker,
    keyed as Kafka places keys; what the worker appends (Forward) goes back into the log."""

    def __init__(self, forwarding: bool = True):
        self.forwarding = forwarding  # False for a replay: what the worker appended is in the log already
        self.records: list[SourceRecord] = []
        self.offsets = [0] * PARTITIONS
        self.stores = [{} for _ in range(PARTITIONS)]
        self.seen = [{} for _ in range(PARTITIONS)]
        self.outputs: list = []
        self._position = 0

    def send(self, key: str, body: dict, partition: int | None = None) -> SourceRecord:
        partition = partition_of(key) if partition is None else partition
        record = SourceRecord(key.encode(), encoded(body), partition, self.offsets[partition], 0)
        self.offsets[partition] += 1
        self.records.append(record)
        return record

    def run(self) -> list:
        produced = []
        while self._position < len(self.records):
            record = self.records[self._position]
            self._position += 1
            outputs = process(record, self.stores[record.partition], self.seen[record.partition], RULES)
            produced += outputs
            for output in outputs:
                if isinstance(output, Forward) and self.forwarding:
                    self.send(output.key, output.record)
        self.outputs += produced
        return produced

    def state(self, key: str):
        return load_customer(self.stores[partition_of(key)], key)


def erasure_request(customer: str, at: datetime, request_id: str = "req-1") -> dict:
    return event("customer_erasure_requested", customer_id=customer, occurred_at=at.isoformat(),
                 source={"channel": "service"}, payload={"request_id": request_id, "requested_by": "dpo@shop"})


def customer_with_history(near: str, far: str) -> Log:
    """A member who registered (personal data sealed under their key), bought, filed a complaint left
    open long enough to raise an alert, and has two loyalty cards: one whose alias lies in the
    customer's partition, one elsewhere; before the link, the far card sent a profile update of its
    own, sealed under the card's key."""
    log = Log()
    card_update = submitted("profile_updated", occurred_at=T0.isoformat(), payload={"phone": "+4930123456"})
    del card_update["customer_id"]
    card_update["identifiers"] = {"loyalty_card": far}
    log.send(f"loyalty_card:{far}", sealed(card_update))
    log.send(CUSTOMER, event("customer_registered", customer_id=CUSTOMER, occurred_at=T0.isoformat(),
                             identifiers={"loyalty_card": near}))
    log.send(CUSTOMER, event("identity_linked", customer_id=CUSTOMER, occurred_at=(T0 + timedelta(minutes=1)).isoformat(),
                             payload={"alias_type": "loyalty_card", "alias_value": far}))
    log.send(CUSTOMER, event("purchase_completed", customer_id=CUSTOMER, occurred_at=(T0 + timedelta(hours=1)).isoformat()))
    log.send(CUSTOMER, event("complaint_filed", customer_id=CUSTOMER, occurred_at=(T0 + timedelta(hours=2)).isoformat(),
                             payload={"complaint_id": "k-1", "category": "delivery"}))
    log.run()
    partition = partition_of(CUSTOMER)
    log.send("clock", orjson.loads(clock_tick(partition, T0 + timedelta(days=3))), partition)
    log.run()
    return log


def erased(outputs: list) -> CustomerErased:
    [record] = [o for o in outputs if isinstance(o, Erased)]
    return CustomerErased.model_validate(record.data)


def test_erasure_shreds_every_data_key_the_customer_s_events_were_sealed_under_and_says_so():
    near, far = alias_in(partition_of(CUSTOMER), True), alias_in(partition_of(CUSTOMER), False)
    log = customer_with_history(near, far)
    own, cards = test_key(CUSTOMER)[0], test_key(f"loyalty_card:{far}")[0]
    assert log.state(CUSTOMER).data_keys == tuple(sorted({own, cards}))

    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    outputs = log.run()

    shredded = [o for o in outputs if isinstance(o, KeyShredded)]
    assert sorted(o.key_id for o in shredded) == sorted({own, cards})
    assert all(o.to_record().topic == "crm.customer-keys" and o.to_record().value is None
               and o.to_record().key == o.key_id.encode() for o in shredded)
    record = erased(outputs)
    assert record.customer_key == CUSTOMER and sorted(record.data_keys_shredded) == sorted({own, cards})
    assert record.request_id == "req-1" and record.erased_at == T0 + timedelta(days=4)
    assert [o.to_record().topic for o in outputs if isinstance(o, Erased)] == ["crm.erasures"]
    state = log.state(CUSTOMER)
    assert state.data_keys == () and state.erased


def test_erasure_wipes_the_personal_traces_of_the_profile_and_marks_it_erased():
    near, far = alias_in(partition_of(CUSTOMER), True), alias_in(partition_of(CUSTOMER), False)
    log = customer_with_history(near, far)
    before = log.state(CUSTOMER).profile
    assert before.contact and before.aliases

    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    outputs = log.run()

    [snapshot] = [o.profile for o in outputs if isinstance(o, ProfileChanged)]
    assert snapshot.contact == () and snapshot.aliases == () and snapshot.consent == {}
    assert snapshot.erased_at_ms == int((T0 + timedelta(days=4)).timestamp() * 1000)
    assert snapshot.version > before.version
    # What stays is pseudonymous: the figures about purchases, under the customer key.
    assert snapshot.purchase_count == before.purchase_count == 1
    assert snapshot.to_record()["erased_at_ms"] is not None


def test_erasure_closes_the_open_alerts_with_status_erased():
    log = customer_with_history(alias_in(0, True), alias_in(0, False))
    assert log.state(CUSTOMER).churn.open

    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    outputs = log.run()

    closing = [o.data for o in outputs if isinstance(o, AlertChanged)]
    assert [change["status"] for change in closing] == ["erased"]
    assert erased(outputs).alerts_closed == [closing[0]["alert_id"]]
    state = log.state(CUSTOMER)
    assert state.churn.open == {} and state.profile.open_alerts == () and state.due_ms is None


def test_erasure_forfeits_the_points_with_a_ledger_movement_and_the_ledger_stays_balanced():
    log = customer_with_history(alias_in(0, True), alias_in(0, False))
    account = log.state(CUSTOMER).account
    held = account.available + account.pending
    assert held > 0

    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    outputs = log.run()

    [forfeit] = [o.data for o in outputs if isinstance(o, LedgerEntry) and o.data.get("kind") == "forfeited"]
    assert forfeit["reason"] == "erasure"
    assert forfeit["available_delta"] + forfeit["pending_delta"] == -held
    assert (forfeit["available_after"], forfeit["pending_after"], forfeit["debt_after"]) == (0, 0, 0)
    assert erased(outputs).points_forfeited == held
    movements = [o.data for o in log.outputs if isinstance(o, LedgerEntry) and o.data["entry"] == "movement"]
    assert sum(m["available_delta"] + m["pending_delta"] for m in movements) == 0
    assert log.state(CUSTOMER).profile.points_available == 0


def card_event(card: str, at: datetime) -> dict:
    """An event that names its customer only by a loyalty card."""
    later = event("product_viewed", occurred_at=at.isoformat(), identifiers={"loyalty_card": card})
    del later["customer_id"]
    return later


def test_erasure_tells_an_alias_in_another_partition_to_forget_its_link_and_its_later_events_stay_with_it():
    near, far = alias_in(partition_of(CUSTOMER), True), alias_in(partition_of(CUSTOMER), False)
    log = customer_with_history(near, far)
    assert log.state(f"loyalty_card:{far}").linked_to == CUSTOMER

    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    outputs = log.run()
    assert sorted(erased(outputs).aliases_unlinked) == sorted([f"loyalty_card:{near}", f"loyalty_card:{far}"])
    [unlink] = [o for o in outputs if isinstance(o, Forward) and o.record["type"] == "alias_unlinked"]
    assert (unlink.key, unlink.record["customer_id"]) == (f"loyalty_card:{far}", CUSTOMER)
    assert log.state(f"loyalty_card:{far}").linked_to is None

    log.send(f"loyalty_card:{far}", card_event(far, T0 + timedelta(days=5)))
    outputs = log.run()
    assert not [o for o in outputs if isinstance(o, (DeadLetter, Forward))]
    assert [o.event.customer_key for o in outputs if isinstance(o, Accepted)] == [f"loyalty_card:{far}"]
    assert log.state(CUSTOMER).erased  # the card's event did not bring the customer back


def test_what_a_link_elsewhere_attributes_before_it_hears_of_the_erasure_is_refused_not_attributed():
    near, far = alias_in(partition_of(CUSTOMER), True), alias_in(partition_of(CUSTOMER), False)
    log = customer_with_history(near, far)
    # The card's event is in the log before the worker appends the alias_unlinked record: the card
    # still forwards it, and the erased customer refuses it.
    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    log.send(f"loyalty_card:{far}", card_event(far, T0 + timedelta(days=4, minutes=1)))
    outputs = log.run()
    assert [o.reason for o in outputs if isinstance(o, DeadLetter)] == ["alias_unlinked"]
    assert log.state(f"loyalty_card:{far}").linked_to is None
    assert log.state(CUSTOMER).erased


def test_an_alias_in_the_customer_s_partition_forgets_its_link():
    partition = partition_of(CUSTOMER)
    near = alias_in(partition, True)
    log = Log()
    anonymous = event("product_viewed", occurred_at=T0.isoformat(), identifiers={"loyalty_card": near})
    del anonymous["customer_id"]
    log.send(f"loyalty_card:{near}", anonymous)
    log.send(CUSTOMER, event("customer_registered", customer_id=CUSTOMER, occurred_at=T0.isoformat(),
                             identifiers={"loyalty_card": near}))
    log.run()
    assert log.state(f"loyalty_card:{near}").linked_to == CUSTOMER

    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=1)))
    log.run()
    assert log.state(f"loyalty_card:{near}").linked_to is None
    assert log.state(CUSTOMER).unlinked_aliases == ()


def test_a_replay_of_the_same_log_gives_the_same_state_and_outputs():
    near, far = alias_in(partition_of(CUSTOMER), True), alias_in(partition_of(CUSTOMER), False)
    live = customer_with_history(near, far)
    live.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    live.run()

    replay = Log(forwarding=False)
    replay.records = list(live.records)
    replay.offsets = list(live.offsets)
    replay.run()

    assert [o.to_record() for o in replay.outputs if not isinstance(o, Forward)] == \
        [o.to_record() for o in live.outputs if not isinstance(o, Forward)]
    assert [{k: v.to_dict() for k, v in store.items() if k.startswith("c|")} for store in replay.stores] == \
        [{k: v.to_dict() for k, v in store.items() if k.startswith("c|")} for store in live.stores]


def test_a_redelivered_erasure_request_changes_nothing_and_sends_the_same_records_again():
    log = customer_with_history(alias_in(0, True), alias_in(0, False))
    request = log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    first = log.run()
    store = log.stores[request.partition]
    before = {key: value.to_dict() for key, value in store.items() if key.startswith("c|")}

    again = process(request, store, log.seen[request.partition], RULES)

    assert {key: value.to_dict() for key, value in store.items() if key.startswith("c|")} == before
    kinds = (KeyShredded, Erased, AlertChanged, LedgerEntry)
    assert [o.to_record() for o in again if isinstance(o, kinds)] == [o.to_record() for o in first if isinstance(o, kinds)]
    # A producer's resend of the request (same event, another offset) is a duplicate.
    resent = log.send(CUSTOMER, orjson.loads(request.value))
    assert [type(o).__name__ for o in process(resent, store, log.seen[resent.partition], RULES)] == ["Duplicate"]


def test_erasure_of_an_unknown_customer_shreds_nothing_and_still_answers():
    log = Log()
    log.send("nobody", erasure_request("nobody", T0))
    outputs = log.run()
    assert [type(o).__name__ for o in outputs] == ["Accepted", "Erased"]
    record = erased(outputs)
    assert (record.data_keys_shredded, record.aliases_unlinked, record.points_forfeited, record.alerts_closed) == \
        ([], [], 0, [])
    assert log.state("nobody") is None


def test_a_customer_who_comes_back_after_erasure_is_a_new_customer_numbering_on():
    log = customer_with_history(alias_in(0, True), alias_in(0, False))
    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    log.run()
    gone = log.state(CUSTOMER)

    log.send(CUSTOMER, event("customer_registered", customer_id=CUSTOMER, occurred_at=(T0 + timedelta(days=30)).isoformat()))
    outputs = log.run()
    back = log.state(CUSTOMER)
    assert back.profile.erased_at_ms is None and back.profile.purchase_count == 0
    assert back.profile.version > gone.profile.version and back.account.seq >= gone.account.seq
    assert back.churn.opened_count == gone.churn.opened_count
    assert back.data_keys == (test_key(CUSTOMER)[0],)
    assert any(isinstance(o, Accepted) for o in outputs)


def test_dead_letters_keep_no_plain_personal_data():
    plain = submitted("customer_registered", customer_id="c-1")
    record = SourceRecord(b"c-1", encoded(plain), 0, 0, 0)
    [letter] = process(record, {}, {}, RULES)
    assert letter.reason == "personal_data_in_clear"
    sent = letter.to_record()
    body = orjson.loads(sent.value)
    assert body["payload"]["email"] == "[redacted]" and body["payload"]["name"] == "[redacted]"
    assert b"ada@example.com" not in sent.value and b"Ada" not in sent.value
    assert dict(sent.headers)[REDACTED_HEADER]
    assert dict(sent.headers)["crm.dlq.source.offset"] == b"0"

    # Refused for another reason (a wrong key), plain e-mail identifiers are redacted too.
    other = {**plain, "payload": {}, "identifiers": {"email": "ada@example.com", "loyalty_card": "LC1"}}
    [letter] = process(SourceRecord(b"c-2", encoded(other), 0, 1, 0), {}, {}, RULES)
    assert b"ada@example.com" not in letter.to_record().value

    # A record with nothing personal keeps its bytes as they were.
    clean = encoded({**event("daily_sign_in"), "event_id": str(uuid.uuid4())})
    [letter] = process(SourceRecord(b"someone-else", clean, 0, 2, 0), {}, {}, RULES)
    assert letter.reason == "wrong_key" and letter.to_record().value == clean
    assert REDACTED_HEADER not in dict(letter.to_record().headers)


def test_the_writer_makes_rows_of_erasures_audit_records_and_erased_profiles():
    from types import SimpleNamespace

    from projections import audit_table, erasures_table, profiles_table
    from projections.replay import TABLES
    from projections.writer import COLUMNS, SINKS
    from schemas.privacy import AuditRecord

    log = customer_with_history(alias_in(0, True), alias_in(0, False))
    log.send(CUSTOMER, erasure_request(CUSTOMER, T0 + timedelta(days=4)))
    outputs = log.run()
    sent = [o.to_record() for o in outputs if isinstance(o, (Erased, ProfileChanged))]
    records = [SimpleNamespace(topic=r.topic, partition=0, offset=n, key=r.key, value=r.value, headers=r.headers)
               for n, r in enumerate(sent)]
    [erasure_row] = SINKS[topics.ERASURES.name]([r for r in records if r.topic == topics.ERASURES.name])["erasures"]
    assert len(erasure_row) == len(erasures_table.COLUMNS) and erasure_row[0] == CUSTOMER
    assert erasure_row[4] == T0 + timedelta(days=4)
    [profile_row] = profiles_table.rows([r for r in records if r.topic == topics.PROFILES.name])
    assert profile_row[profiles_table.COLUMNS.index("erased_at")] == T0 + timedelta(days=4)

    audit = AuditRecord(audit_id=uuid.uuid4(), at=T0, actor="cli:dpo", role="privacy_officer", action="erase",
                        customer_key=CUSTOMER, reason="ticket-1", outcome="allowed")
    [audit_row] = audit_table.rows([SimpleNamespace(topic="crm.audit", partition=0, offset=0, key=None,
                                                    value=audit.model_dump_json().encode())])
    assert len(audit_row) == len(audit_table.COLUMNS) == len(COLUMNS["audit_log"])
    # A rebuild from the log makes erasures again and leaves the audit log alone.
    assert "erasures" in TABLES and "audit_log" not in TABLES


def test_an_alias_unlinked_record_under_another_key_or_malformed_is_a_dead_letter_not_a_crash():
    near, far = alias_in(partition_of(CUSTOMER), True), alias_in(partition_of(CUSTOMER), False)
    log = customer_with_history(near, far)
    unlink = {"event_id": str(uuid.uuid4()), "type": "alias_unlinked", "occurred_at": T0.isoformat(),
              "alias_key": f"loyalty_card:{far}", "customer_id": CUSTOMER, "cause_event_id": str(uuid.uuid4())}
    log.send("someone-else", unlink, partition_of(f"loyalty_card:{far}"))
    log.send(f"loyalty_card:{far}", {**unlink, "customer_id": ""})
    outputs = log.run()
    assert [o.reason for o in outputs if isinstance(o, DeadLetter)] == ["wrong_key", "schema_invalid"]
    assert log.state(f"loyalty_card:{far}").linked_to == CUSTOMER
