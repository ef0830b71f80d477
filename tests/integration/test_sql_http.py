"""SQL over HTTP (services/sql_http.py) from the process that owns the embedded ClickHouse: in this test
session that is the test process itself (the projection writer runs in a thread here), so the
endpoint is started here, on a free 127.0.0.1 port, while the worker and the writer keep running.
What a ClickHouse client sees is checked with clickhouse-connect and with raw HTTP (httpx, as curl)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import clickhouse_connect
import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, ProgrammingError, StreamFailureError

from services.sql_http import (ADMIN_USER, Limits, SqlHttpServer, _LOCAL_TABLE_FUNCTIONS, admin_file, describe,
                               parse_users, start_beside_writer)
from streams.config import PROJECT_ROOT
from tests.factories import encoded, event
from tests.integration.conftest import free_port

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
def writer_endpoint(stack):
    """The endpoint as `crm writer` serves it: to the local admin, whose credential is in the state directory."""
    if stack.settings.clickhouse_dsn:
        pytest.skip("with a ClickHouse server, there is no embedded database to serve")
    server = start_beside_writer(dataclasses.replace(stack.settings, sql_port=free_port()))
    assert server is not None
    yield server
    server.stop()


@contextmanager
def listening(port: int) -> Iterator[None]:
    """Something else listening on 127.0.0.1:port meanwhile."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen(1)
        yield


def admin_auth(settings) -> tuple[str, str]:
    credential = json.loads(admin_file(settings).read_text())
    return credential["user"], credential["password"]


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
    # The profile's constraints, in the engine: as on a server, SETTINGS and SET are checked like the URL.
    ("SET max_threads = 1", 452),
    ("SELECT count() FROM events SETTINGS max_threads = 1", 452),
    ("SELECT count() FROM events SETTINGS max_result_rows = 0", 452),
    ("SELECT count() FROM events SETTINGS max_result_rows = 1000000000", 452),
    ("SELECT count() FROM events SETTINGS max_execution_time = 0", 452),
    ("SELECT count() FROM events SETTINGS result_overflow_mode = 'break'", 452),
    ("SET readonly = 0", 164),
    ("SELECT 1; DROP TABLE events", 62),
    ("SELECT file('/etc/hostname')", 497),
    ("DESCRIBE TABLE url('http://127.0.0.1:9/x.csv', 'CSV')", 164),
    ("SELECT * FROM url('http://127.0.0.1:9/x.csv', 'CSV', 'a UInt8')", 164),
    ("SELECT * FROM s3('http://127.0.0.1:9/bucket/x.csv', 'CSV', 'a UInt8')", 164),
    ("SELECT * FROM remote('127.0.0.1:9', system.one)", 164),
    ("SELECT * FROM executable('x.sh', 'CSV', 'a UInt8')", 164),
    ("SELECT * FROM eval('SELECT 1')", 164),
    ("SELECT 1 INTO OUTFILE 'sql-http-outfile.txt'", 358),
])
def test_analysts_cannot_write_change_limits_or_reach_outside(endpoint, stack, statement, code):
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


def test_the_writer_serves_its_local_admin_always_and_analysts_when_configured(stack):
    digest = hashlib.sha256(b"bi secret").hexdigest()
    taken = free_port()
    with listening(taken):  # another server on the configured port: the writer takes a free one
        config = dataclasses.replace(stack.settings, sql_users=f"bi:sha256:{digest}", sql_port=taken)
        server = start_beside_writer(config)
        assert server is not None and server.port != taken
        try:
            assert describe(config) == f"sql endpoint: {server.url} (answering)"
            assert httpx.get(server.url, params={"query": "SELECT 1"}, auth=("bi", "bi secret")).text == "1\n"
            assert stat.S_IMODE(os.stat(admin_file(config)).st_mode) == 0o600
            credential = json.loads(admin_file(config).read_text())
            assert (credential["host"], credential["port"], credential["user"]) == ("127.0.0.1", server.port, ADMIN_USER)
            assert get(server, query="SELECT 1", auth=admin_auth(config)).text == "1\n"
        finally:
            server.stop()
    assert not admin_file(config).exists()
    assert describe(config) == f"sql endpoint: http://127.0.0.1:{taken} (not answering)"

    alone = start_beside_writer(dataclasses.replace(config, sql_users="", sql_port=free_port()))
    assert alone is not None
    try:
        assert get(alone, query="SELECT 1", auth=admin_auth(config)).text == "1\n"
        assert_clickhouse_error(get(alone, query="SELECT 1", auth=("bi", "bi secret")), 516, 403)
    finally:
        alone.stop()
    assert start_beside_writer(dataclasses.replace(config, sql_port=0)) is None
    assert describe(dataclasses.replace(config, sql_port=0)) == "sql endpoint: off (CRM_SQL_PORT=0)"


