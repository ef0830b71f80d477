"""Hostile input for SQL over HTTP (services/sql_http.py, docs/sql-http.md), with hypothesis, against the
endpoint served on a free port by this process, which owns the session's embedded ClickHouse (the
`endpoint` fixture of test_sql_http.py). What is sent: garbled, cut and huge queries, in the URL, the
body or both; `{name:Type}` placeholders with `param_` values that do not parse, are missing or name no
type; settings as parameters, known and unknown, with values of every shape; format names, real (every
one system.formats lists, input-only ones too) and not, as default_format, X-ClickHouse-Format or
FORMAT; Content-Encoding headers over bodies that are, are not, or are only part of what they claim;
credentials of every shape, in every place ClickHouse reads them; other methods and paths.

Properties, for every request:
- the status is below 500, but 501 for what docs/sql-http.md lists as not implemented (code 48). A 5xx
  is left for the server's own failures (services/sql_http.py: _SERVER_FAILURES), not bad input;
- an error is ClickHouse's: its code in X-ClickHouse-Exception-Code, and a body "Code: N. DB::Exception:
  ..." with the same N;
- where the input decides it, the answer is the one docs/sql-http.md calls for: the result, or the
  error (UNKNOWN_SETTING for an unknown setting, READONLY for changing another, CANNOT_DECOMPRESS for
  a body that is not what it claims, REQUIRED_PASSWORD without credentials, ...);
and at the end of the tests, the databases hold the same tables as before."""

from __future__ import annotations

import base64
import gzip
import json
import lzma
import os
import zlib
from collections.abc import Callable

import httpx
import lz4.frame
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from services.sql_http import _RESERVED_PARAMS, MAX_REQUEST_BYTES
from tests.integration.test_sql_http import AUTH, LIMITS, PASSWORD, USER, endpoint  # noqa: F401 (a fixture)

try:
    from compression import zstd  # Python 3.14
except ImportError:
    from backports import zstd  # installed with clickhouse-connect

pytestmark = pytest.mark.integration

