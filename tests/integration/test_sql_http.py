"""SQL over HTTP (services/sql_http.py) from the process that owns the embedded ClickHouse: in this test
session that is the test process itself (the projection writer runs in a thread here), so the
endpoint is started here, on a free 127.0.0.1 port, while the worker and the writer keep running."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import threading
import time
import uuid
import zlib
from pathlib import Path

import clickhouse_connect
import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from services.sql_http import Limits, SqlHttpServer, describe, parse_users, start_beside_writer
from tests.factories import encoded, event
from tests.integration.conftest import _free_port

try:
    from compression import zstd  # Python 3.14
except ImportError:
    from backports import zstd  # installed with clickhouse-connect

pytestmark = pytest.mark.integration

USER, PASSWORD = "analyst", "s3cret for tests"
AUTH = (USER, PASSWORD)
LIMITS = Limits(max_execution_seconds=5, max_result_rows=5000, max_result_bytes=50_000_000, max_concurrent=2)


@pytest.fixture(scope="module")
def endpoint(stack):
    if stack.settings.clickhouse_dsn:
        pytest.skip("with a ClickHouse server, analysts connect to the server itself")
    server = SqlHttpServer(stack.settings, users=parse_users(f"{USER}:{PASSWORD}"), limits=LIMITS,
                           host="127.0.0.1", port=0)
    server.start()
    yield server
    server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/ping", timeout=5)


@pytest.fixture(scope="module")
def customer(stack):
    """Three events of a customer of our own, so that counts are exact whatever else the session wrote."""
    key = f"sqlhttp-{uuid.uuid4().hex[:10]}"
    for day in (1, 2, 3):
        stack.send(key.encode(), encoded(event("daily_sign_in", customer_id=key,
                                               occurred_at=f"2026-02-0{day}T10:00:00+00:00")))
    stack.flush()
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE customer_key = {c:String}",
                                       {"c": key})[0][0] == 3, what="3 event rows")
    return key


def get(endpoint, auth=AUTH, **params):
    return httpx.get(endpoint.url, params=params, auth=auth, timeout=120)


def post(endpoint, body, auth=AUTH, headers=None, **params):
    return httpx.post(endpoint.url, params=params, content=body, auth=auth, headers=headers, timeout=120)


def assert_clickhouse_error(response, code: int, status: int):
    assert response.status_code == status, response.text
    assert response.headers["X-ClickHouse-Exception-Code"] == str(code)
    assert response.text.startswith(f"Code: {code}. DB::Exception: "), response.text


def test_clickhouse_connect_queries_commands_and_parameters(endpoint, customer):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port, username=USER, password=PASSWORD)
    try:
        assert client.ping()
        assert client.query("SELECT count() FROM events").result_rows[0][0] >= 3
        assert client.query("SELECT count() FROM events FINAL WHERE customer_key = {c:String}",
                            parameters={"c": customer}).result_rows == [(3,)]
        rows = client.query("SELECT type, toDate(occurred_at) FROM events FINAL WHERE customer_key = %(c)s "
                            "ORDER BY occurred_at", parameters={"c": customer}).result_rows
        assert [(kind, str(day)) for kind, day in rows] == [("daily_sign_in", f"2026-02-0{d}") for d in (1, 2, 3)]
        assert client.command("SELECT count() FROM events FINAL WHERE customer_key = {c:String}",
                              parameters={"c": customer}) == 3
        assert client.command("SELECT currentDatabase()") == "crm"
        # Long parameters travel in a multipart/form-data body.
        many = [customer] + [f"nobody-{i}" for i in range(3000)]
        assert client.query("SELECT count() FROM events FINAL WHERE customer_key IN {ks:Array(String)}",
                            parameters={"ks": many}).result_rows == [(3,)]
        with pytest.raises(DatabaseError) as refused:
            client.command("DROP TABLE events")
        assert refused.value.code == 164
        assert client.command("EXISTS TABLE events") == 1
    finally:
        client.close()


def test_curl_style_requests(endpoint, customer):
    assert httpx.get(f"{endpoint.url}/ping").text == "Ok.\n"
    assert httpx.get(f"{endpoint.url}/").text == "Ok.\n"

    answer = get(endpoint, query="SELECT 1")
    assert answer.status_code == 200 and answer.text == "1\n"
    assert answer.headers["X-ClickHouse-Format"] == "TabSeparated"
    assert answer.headers["X-ClickHouse-Timezone"]
    uuid.UUID(answer.headers["X-ClickHouse-Query-Id"])
    assert json.loads(answer.headers["X-ClickHouse-Summary"])["result_rows"] == "1"
    assert get(endpoint, query="SELECT 1", query_id="mine-1").headers["X-ClickHouse-Query-Id"] == "mine-1"

    # The query in the body, FORMAT in the query.
    answer = post(endpoint, f"SELECT type, toInt32(count()) AS n FROM events FINAL WHERE customer_key = '{customer}' "
                            "GROUP BY type FORMAT JSONEachRow")
    assert answer.headers["X-ClickHouse-Format"] == "JSONEachRow"
    assert [json.loads(line) for line in answer.text.splitlines()] == [{"type": "daily_sign_in", "n": 3}]

    # The query parameter, then the body, as ClickHouse concatenates them; param_ values for placeholders.
    answer = post(endpoint, "GROUP BY customer_key FORMAT CSV", param_c=customer,
                  query="SELECT customer_key, count() FROM events FINAL WHERE customer_key = {c:String}")
    assert answer.text == f'"{customer}",3\n'
    assert answer.headers["Content-Type"].startswith("text/csv")
    assert get(endpoint, query="SELECT {s:String} AS s, length(s)", param_s="a\\tb").text == "a\\tb\t3\n"

    # default_format, and a FORMAT in the query that wins over it.
    assert get(endpoint, query="SELECT 1 AS one", default_format="CSVWithNames").text == '"one"\n1\n'
    assert get(endpoint, query="SELECT 1 AS one FORMAT TabSeparatedWithNames",
               default_format="CSVWithNames").text == "one\n1\n"

    # database: crm unless the request names another.
    assert get(endpoint, query="SELECT currentDatabase()").text == "crm\n"
    assert get(endpoint, query="SELECT currentDatabase()", database="system").text == "system\n"
    assert_clickhouse_error(get(endpoint, query="SELECT count() FROM customer_profiles", database="system"), 60, 404)

    # Compressed responses: only when asked for with enable_http_compression=1 and Accept-Encoding.
    plain = get(endpoint, query="SELECT number FROM numbers(1000) FORMAT TSV")
    assert "Content-Encoding" not in plain.headers
    for encoding, decompress in (("gzip", gzip.decompress), ("deflate", zlib.decompress), ("zstd", zstd.decompress)):
        with httpx.stream("GET", endpoint.url, auth=AUTH, headers={"Accept-Encoding": encoding},
                          params={"query": "SELECT number FROM numbers(1000) FORMAT TSV",
                                  "enable_http_compression": "1"}) as compressed:
            raw = b"".join(compressed.iter_raw())
        assert compressed.headers["Content-Encoding"] == encoding
        assert len(raw) < len(plain.content)
        assert decompress(raw) == plain.content

    # A compressed request body; one that would unfold beyond 16 MiB is refused before it does.
    assert post(endpoint, gzip.compress(b"SELECT 42"), headers={"Content-Encoding": "gzip"}).text == "42\n"
    bomb = gzip.compress(b"SELECT 1 " + b" " * (64 * 1024 * 1024))
    assert_clickhouse_error(post(endpoint, bomb, headers={"Content-Encoding": "gzip"}), 229, 413)

    # The other ways ClickHouse takes credentials.
    assert httpx.get(endpoint.url, params={"query": "SELECT 2", "user": USER, "password": PASSWORD}).text == "2\n"
    assert httpx.get(endpoint.url, params={"query": "SELECT 3"},
                     headers={"X-ClickHouse-User": USER, "X-ClickHouse-Key": PASSWORD}).text == "3\n"

    # A few at once: two run, the others wait for a slot.
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(get(endpoint, query="SELECT count() FROM events")))
               for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 5


@pytest.mark.parametrize(("statement", "code"), [
    ("INSERT INTO events (event_id, customer_key) VALUES (generateUUIDv4(), 'intruder')", 164),
    ("CREATE TABLE intruder (a UInt8) ENGINE = Memory", 164),
    ("DROP TABLE events", 164),
    ("ALTER TABLE events DELETE WHERE 1", 164),
    ("TRUNCATE TABLE events", 164),
    ("OPTIMIZE TABLE events FINAL", 164),
    ("SYSTEM STOP MERGES", 164),
    ("KILL QUERY WHERE 1", 164),
    ("SET max_threads = 1", 164),
    ("SELECT count() FROM events SETTINGS max_result_rows = 0", 164),
    ("SELECT 1; DROP TABLE events", 62),
    ("SELECT file('/etc/hostname')", 497),
    ("DESCRIBE TABLE url('http://127.0.0.1:9/x.csv', 'CSV')", 164),
    ("SELECT * FROM eval('SELECT 1')", 164),
    ("SELECT 1 INTO OUTFILE 'sql-http-outfile.txt'", 358),
])
def test_analysts_cannot_write_or_reach_outside(endpoint, stack, statement, code):
    answer = post(endpoint, statement)
    assert_clickhouse_error(answer, code, 400 if code == 62 else 403)
    assert stack.query("EXISTS TABLE events")[0][0] == 1
    assert stack.query("SELECT count() FROM events WHERE customer_key = 'intruder'")[0][0] == 0
    assert not Path("sql-http-outfile.txt").exists()


def test_result_size_and_time_are_limited(endpoint):
    too_many = post(endpoint, "SELECT number FROM numbers(100000)")
    assert_clickhouse_error(too_many, 396, 400)
    assert "Limit for result exceeded" in too_many.text

    started = time.monotonic()
    too_long = post(endpoint, "SELECT count() FROM numbers_mt(1e13) WHERE NOT ignore(sipHash64(number))")
    assert_clickhouse_error(too_long, 159, 408)
    assert time.monotonic() - started < LIMITS.max_execution_seconds + 30

    # An analyst may lower a limit for one query, not raise it.
    assert_clickhouse_error(get(endpoint, query="SELECT number FROM numbers(100)", max_result_rows="10"), 396, 400)
    assert get(endpoint, query="SELECT count() FROM numbers(100)", max_result_rows="10").text == "100\n"
    assert_clickhouse_error(get(endpoint, query="SELECT 1", max_result_rows="1000000"), 452, 403)
    assert_clickhouse_error(get(endpoint, query="SELECT 1", max_execution_time="0"), 452, 403)
    # Settings that only shape the output are the analyst's to choose; others are not.
    assert get(endpoint, query="SELECT toDateTime('2026-01-01 00:00:00', 'UTC')",
               date_time_output_format="unix_timestamp").text == "1767225600\n"
    assert_clickhouse_error(get(endpoint, query="SELECT 1", max_threads="64"), 164, 403)
    assert_clickhouse_error(get(endpoint, query="SELECT 1", no_such_setting="1"), 115, 404)


def test_credentials_are_checked_as_clickhouse_does(endpoint):
    anonymous = httpx.get(endpoint.url, params={"query": "SELECT 1"})
    assert_clickhouse_error(anonymous, 194, 401)
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert_clickhouse_error(get(endpoint, query="SELECT 1", auth=(USER, "wrong")), 516, 403)
    assert_clickhouse_error(get(endpoint, query="SELECT 1", auth=("nobody", PASSWORD)), 516, 403)
    assert_clickhouse_error(httpx.get(endpoint.url, params={"query": "SELECT 1"}, auth=AUTH,
                                      headers={"X-ClickHouse-User": USER, "X-ClickHouse-Key": PASSWORD}), 516, 403)
    with pytest.raises(DatabaseError) as refused:
        clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port, username=USER, password="wrong")
    assert refused.value.code == 516


def test_errors_carry_clickhouse_codes_and_headers(endpoint):
    unknown = post(endpoint, "SELECT * FROM no_such_table")
    assert_clickhouse_error(unknown, 60, 404)
    assert unknown.headers["X-ClickHouse-Query-Id"]
    assert unknown.text.rstrip().endswith(")") and "(UNKNOWN_TABLE)" in unknown.text
    assert_clickhouse_error(post(endpoint, "SELEC 1"), 62, 400)
    assert_clickhouse_error(post(endpoint, ""), 62, 400)
    assert_clickhouse_error(get(endpoint, query="SELECT 1", default_format="NoSuchFormat"), 73, 404)


def test_new_events_are_visible_while_the_workers_run(endpoint, stack):
    key = f"sqlhttp-live-{uuid.uuid4().hex[:10]}"
    stack.send(key.encode(), encoded(event("product_viewed", customer_id=key)))
    stack.flush()
    stack.wait_for(lambda: get(endpoint, query="SELECT count() FROM events WHERE customer_key = {c:String}",
                               param_c=key).text == "1\n", what="the event over HTTP")


def test_the_writer_serves_it_when_analysts_are_configured(endpoint, stack):
    digest = hashlib.sha256(b"bi secret").hexdigest()
    config = dataclasses.replace(stack.settings, sql_users=f"bi:sha256:{digest}", sql_port=_free_port())
    server = start_beside_writer(config)
    assert server is not None
    try:
        assert describe(config) == f"sql endpoint: {server.url} (answering)"
        assert httpx.get(server.url, params={"query": "SELECT 1"}, auth=("bi", "bi secret")).text == "1\n"
    finally:
        server.stop()
    assert describe(config) == f"sql endpoint: {server.url} (not answering)"
    assert start_beside_writer(dataclasses.replace(config, sql_users="")) is None
    assert "off" in describe(dataclasses.replace(config, sql_users=""))


def test_user_entries():
    users = parse_users(f" analyst:{PASSWORD} , bi:sha256:{hashlib.sha256(b'x').hexdigest()},")
    assert set(users) == {"analyst", "bi"}
    assert users["analyst"].accepts(PASSWORD) and not users["analyst"].accepts("other")
    assert users["bi"].accepts("x")
    assert PASSWORD not in repr(users)
    with pytest.raises(ValueError):
        parse_users("no-password-here")
