"""Hostile input for the alerts service's HTTP API (services/alerts/api.py), in process: the FastAPI app
is called directly as an ASGI application, on an alert log and key store of its own (SQLite files in
a temporary directory; no Kafka, no socket), so a few hundred requests take seconds.

- Every operation of the app's own OpenAPI description, by schemathesis: valid and invalid values of
  every parameter and body field, with a backoffice key, another source's key, a revoked key or no
  key, and with the path's webhook id a real one or not. Each answer must be below 500, of a status,
  content type and schema the description documents, and an invalid request must be refused (4xx).
- What schemathesis does not send, by hypothesis: bodies that are not JSON or not UTF-8, under any
  Content-Type, up to a few MiB; path ids with `..`, encoded slashes, NULs, unicode and 10,000
  characters; Authorization headers with bytes outside ASCII; numbers in the query past 64 bits; the
  live stream's filters, `from=` and resume positions (Last-Event-ID header and parameter) of every
  shape, with the alerts each accepted stream must send.
- Example-based regression tests for the 5xx these found.

The live stream (GET /v1/alerts/stream) never ends on its own: after the log's backlog it waits on
the service's bell for new alerts. The bell here closes when a stream first waits on it, as when the
service is stopping, so an accepted stream sends its backlog and ends, and every answer, 200 included,
is a complete response. Its inputs are checked before streaming starts, as in a running service."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import orjson
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from schemas.alerts import AlertChange, AlertType, Severity
from services.alerts.api import Runtime, create_app
from services.alerts.bell import Bell
from services.alerts.filters import Filters
from services.alerts.store import AlertStore
from services.ingest.keys import ApiKeyStore
from tests.unit.test_alert_delivery import alert, encoded

# Examples per test, chosen so that each test takes a few seconds on the busy 2-core machine;
# CRM_FUZZ_SCALE=10 runs ten times as many.
SCALE = float(os.environ.get("CRM_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, derandomize=True, max_examples=int(200 * SCALE), print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

KEYS = ("backoffice", "pos", "revoked", "none", "garbage")
CONTENT_TYPES = (None, "application/json", "application/json; charset=latin-1", "application/vnd.x+json",
                 "text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/xml", "application/octet-stream", "application/json; boundary=\"\xff\"")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case, values as latin-1 text
    body: bytes


class EndAfterBacklog(Bell):
    """A bell that closes when a stream first waits on it (see the module's docstring)."""

    async def wait(self, timeout: float) -> None:
        self.close()


@dataclass
class Api:
    """The app and what it works on, with a webhook that has one dead delivery."""
    app: FastAPI
    store: AlertStore
    bell: Bell                         # reopened before each request
    loop: asyncio.Runner               # the one event loop every request of the module runs on
    secrets: dict[str, str | None]     # KEYS -> the Authorization header's secret
    hook: str                          # an active webhook's id
    change_ids: list[str]              # the alert log's change_ids, oldest first

    def request(self, method: str, target: str | bytes, headers: dict[str, str | bytes] | None = None,
                body: bytes = b"", key: str | None = "backoffice") -> Answer:
        """`target` (path and query) and the header values go to the app as the bytes given, as
        uvicorn hands them on; no client in between normalises `..` or refuses bytes outside ASCII."""
        sent = [(name.lower().encode(), value if isinstance(value, bytes) else value.encode("latin-1"))
                for name, value in (headers or {}).items()]
        if key is not None and self.secrets[key] is not None:
            sent.append((b"authorization", f"Bearer {self.secrets[key]}".encode()))
        target = target if isinstance(target, bytes) else target.encode("ascii")
        self.bell.closed = False
        return self.loop.run(_asgi(self.app, method, target, sent, body))


async def _asgi(app: FastAPI, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
    raw_path, _, query = target.partition(b"?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": unquote(raw_path.decode("ascii")), "raw_path": raw_path, "query_string": query, "root_path": "",
             "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 50000),
             "server": ("testserver", 80)}
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    complete = asyncio.Event()
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await complete.wait()  # the client stays connected until the answer is whole
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                complete.set()

    await app(scope, receive, send)
    headers_out = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in start["headers"]}
    return Answer(start["status"], headers_out, b"".join(chunks))


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Api]:
    state = tmp_path_factory.mktemp("alerts-fuzz")
    store, keys = AlertStore(state / "alerts.sqlite"), ApiKeyStore(state / "ingest.sqlite")
    secrets = _keys(keys)
    hook, change_ids = _webhook_with_a_dead_letter(store)
    bell = EndAfterBacklog()
    try:
        with asyncio.Runner() as loop:
            yield Api(create_app(Runtime(store, keys, bell)), store, bell, loop, secrets, hook, change_ids)
    finally:
        store.close()
        keys.close()


