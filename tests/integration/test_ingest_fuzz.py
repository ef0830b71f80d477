"""Fuzzing the ingestion API with hypothesis, against the real broker (the `stack` and `api` session
fixtures). What is sent is derived from the API's own OpenAPI description (/openapi.json): its POST
operations, the batch wrapper and its `maxItems`; every answer is checked against the statuses and
schemas that description documents. The bodies are valid events from tests/factories.py, mutated
field by field (wrong types, missing fields, huge strings, unknown fields, bad and future dates,
nested garbage, invalid e-mails and phones), arbitrary JSON values, duplicates with the same and
with different content, and raw bytes (empty, not UTF-8, not JSON, around the size limits) under
wrong or missing Content-Types and keys.

Properties, for every request:
- the status is below 500 and is one the OpenAPI description documents for the operation, and the
  body is JSON of the documented schema with an X-Request-ID header;
- an error of the whole request carries a non-empty `error` and `detail`, and is the one
  docs/ingestion.md calls for (401, 413, 400 malformed_json / bad_request, 413 too_many_events);
- a batch answer has one result per item, in order, with consistent counts; every status is
  accepted, duplicate or rejected; a rejected item has a reason and errors with field and message;
- where the generated input decides it, the item's outcome is the one the rules call for (a valid
  event is accepted and marked late when it is; an invalid one is rejected, with the expected
  reason and field; a resent item is a duplicate, a changed one with a known id a conflict);
and, at the end of each test, read back from Kafka:
- every event id the API reported accepted was reported so once and is on crm.events exactly once,
  under its customer's key; no other event id sent is on crm.events (one whose request was
  answered 5xx may be, once: a retry then finds it a duplicate);
- every rejected item, and every body that was not JSON, is on the dead-letter topic with its reason.

Schemathesis is not used: the request bodies in the OpenAPI description are open objects ("one
event of the catalog"), so schema-driven generation reaches little past `unknown_type`; the
strategies here know the catalog through the factories."""

from __future__ import annotations

import copy
import json
import os
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from schemas.codec import MAX_EVENT_BYTES
from services.ingest.api import MAX_BODY_BYTES
from services.ingest.keys import ApiKey, SourceKind
from streams import topics
from tests.factories import submitted as event  # the API takes what producers submit: personal values plain
from tests.integration.test_ingest_api import on_topic

pytestmark = pytest.mark.integration