def test_clickhouse_connect_sends_the_settings_an_analyst_may_change_and_refuses_the_others(endpoint, caplog):
    """system.settings, as the analyst's session shows it, says what may change; clickhouse-connect reads it
    when it connects, then sends those settings (its own defaults too), and refuses to send the others."""
    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port, username=USER, password=PASSWORD)
    try:
        known = client.server_settings
        for changeable in ("max_block_size", "output_format_json_quote_64bit_integers", "date_time_input_format",
                           "max_result_rows", "max_execution_time", "enable_http_compression"):
            assert known[changeable].readonly == 0, changeable
        for fixed in ("max_threads", "allow_ddl", "readonly", "result_overflow_mode", "allow_introspection_functions"):
            assert known[fixed].readonly == 1, fixed
        with caplog.at_level(logging.WARNING, logger="clickhouse_connect"):
            assert client.query("SELECT getSetting('max_block_size')",
                                settings={"max_block_size": 1000}).result_rows == [(1000,)]
            assert client.query("SELECT getSetting('date_time_input_format')").result_rows == [("best_effort",)]
            with pytest.raises(DatabaseError) as lowered:
                client.query("SELECT number FROM numbers(100)", settings={"max_result_rows": 10})
        assert lowered.value.code == 396
        assert not [record for record in caplog.records if "setting" in record.getMessage().lower()]
        with pytest.raises(ProgrammingError, match="max_threads is readonly"):
            client.query("SELECT 1", settings={"max_threads": 1})
        limits = client.query("SELECT name, min, max FROM system.settings WHERE name IN "
                              "('max_result_rows', 'max_execution_time') ORDER BY name").result_rows
        assert [(name, low) for name, low, _ in limits] == [("max_execution_time", "0.001"), ("max_result_rows", "1")]
        assert all(high is not None for _, _, high in limits)
    finally:
        client.close()


# One query per table function docs/sql-http.md lets analysts use, with its answer.
LOCAL_TABLE_FUNCTIONS = {
    "numbers": ("SELECT sum(number) FROM numbers(4)", "6\n"),
    "numbers_mt": ("SELECT sum(number) FROM numbers_mt(4)", "6\n"),
    "zeros": ("SELECT count() FROM zeros(3)", "3\n"),
    "zeros_mt": ("SELECT count() FROM zeros_mt(3)", "3\n"),
    "generateRandom": ("SELECT count() FROM (SELECT * FROM generateRandom('a UInt8', 1) LIMIT 5)", "5\n"),
    "generateSeries": ("SELECT groupArray(generate_series) FROM generateSeries(1, 3)", "[1,2,3]\n"),
    "generate_series": ("SELECT groupArray(generate_series) FROM generate_series(1, 3)", "[1,2,3]\n"),
    "primes": ("SELECT groupArray(prime) FROM primes(3)", "[2,3,5]\n"),
    "values": ("SELECT sum(a) FROM values('a UInt8', 1, 2)", "3\n"),
    "view": ("SELECT * FROM view(SELECT 7)", "7\n"),
    "merge": ("SELECT count() FROM merge('system', '^one$')", "1\n"),
    "null": ("SELECT count() FROM null('a UInt8')", "0\n"),
    "format": ("SELECT a + 1 FROM format(CSV, 'a UInt8', '41')", "42\n"),
}


def test_the_table_functions_the_docs_list_are_the_ones_allowed():
    text = (PROJECT_ROOT / "docs" / "sql-http.md").read_text()
    listed = re.search(r"Table functions\s+other than (.*?)\s+are refused", text, re.S)
    assert listed is not None
    documented = set(re.findall(r"`(\w+)`", listed.group(1)))
    assert documented == set(LOCAL_TABLE_FUNCTIONS)
    assert {name.lower() for name in documented} <= _LOCAL_TABLE_FUNCTIONS


@pytest.mark.parametrize("name", sorted(LOCAL_TABLE_FUNCTIONS))
def test_an_analyst_may_use_each_local_table_function(endpoint, name):
    query, expected = LOCAL_TABLE_FUNCTIONS[name]
    answer = post(endpoint, query)
    assert (answer.status_code, answer.text) == (200, expected)