# Examples per test, chosen so that each test takes well under a minute on the busy 2-core machine
# (every query opens a session of the engine); CRM_FUZZ_SCALE=10 runs ten times as many.
SCALE = float(os.environ.get("CRM_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, derandomize=True, max_examples=int(100 * SCALE), print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def client(endpoint):  # noqa: F811 (the fixture imported above)
    with httpx.Client(base_url=endpoint.url, timeout=120) as client:
        yield client


def rows(client: httpx.Client, query: str) -> list[dict]:
    answer = client.post("/", content=f"{query} FORMAT JSONEachRow", auth=AUTH)
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in answer.text.splitlines()]


@pytest.fixture(scope="module")
def catalog(client) -> dict[str, dict]:
    """The engine's settings (name -> value) and formats (name -> can it write)."""
    return {"settings": {r["name"]: r["value"] for r in rows(client, "SELECT name, value FROM system.settings")},
            "formats": {r["name"]: r["is_output"] for r in rows(client, "SELECT name, is_output FROM system.formats")}}


@pytest.fixture(scope="module", autouse=True)
def nothing_is_written(client):
    """Whatever the tests send, the databases hold the same tables afterwards."""
    query = "SELECT database, name FROM system.tables WHERE database NOT IN ('system', 'INFORMATION_SCHEMA', " \
            "'information_schema') ORDER BY database, name"
    before = rows(client, query)
    yield
    assert rows(client, query) == before


# What a header value may hold (HTTP: visible characters and spaces, as latin-1), and a name without spaces.
LATIN1 = st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f")
VISIBLE = st.characters(min_codepoint=33, max_codepoint=0x2fff, exclude_categories=["Cc", "Cs", "Zs", "Zl", "Zp"])


def check(response: httpx.Response) -> httpx.Response:
    """What every answer must be (see the module's docstring)."""
    code = response.headers.get("x-clickhouse-exception-code")
    text = response.text
    if response.status_code == 200:
        assert code is None, text[:500]
        return response
    assert code is not None, (response.status_code, text[:500])
    assert text.startswith(f"Code: {code}. DB::Exception: "), (response.status_code, text[:500])
    assert "Traceback" not in text and "Internal error of the SQL endpoint" not in text, text[:2000]
    assert response.status_code < 500 or (response.status_code, code) == (501, "48"), (response.status_code, text[:500])
    return response


def refused(response: httpx.Response, code: int, status: int) -> None:
    assert (response.status_code, response.headers.get("x-clickhouse-exception-code")) == (status, str(code)), \
        (response.status_code, response.text[:500])


# --- queries ----------------------------------------------------------------------------------------------
# Nothing here may run long: no system.numbers, no big numbers() (the limits would stop them, slowly).

STATEMENTS = ["SELECT 1", "SELECT count() FROM events", "SELECT number, toString(number) FROM numbers(5) FORMAT CSV",
              "SELECT customer_key, purchase_count FROM customer_profiles FINAL LIMIT 3",
              "WITH 2 AS x SELECT x * number FROM numbers(3) WHERE number > 0 ORDER BY number DESC",
              "SHOW TABLES", "DESCRIBE TABLE events", "EXISTS TABLE events", "EXPLAIN SELECT 1",
              "SELECT {n:UInt8} + 1", "SELECT 'a\\tb', [1, 2], (1, 'x'), NULL, 1.5e3, toDate('2026-03-01')"]
TOKENS = ["SELECT", "FROM", "WHERE", "FORMAT", "SETTINGS", "INTO", "OUTFILE", "UNION", "ALL", "WITH", "AS", "JOIN",
          "ON", "GROUP", "ORDER", "BY", "LIMIT", "INSERT", "VALUES", "DROP", "CREATE", "TABLE", "ALTER", "SET",
          "USE", "SHOW", "DESCRIBE", "EXPLAIN", "EXISTS", "SYSTEM", "KILL", "GRANT", "OPTIMIZE", "events",
          "customer_profiles", "system.tables", "crm.events", "number", "x", "`a b`", '"q"', "count(", "plus(",
          "file(", "url(", "numbers(", "toDate(", "arrayJoin(", "throwIf(", "format(", "eval(", "s3(", "remote(",
          "1", "-1", "0", "1e308", "-9223372036854775809", "'str'", "'\\xff'", "'\\'", "NULL", "[1,", "{x:UInt8}",
          "{y:NoSuchType}", "(", ")", ",", ";", "*", "+", "/", "=", "--", "/*", "*/", "'", "`", "JSON", "CSV",
          "Parquet", "readonly", "=", "max_threads", "\\", "\x00", "\u00e9", "\ud7ff", "\n"]

token_soup = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=25).map(" ".join)


@st.composite
def mutated(draw) -> str:
    """A statement with a few characters deleted, inserted or replaced."""
    query = draw(st.sampled_from(STATEMENTS))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(query)))
        cut = draw(st.integers(0, 5))
        query = query[:at] + draw(st.text(max_size=3)) + query[at + cut:]
    return query