# Examples per test, chosen so the file runs in about two minutes on the busy 2-core machine;
# CRM_FUZZ_SCALE=10 runs ten times as many.
SCALE = float(os.environ.get("CRM_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, max_examples=int(300 * SCALE), print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])

TYPES = ["purchase_completed", "purchase_refunded", "product_viewed", "daily_sign_in", "survey_answered",
         "customer_registered"]
KEY_NAMES = ["backoffice", "app", "pos-store-1", "pos-store-9"]
STATUSES = {"accepted", "duplicate", "rejected"}
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain", "",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml"]
ALIASES = ("loyalty_card", "app_user_id", "phone_hash", "email_hash", "device_id")
LATE = timedelta(days=7)


# --- fixtures: the OpenAPI description, a client, keys with a high rate limit ----------------------

@dataclass
class Operation:
    path: str
    responses: dict[str, dict]  # status -> response schema
    batch: bool                 # the body wraps its events in {"events": [...]}
    max_items: int | None


@dataclass
class Spec:
    document: dict
    operations: dict[str, Operation]

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            schema = self.document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return schema


@pytest.fixture(scope="module")
def spec(api) -> Spec:
    document = httpx.get(f"{api.url}/openapi.json", timeout=30).json()
    operations = {}
    for path, methods in document["paths"].items():
        post = methods.get("post")
        if not post or not path.startswith("/v1/events"):  # the events endpoints; others (privacy) have their own tests
            continue
        body = post["requestBody"]["content"]["application/json"]["schema"]
        events = body.get("properties", {}).get("events")
        responses = {code: answer.get("content", {}).get("application/json", {}).get("schema", {})
                     for code, answer in post["responses"].items()}
        operations[path] = Operation(path, responses, batch=events is not None,
                                     max_items=events.get("maxItems") if events else None)
    assert {op.batch for op in operations.values()} == {True, False}, "a single and a batch endpoint"
    return Spec(document, operations)


@pytest.fixture(scope="module")
def keys(api) -> dict[str, tuple[ApiKey, str]]:
    options = dict(rate_per_second=1e6, burst=10**8)
    return {
        "backoffice": api.keys.create("backoffice", "fuzz-backoffice", **options),
        "app": api.keys.create("app", "fuzz-app", **options),
        "pos-store-1": api.keys.create("pos", "fuzz-pos-1", store_id="store-1", **options),
        "pos-store-9": api.keys.create("pos", "fuzz-pos-9", store_id="store-9", **options),
    }


@pytest.fixture(scope="module")
def client(api):
    with httpx.Client(base_url=api.url, timeout=120) as client:
        yield client


# --- templates: events with placeholders filled in at send time -----------------------------------
# Event ids are fresh UUIDs drawn when a request is sent, not by hypothesis: replaying or shrinking
# an example then never meets an id the API remembers from an earlier example, so outcomes do not
# depend on history. Items that must share an id (resends, conflicts) share a slot.

@dataclass
class Fresh:
    slot: int
    form: str = "canonical"  # how the UUID is written: all these are the same id to the API


@dataclass
class Now:
    minutes: float  # occurred_at this long after the time of sending


@dataclass
class Deep:
    depth: int  # `depth` nested arrays, written directly as JSON text


def realise(value: Any, ids: dict[int, uuid.UUID], now: datetime) -> Any:
    if isinstance(value, Fresh):
        u = ids.setdefault(value.slot, uuid.uuid4())
        return {"canonical": str(u), "upper": str(u).upper(), "hex": u.hex, "braces": "{%s}" % u,
                "urn": f"urn:uuid:{u}"}[value.form]
    if isinstance(value, Now):
        return (now + timedelta(minutes=value.minutes)).isoformat()
    if isinstance(value, dict):
        return {k: realise(v, ids, now) for k, v in value.items()}
    if isinstance(value, list):
        return [realise(v, ids, now) for v in value]
    return value


def encode(value: Any) -> str:
    """JSON text; big integers, and nesting deeper than Python's json module allows."""
    if isinstance(value, Deep):
        return "[" * value.depth + "0" + "]" * value.depth
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def canonical_id(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


# --- strategies ------------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
not_scalars = st.sampled_from([[], [1, "x"], {}, {"k": "v"}])

BAD_DATES = ["2026-03-01", "2026-03-01T10:00:00", "2026-02-30T10:00:00Z", "2026-13-01T00:00:00Z", "yesterday", "",
             "2026-03-01T25:00:00Z", "10:00:00Z", "2026/03/01 10:00:00Z", "2026-03-01T10:00:00+25:00", "NaN", True]
LATE_DATES = ["2024-03-01T10:00:00+00:00", "2020-02-29T23:59:59.999999Z"]
# More than ten years before receipt: refused as a wrong clock (docs/ingestion.md).
TOO_OLD_DATES = ["1900-01-01T00:00:00+00:00", "0001-01-01T00:00:00Z"]
PAST_DATES = LATE_DATES + TOO_OLD_DATES
FUTURE_DATES = ["2999-01-01T00:00:00Z", "9999-12-31T23:59:59.999999-23:59"]


@dataclass
class Item:
    """One event (or anything else) of a request, and what the rules make of it."""
    body: Any
    expect: str | None = None        # "accepted" / "rejected" when the input decides it, else None
    reason: str | None = None        # the rejection reason, when known
    error_field: str | None = None   # a field an error must name, when known
    late: bool | None = None
    same_as: int | None = None       # a resend of an earlier item of the request (same id and content)
    conflicts_with: int | None = None  # same id as an earlier item, other (valid) content
    story: list[str] = field(default_factory=list)


@st.composite
def valid_events(draw, slot: int) -> Item:
    type_ = draw(st.sampled_from(TYPES))
    when = draw(st.one_of(st.floats(-60 * 24 * 30, 4).map(Now), st.sampled_from(LATE_DATES)))
    customer = f"fuzz-{draw(st.integers(0, 40))}"
    body = event(type_, customer_id=draw(st.sampled_from([customer, f"  {customer} "])), occurred_at=when,
                 event_id=Fresh(slot, draw(st.sampled_from(["canonical", "canonical", "upper", "hex", "braces",
                                                            "urn"]))))
    if draw(st.booleans()):
        body["identifiers"] = {"loyalty_card": f"card-{draw(st.integers(0, 40))}"}
    if "currency" in body["payload"] and draw(st.booleans()):
        body["payload"]["currency"] = draw(st.sampled_from(["eur", " Eur ", "EUR"]))
    if type_ == "customer_registered":
        body["payload"].update(draw(st.sampled_from([{}, {"email": "  Ada.Lovelace@Example.COM "},
                                                     {"phone": "030 1234567"}, {"phone": "+49 30 1234567"}])))
    if draw(st.integers(0, 5)) == 0:
        body["source"]["timezone"] = "Europe/Berlin"
    if isinstance(when, Now):
        late = True if when.minutes < -(LATE.total_seconds() / 60 + 5) else \
            False if when.minutes > -(LATE.total_seconds() / 60 - 5) else None
    else:
        late = True
    return Item(body, "accepted", late=late, story=[f"valid {type_}"])


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            found.append(prefix + (k,))
            found.extend(paths(v, prefix + (k,)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.append(prefix + (i,))
            found.extend(paths(v, prefix + (i,)))
    return found


def get(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


def put(value: Any, path: tuple, new: Any) -> None:
    get(value, path[:-1])[path[-1]] = new


def reason_at(path: tuple, default: str = "schema_invalid") -> str:
    return {("type",): "unknown_type", ("schema_version",): "unsupported_schema_version"}.get(path, default)


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def overlaps(a: tuple, b: tuple) -> bool:
    return a[:len(b)] == b or b[:len(a)] == a


@st.composite
def mutation(draw, body: dict, touched: list[tuple]) -> tuple[str | None, str | None, str | None, str]:
    """Change `body` in place; return (expected status, reason, field an error names, what was done).
    A mutation leaves alone whatever an earlier one changed (`touched`), so that none undoes another."""
    def free(path: tuple) -> bool:
        return not any(overlaps(path, t) for t in touched)

    def touch(path: tuple) -> tuple:
        touched.append(path)
        return path

    everything = [p for p in paths(body) if free(p) and not any(isinstance(get(body, p[:n]), Deep)
                                                                 for n in range(1, len(p)))]
    leaves = [p for p in everything if not isinstance(get(body, p), (dict, list, Deep))]
    containers = [()] + [p for p in everything if isinstance(get(body, p), dict)]
    containers = [c for c in containers if not any(c[:len(t)] == t for t in touched)]
    op = draw(st.sampled_from(["delete", "wrong_type", "unknown_field", "huge", "long", "bad_date", "future",
                               "past", "deep", "random", "bad_personal", "bad_version", "unknown_type",
                               "alias_only"]))
    if op == "delete" and everything:
        path = touch(draw(st.sampled_from(everything)))
        del get(body, path[:-1])[path[-1]]
        if path == ("customer_id",):
            # identifiers, or an e-mail or phone (hashed into identifiers), may name the customer instead
            named = "identifiers" in body or (isinstance(body.get("payload"), dict)
                                              and ({"email", "phone"} & set(body["payload"])))
            return (None if named else "rejected"), "schema_invalid", None, f"delete {dotted(path)}"
        if path in {("event_id",), ("type",), ("occurred_at",), ("source",), ("source", "channel")}:
            return "rejected", reason_at(path), None, f"delete {dotted(path)}"
        if path == ("schema_version",):
            return "accepted", None, None, "delete schema_version (defaults to 1)"
        return None, None, None, f"delete {dotted(path)}"
    if op == "wrong_type" and everything:
        path = touch(draw(st.sampled_from(everything)))
        current = get(body, path)
        new = draw(st.sampled_from([[], "text", 7, True]) if isinstance(current, dict) else
                   st.sampled_from([{"k": 1}, "text", 7]) if isinstance(current, list) else not_scalars)
        put(body, path, new)
        return "rejected", reason_at(path), None, f"{dotted(path)} = {new!r}"
    if op == "unknown_field":
        where = draw(st.sampled_from(containers))
        name = "zz_" + draw(st.text(max_size=12))
        if not free(where + (name,)):
            return "accepted", None, None, "unchanged"
        touch(where + (name,))
        get(body, where)[name] = draw(json_values)
        return "rejected", "schema_invalid", dotted(where + (name,)), f"unknown field {dotted(where + (name,))}"
    if op == "huge":
        path = touch(draw(st.sampled_from(leaves + [p for p in [("zz_huge",)] if free(p)])))
        char = draw(st.sampled_from(["x", "é", "😀"]))
        size = draw(st.integers(MAX_EVENT_BYTES + 1, 3_000_000)) // len(char.encode())
        put(body, path, char * size)
        return "rejected", "too_large", None, f"{dotted(path)} = {char!r} * {size}"
    if op == "long" and leaves:
        path = touch(draw(st.sampled_from(leaves)))
        size = draw(st.integers(201, 20_000))
        put(body, path, "y" * size)
        if path == ("customer_id",) or path[:1] == ("identifiers",):
            return "rejected", "schema_invalid", dotted(path), f"{dotted(path)} = 'y' * {size} (limit 200)"
        if path in {("type",), ("schema_version",), ("occurred_at",), ("event_id",), ("source", "channel")}:
            return "rejected", reason_at(path), None, f"{dotted(path)} = 'y' * {size}"
        return None, None, None, f"{dotted(path)} = 'y' * {size}"
    if op in ("bad_date", "future", "past") and not free(("occurred_at",)):
        return "accepted", None, None, "unchanged"
    if op in ("bad_date", "future", "past"):
        touch(("occurred_at",))
    if op == "bad_date":
        value = draw(st.sampled_from(BAD_DATES) | st.text(st.characters(codec="utf-8", categories=["L", "P", "Z"]),
                                                          max_size=20))
        body["occurred_at"] = value
        return "rejected", "schema_invalid", "occurred_at", f"occurred_at = {value!r}"
    if op == "future":
        value = draw(st.sampled_from(FUTURE_DATES) | st.floats(10, 60 * 24 * 365 * 50).map(Now))
        body["occurred_at"] = value
        return "rejected", "occurred_in_future", "occurred_at", f"occurred_at = {value!r}"
    if op == "past":
        body["occurred_at"] = draw(st.sampled_from(PAST_DATES))
        if body["occurred_at"] in TOO_OLD_DATES:
            return "rejected", "occurred_too_long_ago", "occurred_at", f"occurred_at = {body['occurred_at']!r}"
        return "accepted", None, None, f"occurred_at = {body['occurred_at']!r}"
    if op == "deep":
        path = touch(draw(st.sampled_from(everything + [p for p in [("zz_deep",)] if free(p)])))
        levels = draw(st.one_of(st.integers(1, 60), st.integers(240, 270), st.integers(1000, 1030)))
        put(body, path, Deep(levels))
        # Past about 250 levels the event is refused as too_deep before its fields are looked at.
        return "rejected", reason_at(path) if levels < 200 else None, None, f"{dotted(path)} = {levels} nested arrays"
    if op == "random" and everything:
        path = touch(draw(st.sampled_from(everything)))
        value = draw(json_values)
        put(body, path, value)
        return None, None, None, f"{dotted(path)} = {value!r}"
    if op == "bad_personal" and isinstance(body.get("payload"), dict) and free(("payload", "email")) \
            and free(("payload", "phone")):
        name, value = draw(st.sampled_from([("email", "not-an-email"), ("email", "a@b"), ("email", "a b@c.de"),
                                            ("phone", "12"), ("phone", "+49 abc"), ("phone", "0" * 300)]))
        touch(("payload", name))
        body["payload"][name] = value
        return "rejected", "schema_invalid", f"payload.{name}", f"payload.{name} = {value!r}"
    if op == "bad_version" and free(("schema_version",)):
        touch(("schema_version",))
        value = draw(st.sampled_from([0, -1, 2, 99, 2**63, "1", 1.5, None]))
        body["schema_version"] = value
        return "rejected", "unsupported_schema_version", "schema_version", f"schema_version = {value!r}"
    if op == "unknown_type" and free(("type",)):
        touch(("type",))
        value = draw(st.text(max_size=30).filter(lambda t: t not in TYPES) | st.sampled_from(["Daily_Sign_In", ""]))
        body["type"] = value
        return "rejected", "unknown_type", "type", f"type = {value!r}"
    if op == "alias_only" and isinstance(body.get("identifiers"), dict) and "customer_id" in body \
            and free(("customer_id",)) and free(("identifiers",)):
        del body[touch(("customer_id",))[0]]
        return "accepted", None, None, "customer_id left out, identifiers name the customer"
    return "accepted", None, None, "unchanged"


@st.composite
def mutated_events(draw, slot: int) -> Item:
    item = draw(valid_events(slot))
    touched: list[tuple] = []
    outcomes = [draw(mutation(item.body, touched)) for _ in range(draw(st.integers(1, 3)))]
    expects = {o[0] for o in outcomes}
    item.story += [o[3] for o in outcomes]
    item.late = None
    if None in expects:
        item.expect = None
    elif "rejected" in expects:
        item.expect = "rejected"
        real = [o for o in outcomes if o[0] == "rejected"]
        if len(real) == 1 and len(outcomes) == 1:
            item.reason, item.error_field = real[0][1], real[0][2]
    else:
        item.expect = "accepted"
    return item


@st.composite
def anything(draw, slot: int) -> Item:
    value = draw(json_values)
    if not isinstance(value, dict):
        return Item(value, "rejected", "not_an_object", "(event)", story=["not an object"])
    if isinstance(value.get("type"), str) and value["type"] not in TYPES:
        return Item(value, "rejected", "unknown_type", "type", story=["random object"])
    return Item(value, None, story=["random object"])


@st.composite
def batch_items(draw, most: int = 8) -> list[Item]:
    items: list[Item] = []
    for index in range(draw(st.integers(0, most))):
        earlier = [i for i, it in enumerate(items) if isinstance(it.body, dict) and isinstance(it.body.get("event_id"), Fresh)]
        kind = draw(st.sampled_from(["valid", "mutated", "mutated", "anything", "same", "changed"]))
        if kind in ("same", "changed") and earlier:
            j = draw(st.sampled_from(earlier))
            body = copy.deepcopy(items[j].body)
            if kind == "same":
                items.append(Item(body, same_as=j, story=[f"resend of item {j}"]))
            else:
                body["customer_id"] = f"fuzz-changed-{index}"
                items.append(Item(body, conflicts_with=j, story=[f"item {j} with another customer_id"]))
        elif kind == "valid":
            items.append(draw(valid_events(index)))
        elif kind == "anything":
            items.append(draw(anything(index)))
        else:
            items.append(draw(mutated_events(index)))
    return items


@dataclass
class Request:
    path: str
    key: str | None            # a name in KEY_NAMES, or None for a request without a valid key
    items: list[Item] | None   # the events, when the body is built from items
    raw: bytes | None = None   # else the body as bytes
    content_type: str | None = "application/json"
    authorization: str | None = None  # when `key` is None: what the Authorization header says
    request_id: str | None = None
    spoil: str | None = None    # how the encoded body is spoiled: invalid_utf8, utf16, bom, truncate, empty
    story: str = ""


def body_variants(spoil: str | None, text: str, draw) -> bytes:
    body = text.encode()
    if spoil == "invalid_utf8":
        at = draw(st.integers(0, len(body)))
        return body[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + body[at:]
    if spoil == "utf16":
        return text.encode("utf-16")
    if spoil == "bom":
        return b"\xef\xbb\xbf" + body
    if spoil == "truncate":
        return body[:draw(st.integers(0, max(len(body) - 1, 0)))]
    if spoil == "empty":
        return b""
    return body


@st.composite
def item_requests(draw, spec: Spec) -> Request:
    op = spec.operations[draw(st.sampled_from(sorted(spec.operations)))]
    items = draw(batch_items(8)) if op.batch else [draw(st.one_of(valid_events(0), mutated_events(0),
                                                                  mutated_events(0), anything(0)))]
    key = draw(st.sampled_from(["backoffice"] * 2 + KEY_NAMES))
    spoil = draw(st.sampled_from([None] * 12 + ["invalid_utf8", "utf16", "bom", "truncate", "empty"]))
    return Request(op.path, key, items, content_type=draw(st.sampled_from(CONTENT_TYPES[1:2] * 6 + CONTENT_TYPES)),
                   spoil=spoil, request_id=f"fuzz-{uuid.uuid4().hex}")


printable_ids = st.from_regex(r"[!-~]([ -~]{0,148}[!-~])?", fullmatch=True)


@st.composite
def raw_requests(draw, spec: Spec) -> Request:
    op = spec.operations[draw(st.sampled_from(sorted(spec.operations)))]
    kind = draw(st.sampled_from(["bytes", "json", "wrapper", "size", "padded", "too_many", "empty"]))
    if kind == "bytes":
        raw = draw(st.binary(max_size=3000))
    elif kind == "json":
        raw = encode(draw(json_values)).encode()
    elif kind == "wrapper":
        items = draw(st.lists(json_values, max_size=3))
        raw = encode(draw(st.sampled_from([{"events": items, "extra": 1}, {"Events": items}, {"events": None},
                                           {"events": {"0": items}}, items, {}, {"events": items}]))).encode()
    elif kind == "size":
        size = draw(st.one_of(st.integers(0, 4096), st.integers(MAX_BODY_BYTES - 64, MAX_BODY_BYTES + 64),
                              st.integers(4096, MAX_BODY_BYTES)))
        raw = (draw(st.sampled_from([b"x", b"{", b"\xff", b" ", b"[1,"])) * size)[:size]
    elif kind == "padded":  # valid JSON, padded with whitespace to a size around the limits
        size = draw(st.one_of(st.integers(MAX_BODY_BYTES - 64, MAX_BODY_BYTES + 64), st.integers(0, MAX_BODY_BYTES)))
        core = orjson.dumps({"events": []} if op.batch else event("daily_sign_in", customer_id="fuzz-padded",
                                                                   event_id=str(uuid.uuid4())))
        raw = core + b" " * max(size - len(core), 0)
    elif kind == "too_many":
        count = draw(st.integers((op.max_items or 1) + 1, (op.max_items or 1) + 50))
        raw = encode({"events": [{}] * count} if op.batch else [{}] * count).encode()
    else:
        raw = b""
    auth = draw(st.sampled_from(["valid"] * 4 + ["none", "basic", "bearer-empty", "unknown", "revoked-looking"]))
    return Request(op.path, "backoffice" if auth == "valid" else None, None, raw=raw,
                   content_type=draw(st.sampled_from(CONTENT_TYPES)),
                   authorization={"valid": None, "none": None, "basic": "Basic Zm9vOmJhcg==", "bearer-empty": "Bearer",
                                  "unknown": "Bearer crm_000000000000_nothing",
                                  "revoked-looking": "bearer crm_ffff_" + "x" * 43}[auth],
                   request_id=draw(st.none() | st.just("") | printable_ids), story=f"{kind}, auth {auth}")


# --- sending and checking ----------------------------------------------------------------------------

class Wanted(set):
    """Ids to look for with on_topic: a dead letter's body is whatever was sent, and its `event_id`
    may be a JSON list or object, which a plain set cannot be asked about."""

    def __contains__(self, candidate: object) -> bool:
        try:
            return super().__contains__(candidate)
        except TypeError:
            return False


class Ledger:
    """What the API said, to compare with what Kafka holds at the end."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.accepted: Counter[str] = Counter()
        self.sent: set[str] = set()    # event ids of requests the API answered below 500
        self.maybe: set[str] = set()   # ... answered 5xx or not at all: at most once on the topic
        self.keys: dict[str, bytes] = {}
        self.letters: dict[str, Counter[str]] = {}

    def assert_kafka_agrees(self, stack) -> None:
        problems: dict[str, list[str]] = {}

        def problem(kind: str, text: str) -> None:
            problems.setdefault(kind, []).append(text)

        for event_id, n in self.accepted.items():
            if n > 1:
                problem("reported accepted more than once", f"{event_id}: {n} times")
        found = on_topic(stack, topics.EVENTS.name, Wanted(self.sent | self.maybe | set(self.accepted)))
        for event_id in self.accepted:
            copies = found.get(event_id, [])
            if len(copies) != 1:
                problem(f"reported accepted, not once on {topics.EVENTS.name}", f"{event_id}: {len(copies)} copies")
            elif event_id in self.keys and copies[0][0].key != self.keys[event_id]:
                problem("on the topic under another key", f"{event_id}: {copies[0][0].key!r}, not {self.keys[event_id]!r}")
        for event_id in self.sent - self.maybe - set(self.accepted):
            if event_id in found:
                problem(f"never reported accepted, yet on {topics.EVENTS.name}", f"{event_id}: {len(found[event_id])} copies")
        for event_id in self.maybe - set(self.accepted):
            if len(found.get(event_id, [])) > 1:
                problem(f"request answered 5xx, event more than once on {topics.EVENTS.name}",
                        f"{event_id}: {len(found[event_id])} copies")
        letters = on_topic(stack, topics.DEAD_LETTERS.name, Wanted(self.letters))
        for request_id, reasons in self.letters.items():
            there = Counter(dict(record.headers)["crm.dlq.reason"].decode() for record, _ in letters.get(request_id, []))
            if there != reasons:
                problem("dead letters differ from the rejections", f"request {request_id}: {dict(there)}, "
                                                                     f"expected {dict(reasons)}")
        assert not problems, "what Kafka holds disagrees with the answers:\n" + "\n".join(
            f"- {kind}: {len(texts)}, e.g. {'; '.join(texts[:3])}" for kind, texts in problems.items())


def validate(value: Any, schema: dict, spec: Spec, where: str = "body") -> None:
    """The parts of JSON Schema the API's OpenAPI description uses."""
    schema = spec.resolve(schema)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return validate(value, option, spec, where)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: matches no option: {errors}")
    kinds = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict, "null": type(None)}
    if "type" in schema:
        assert isinstance(value, kinds[schema["type"]]) and not (schema["type"] == "integer" and isinstance(value, bool)), \
            f"{where}: {value!r} is not {schema['type']}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for name in schema.get("required", []):
            assert name in value, f"{where}: no {name!r}"
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                validate(value[name], sub, spec, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            validate(v, schema["items"], spec, f"{where}[{i}]")


def headers_for(request: Request, keys: dict) -> dict[str, str]:
    headers = {}
    if request.key:
        headers["Authorization"] = f"Bearer {keys[request.key][1]}"
    elif request.authorization is not None:
        headers["Authorization"] = request.authorization
    if request.content_type is not None:
        headers["Content-Type"] = request.content_type
    if request.request_id is not None:
        headers["X-Request-ID"] = request.request_id
    return headers


def check_answer(response: httpx.Response, request: Request, spec: Spec, sent: bytes) -> dict:
    """What holds for every answer, whatever was sent."""
    operation = spec.operations[request.path]
    assert response.status_code < 500, f"{response.status_code} {response.text[:1000]}"
    assert str(response.status_code) in operation.responses, \
        f"{response.status_code} is not documented for {request.path}: {response.text[:500]}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    validate(body, operation.responses[str(response.status_code)], spec)
    if request.request_id:
        assert response.headers["x-request-id"] == request.request_id[:100]
    else:
        assert response.headers["x-request-id"]
    if "results" in body:
        results = body["results"]
        assert [r["index"] for r in results] == list(range(len(results)))
        counts = Counter(r["status"] for r in results)
        assert set(counts) <= STATUSES
        assert (body["accepted"], body["duplicates"], body["rejected"]) == \
            (counts["accepted"], counts["duplicate"], counts["rejected"])
        for r in results:
            if r["status"] == "rejected":
                assert isinstance(r["reason"], str) and r["reason"], r
                assert r["errors"] and all(isinstance(e["field"], str) and e["field"] and isinstance(e["message"], str)
                                           and e["message"] for e in r["errors"]), r
            else:
                assert r["event_id"] == canonical_id(r["event_id"]) and r["reason"] is None and not r["errors"], r
        if not operation.batch:
            assert len(results) == 1
            assert response.status_code == (422 if results[0]["status"] == "rejected" else 200), body
    else:
        assert isinstance(body["error"], str) and body["error"], body
        assert isinstance(body["detail"], str) and body["detail"].strip(), body
        assert "Traceback" not in body["detail"]
        if response.status_code == 401:
            assert response.headers.get("www-authenticate") == "Bearer"
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
    # The whole-request rules of docs/ingestion.md.
    error = body.get("error")
    if request.key is None:
        assert (response.status_code, error) == (401, "unauthorized"), body
        return body
    if len(sent) > MAX_BODY_BYTES:
        assert (response.status_code, error) == (413, "body_too_large"), body
        return body
    try:
        parsed = orjson.loads(sent)
    except orjson.JSONDecodeError:
        assert (response.status_code, error) == (400, "malformed_json"), body
        return body
    if operation.batch:
        if not (isinstance(parsed, dict) and set(parsed) == {"events"} and isinstance(parsed["events"], list)):
            assert (response.status_code, error) == (400, "bad_request"), body
        elif len(parsed["events"]) > operation.max_items:
            assert (response.status_code, error) == (413, "too_many_events"), body
        else:
            assert response.status_code == 200 and len(body["results"]) == len(parsed["events"]), body
    else:
        assert response.status_code in (200, 422) and "results" in body, body
        if not isinstance(parsed, dict):
            assert body["results"][0]["reason"] == "not_an_object", body
    return body


def expected_key(item: dict) -> bytes | None:
    customer = item.get("customer_id")
    if isinstance(customer, str) and customer.strip():
        return customer.strip().encode()
    identifiers = item.get("identifiers")
    if "customer_id" not in item and isinstance(identifiers, dict) and identifiers.get(ALIASES[0]):
        return f"{ALIASES[0]}:{identifiers[ALIASES[0]].strip()}".encode()
    return None


def key_rule(item: dict, key: ApiKey) -> str | None:
    """The rejection reason a valid event gets from the key's scope, if any."""
    if item["type"] not in key.event_types:
        return "type_not_allowed"
    if key.source is SourceKind.POS:
        stores = {item["source"].get("store_id") or key.store_id, item.get("payload", {}).get("store_id")} - {None}
        if stores != {key.store_id}:
            return "store_not_allowed"
    return None


def check_items(body: dict, request: Request, realised: list[Any], keys: dict) -> None:
    """Each item's outcome against what the rules call for, where the input decides it."""
    key = keys[request.key][0]
    results = body["results"]
    for index, (item, sent, result) in enumerate(zip(request.items, realised, results)):
        status, reason = result["status"], result["reason"]
        what = f"item {index} ({'; '.join(item.story)}): {result}"
        if status == "rejected":
            expected_id = sent.get("event_id") if isinstance(sent, dict) and isinstance(sent.get("event_id"), str) else None
            assert result["event_id"] == expected_id, what
        else:
            assert result["event_id"] == canonical_id(sent.get("event_id")), what
        if item.same_as is not None:
            earlier = results[item.same_as]
            if earlier["status"] == "rejected":
                assert (status, reason) == ("rejected", earlier["reason"]), what
            else:
                assert status == "duplicate", what
            continue
        if item.conflicts_with is not None:
            if results[item.conflicts_with]["status"] != "rejected":
                assert (status, reason) == ("rejected", "conflicting_duplicate"), what
                assert result["errors"][0]["field"] == "event_id", what
            continue
        expect, expected_reason = item.expect, item.reason
        if expect == "accepted":
            scope = key_rule(sent, key)
            if scope:
                expect, expected_reason = "rejected", scope
        if expect == "accepted":
            # Earlier items of the request with the same id make it a duplicate or a conflict;
            # the strategies give every other item its own id.
            assert status == "accepted", what
            if item.late is not None:
                assert result["late"] is item.late, what
        elif expect == "rejected":
            assert status == "rejected", what
            if key.source is SourceKind.BACKOFFICE and expected_reason:
                assert reason == expected_reason, what
            if key.source is SourceKind.BACKOFFICE and item.error_field:
                assert any(e["field"] == item.error_field for e in result["errors"]), what


def record(ledger: Ledger, realised: list[Any] | None, body: dict, request_id: str | None) -> None:
    """The answer's accepted event ids (with their expected Kafka key, when `realised` is what was
    sent), and the dead letters its request id should have (unless it is None: not unique)."""
    with ledger.lock:
        if "results" in body:
            reasons = Counter(r["reason"] for r in body["results"] if r["status"] == "rejected")
            if reasons and request_id:
                ledger.letters[request_id] = reasons
            for r, sent in zip(body["results"], realised or [None] * len(body["results"])):
                if r["status"] == "accepted":
                    ledger.accepted[r["event_id"]] += 1
                    key = expected_key(sent) if isinstance(sent, dict) else None
                    if key:
                        ledger.keys[r["event_id"]] = key
        elif body.get("error") == "malformed_json" and request_id:
            ledger.letters[request_id] = Counter({"malformed_json": 1})


def send(client: httpx.Client, request: Request, body: bytes, keys: dict, ledger: Ledger,
         event_ids: set[str]) -> httpx.Response:
    """Send; note the request's event ids as sent, or as maybe written when the API failed."""
    try:
        response = client.post(request.path, content=body, headers=headers_for(request, keys))
    except httpx.HTTPError:
        with ledger.lock:
            ledger.maybe |= event_ids
        raise
    with ledger.lock:
        (ledger.maybe if response.status_code >= 500 else ledger.sent).update(event_ids)
    return response


def serialise(request: Request, spec: Spec, realised: list[Any]) -> str:
    if spec.operations[request.path].batch:
        return encode({"events": realised})
    return encode(realised[0])


def sent_ids(realised: list[Any]) -> set[str]:
    return {i for i in (canonical_id(x.get("event_id")) for x in realised if isinstance(x, dict)) if i}


def run_then_read_kafka(run, ledger: Ledger, stack) -> None:
    """Kafka is read back even when hypothesis found a failure: an event on the topic twice, or one
    never reported accepted, is then reported too (chained to the failure)."""
    try:
        run()
    finally:
        print(f"{sum(ledger.accepted.values())} events reported accepted, {len(ledger.sent)} event ids sent, "
              f"{len(ledger.letters)} requests with dead letters")
        ledger.assert_kafka_agrees(stack)


# --- the tests -------------------------------------------------------------------------------------------

def test_events_mutated_field_by_field(stack, api, spec, keys, client):
    ledger = Ledger()

    @FUZZ
    @given(request=item_requests(spec), data=st.data())
    def run(request: Request, data: st.DataObject) -> None:
        realised = realise([item.body for item in request.items], {}, datetime.now(UTC))
        body = body_variants(request.spoil, serialise(request, spec, realised), data.draw)
        note(f"{request.path} key={request.key} content-type={request.content_type!r} spoil={request.spoil} "
             f"items={[item.story for item in request.items]}\nbody[:3000]={body[:3000]!r}")
        response = send(client, request, body, keys, ledger, sent_ids(realised))
        answer = check_answer(response, request, spec, body)
        record(ledger, realised if request.spoil is None else None, answer, request.request_id)
        if "results" in answer and request.spoil is None:
            check_items(answer, request, realised, keys)

    run_then_read_kafka(run, ledger, stack)


def test_raw_bodies_sizes_keys_and_content_types(stack, api, spec, keys, client):
    ledger = Ledger()

    @settings(FUZZ, max_examples=int(150 * SCALE))
    @given(request=raw_requests(spec))
    def run(request: Request) -> None:
        tracked = request.request_id is None  # a unique id, to find its dead letters
        if tracked:
            request.request_id = f"fuzz-raw-{uuid.uuid4().hex}"
        try:
            parsed = orjson.loads(request.raw)
        except orjson.JSONDecodeError:
            parsed = None
        note(f"{request.path} {request.story} content-type={request.content_type!r} request-id={request.request_id!r} "
             f"{len(request.raw)} bytes: {request.raw[:300]!r}")
        response = send(client, request, request.raw, keys, ledger, sent_ids([parsed]))
        answer = check_answer(response, request, spec, request.raw)
        record(ledger, None, answer, request.request_id if tracked else None)

    run_then_read_kafka(run, ledger, stack)


def test_resends_concurrent_and_changed_duplicates(stack, api, spec, keys):
    """A client that resends (after a timeout, or from two places at once) must not get an event
    written twice: across all answers an event is accepted once, every other answer says duplicate;
    the same ids with other content are conflicts."""
    ledger = Ledger()
    batch = next(op for op in spec.operations.values() if op.batch)
    clients = [httpx.Client(base_url=api.url, timeout=120) for _ in range(4)]

    def post(client: httpx.Client, body: bytes, request_id: str, event_ids: set[str]) -> dict:
        request = Request(batch.path, "backoffice", None, request_id=request_id)
        return check_answer(send(client, request, body, keys, ledger, event_ids), request, spec, body)

    @settings(FUZZ, max_examples=int(40 * SCALE))
    @given(items=st.lists(st.integers(0, 5), min_size=1, max_size=6).flatmap(
        lambda kinds: st.tuples(*[valid_events(i) if k else mutated_events(i) for i, k in enumerate(kinds)])),
        copies=st.integers(1, 4))
    def run(items: tuple[Item, ...], copies: int) -> None:
        realised = realise([item.body for item in items], {}, datetime.now(UTC))
        body = encode({"events": realised}).encode()
        ids = sent_ids(realised)
        note(f"{copies} concurrent copies of {[item.story for item in items]}")
        answers: list[dict | BaseException] = [None] * copies  # type: ignore[list-item]
        barrier = threading.Barrier(copies)
        request_ids = [f"fuzz-dup-{uuid.uuid4().hex}" for _ in range(copies)]

        def one(n: int) -> None:
            barrier.wait()
            try:
                answers[n] = post(clients[n], body, request_ids[n], ids)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                answers[n] = exc

        threads = [threading.Thread(target=one, args=(n,)) for n in range(copies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        for answer, request_id in zip(answers, request_ids):
            record(ledger, realised, answer, request_id)
        if any("results" not in answer for answer in answers):
            # The body as a whole was refused (an item nested past the JSON parser's depth makes
            # it unreadable): every copy gets the same answer, and nothing was written.
            assert {answer.get("error") for answer in answers} == {"malformed_json"}, answers
            return
        for index, item in enumerate(items):
            statuses = Counter(answer["results"][index]["status"] for answer in answers)
            reasons = {answer["results"][index]["reason"] for answer in answers}
            what = f"item {index} ({'; '.join(item.story)}) in {copies} concurrent copies: {dict(statuses)}"
            if statuses["rejected"]:
                assert statuses["rejected"] == copies and len(reasons) == 1, what
            else:
                assert statuses == Counter({"accepted": 1, "duplicate": copies - 1}), what

        # A resend afterwards: nothing new; then the same ids with other content: conflicts.
        again = post(clients[0], body, f"fuzz-dup-{uuid.uuid4().hex}", ids)
        record(ledger, realised, again, again["request_id"])
        for before, after in zip(answers[0]["results"], again["results"]):
            if before["status"] == "rejected":
                assert (after["status"], after["reason"]) == ("rejected", before["reason"]), (before, after)
            else:
                assert after["status"] == "duplicate", (before, after)
        changed = [{**x, "customer_id": "fuzz-changed"} if isinstance(x, dict) else x for x in realised]
        conflict = post(clients[0], encode({"events": changed}).encode(), f"fuzz-dup-{uuid.uuid4().hex}", ids)
        record(ledger, changed, conflict, conflict["request_id"])
        for before, after in zip(answers[0]["results"], conflict["results"]):
            if before["status"] != "rejected":
                assert (after["status"], after["reason"]) == ("rejected", "conflicting_duplicate"), (before, after)

    try:
        run_then_read_kafka(run, ledger, stack)
    finally:
        for c in clients:
            c.close()


@settings(deadline=None, max_examples=int(40 * SCALE))
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
       path=st.sampled_from(["/v1/events", "/v1/events/batch", "/health", "/ready", "/openapi.json"])
       | st.from_regex(r"/[a-z0-9_\-]{1,12}(/[a-z0-9_\-]{1,12})?", fullmatch=True))
def test_undeclared_methods_and_paths(api, spec, method, path):
    """Outside the operations the description declares: a 404 or 405 with a message, never a 5xx."""
    declared = {path: {m.upper() for m in methods} for path, methods in spec.document["paths"].items()}
    declared.update({docs: {"GET"} for docs in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect")})
    if method in declared.get(path, set()):
        return
    response = httpx.request(method, f"{api.url}{path}", content=b"{}", timeout=60)
    assert response.status_code < 500, response.text
    assert response.status_code == (405 if path in declared else 404), (response.status_code, response.text)
    detail = response.json().get("detail")
    assert isinstance(detail, str) and detail, response.text