def rss() -> int:
    """This process's resident memory, in bytes (it holds the endpoint and the client)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_result_of_hundreds_of_megabytes_streams_without_being_held_whole(writer_endpoint, stack):
    """About 650 MB of TSV, read and dropped as it comes: the process that serves and reads it grows by
    far less than the result, which would be in memory at least once if it were made whole first."""
    before = peak = rss()
    size = 0
    with httpx.stream("POST", writer_endpoint.url, content="SELECT number, repeat('x', 100) FROM numbers(6000000)",
                      auth=admin_auth(stack.settings), timeout=600) as answer:
        assert answer.status_code == 200
        for piece in answer.iter_raw():
            size += len(piece)
            peak = max(peak, rss())
    assert size > 600_000_000
    assert peak - before < 250_000_000, f"grew by {(peak - before) >> 20} MiB for {size >> 20} MiB"


def test_an_error_part_way_through_a_result_ends_it_as_clickhouse_does(endpoint):
    """Rows first, then the error: the status is sent already, so ClickHouse (25.11+) writes the error at
    the end of the body between markers tagged as X-ClickHouse-Exception-Tag says, and breaks the
    connection off; with wait_end_of_query=1 (what clickhouse-connect's query() sends) it is a plain error."""
    query = "SELECT throwIf(number = 3000, 'boom part-way') FROM numbers(4000)"
    received = bytearray()
    with httpx.stream("POST", endpoint.url, params={"max_block_size": "100"}, content=query, auth=AUTH) as answer:
        with pytest.raises(httpx.RemoteProtocolError):
            for piece in answer.iter_raw():
                received += piece
    assert answer.status_code == 200 and "X-ClickHouse-Exception-Code" not in answer.headers
    tag = answer.headers["X-ClickHouse-Exception-Tag"].encode()
    assert re.fullmatch(rb"[a-z0-9]{16}", tag)
    block = re.fullmatch(rb"((?:0\n)+)\r\n__exception__\r\n" + tag + rb"\r\n(Code: 395\. .*\n)(\d+) " + tag
                         + rb"\r\n__exception__\r\n", bytes(received), re.S)
    assert block is not None, bytes(received[-400:])
    assert len(block.group(1)) >= 200 and b"boom part-way" in block.group(2)
    assert int(block.group(3)) == len(block.group(2))

    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port, username=USER, password=PASSWORD)
    try:
        with pytest.raises(StreamFailureError) as failed:  # compressed (lz4), as clickhouse-connect asks
            with client.query_row_block_stream(query, settings={"max_block_size": 100}) as blocks:
                for _ in blocks:
                    pass
        assert failed.value.code == 395 and "boom part-way" in str(failed.value)
        with pytest.raises(DatabaseError) as whole:
            client.query(query, settings={"max_block_size": 100})
        assert whole.value.code == 395
        assert client.command("SELECT 1") == 1
    finally:
        client.close()
    assert_clickhouse_error(post(endpoint, query, max_block_size="100", wait_end_of_query="1"), 395, 400)


def test_results_are_the_same_streamed_spooled_and_made_whole(endpoint):
    """TSV and Native stream, wait_end_of_query=1 reads all first, JSON is made whole (chdb streams it as a
    document per block); WITH TOTALS, which streaming would lose, is made whole too."""
    query = "SELECT number, toString(number) AS s FROM numbers(4000)"
    for fmt in ("TSV", "Native", "JSONEachRow", "CSVWithNames", "TabSeparatedWithNamesAndTypes"):
        streamed = post(endpoint, query, default_format=fmt, max_block_size="100")
        spooled = post(endpoint, query, default_format=fmt, max_block_size="100", wait_end_of_query="1")
        assert streamed.status_code == spooled.status_code == 200
        assert streamed.content == spooled.content, fmt
    assert post(endpoint, "SELECT count() FROM numbers(1000)", default_format="JSON").json()["data"] == [{"count()": 1000}]
    totals = post(endpoint, "SELECT number % 2 AS k, count() FROM numbers(2000) GROUP BY k WITH TOTALS ORDER BY k",
                  max_block_size="100")
    assert totals.text == "0\t1000\n1\t1000\n\n0\t2000\n"


def test_user_entries():
    users = parse_users(f" analyst:{PASSWORD} , bi:sha256:{hashlib.sha256(b'x').hexdigest()},")
    assert set(users) == {"analyst", "bi"}
    assert users["analyst"].accepts(PASSWORD) and not users["analyst"].accepts("other")
    assert users["bi"].accepts("x")
    assert PASSWORD not in repr(users)
    with pytest.raises(ValueError):
        parse_users("no-password-here")