def _keys(keys: ApiKeyStore) -> dict[str, str | None]:
    _, backoffice = keys.create("backoffice", "fuzz backoffice")
    _, pos = keys.create("pos", "fuzz till", store_id="store-1")
    revoked_key, revoked = keys.create("backoffice", "fuzz revoked")
    keys.revoke(revoked_key.key_id)
    return {"backoffice": backoffice, "pos": pos, "revoked": revoked, "none": None, "garbage": "crm_nope_nope"}


def _webhook_with_a_dead_letter(store: AlertStore) -> tuple[str, list[str]]:
    hook = store.create_subscription("http://127.0.0.1:9/hook", Filters())
    alerts = [alert(f"fuzz-{n}", severity=severity) for n, severity in enumerate(("low", "high", "critical"))]
    store.append([(a, encoded(a)) for a in alerts])
    seq = store.seq_of(str(alerts[0].change_id))
    assert seq is not None
    store.failed(hook.id, seq, attempts=15, error="HTTP 500", response_status=500, retry_at=None)
    return hook.id, [str(a.change_id) for a in alerts]


# --- schemathesis over the OpenAPI description -------------------------------------------------------

def _description() -> dict[str, Any]:
    """The app's OpenAPI description, needed when the tests are collected, before any fixture exists;
    it does not depend on the runtime, so none is given."""
    return create_app(Runtime(store=None, keys=None, bell=Bell())).openapi()  # type: ignore[arg-type]


DESCRIPTION = _description()
schema = schemathesis.openapi.from_dict(DESCRIPTION, config=schemathesis.Config.from_dict({
    "seed": 20260301,
    "generation": {"mode": "all", "max-examples": int(100 * SCALE), "deterministic": True},
    "phases": {"stateful": {"enabled": False}},
    # Off: a request valid by the description may still be refused by design, with a documented 400
    # (a Last-Event-ID the log does not have; the stream's type and min_severity are plain strings).
    "checks": {"positive_data_acceptance": {"enabled": False}},
}))


@schema.parametrize()
@schema.given(key=st.sampled_from(KEYS), real_hook=st.booleans())
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_every_generated_request_below_500_as_documented(case, api, key, real_hook):
    # The key, and whether the path names a real webhook, are chosen here: the description cannot say
    # which values would get past authentication and the lookup.
    if api.secrets[key] is None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    else:
        case.headers = {**(case.headers or {}), "authorization": f"Bearer {api.secrets[key]}"}
    if real_hook and "subscription_id" in (case.path_parameters or {}):
        case.path_parameters = {**case.path_parameters, "subscription_id": api.hook}
    response = case.call_and_validate(app=api.app)
    headers = {name: values[-1] for name, values in response.headers.items()}
    assert_documented_error(response.status_code, response.content, headers)


# --- the answers ------------------------------------------------------------------------------------

def assert_documented_error(status: int, body: bytes, headers: dict[str, str]) -> None:
    """Below 500; an error is the API's problem shape ({"error", "detail"}), or FastAPI's validation
    error ({"detail": [...]}) for a 422, both in the OpenAPI description."""
    assert status < 500, (status, body[:500])
    if status < 400:
        return
    problem = orjson.loads(body)
    if status == 422:
        assert isinstance(problem["detail"], list) and problem["detail"], problem
        return
    assert set(problem) == {"error", "detail"}, problem
    assert isinstance(problem["error"], str) and problem["error"], problem
    assert isinstance(problem["detail"], str) and problem["detail"], problem
    if status == 401:
        assert headers.get("www-authenticate") == "Bearer"


def documented_statuses(method: str, template: str) -> set[int]:
    responses = DESCRIPTION["paths"][template][method.lower()]["responses"]
    return {int(status) for status in responses}


# --- bodies ------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)
webhook_like = st.fixed_dictionaries({"url": st.sampled_from(["http://127.0.0.1:9/x", "ftp://x", "", "http://", 7])},
                                     optional={"filters": json_values, "extra": json_values})


