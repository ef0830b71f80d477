"""Rows to a sorted, validated stream of catalog events, and rejects (services/importer/build.py, plan.py)."""

import shutil
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from schemas.codec import decode_event
from schemas.envelope import Envelope
from services.importer import build
from services.importer.mapping import load
from services.importer.plan import Plan, build as build_part, merge, plan
from services.importer.report import originals, write_rejects
from services.importer.sample import write_export
from services.ingest.hygiene import identity_hash
from services.ingest.sealing import Sealer, offline_keys
from tests.unit.test_import_mapping import EXAMPLE, HEAD, ORDERS

SECRET = b"test-identity-secret"  # the identity secret e-mails and phones are hashed under
SEALER = Sealer(offline_keys(b"test-data-keys"), SECRET)


def sealed(value: bytes) -> bytes:
    """A planned event as send.py hands it to Kafka: personal fields sealed."""
    return orjson.dumps(SEALER.seal([orjson.loads(value)])[0])

HEADER = "order,customer,at,sku,category,qty,price\n"


def planned(tmp_path: Path, mapping_text: str, files: dict[str, str]) -> Plan:
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    (tmp_path / "mapping.toml").write_text(mapping_text)
    return plan(load(tmp_path / "mapping.toml"), "DE", SECRET)


def events(result: Plan) -> list[dict]:
    return [orjson.loads(event.value) for event in result.events]


def reasons(result: Plan) -> dict[int, str]:
    return {reject.line: reject.reason for reject in result.rejects}


def test_the_lines_of_an_order_become_one_purchase_with_every_line(tmp_path):
    result = planned(tmp_path, HEAD + ORDERS, {"orders.csv": HEADER + "o1,c1,2019-03-01 10:00,s1,grocery,2,3.50\n"
                                                                      "o1,c1,2019-03-01 10:00,s2,bakery,1,1.20\n"})
    (purchase,) = events(result)
    assert purchase["type"] == "purchase_completed" and purchase["customer_id"] == "c1"
    assert purchase["payload"]["lines"] == [
        {"sku": "s1", "category": "grocery", "quantity": 2, "unit_price": "3.50"},
        {"sku": "s2", "category": "bakery", "quantity": 1, "unit_price": "1.20"}]
    assert purchase["occurred_at"] == "2019-03-01T10:00:00+00:00"


def test_one_bad_line_rejects_its_whole_order_and_each_row_says_why(tmp_path):
    result = planned(tmp_path, HEAD + ORDERS, {"orders.csv": HEADER + "o1,c1,2019-03-01 10:00,s1,grocery,2,3.50\n"
                                                                      "o1,c1,2019-03-01 10:00,s2,bakery,-1,1.20\n"
                                                                      "o1,c1,2019-03-01 10:00,s3,bakery,1,-1\n"
                                                                      "o2,c1,2019-03-02 10:00,s1,grocery,1,3.50\n"})
    assert reasons(result) == {2: "order_rejected", 3: "negative_quantity", 4: "negative_amount"}
    assert [e["payload"]["order_id"] for e in events(result)] == ["o2"]


def test_lines_that_disagree_about_their_order_reject_it(tmp_path):
    result = planned(tmp_path, HEAD + ORDERS, {"orders.csv": HEADER + "o1,c1,2019-03-01 10:00,s1,grocery,2,3.50\n"
                                                                      "o1,c2,2019-03-01 10:00,s2,bakery,1,1.20\n"})
    assert reasons(result) == {2: "order_rejected", 3: "inconsistent_order"}
    assert "customer_id is 'c2' here and 'c1' on line 2" in result.rejects[1].detail


@pytest.mark.parametrize("years", [(2015, 2024), (2024, 2024)])
def test_every_row_is_part_of_an_event_or_rejected_exactly_once(tmp_path, years):
    export = write_export(tmp_path, customers=30, years=years)
    result = plan(load(export.mapping), "DE", SECRET)
    assert Counter(reject.reason for reject in result.rejects) == export.expected.rejected
    assert len(result.events) == export.expected.events
    assert sum(tally.rows for tally in result.files) == export.rows
    assert len({(r.source.name, r.line) for r in result.rejects}) == len(result.rejects)