@st.composite
def huge(draw) -> str:
    """Past ClickHouse's max_query_size (256 KiB) and up to 2 MiB: a comment, a literal, a list."""
    size = draw(st.sampled_from([300_000, 2 * 1024 * 1024]))
    listed = ",".join(["7"] * (size // 2))
    return draw(st.sampled_from([f"SELECT 1 /* {'x' * size} */", f"SELECT length('{'y' * size}')",
                                 f"SELECT count() FROM numbers(3) WHERE number IN ({listed})"]))


queries = st.one_of(st.text(max_size=200), token_soup, mutated(), huge(), st.sampled_from(STATEMENTS))


@FUZZ
@given(query=queries, where=st.sampled_from(["url", "body", "both"]), data=st.data())
def test_garbled_cut_and_huge_queries_are_answered_or_refused_with_a_4xx(client, query, where, data):
    note(f"{where}: {len(query)} characters: {query[:500]!r}")
    # A URL carries 20,000 characters of it at most: httpx sends no URL over 64 KiB.
    if where == "url":
        response = client.get("/", params={"query": query[:20_000]}, auth=AUTH)
    elif where == "body":
        response = client.post("/", content=query.encode(), auth=AUTH)
    else:
        at = data.draw(st.integers(0, len(query)))
        response = client.post("/", params={"query": query[:at][:20_000]}, content=query[at:].encode(), auth=AUTH)
    check(response)


def test_a_request_body_over_16_mib_is_refused_with_413_before_it_is_read_whole(client):
    refused(client.post("/", content=b"SELECT 1 --" + b"x" * MAX_REQUEST_BYTES, auth=AUTH), 229, 413)


# --- query parameters --------------------------------------------------------------------------------------

GOOD_VALUES = {"UInt8": ["0", "255"], "Int64": ["-9223372036854775808", "42"], "Float64": ["1.5", "-inf", "nan"],
               "String": ["", "any text", "\u00e9\u2603"], "Date": ["2026-03-01"], "DateTime": ["2026-03-01 10:00:00"],
               "UUID": ["7f1c2a9e-0000-4000-8000-000000000000"], "Array(UInt8)": ["[]", "[1,2]"],
               "Nullable(String)": ["\\N", "x"], "Decimal(10, 2)": ["3.14"], "IPv4": ["127.0.0.1"],
               "Map(String, UInt8)": ["{'a':1}"], "Tuple(UInt8, String)": ["(1,'x')"], "Bool": ["true", "0"],
               "Enum8('a' = 1)": ["a"]}
BAD_TYPES = ["NoSuchType", "UInt8)", "Array(", "", "String String", "Nullable(Nullable(String))", "Decimal(100, 2)",
             "FixedString(0)", "LowCardinality(Array(String))", "\u00e9"]
values = (st.sampled_from([v for good in GOOD_VALUES.values() for v in good])
          | st.sampled_from(["", "abc", "256", "-1", "1e400", "[1,", "(1,", "{'a'", "\\", "\\x", "\x00", "2026-13-45",
                             "9" * 400, "'quoted'", "NULL"])
          | st.text(max_size=40))


@FUZZ
@given(type_=st.sampled_from(sorted(GOOD_VALUES)) | st.sampled_from(BAD_TYPES), data=st.data(),
       name=st.sampled_from(["p", "p"]) | st.text(st.characters(codec="utf-8"), max_size=6),
       present=st.sampled_from([True, True, True, False]))
def test_parameters_that_do_not_fit_their_placeholder_are_refused_with_a_4xx(client, type_, data, name, present):
    good = type_ in GOOD_VALUES and data.draw(st.booleans())
    value = data.draw(st.sampled_from(GOOD_VALUES[type_]) if good else values)
    params = {f"param_{name}": value} if present else {}
    query = f"SELECT {{{name}:{type_}}} AS v, toTypeName(v)"
    note(f"{query!r} {params!r}")
    response = check(client.post("/", params=params, content=query.encode(), auth=AUTH))
    if good and present and name == "p":
        assert response.status_code == 200, response.text


# --- settings ----------------------------------------------------------------------------------------------

NOT_SETTINGS = _RESERVED_PARAMS | {"query", "database", "default_format"}
# The limits an analyst may lower, with their ceilings (0: none); docs/sql-http.md.
CAPS = {"max_execution_time": LIMITS.max_execution_seconds, "max_result_rows": LIMITS.max_result_rows,
        "max_result_bytes": LIMITS.max_result_bytes, "max_memory_usage": LIMITS.max_memory_bytes,
        "max_rows_to_read": 0, "max_bytes_to_read": 0}
ANALYST = ["max_block_size", "extremes", "join_use_nulls", "date_time_output_format", "session_timezone",
           "format_csv_delimiter", "output_format_json_quote_64bit_integers", "output_format_pretty_max_rows",
           "output_format_csv_crlf_end_of_line", "output_format_decimal_trailing_zeros"]
OTHERS = ["max_threads", "allow_ddl", "allow_introspection_functions", "readonly", "log_queries", "max_query_size",
          "max_parser_depth", "allow_experimental_analyzer"]
setting_values = (st.sampled_from(["0", "1", "-1", "2", "100", "1.5", "1e3", "1e400", "nan", "inf", "", " ", "true",
                                   "false", "maybe", "unix_timestamp", "iso", "UTC", "Mars/Olympus", ",", "ab", "\\",
                                   "'", "\x00", "18446744073709551616", "0x10"])
                  | st.integers(-2**70, 2**70).map(str) | st.text(max_size=12))


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["caps", "analyst", "others", "unknown", "reserved", "odd"]),
       value=setting_values)