@st.composite
def bodies(draw) -> bytes:
    """Bytes that are not a valid webhook: wrong JSON, broken JSON, not UTF-8, deeply nested, huge."""
    kind = draw(st.sampled_from(["json", "webhook_like", "truncated", "binary", "latin1", "deep", "huge", "empty"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "webhook_like":
        return json.dumps(draw(webhook_like)).encode()
    if kind == "truncated":
        whole = json.dumps(draw(webhook_like)).encode()
        return whole[:draw(st.integers(0, max(0, len(whole) - 1)))]
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "latin1":
        return '{"url": "http://127.0.0.1:9/\xe9"}'.encode("latin-1")
    if kind == "deep":
        depth = draw(st.integers(100, 200_000))
        return b"[" * depth + b"]" * depth
    if kind == "huge":
        size = draw(st.integers(1, 4)) * 1024 * 1024
        return b'{"url": "http://127.0.0.1:9/' + b"a" * size + b'", "filters": {"stores": ["s"]}}'
    return b""


@FUZZ
@given(operation=st.sampled_from(["/v1/webhooks", "/v1/webhooks/{hook}/dead/redeliver"]), body=bodies(),
       content_type=st.sampled_from(CONTENT_TYPES), key=st.sampled_from(KEYS))
def test_bodies_that_are_not_a_webhook_are_refused_with_a_documented_4xx(api, operation, body, content_type, key):
    headers = {} if content_type is None else {"content-type": content_type.encode("latin-1")}
    note(f"POST {operation} content-type={content_type!r} key={key} {len(body)} bytes: {body[:200]!r}")
    answer = api.request("POST", operation.format(hook=api.hook), headers, body, key=key)
    assert answer.status in documented_statuses("POST", operation.replace("{hook}", "{subscription_id}")), answer
    assert_documented_error(answer.status, answer.body, answer.headers)
    if answer.status < 400:
        assert key == "backoffice", answer


# --- path ids ----------------------------------------------------------------------------------------

ODD_IDS = ["..", ".", "%2e%2e", "%2E%2E%2F%2E%2E", "..%2F..", "a%2Fb", "%00", "%FF", "%ED%A0%80", "%C0%AF", "%",
           "%zz", "wh_" + "0" * 12, "wh_%20", "%20", "*", "%25", "'%20OR%20'1'='1", "x" * 10_000]
ROUTES = [("GET", "/v1/webhooks/{}"), ("DELETE", "/v1/webhooks/{}"), ("GET", "/v1/webhooks/{}/dead"),
          ("POST", "/v1/webhooks/{}/dead/redeliver")]


@FUZZ
@given(route=st.sampled_from(ROUTES), key=st.sampled_from(KEYS),
       hook_id=st.sampled_from(ODD_IDS) | st.text(min_size=1, max_size=300).map(lambda t: quote(t, safe=""))
       | st.lists(st.sampled_from(["..", ".", "", "x", "%2F"]), min_size=1, max_size=5).map("/".join))
def test_odd_webhook_ids_in_the_path_are_a_404_and_reach_no_other_webhook(api, route, key, hook_id):
    bystander = api.store.create_subscription("http://127.0.0.1:9/bystander", Filters())
    method, path = route
    answer = api.request(method, path.format(hook_id), key=key)
    note(f"{method} {path.format(hook_id)[:300]} key={key}: {answer}")
    assert_documented_error(answer.status, answer.body, answer.headers)
    # 307: an empty id ("/v1/webhooks/") is redirected to the list, without its trailing slash.
    if key == "backoffice":
        assert answer.status in (307, 404, 405), answer
    else:
        assert answer.status in (307, 401, 403, 404, 405), answer
    assert api.store.subscription(bystander.id).active


# --- the live stream's parameters ----------------------------------------------------------------------

def mostly(meaningful: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    """Three times in four a value that means something, so that many requests get past the first
    check to the next; otherwise anything."""
    return st.integers(0, 3).flatmap(lambda n: meaningful if n else anything)


SEVERITIES = [s.value for s in Severity]
severities = mostly(st.sampled_from([*SEVERITIES, *(f" {s} " for s in SEVERITIES), ""]),
                    st.sampled_from([s.upper() for s in SEVERITIES] + [" ", "dire", "\x00", "h\u0131gh", "x" * 5000])
                    | st.text(max_size=20))
TYPES = [t.value for t in AlertType]
alert_types = mostly(st.sampled_from([*TYPES, f" {TYPES[0]} ", ""]),
                     st.sampled_from([t.upper() for t in TYPES] + ["churn", "\ud7ff", "x" * 5000])
                     | st.text(max_size=20))
starts = mostly(st.sampled_from([None, "start", "now"]), st.sampled_from(["", "START", "beginning", "0", "\u00e9"]))


@st.composite
def positions(draw, api: Api) -> str:
    """A resume position: a change_id of the log in its many spellings, an unknown one, or garbage."""
    known = draw(st.sampled_from(api.change_ids))
    return draw(mostly(st.sampled_from([known, known.upper(), known.replace("-", ""), f"{{{known}}}",
                                        f"urn:uuid:{known}", f"  {known}\t"]),
                       st.sampled_from(["00000000-0000-4000-8000-000000000000", "", " ", "not-a-uuid", "\u00e9\u00ff",
                                        "1" * 10_000]) | st.text(max_size=40)))


@dataclass(frozen=True)
class StreamRequest:
    types: list[str]
    min_severity: str | None
    stores: list[str]
    segments: list[str]
    start: str | None
    param: str | None   # ?last_event_id=
    header: str | None  # Last-Event-ID:

    def target(self) -> str:
        pairs = [("type", t) for t in self.types] + [("store", s) for s in self.stores] + \
                [("segment", s) for s in self.segments]
        pairs += [(name, value) for name, value in (("min_severity", self.min_severity), ("from", self.start),
                                                    ("last_event_id", self.param)) if value is not None]
        return "/v1/alerts/stream?" + "&".join(f"{quote(n)}={quote(v, safe='')}" for n, v in pairs)


@st.composite
def stream_requests(draw, api: Api) -> StreamRequest:
    # A header value cannot hold CR, LF or NUL (the HTTP server refuses the request before the app).
    header = draw(st.none() | positions(api).filter(lambda v: not set(v) & set("\r\n\x00")))
    return StreamRequest(
        types=draw(st.lists(alert_types, max_size=2)), min_severity=draw(st.none() | severities),
        stores=draw(st.lists(st.sampled_from(["store-1", "store-2", "", "\u2603"]), max_size=2)),
        segments=draw(st.lists(st.sampled_from(["champions", "value_tier:high", "", ":"]), max_size=2)),
        start=draw(starts),
        param=draw(st.none() | positions(api)), header=header)


def expected_stream(api: Api, request: StreamRequest) -> tuple[int, str | list[str]]:
    """(400, the error) or (200, the change_ids a stream that ends at the backlog sends)."""
    try:
        filters = Filters.build(request.types, request.min_severity, request.stores, request.segments)
    except ValueError:
        return 400, "bad_filter"
    if request.start not in (None, "start", "now"):
        return 400, "bad_request"
    # The header goes as UTF-8 bytes, which the app reads as latin-1 (as it reads any header).
    header = request.header.encode("utf-8").decode("latin-1") if request.header is not None else None
    resume = header or request.param
    after = len(api.change_ids)
    if resume:
        try:
            after = api.change_ids.index(str(uuid.UUID(resume.strip()))) + 1
        except ValueError:
            if request.start != "start":
                return 400, "unknown_event_id"
            after = 0
    elif request.start == "start":
        after = 0
    logged = api.store.alerts_after(0, 100)
    return 200, [a.change_id for a in logged[after:]
                 if filters.empty or filters.matches(AlertChange.model_validate_json(a.record))]


@FUZZ
@given(data=st.data(), key=mostly(st.just("backoffice"), st.sampled_from(KEYS)))
def test_the_stream_answers_any_filter_from_and_resume_position_with_a_400_or_the_right_alerts(api, data, key):
    request = data.draw(stream_requests(api))
    headers = {} if request.header is None else {"last-event-id": request.header.encode("utf-8")}
    answer = api.request("GET", request.target(), headers, key=key)
    note(f"{request} key={key}: {answer.status} {answer.body[:300]!r}")
    assert_documented_error(answer.status, answer.body, answer.headers)
    if key != "backoffice":
        assert answer.status in (401, 403), answer
        return
    status, expected = expected_stream(api, request)
    assert answer.status == status, (expected, answer)
    if status == 200:
        assert answer.headers["content-type"].startswith("text/event-stream"), answer
        assert [line[4:] for line in answer.body.decode().splitlines() if line.startswith("id: ")] == expected
    else:
        assert orjson.loads(answer.body)["error"] == expected, answer


# --- credentials, methods, paths ---------------------------------------------------------------------------

@FUZZ
@given(header=st.binary(max_size=80).filter(lambda b: not set(b) & set(b"\r\n\x00"))
       | st.sampled_from(["bearer", "Bearer", "Bearer ", "Basic", "Token"]).flatmap(
           lambda scheme: st.tuples(st.just(scheme), st.sampled_from(["", " ", "  ", "\t"]),
                                    st.sampled_from(KEYS[:3]) | st.text(max_size=30)).map(tuple)))
def test_authorization_headers_of_any_shape_are_a_401_or_403_unless_they_carry_a_backoffice_key(api, header):
    if isinstance(header, tuple):
        scheme, gap, secret = header
        header = f"{scheme}{gap}{api.secrets.get(secret) or secret}".encode("utf-8")
    answer = api.request("GET", "/v1/webhooks", {"authorization": header}, key=None)
    note(f"Authorization: {header!r}: {answer}")
    assert answer.status in (200, 401, 403), answer
    assert_documented_error(answer.status, answer.body, answer.headers)
    if answer.status == 200:
        assert api.secrets["backoffice"].encode() in header
    if answer.status == 403:
        assert api.secrets["pos"].encode() in header


@settings(FUZZ, max_examples=int(60 * SCALE))
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST", "OPTIONS", "TRACE", "HEAD"]),
       path=st.sampled_from([p for p in DESCRIPTION["paths"] if "{" not in p] + ["/", "/v1", "/v1/alerts", "/docs"])
       | st.from_regex(r"/[a-z0-9_\-.]{1,12}(/[a-z0-9_\-.]{1,12})?", fullmatch=True))
def test_undeclared_methods_and_paths_are_a_404_or_405_with_a_problem_body(api, method, path):
    declared = {p: {m.upper() for m in methods} for p, methods in DESCRIPTION["paths"].items()}
    # FastAPI's documentation (which answers HEAD too), and the operators' /metrics: served, not described.
    declared.update({path: {"GET", "HEAD"} for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect",
                                                        "/metrics")})
    if method in declared.get(path, set()):
        return
    answer = api.request(method, path)
    assert answer.status in (404, 405), answer
    if method != "HEAD":
        assert_documented_error(answer.status, answer.body, answer.headers)


# --- numbers in the query ----------------------------------------------------------------------------

numbers = (st.integers(-2**80, 2**80).map(str)
           | st.sampled_from(["", " 1", "1.0", "1.5", "1e3", "NaN", "-0", "+1", "0x10", "\uff11", "9" * 5000])
           | st.text(max_size=10))


@FUZZ
@given(name=st.sampled_from(["seq", "limit"]), value=numbers, key=st.sampled_from(KEYS))
def test_numbers_in_the_query_of_any_size_or_shape_are_a_4xx_or_an_answer(api, name, value, key):
    method, path = ("POST", "dead/redeliver") if name == "seq" else ("GET", "dead")
    answer = api.request(method, f"/v1/webhooks/{api.hook}/{path}?{name}={quote(value, safe='')}", key=key)
    note(f"{method} {path}?{name}={value[:100]!r}: {answer}")
    assert_documented_error(answer.status, answer.body, answer.headers)
    assert answer.status in documented_statuses(method, f"/v1/webhooks/{{subscription_id}}/{path}"), answer


# --- regressions: the 5xx (and the undocumented answer) found here -------------------------------------

def test_a_seq_beyond_sqlites_integers_is_a_422_not_a_500(api):
    """It reached the SQLite driver, which cannot bind it (OverflowError)."""
    for seq in (2**63, -(2**63) - 1, 10**30):
        answer = api.request("POST", f"/v1/webhooks/{api.hook}/dead/redeliver?seq={seq}")
        assert answer.status == 422, answer
        assert orjson.loads(answer.body)["detail"][0]["loc"] == ["query", "seq"]
    assert api.request("POST", f"/v1/webhooks/{api.hook}/dead/redeliver?seq={2**63 - 1}").status == 404


def test_a_body_that_is_not_utf8_and_not_declared_json_is_a_422_not_a_500(api):
    """FastAPI's validation error echoed the body and failed to decode it as UTF-8."""
    for content_type in ("text/plain", "application/octet-stream"):
        answer = api.request("POST", "/v1/webhooks", {"content-type": content_type}, b'{"url": "http://h/\xe9\xff"}')
        assert answer.status == 422, answer
        [error] = orjson.loads(answer.body)["detail"]
        assert error["loc"] == ["body"] and error["input"] == '{"url": "http://h/\ufffd\ufffd"}', error


def test_json_that_is_not_utf8_is_the_documented_400(api):
    """FastAPI answers a body it cannot decode with a 400, which the description did not mention."""
    answer = api.request("POST", "/v1/webhooks", {"content-type": "application/json"}, b'{"url": "http://h/\xe9"}')
    assert answer.status == 400, answer
    assert orjson.loads(answer.body) == {"error": "http_error", "detail": "There was an error parsing the body"}
    assert "400" in DESCRIPTION["paths"]["/v1/webhooks"]["post"]["responses"]