def test_each_customers_events_are_in_time_order_with_the_registration_first(tmp_path):
    result = plan(load(write_export(tmp_path, customers=30).mapping), "DE", SECRET)
    by_customer: dict[bytes, list[tuple[str, str]]] = {}
    for event in result.events:
        body = orjson.loads(event.value)
        by_customer.setdefault(event.key, []).append((decode_event(sealed(event.value)).occurred_at, body["type"]))
    for stream in by_customer.values():
        assert stream == sorted(stream, key=lambda item: item[0])
        assert stream[0][1] == "customer_registered"


def test_every_event_is_what_the_worker_accepts_keyed_by_its_customer(tmp_path):
    result = plan(load(write_export(tmp_path, customers=30).mapping), "DE", SECRET)
    for event in result.events:
        decoded = decode_event(sealed(event.value))
        assert isinstance(decoded, Envelope), decoded
        assert event.key == decoded.customer_key.encode()
        assert decoded.received_at is None
        assert decoded.source.terminal_id == "import:sample"


def test_the_same_files_give_the_same_stream_byte_for_byte(tmp_path):
    mapping = load(write_export(tmp_path, customers=30).mapping)
    first, second = plan(mapping, "DE", SECRET), plan(mapping, "DE", SECRET)
    assert [(e.key, e.value) for e in first.events] == [(e.key, e.value) for e in second.events]
    assert first.digest == second.digest


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_one_export_gives_the_same_stream_from_csv_json_lines_and_parquet(tmp_path, file_format):
    csv_export = write_export(tmp_path / "csv", customers=30, file_format="csv")
    other = write_export(tmp_path / file_format, customers=30, file_format=file_format)
    assert plan(load(other.mapping), "DE", SECRET).digest == plan(load(csv_export.mapping), "DE", SECRET).digest


def test_builders_of_disjoint_partitions_together_make_what_one_builder_makes(tmp_path):
    mapping = load(write_export(tmp_path, customers=40).mapping)
    whole = plan(mapping, "DE", SECRET)
    parts = merge(mapping, [build_part(mapping, "DE", 6, owned, SECRET) for owned in ((0, 3), (1, 4, 5), (2,))])
    assert parts.digest == whole.digest
    assert [(r.source.name, r.line, r.reason) for r in parts.rejects] == \
        [(r.source.name, r.line, r.reason) for r in whole.rejects]
    assert [(t.rows, t.rejected, t.events) for t in parts.files] == [(t.rows, t.rejected, t.events) for t in whole.files]


def test_every_stream_holds_only_customers_kafka_puts_in_its_partition(tmp_path):
    from kafka.partitioner.default import DefaultPartitioner

    class Cluster:
        def topics(self):
            return {"crm.events"}

        def partitions_for_topic(self, topic):
            return set(range(6))

        def available_partitions_for_topic(self, topic):
            return set(range(6))

    streams = plan(load(write_export(tmp_path, customers=40).mapping), "DE", SECRET).streams
    producer_choice = DefaultPartitioner()
    for partition, stream in streams.items():
        for event in stream:
            assert build.partition_of(event.key, 6) == partition
            assert producer_choice.partition("crm.events", None, event.key, None, None, Cluster()) == partition


def test_event_ids_are_uuid5_of_the_imports_namespace_the_kind_and_the_natural_key(tmp_path):
    result = planned(tmp_path, HEAD + ORDERS, {"orders.csv": HEADER + "o1,c1,2019-03-01 10:00,s1,grocery,2,3.50\n"})
    namespace = uuid.uuid5(build.IMPORT_NAMESPACE, "t")
    assert events(result)[0]["event_id"] == str(uuid.uuid5(namespace, "orders:o1"))


def test_the_quick_event_id_is_the_standard_uuid5():
    namespace = uuid.uuid5(build.IMPORT_NAMESPACE, "some-import")
    for name in ("orders:o1", "customers:K-1001", "consent:K-1:email", "reviews:ü/ß|2"):
        assert build.event_id(namespace.bytes, name) == str(uuid.uuid5(namespace, name))