def test_settings_of_any_name_and_value_apply_or_are_refused_as_documented(client, catalog, data, kind, value):
    name = data.draw({"caps": st.sampled_from(sorted(CAPS)), "analyst": st.sampled_from(ANALYST),
                      "others": st.sampled_from(OTHERS), "reserved": st.sampled_from(sorted(NOT_SETTINGS)),
                      "unknown": st.from_regex(r"[a-z][a-z_]{0,30}", fullmatch=True),
                      "odd": st.text(max_size=12)}[kind])
    note(f"{kind} setting {name!r} = {value!r}")
    if name in ("user", "password", "quota_key", "query", "default_format", "database") or name.startswith("param_"):
        return  # credentials, the query and the format are tested on their own
    response = check(client.get("/", params={"query": "SELECT 1", name: value}, auth=AUTH))
    expected = refusal(name, value, catalog["settings"])
    if expected:
        refused(response, *expected)


def refusal(name: str, value: str, known: dict[str, str]) -> tuple[int, int] | None:
    """(code, status) of the refusal docs/sql-http.md calls for, or None where the engine decides (it
    parses the value) or nothing is refused."""
    if name in NOT_SETTINGS or not name:
        return None
    if name == "readonly":
        return None if value.strip() in ("1", "2") else (164, 403)
    if name in CAPS:
        return _capped(name, value)
    if name not in known:
        return 115, 404
    if name in ANALYST or value == known[name]:
        return None
    return 164, 403


def _capped(name: str, value: str) -> tuple[int, int] | None:
    """A limit may be lowered, not raised nor lifted (0)."""
    try:
        number = float(value)
    except ValueError:
        return 6, 400
    cap = CAPS[name]
    if cap and (number <= 0 or number > cap):
        return 452, 403
    return None


# --- formats -----------------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data(), where=st.sampled_from(["default_format", "header", "FORMAT"]))
def test_format_names_real_or_not_give_a_result_or_a_4xx(client, catalog, data, where):
    formats = catalog["formats"]
    name = data.draw(st.sampled_from(sorted(formats)) | st.sampled_from(["NoSuch", "json", "JSON'", "Native abc",
                                                                            "DataFrame", "ArrowTable", "\u00e9", ""])
                     | st.text(VISIBLE, max_size=12))
    note(f"{where} {name!r} ({formats.get(name, 'unknown')})")
    query = "SELECT number, toString(number) AS s, [number] AS a FROM numbers(3)"
    if where == "FORMAT":
        response = client.post("/", content=f"{query} FORMAT {name}".encode(), auth=AUTH)
    elif where == "header":
        response = client.post("/", content=query.encode(), headers={"X-ClickHouse-Format": name.encode()}, auth=AUTH)
    else:
        response = client.post("/", params={"default_format": name}, content=query.encode(), auth=AUTH)
    check(response)
    if where != "FORMAT" and name and name.lower() not in {f.lower() for f in formats}:
        refused(response, 73, 404)


# --- compressed bodies -------------------------------------------------------------------------------------

QUERY = b"SELECT 42"
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress, "deflate": zlib.compress, "xz": lzma.compress, "zstd": zstd.compress,
    "lz4": lz4.frame.compress}
ENCODINGS = [*COMPRESS, "GZIP", " gzip ", "identity", "br", "snappy", "x-gzip", "gzip, gzip", "compress", "*"]


@st.composite
def compressed_bodies(draw, encoding: str) -> tuple[str, bytes]:
    """(what it is, the body) for a Content-Encoding."""
    codec = COMPRESS.get(encoding.strip().lower())
    kind = draw(st.sampled_from(["whole", "cut", "flipped", "plain", "random", "other codec", "empty"]))
    whole = codec(QUERY) if codec else gzip.compress(QUERY)
    if kind == "whole":
        return kind, whole
    if kind == "cut":
        return kind, whole[:draw(st.integers(1, len(whole) - 1))]
    if kind == "flipped":
        at = draw(st.integers(0, len(whole) - 1))
        return kind, whole[:at] + bytes([whole[at] ^ draw(st.integers(1, 255))]) + whole[at + 1:]
    if kind == "plain":
        return kind, QUERY
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=64))
    if kind == "other codec":
        other = draw(st.sampled_from(sorted(set(COMPRESS) - {encoding.strip().lower()})))
        return kind, COMPRESS[other](QUERY)
    return kind, b""


@FUZZ
@given(data=st.data(), encoding=st.sampled_from(ENCODINGS) | st.text(LATIN1, max_size=10))
def test_bodies_that_are_not_what_their_content_encoding_claims_are_refused_with_a_4xx(client, data, encoding):
    kind, body = data.draw(compressed_bodies(encoding))
    note(f"Content-Encoding {encoding!r}: {kind} {body[:80]!r}")
    header = encoding.encode("latin-1").strip(b" \t")  # HTTP has no spaces around a value
    response = check(client.post("/", content=body, headers={"Content-Encoding": header}, auth=AUTH))
    name = encoding.strip().lower()
    if not body:
        refused(response, 62, 400)  # nothing to decompress: an empty query
    elif name in ("", "identity"):
        if kind == "plain":  # other bytes are the query as they are; some may even run
            assert (response.status_code, response.text) == (200, "42\n")
    elif name not in COMPRESS:
        refused(response, 89, 400)
    elif kind == "whole":
        assert (response.status_code, response.text) == (200, "42\n")
    elif kind in ("cut", "plain", "random", "other codec"):
        refused(response, 271, 400)


@FUZZ
@given(flag=st.sampled_from(["1", "true", "0", "", "yes", "2", "\u00e9"]),
       accept=st.sampled_from(["gzip", "deflate", "zstd", "lz4", "xz", "br", "*", "identity", "gzip;q=0", "",
                               "x-unknown, gzip"]) | st.text(LATIN1, max_size=16),
       level=st.sampled_from([None, "1", "9", "0", "-5", "99", "x", "", "\u0661", "\u00b2", "9" * 5000]))
def test_compressed_answers_are_what_content_encoding_says_whatever_is_asked_for(client, flag, accept, level):
    params = {"query": "SELECT number FROM numbers(50) FORMAT TSV", "enable_http_compression": flag}
    if level is not None:
        params["http_zlib_compression_level"] = level
    with client.stream("GET", "/", params=params, headers={"Accept-Encoding": accept.encode("latin-1").strip(b" \t")},
                       auth=AUTH) as response:
        raw = b"".join(response.iter_raw())
    note(f"{params} Accept-Encoding {accept!r}: {response.status_code} {response.headers.get('content-encoding')}")
    assert response.status_code == 200, raw[:500]
    decompress = {"gzip": gzip.decompress, "deflate": zlib.decompress, "xz": lzma.decompress,
                  "zstd": zstd.decompress, "lz4": lz4.frame.decompress}
    encoding = response.headers.get("content-encoding")
    plain = decompress[encoding](raw) if encoding else raw
    assert plain == "".join(f"{n}\n" for n in range(50)).encode()


# --- credentials -------------------------------------------------------------------------------------------