def test_a_natural_key_seen_before_rejects_the_later_row(tmp_path):
    text = HEAD + '[customers]\nfile = "c.csv"\n[customers.columns]\ncustomer_id = "id"\nregistered_at = "at"\n'
    result = planned(tmp_path, text, {"c.csv": "id,at\nc1,2019-01-01\nc1,2019-02-01\nc2,bad\nc2,2019-03-01\n"})
    assert reasons(result) == {3: "duplicate_key", 4: "unparseable_date"}
    assert "also on line 2 of c.csv" in result.rejects[0].detail
    assert len(result.events) == 2  # c2's valid row is not a duplicate of its rejected one


def test_rows_dated_after_the_exports_as_of_are_rejected(tmp_path):
    result = planned(tmp_path, HEAD + ORDERS, {"orders.csv": HEADER + "o1,c1,2025-01-02 10:00,s1,grocery,2,3.50\n"})
    assert reasons(result) == {2: "after_as_of"}


def test_currencies_outside_the_imports_are_refused_and_codes_are_upper_cased(tmp_path):
    text = HEAD + ORDERS + 'currency = "cur"\n'
    result = planned(tmp_path, text, {"orders.csv": HEADER.replace("\n", ",cur\n")
                                      + "o1,c1,2019-03-01 10:00,s1,grocery,2,3.50,eur\n"
                                      + "o2,c1,2019-03-01 10:00,s1,grocery,2,3.50,USD\n"})
    assert reasons(result) == {3: "unknown_currency"}
    assert events(result)[0]["payload"]["currency"] == "EUR"


def test_customers_get_their_email_and_phone_normalised_and_hashed_as_the_api_does(tmp_path):
    text = HEAD + ('[customers]\nfile = "c.csv"\n[customers.columns]\ncustomer_id = "id"\nregistered_at = "at"\n'
                   'email = "mail"\nphone = "phone"\nname = ["first", "last"]\nconsent_sms = "sms"\n')
    result = planned(tmp_path, text, {"c.csv": "id,at,mail,phone,first,last,sms\n"
                                               "c1,2019-01-01,  Ada@Example.COM ,0151 23456789,Ada,Lovelace,yes\n"
                                               "c2,2019-01-01,not-an-address,,Bob,,no\n"})
    registered, consent = events(result)
    assert registered["payload"]["email"] == "ada@example.com"
    assert registered["payload"]["phone"] == "+4915123456789"
    assert registered["payload"]["name"] == "Ada Lovelace"
    assert registered["identifiers"] == {"email_hash": identity_hash(SECRET, "ada@example.com"),
                                         "phone_hash": identity_hash(SECRET, "+4915123456789")}
    assert consent["type"] == "consent_changed" and consent["payload"] == {"channel": "sms", "granted": True}
    assert reasons(result) == {3: "invalid_email"}


def test_the_customer_key_is_the_one_the_envelope_gives():
    cases = [("c1", {"loyalty_card": "L"}), (None, {"app_user_id": "a", "loyalty_card": "L"}),
             (None, {"email_hash": "e", "phone_hash": "p"}), (None, {"app_user_id": "a"})]
    for customer_id, identifiers in cases:
        envelope = Envelope(event_id=uuid.uuid4(), type="x", customer_id=customer_id, identifiers=identifiers,
                            occurred_at="2020-01-01T00:00:00Z", source={"channel": "pos"})
        assert build.customer_key(customer_id, identifiers) == envelope.customer_key


def test_a_points_balance_becomes_an_adjustment_at_the_exports_as_of(tmp_path):
    text = HEAD + '[points]\nfile = "p.csv"\n[points.columns]\nloyalty_card = "card"\npoints = "balance"\n'
    result = planned(tmp_path, text, {"p.csv": "card,balance\nL1,250\nL2,0\nL3,-5\n"})
    (adjustment,) = events(result)
    assert adjustment["identifiers"] == {"loyalty_card": "L1"} and adjustment["occurred_at"] == "2025-01-01T00:00:00+00:00"
    assert adjustment["payload"] == {"adjustment_id": "import:t:loyalty_card:L1", "points": 250,
                                     "reason": "opening balance", "operator": "import:t"}
    assert reasons(result) == {3: "zero_points", 4: "negative_points"}