def basic(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


header_bytes = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127))
RIGHT = base64.b64encode(f"{USER}:{PASSWORD}".encode())
authorizations = st.one_of(
    st.just(b"Basic " + RIGHT), st.sampled_from([b"basic ", b"Basic  ", b"BASIC "]).map(lambda scheme: scheme + RIGHT),
    st.tuples(st.binary(max_size=20), st.binary(max_size=20)).map(lambda up: basic(*up)),
    st.binary(max_size=40).map(lambda b: b"Basic " + base64.b64encode(b)),  # no colon, not UTF-8, ...
    st.sampled_from([b"Basic", b"Basic ", b"Basic !!!", b"Basic ====", b"Basic \xff\xfe", b"Bearer x", b"Digest a=b",
                     b"Negotiate", b" ", b"Basic " + base64.b64encode("\u00e9:\u00fc".encode("latin-1"))]),
    header_bytes)


@FUZZ
@given(authorization=st.none() | authorizations,
       user_header=st.none() | st.just(USER.encode()) | header_bytes,
       key_header=st.none() | st.just(PASSWORD.encode()) | header_bytes,
       params=st.fixed_dictionaries({}, optional={"user": st.just(USER) | st.text(max_size=10),
                                                  "password": st.just(PASSWORD) | st.text(max_size=10)}))
def test_credentials_of_any_shape_in_any_place_are_a_401_or_403_unless_right(client, authorization, user_header,
                                                                             key_header, params):
    headers = {name: value.strip(b" \t") for name, value in (("Authorization", authorization),
                                                             ("X-ClickHouse-User", user_header),
                                                             ("X-ClickHouse-Key", key_header)) if value is not None}
    note(f"headers {headers} params {params}")
    response = check(client.get("/", params={"query": "SELECT 1", **params}, headers=headers))
    assert response.status_code in (200, 401, 403), response.text
    sent = b" ".join(headers.values()) + json.dumps(params).encode()
    if response.status_code == 200:
        assert PASSWORD.encode() in sent or RIGHT in sent
    given_any = any(headers.values()) or params
    if not given_any:
        refused(response, 194, 401)


# --- methods and paths -------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=int(50 * SCALE))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND"]),
       path=st.sampled_from(["/", "/ping", "/replicas_status", "/play", "/dashboard", "/query", "/%2e%2e/"])
       | st.from_regex(r"/[a-z0-9_\-.]{1,12}", fullmatch=True))
def test_other_methods_and_paths_are_a_404_or_405(client, method, path):
    response = client.request(method, path, params={"query": "SELECT 1"}, auth=AUTH)
    path = response.request.url.path  # as sent: httpx resolves `.` and `..`
    note(f"{method} {path}: {response.status_code} {response.text[:200]!r}")
    assert response.status_code < 500, response.text
    if path in ("/ping", "/replicas_status"):
        assert response.status_code == 200
    elif path != "/":
        assert response.status_code == 404
    elif method not in ("GET", "POST"):
        refused(response, 1, 405)


# --- regressions: the 5xx (and the partial query) found here -----------------------------------------------

@pytest.mark.parametrize(("query", "params", "code", "status"), [
    ("SELECT {x:UInt8}", {"param_x": "abc"}, 457, 400),            # BAD_QUERY_PARAMETER
    ("SELECT {x:UInt8}", {}, 456, 400),                            # UNKNOWN_QUERY_PARAMETER
    ("SELECT {x:Array(UInt8)}", {"param_x": "[1,"}, 32, 400),      # ATTEMPT_TO_READ_AFTER_EOF
    ("SELECT 1", {"default_format": "Regexp"}, 399, 400),          # FORMAT_IS_NOT_SUITABLE_FOR_OUTPUT
    ("SELECT 1 FORMAT Template", {}, 474, 400),                    # INVALID_TEMPLATE_FORMAT
    ("SELECT plus('a', 1)", {}, 43, 400),                          # ILLEGAL_TYPE_OF_ARGUMENT
    ("SELECT 1", {"extremes": "maybe"}, 467, 400),                 # CANNOT_PARSE_BOOL
    ("SELECT 1", {"format_csv_delimiter": "ab"}, 19, 400),         # SIZE_OF_FIXED_STRING_DOESNT_MATCH
    ("SELECT 1", {"max_threads": "8"}, 164, 403),                  # READONLY
    ("DROP TABLE events", {}, 164, 403),
    ("SELECT 1", {"max_result_rows": "-1"}, 452, 403),             # SETTING_CONSTRAINT_VIOLATION
])
def test_errors_of_the_request_that_clickhouse_answers_with_500_are_a_4xx(client, query, params, code, status):
    refused(client.post("/", params=params, content=query.encode(), auth=AUTH), code, status)


@pytest.mark.parametrize(("encoding", "body", "code"), [
    ("br", b"SELECT 1", 89),                                      # UNKNOWN_COMPRESSION_METHOD
    ("gzip", b"SELECT 1", 271),                                   # CANNOT_DECOMPRESS
])
def test_a_body_that_does_not_decompress_is_a_400(client, encoding, body, code):
    refused(client.post("/", content=body, headers={"Content-Encoding": encoding}, auth=AUTH), code, 400)


def test_a_cut_off_compressed_body_is_refused_not_run_in_part(client):
    """Stored (level 0) gzip: the first 23 bytes decompress to `SELECT 4`, which used to run and answer 4."""
    whole = gzip.compress(b"SELECT 42", compresslevel=0, mtime=0)
    assert client.post("/", content=whole, headers={"Content-Encoding": "gzip"}, auth=AUTH).text == "42\n"
    refused(client.post("/", content=whole[:23], headers={"Content-Encoding": "gzip"}, auth=AUTH), 271, 400)


def test_a_string_literal_that_is_not_utf8_is_run_not_a_500(client):
    """The statement check decoded the canonical query as strict UTF-8 and failed (UNKNOWN_EXCEPTION)."""
    answer = client.post("/", content=b"SELECT '\\xff' AS b, length(b)", auth=AUTH)
    assert (answer.status_code, answer.content) == (200, b"\xff\t1\n")


@pytest.mark.parametrize("level", ["\u00b2", "9" * 5000])
def test_a_compression_level_int_cannot_read_falls_back_to_the_default_not_a_500(client, level):
    """'²' passed isdigit() and then failed int(); so did 5,000 digits (past Python's limit for int())."""
    answer = client.get("/", params={"query": "SELECT 42", "enable_http_compression": "1",
                                     "http_zlib_compression_level": level},
                        headers={"Accept-Encoding": "gzip"}, auth=AUTH)
    assert (answer.status_code, answer.headers["content-encoding"], answer.text) == (200, "gzip", "42\n")


@pytest.mark.parametrize("query_id", [" ", "a ", "\u2603", "a\r\nX-Injected: 1", "\x00"])
def test_a_query_id_that_cannot_be_a_header_is_a_400_not_a_dropped_connection(client, query_id):
    """It is sent back in X-ClickHouse-Query-Id; the HTTP server refused to write it and dropped the
    connection (or answered a bare 500)."""
    answer = client.post("/", params={"query_id": query_id}, content=b"SELECT 1", auth=AUTH)
    refused(answer, 36, 400)
    assert "x-injected" not in answer.headers and "x-clickhouse-query-id" not in answer.headers


def test_an_engine_error_that_quotes_a_character_cut_in_two_keeps_its_code_not_a_500(client):
    """The engine's message quoted the value cut mid-character; chdb failed to decode it as UTF-8, and
    the endpoint answered UNKNOWN_EXCEPTION (500) instead of the engine's CANNOT_PARSE_BOOL."""
    answer = client.post("/", params={"param_p": "0\x80\U00010000\U00010000"}, content=b"SELECT {p:Bool}", auth=AUTH)
    refused(answer, 467, 400)
    assert "cannot be parsed as Bool" in answer.text