def test_an_events_entry_maps_columns_to_the_payload_of_any_catalog_type(tmp_path):
    text = HEAD + ('[[events]]\ntype = "survey_answered"\nfile = "s.jsonl"\nkey = ["survey", "who"]\n'
                   '[events.columns]\ncustomer_id = "who"\noccurred_at = "at"\n'
                   '[events.payload]\nsurvey_id = "survey"\nkind = "kind"\nscore = "score"\n')
    result = planned(tmp_path, text, {"s.jsonl": '{"survey": "s1", "who": "c1", "at": "2020-01-01T10:00:00Z", '
                                                 '"kind": "nps", "score": 9}\n'
                                                 '{"survey": "s1", "who": "c2", "at": "2020-01-01T10:00:00Z", '
                                                 '"kind": "nps", "score": 11}\n'})
    (survey,) = events(result)
    assert survey["payload"] == {"survey_id": "s1", "kind": "nps", "score": 9}
    assert survey["event_id"] == str(uuid.uuid5(uuid.uuid5(build.IMPORT_NAMESPACE, "t"), "survey_answered:s1|c1"))
    assert reasons(result) == {2: "schema_invalid"}
    assert "payload" in result.rejects[0].detail


def test_the_reject_report_keeps_each_row_as_it_was_in_the_file(tmp_path):
    quoted = 'o2,c1,2019-03-01 10:00,"s1\nsecond line",grocery,0,3.50'
    result = planned(tmp_path, HEAD + ORDERS, {"orders.csv": HEADER + "o1,c1,2019-03-01 10:00,s1,grocery,2,3.50\n"
                                                                      + quoted + "\n" + "o3,c1,oops,s,g,1,1\n"})
    assert reasons(result) == {3: "zero_quantity", 5: "unparseable_date"}
    rows = originals(result.rejects)
    assert rows[("orders.csv", 3)] == quoted.encode()
    assert rows[("orders.csv", 5)] == b"o3,c1,oops,s,g,1,1"
    write_rejects(tmp_path / "rejected.csv", result.rejects, rows)
    assert "second line" in (tmp_path / "rejected.csv").read_text()


def test_the_documented_example_gives_what_the_docs_show(tmp_path):
    result = plan(load(EXAMPLE), "DE", SECRET)
    assert (len(result.events), result.customers, len(result.rejects)) == (13, 3, 8)
    assert Counter(r.reason for r in result.rejects) == {
        "invalid_email": 1, "unparseable_date": 1, "order_rejected": 1, "negative_quantity": 1,
        "missing_customer": 1, "too_many_decimals": 1, "zero_points": 1, "schema_invalid": 1}


ORDERS_AS = """[orders]
file = "orders.{ext}"
datetime_format = "iso"
decimal_separator = "."
thousands_separator = ""
[orders.columns]
order_id = "order"
customer_id = "customer"
occurred_at = "at"
store_id = "store"
sku = "sku"
category = "category"
quantity = "quantity"
unit_price = "unit_price"
discount = "discount"
currency = "currency"
payment_method = "payment"

[refunds]"""


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_the_documented_orders_in_json_lines_and_parquet_give_the_same_stream(tmp_path, ext):
    shutil.copytree(EXAMPLE.parent, tmp_path, dirs_exist_ok=True)
    text = EXAMPLE.read_text()
    start, end = text.index("[orders]"), text.index("[refunds]")
    (tmp_path / "other.toml").write_text(text[:start] + ORDERS_AS.format(ext=ext) + text[end + len("[refunds]"):])
    assert plan(load(tmp_path / "other.toml"), "DE", SECRET).digest == plan(load(EXAMPLE), "DE", SECRET).digest
