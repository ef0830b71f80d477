"""SQL over HTTP while the platform runs: a subset of ClickHouse's HTTP interface, served by the process
that owns the embedded ClickHouse (docs/sql-http.md).

chdb lets one process open the data directory, and the projection writer is that process; so this
module runs inside it (`crm writer`, in a thread beside the writer) and answers what clickhouse-connect,
curl and BI tools send to a ClickHouse server's port 8123: the query in the `query` parameter and/or
the body, `FORMAT x` or `default_format`, `database`, `param_<name>` values for `{name:Type}`
placeholders, settings as parameters, compressed responses (`enable_http_compression=1` with
Accept-Encoding), and ClickHouse's error bodies, codes, HTTP statuses (but a 4xx for the errors of the
request that ClickHouse answers with 500: QueryError.http_status) and X-ClickHouse-* headers.

Every request runs on a fresh chdb connection handle (a session of the one engine, so nothing an
analyst does outlives the request): the user's limits are set, then the settings the analyst may
change, then `readonly = 1`, which makes the engine refuse writes, DDL, settings changes and table
functions that reach outside. Before that, ClickHouse's own parser (`formatQuerySingleLine`, the query
passed as a parameter, never spliced into SQL) turns the query into one canonical statement, which is
checked for what `readonly = 1` lets through in the embedded engine but a server's HTTP interface or an
analyst's grants would not: more than one statement, statements other than SELECT/SHOW/DESCRIBE/EXISTS/
EXPLAIN/USE/SET, `INTO OUTFILE`, the `file()` function and table functions other than a few local ones
(notably DESCRIBE url(...), which fetches the URL to infer its columns, and eval(...)).

With CRM_CLICKHOUSE_DSN (a ClickHouse server) none of this runs: analysts connect to the server, as a
read-only user created as docs/sql-http.md shows.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import logging
import lzma
import os
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qsl

from streams.config import Settings

log = logging.getLogger("crm.sql_http")

MAX_REQUEST_BYTES = 16 * 1024 * 1024  # request body, before and after decompression: queries, not data
SLOT_WAIT_SECONDS = 10.0  # how long a query waits for one of the concurrent-query slots

# ClickHouse error codes used here (src/Common/ErrorCodes.cpp).
BAD_ARGUMENTS = 36
NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
UNKNOWN_FORMAT = 73
CANNOT_PARSE_TEXT = 6
UNKNOWN_COMPRESSION_METHOD = 89
UNKNOWN_SETTING = 115
READONLY = 164
REQUIRED_PASSWORD = 194
TOO_MANY_SIMULTANEOUS_QUERIES = 202
QUERY_IS_TOO_LARGE = 229
CANNOT_DECOMPRESS = 271
INTO_OUTFILE_NOT_ALLOWED = 358
SETTING_CONSTRAINT_VIOLATION = 452
ACCESS_DENIED = 497
AUTHENTICATION_FAILED = 516
UNKNOWN_EXCEPTION = 1002

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp, 26.x), by code.
# ClickHouse answers any other code with 500; this endpoint does so only for _SERVER_FAILURES (see
# QueryError.http_status).
_HTTP_STATUS: dict[int, int] = {
    REQUIRED_PASSWORD: 401,
    **dict.fromkeys((192, 193, AUTHENTICATION_FAILED, 512, ACCESS_DENIED), 403),  # UNKNOWN_USER, WRONG_PASSWORD, ...
    **dict.fromkeys((BAD_ARGUMENTS, 427, CANNOT_PARSE_TEXT, 25, 26, 38, 41, 72, 441, 675, 676, 27, 376, 15, 44, 37,
                     123, 8, 167, 168, 223, SYNTAX_ERROR, 117, 53, 321), 400),
    **dict.fromkeys((60, 46, 47, 50, 56, 81, UNKNOWN_SETTING, 152, 63, UNKNOWN_FORMAT, 336, 78, 511), 404),
    QUERY_IS_TOO_LARGE: 413,
    NOT_IMPLEMENTED: 501,
    **dict.fromkeys((209, 76, 439), 503),  # SOCKET_TIMEOUT, CANNOT_OPEN_FILE, CANNOT_SCHEDULE_TASK
    381: 411,  # HTTP_LENGTH_REQUIRED
    159: 408,  # TIMEOUT_EXCEEDED
    779: 415,  # UNSUPPORTED_MEDIA_TYPE
}
# The codes that say the server failed, whatever the request was: they keep ClickHouse's 500.
_SERVER_FAILURES = frozenset({
    3, 33, 40, 246,  # UNEXPECTED_END_OF_FILE, CANNOT_READ_ALL_DATA, CHECKSUM_DOESNT_MATCH, CORRUPTED_DATA
    74, 75, 77, 87, 88, 107, 204, 400, 662,  # reading, writing, seeking, syncing or finding the engine's files
    95, 96, 210, 279,  # CANNOT_READ_FROM_SOCKET, CANNOT_WRITE_TO_SOCKET, NETWORK_ERROR, ALL_CONNECTION_TRIES_FAILED
    173, 239, 240, 298, 299, 425,  # CANNOT_ALLOCATE_MEMORY, CANNOT_M(UN|RE)MAP, CANNOT_PIPE, CANNOT_FORK, SYSTEM_ERROR
    241,  # MEMORY_LIMIT_EXCEEDED: the query's own limit, or the whole process's, which share the code
    202, 745,  # TOO_MANY_SIMULTANEOUS_QUERIES, SERVER_OVERLOADED
    236, 394, 473,  # ABORTED, QUERY_WAS_CANCELLED, DEADLOCK_AVOIDED
    242, 243, 252,  # TABLE_IS_READ_ONLY, NOT_ENOUGH_SPACE, TOO_MANY_PARTS
    49, 1000, 1001, UNKNOWN_EXCEPTION,  # LOGICAL_ERROR, POCO_EXCEPTION, STD_EXCEPTION, and this endpoint's own failures
})
# What an analyst may not do: refused as ACCESS_DENIED is.
_NOT_ALLOWED = frozenset({READONLY, SETTING_CONSTRAINT_VIOLATION, INTO_OUTFILE_NOT_ALLOWED})

# Request parameters that are not settings (ClickHouse's reserved_param_names, plus the HTTP
# transport settings this server honours or ignores itself).
_RESERVED_PARAMS = frozenset({
    "compress", "decompress", "user", "password", "quota_key", "query_id", "stacktrace", "buffer_size",
    "wait_end_of_query", "session_id", "session_timeout", "session_check", "client_protocol_version",
    "close_session", "role", "enable_http_compression", "http_zlib_compression_level",
    "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "cancel_http_readonly_queries_on_client_close", "http_response_buffer_size", "http_wait_end_of_query",
    "add_http_cors_header", "http_write_exception_in_output_format",
    "http_native_compression_disable_checksumming_on_decompress",
})

# Settings an analyst may pass as parameters although readonly = 1 forbids changing settings: they
# change how results are written, not what the engine may do. Everything else is refused unless it
# equals the current value (as a server does for a readonly = 1 user).
_ANALYST_SETTINGS = frozenset({
    "max_block_size", "extremes", "join_use_nulls", "totals_mode", "totals_auto_threshold",
    "date_time_output_format", "date_time_input_format", "session_timezone", "output_format_decimal_trailing_zeros",
    "output_format_json_quote_64bit_integers", "output_format_json_quote_64bit_floats",
    "output_format_json_quote_denormals", "output_format_json_quote_decimals",
    "output_format_json_named_tuples_as_objects", "output_format_json_array_of_rows",
    "output_format_json_validate_utf8", "output_format_json_escape_forward_slashes", "output_format_json_pretty_print",
    "output_format_json_map_as_array_of_tuples", "output_format_write_statistics", "output_format_csv_crlf_end_of_line",
    "output_format_tsv_crlf_end_of_line", "format_csv_delimiter", "format_csv_null_representation",
    "format_tsv_null_representation", "output_format_pretty_max_rows", "output_format_pretty_max_column_pad_width",
    "output_format_pretty_max_value_width", "output_format_pretty_color", "output_format_pretty_grid_charset",
    "output_format_pretty_row_numbers", "output_format_arrow_string_as_string",
    "output_format_arrow_low_cardinality_as_dictionary", "output_format_parquet_string_as_string",
    "output_format_orc_string_as_string", "output_format_native_encode_types_in_binary_format",
    "output_format_binary_encode_types_in_binary_format", "output_format_markdown_escape_special_characters",
    "low_cardinality_allow_in_native_format", "cast_string_to_dynamic_use_inference",
})

# Statements an analyst may run (first word of the canonical statement). The engine's readonly = 1
# refuses what changes data or settings within these (SET of another value, table functions).
_ALLOWED_STATEMENTS = frozenset({"SELECT", "WITH", "(", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "USE", "SET"})
_NO_RESULT_STATEMENTS = frozenset({"USE", "SET"})
# Table functions that read nothing outside the database; every other one (url, s3, file, remote,
# mysql, python, eval, ...) is refused even where readonly = 1 would let it run (DESCRIBE, EXPLAIN).
_LOCAL_TABLE_FUNCTIONS = frozenset(name.lower() for name in (
    "numbers", "numbers_mt", "zeros", "zeros_mt", "generateRandom", "generateSeries", "generate_series", "primes",
    "values", "SQLStandardValues", "view", "merge", "null", "format"))
# Scalar functions that read the host: the embedded engine, like clickhouse-local, reads any path.
_HOST_FUNCTIONS = frozenset({"file"})
_CHDB_PYTHON_FORMATS = frozenset({"dataframe", "arrowtable", "datastore"})  # chdb's Python wrapper converts these

_TOKEN = re.compile(r"'(?:[^'\\]|\\.)*'|`((?:[^`\\]|\\.)*)`|\"((?:[^\"\\]|\\.)*)\"", re.S)
_CALL = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.I)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z_][A-Za-z0-9_]*)\s*(?:SETTINGS\b.*)?$", re.S)
_FIRST_WORD = re.compile(r"\s*(\(|[A-Za-z]+)")
_CODE = re.compile(r"Code: (\d+)\. ")
_HEADER_VALUE = re.compile(r"[!-~\xa0-\xff](?:[ -~\xa0-\xff]*[!-~\xa0-\xff])?")
_NESTED = re.compile(r"^Code: (\d+)\. DB::Exception: (Code: \1\. .*)"
                     r" \(version [^()]*(?:\([^()]*\))?[^()]*\)\. \([A-Z_0-9]+\)$", re.S)
_FORMAT_CHECK_SCOPE = re.compile(r"(?:\.\s*)?:?\s*In scope SELECT formatQuerySingleLine\(.*\)\.(?= \([A-Z_0-9]+\)$)", re.S)


class QueryError(Exception):
    """A ClickHouse exception as the HTTP interface reports it: code and "Code: N. DB::Exception: ..." text."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text

    @classmethod
    def of(cls, code: int, name: str, message: str) -> QueryError:
        return cls(code, f"Code: {code}. DB::Exception: {message}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> QueryError:
        # chdb reads the engine's message as UTF-8 and fails where it quotes a character cut in two (of a
        # query parameter, say): the message is then the bytes it failed on.
        text = (bytes(exc.object).decode(errors="replace") if isinstance(exc, UnicodeDecodeError) else str(exc)).strip()
        at = text.find("Code: ")
        text = text[at:] if at > 0 else text
        # chdb nests an exception rethrown across its layers in itself: keep the innermost.
        while (nested := _NESTED.match(text)) is not None:
            text = nested.group(2)
        text = _FORMAT_CHECK_SCOPE.sub(".", text)
        match = _CODE.match(text)
        if match is None:
            return cls.of(UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", text.rstrip(".") or type(exc).__name__)
        return cls(int(match.group(1)), text)

    @property
    def http_status(self) -> int:
        """ClickHouse's status where it has one other than 500. Where ClickHouse has 500 (for a bad function
        argument, a query parameter that does not parse, a format that cannot write, a refused statement,
        ...), only a server failure keeps it: every statement here runs read-only, in a session of its own,
        on the engine this process owns, so any other error is about the request and is a 4xx."""
        if self.code in _HTTP_STATUS:
            return _HTTP_STATUS[self.code]
        if self.code in _SERVER_FAILURES:
            return 500
        return 403 if self.code in _NOT_ALLOWED else 400


# ---- users and limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqlUser:
    name: str
    password_sha256: bytes = field(repr=False)

    def accepts(self, password: str) -> bool:
        return hmac.compare_digest(self.password_sha256, hashlib.sha256(password.encode()).digest())


def parse_users(text: str, separator: str = ",") -> dict[str, SqlUser]:
    """`name:password` entries (or `name:sha256:<64 hex digits>`, the SHA-256 of the password, as in
    ClickHouse's password_sha256_hex), separated by commas (CRM_SQL_USERS) or lines (CRM_SQL_USERS_FILE,
    where `#` starts a comment)."""
    users: dict[str, SqlUser] = {}
    for raw in text.split(separator):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, colon, secret = entry.partition(":")
        if not colon or not name.strip() or not secret:
            raise ValueError(f"a SQL user must be written name:password, got {entry.split(':')[0]!r}:…")
        hashed = re.fullmatch(r"sha256:([0-9a-fA-F]{64})", secret)
        digest = bytes.fromhex(hashed.group(1)) if hashed else hashlib.sha256(secret.encode()).digest()
        users[name.strip()] = SqlUser(name.strip(), digest)
    return users


def load_users(settings: Settings) -> dict[str, SqlUser]:
    users = parse_users(settings.sql_users)
    if settings.sql_users_file is not None:
        users.update(parse_users(settings.sql_users_file.read_text(), separator="\n"))
    return users


@dataclass(frozen=True)
class Limits:
    """What every analyst query may use (a ClickHouse settings profile): exceeding one stops the query
    with TIMEOUT_EXCEEDED (159), TOO_MANY_ROWS_OR_BYTES (396) or MEMORY_LIMIT_EXCEEDED (241); an analyst
    may lower them per query (as a `max` constraint allows), not raise them. 0 means no limit."""

    max_execution_seconds: float = 60.0
    max_result_rows: int = 1_000_000
    max_result_bytes: int = 256 * 1024 * 1024
    max_memory_bytes: int = 2_000_000_000
    max_concurrent: int = 2

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.sql_max_execution_seconds, settings.sql_max_result_rows, settings.sql_max_result_bytes,
                   settings.sql_max_memory_bytes, settings.sql_max_concurrent)

    def profile(self) -> dict[str, str]:
        profile = {"max_execution_time": _number(self.max_execution_seconds), "timeout_overflow_mode": "throw",
                   "max_result_rows": str(self.max_result_rows), "max_result_bytes": str(self.max_result_bytes),
                   "result_overflow_mode": "throw"}
        if self.max_memory_bytes:
            profile["max_memory_usage"] = str(self.max_memory_bytes)
        return profile

    def caps(self) -> dict[str, float]:
        """Settings an analyst may only lower, and their ceiling (0: none)."""
        return {"max_execution_time": self.max_execution_seconds, "max_result_rows": self.max_result_rows,
                "max_result_bytes": self.max_result_bytes, "max_memory_usage": self.max_memory_bytes,
                "max_rows_to_read": 0, "max_bytes_to_read": 0}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ---- one query -------------------------------------------------------------------------------------


@dataclass
class SqlRequest:
    user: SqlUser
    query: str
    database: str
    default_format: str = "TabSeparated"
    settings: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    query_id: str = ""


@dataclass
class SqlResult:
    body: bytes
    format: str | None  # None: the statement writes no result (USE, SET)
    timezone: str
    summary: dict[str, str]


class Engine:
    """Runs analyst queries on the embedded ClickHouse this process owns."""

    def __init__(self, settings: Settings, limits: Limits):
        from projections.clickhouse import connect

        if settings.clickhouse_dsn:
            raise ValueError("with CRM_CLICKHOUSE_DSN analysts query the ClickHouse server directly (docs/sql-http.md)")
        # Claims the embedded database for this process (a no-op in the writer, which already has) and
        # keeps the engine open for as long as the endpoint serves.
        self._client = connect(settings)
        self._path = os.path.realpath(settings.chdb_dir)
        self.database = settings.clickhouse_database
        self.limits = limits
        self._slots = threading.BoundedSemaphore(max(1, limits.max_concurrent))
        catalog = self._client.query("SELECT name, value FROM system.settings").result_rows
        self._settings_catalog: dict[str, str] = {name: value for name, value in catalog}
        functions = self._client.query("SELECT name FROM system.table_functions").result_rows
        self._denied_calls = ({name.lower() for (name,) in functions} - _LOCAL_TABLE_FUNCTIONS) | _HOST_FUNCTIONS
        self.version, self.timezone = self._client.query("SELECT version(), timezone()").result_rows[0]

    def close(self) -> None:
        self._client.close()

    def run(self, request: SqlRequest) -> SqlResult:
        changes = self._analyst_settings(request.settings)
        if request.default_format.lower() in _CHDB_PYTHON_FORMATS:
            raise QueryError.of(UNKNOWN_FORMAT, "UNKNOWN_FORMAT", f"Unknown format {request.default_format}")
        with self._slot():
            import chdb

            started = time.monotonic()
            connection = chdb.connect(self._path)
            try:
                self._set(connection, self.limits.profile())
                kind, explicit_format = self._check(connection, request)
                self._set(connection, {**changes, "readonly": "1"})
                self._engine(connection, f"USE {_identifier(request.database)}")
                result = self._engine(connection, request.query, request.default_format, request.parameters)
                body = result.bytes() or b""
                summary = _summary(result, time.monotonic() - started)
            finally:
                connection.close()
        output = None if kind in _NO_RESULT_STATEMENTS else (explicit_format or request.default_format)
        return SqlResult(body, output, request.settings.get("session_timezone") or self.timezone, summary)

    def _analyst_settings(self, requested: dict[str, str]) -> dict[str, str]:
        """The request's settings that apply, checked as a readonly = 1 user with max constraints on the
        limits would have them checked by a ClickHouse server."""
        caps = self.limits.caps()
        changes: dict[str, str] = {}
        for name, value in requested.items():
            if name == "readonly":
                if value.strip() not in ("1", "2"):
                    raise QueryError.of(READONLY, "READONLY", "Cannot modify 'readonly' setting in readonly mode")
            elif name in caps:
                try:
                    number = float(value)
                except ValueError:
                    raise QueryError.of(CANNOT_PARSE_TEXT, "CANNOT_PARSE_TEXT",
                                        f"Cannot parse '{value}' as the value of setting {name}") from None
                cap = caps[name]
                if number <= 0 and cap:
                    raise QueryError.of(SETTING_CONSTRAINT_VIOLATION, "SETTING_CONSTRAINT_VIOLATION",
                                        f"Setting {name} shouldn't be unlimited (0) for this user; "
                                        f"the maximum is {_number(cap)}")
                if cap and number > cap:
                    raise QueryError.of(SETTING_CONSTRAINT_VIOLATION, "SETTING_CONSTRAINT_VIOLATION",
                                        f"Setting {name} shouldn't be greater than {_number(cap)}")
                changes[name] = value
            elif name not in self._settings_catalog:
                raise QueryError.of(UNKNOWN_SETTING, "UNKNOWN_SETTING",
                                    f"Setting {name} is neither a builtin setting nor started with the prefix "
                                    "'SQL_' registered for user-defined settings")
            elif name in _ANALYST_SETTINGS:
                changes[name] = value
            elif value != self._settings_catalog[name]:
                raise QueryError.of(READONLY, "READONLY", f"Cannot modify '{name}' setting in readonly mode")
        return changes

    def _check(self, connection: Any, request: SqlRequest) -> tuple[str, str | None]:
        """ClickHouse parses the query (one statement, or SYNTAX_ERROR as over HTTP); the canonical
        statement it prints, without string literals, says what kind of statement it is and what it calls."""
        result = self._engine(connection, "SELECT formatQuerySingleLine({q:String})", "TabSeparatedRaw",
                              {"q": _escaped(request.query)})
        # Not necessarily UTF-8: a literal may hold any bytes ('\xff'); only the code outside literals is read.
        canonical = (result.bytes() or b"").decode(errors="replace").rstrip("\n")
        code = _TOKEN.sub(_without_literals, canonical)
        first = _FIRST_WORD.match(code)
        kind = first.group(1).upper() if first else ""
        who = request.user.name
        if kind not in _ALLOWED_STATEMENTS:
            raise QueryError.of(READONLY, "READONLY", f"{who}: Cannot execute query in readonly mode")
        if _INTO_OUTFILE.search(code):
            raise QueryError.of(INTO_OUTFILE_NOT_ALLOWED, "INTO_OUTFILE_NOT_ALLOWED", "INTO OUTFILE is not allowed")
        for name in _CALL.findall(code):
            if name.lower() in _HOST_FUNCTIONS:
                raise QueryError.of(ACCESS_DENIED, "ACCESS_DENIED",
                                    f"{who}: Not enough privileges. The function {name}() reads files of the "
                                    "server host, which this endpoint does not allow")
            if name.lower() in self._denied_calls:
                raise QueryError.of(READONLY, "READONLY",
                                    f"{who}: Cannot execute query in readonly mode: table function {name}() "
                                    "reads outside the database")
        trailing = _TRAILING_FORMAT.search(code)
        return kind, trailing.group(1) if trailing else None

    @staticmethod
    def _engine(connection: Any, sql: str, fmt: str = "TabSeparated", parameters: dict[str, str] | None = None) -> Any:
        try:
            return connection.query(sql, fmt, params=parameters or {})
        except Exception as exc:  # chdb raises ChdbError (or RuntimeError) carrying ClickHouse's message
            raise QueryError.from_engine(exc) from None

    def _set(self, connection: Any, values: dict[str, str]) -> None:
        if values:
            self._engine(connection, "SET " + ", ".join(f"{name} = {_quoted(value)}" for name, value in values.items()))

    @contextmanager
    def _slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=SLOT_WAIT_SECONDS):
            raise QueryError.of(TOO_MANY_SIMULTANEOUS_QUERIES, "TOO_MANY_SIMULTANEOUS_QUERIES",
                                f"Too many simultaneous queries. Maximum: {self.limits.max_concurrent}")
        try:
            yield
        finally:
            self._slots.release()


def _without_literals(match: re.Match[str]) -> str:
    quoted = match.group(1) if match.group(1) is not None else match.group(2)
    if quoted is None:
        return "''"
    return re.sub(r"\W", "_", quoted) or "_"  # `file`('x') calls file() too


def _escaped(text: str) -> str:
    """A query parameter's value in ClickHouse's escaped text form."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\0", "\\0").replace("\b", "\\b").replace("\f", "\\f"))


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _summary(result: Any, elapsed: float) -> dict[str, str]:
    def figure(method: str) -> str:
        try:
            return str(int(getattr(result, method)()))
        except Exception:
            return "0"

    return {"read_rows": figure("storage_rows_read"), "read_bytes": figure("storage_bytes_read"),
            "written_rows": "0", "written_bytes": "0", "total_rows_to_read": figure("storage_rows_read"),
            "result_rows": figure("rows_read"), "result_bytes": figure("bytes_read"),
            "elapsed_ns": str(int(elapsed * 1e9))}


# ---- HTTP ------------------------------------------------------------------------------------------


def _optional(*modules: str) -> Any:
    """The first of these modules that imports, or None."""
    import importlib

    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


_zstd = _optional("compression.zstd", "backports.zstd")  # Python 3.14, or the backport clickhouse-connect uses
_lz4 = _optional("lz4.frame")

# In ClickHouse's order of preference (chooseHTTPCompressionMethod); br and snappy need modules this
# project does not have, zstd and lz4 are there when clickhouse-connect's own dependencies are.
_ENCODERS: dict[str, Callable[[bytes, int], bytes]] = {
    **({"zstd": lambda data, level: _zstd.compress(data)} if _zstd else {}),
    **({"lz4": lambda data, level: _lz4.compress(data)} if _lz4 else {}),
    "gzip": lambda data, level: gzip.compress(data, compresslevel=min(max(level, 1), 9), mtime=0),
    "deflate": lambda data, level: zlib.compress(data, min(max(level, 1), 9)),
    "xz": lambda data, level: lzma.compress(data),
}
# Request bodies: each decoder stops at MAX_REQUEST_BYTES + 1 bytes of output, so that a small
# compressed body cannot unfold into gigabytes before anyone is authenticated.
_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    **({"zstd": _zstd.ZstdDecompressor} if _zstd else {}),
    **({"lz4": _lz4.LZ4FrameDecompressor} if _lz4 else {}),
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "deflate": zlib.decompressobj,
    "xz": lzma.LZMADecompressor,
}

_CONTENT_TYPES = (
    (re.compile(r"^(TabSeparated|TSV)", re.I), "text/tab-separated-values; charset=UTF-8"),
    (re.compile(r"^CSVWith", re.I), "text/csv; charset=UTF-8; header=present"),
    (re.compile(r"^CSV", re.I), "text/csv; charset=UTF-8; header=absent"),
    (re.compile(r"^(JSONEachRow|JSONLines|NDJSON|JSONStringsEachRow|JSONCompactEachRow|JSONCompactStringsEachRow)", re.I),
     "application/x-ndjson; charset=UTF-8"),
    (re.compile(r"^JSON", re.I), "application/json; charset=UTF-8"),
    (re.compile(r"^XML$", re.I), "application/xml; charset=UTF-8"),
    (re.compile(r"^(Native|RowBinary|Parquet|Arrow|ORC|Avro|Protobuf|MsgPack|CapnProto|Npy|BSONEachRow|RawBLOB)", re.I),
     "application/octet-stream"),
)


def _content_type(fmt: str | None) -> str:
    for pattern, content_type in _CONTENT_TYPES:
        if fmt and pattern.match(fmt):
            return content_type
    return "text/plain; charset=UTF-8"


def _first(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A request's parameters; the first of a repeated name counts, as in ClickHouse's HTMLForm."""
    values: dict[str, str] = {}
    for name, value in items:
        values.setdefault(name, value)
    return values


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class SqlApp:
    """The ASGI application: ClickHouse's HTTP interface in front of an Engine."""

    def __init__(self, engine: Engine, users: dict[str, SqlUser]):
        self.engine = engine
        self.users = users
        self.display_name = socket.gethostname()

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        from starlette.requests import Request

        if scope["type"] != "http":  # uvicorn runs it with lifespan="off"
            return
        response = await self.respond(Request(scope, receive))
        await response(scope, receive, send)

    async def respond(self, request: Any) -> Any:
        from starlette.responses import Response

        path, method = request.url.path, request.method
        if path in ("/ping", "/replicas_status") or (path == "/" and method in ("GET", "HEAD") and not request.url.query):
            return Response(b"Ok.\n", media_type="text/html; charset=UTF-8")
        if path != "/":
            return Response(f"There is no handle {path}\n\nUse / or /ping for health checks.\n"
                            "Send queries with POST or GET /?query=...\n".encode(), status_code=404,
                            media_type="text/plain; charset=UTF-8")
        if method not in ("GET", "POST"):
            return self._error(QueryError.of(1, "UNSUPPORTED_METHOD", f"HTTP method {method} is not supported"), {},
                               status=405)
        query_id = ""
        try:
            body = await self._body(request)
            sql, params = self._parse(request, body)
            user = self._authenticate(request, params)
            query_id = _query_id(params.pop("query_id", "") or request.headers.get("x-clickhouse-query-id", ""))
            sql_request = self._sql_request(request, sql, params, user, query_id)
            result = await asyncio.to_thread(self.engine.run, sql_request)
        except QueryError as error:
            if error.code not in (REQUIRED_PASSWORD, AUTHENTICATION_FAILED):
                log.info("refused query %s: %s", query_id or "-", error.text.splitlines()[0][:300])
            return self._error(error, {"X-ClickHouse-Query-Id": query_id} if query_id else {})
        except Exception:
            log.exception("SQL endpoint failed on query %s", query_id or "-")
            return self._error(QueryError.of(UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", "Internal error of the SQL endpoint"),
                               {"X-ClickHouse-Query-Id": query_id} if query_id else {})
        log.debug("query %s by %s: %s result bytes", query_id, sql_request.user.name, len(result.body))
        headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": result.timezone,
                   "X-ClickHouse-Server-Display-Name": self.display_name,
                   "X-ClickHouse-Summary": json.dumps(result.summary, separators=(",", ":"))}
        if result.format:
            headers["X-ClickHouse-Format"] = result.format
        content = result.body
        if _flag(params.get("enable_http_compression")):
            accepted = request.headers.get("accept-encoding", "")
            encoding = next((name for name in _ENCODERS if name in accepted), None)
            if encoding:
                try:  # not isdigit() first: it takes '²', and thousands of digits, which int() refuses
                    level = int(params.get("http_zlib_compression_level", "3"))
                except ValueError:
                    level = 3
                content = _ENCODERS[encoding](content, level)
                headers["Content-Encoding"] = encoding
        headers["Content-Type"] = _content_type(result.format)
        return Response(content, headers=headers)

    def _error(self, error: QueryError, headers: dict[str, str], status: int | None = None) -> Any:
        from starlette.responses import Response

        text = error.text if "(version " in error.text[-60:] else f"{error.text} (version {self.engine.version})"
        headers = {**headers, "X-ClickHouse-Exception-Code": str(error.code),
                   "X-ClickHouse-Server-Display-Name": self.display_name}
        if error.code == REQUIRED_PASSWORD:
            headers["WWW-Authenticate"] = 'Basic realm="ClickHouse server HTTP API"'
        return Response((text + "\n").encode(), status_code=status or error.http_status, headers=headers,
                        media_type="text/plain; charset=UTF-8")

    @staticmethod
    async def _body(request: Any) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                raise QueryError.of(QUERY_IS_TOO_LARGE, "QUERY_IS_TOO_LARGE",
                                    f"The request body is larger than {MAX_REQUEST_BYTES} bytes; "
                                    "this endpoint takes queries, not data")
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if body and encoding and encoding != "identity":
            decompressor = _DECOMPRESSORS.get(encoding)
            if decompressor is None:
                raise QueryError.of(UNKNOWN_COMPRESSION_METHOD, "UNKNOWN_COMPRESSION_METHOD",
                                    f"Unknown compression method '{encoding}' in Content-Encoding")
            try:
                stream = decompressor()
                body = stream.decompress(body, MAX_REQUEST_BYTES + 1)
            except Exception as exc:
                raise QueryError.of(CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS",
                                    f"Cannot decompress the request body: {exc}") from None
            if len(body) > MAX_REQUEST_BYTES:
                raise QueryError.of(QUERY_IS_TOO_LARGE, "QUERY_IS_TOO_LARGE",
                                    f"The request body is larger than {MAX_REQUEST_BYTES} bytes once decompressed")
            if not stream.eof:  # a cut-off body would otherwise run the part of the query that arrived
                raise QueryError.of(CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS",
                                    f"Cannot decompress the request body: the {encoding} stream is truncated")
        return body

    @staticmethod
    def _parse(request: Any, body: bytes) -> tuple[str, dict[str, str]]:
        """The query text and the request's parameters, as ClickHouse reads them: the `query`
        parameter, then a newline and the body; or, in a multipart/form-data body, its fields."""
        params = _first(parse_qsl(request.url.query, keep_blank_values=True))
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            message = BytesParser(policy=policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
            fields: list[tuple[str, str]] = []
            for part in message.iter_parts() if message.is_multipart() else ():
                name = part.get_param("name", header="content-disposition") or ""
                if part.get_filename() is not None:
                    raise QueryError.of(NOT_IMPLEMENTED, "NOT_IMPLEMENTED",
                                        "External data (files in a multipart request) is not supported by this endpoint")
                if name.endswith(("_format", "_types", "_structure")):
                    continue
                fields.append((str(name), _text(part.get_payload(decode=True) or b"")))
            for name, value in _first(fields).items():
                params.setdefault(name, value)
            return params.pop("query", ""), params
        query = params.pop("query", "")
        text = _text(body)
        return (f"{query}\n{text}" if query and text else query or text), params

    def _authenticate(self, request: Any, params: dict[str, str]) -> SqlUser:
        """ClickHouse's ways to give credentials (authenticateUserByHTTP), one at a time: X-ClickHouse-User
        and X-ClickHouse-Key headers, HTTP basic auth, or user and password parameters."""
        user = request.headers.get("x-clickhouse-user", "")
        password = request.headers.get("x-clickhouse-key", "")
        authorization = request.headers.get("authorization", "")
        in_params = "user" in params or "password" in params
        name = "default"
        given = bool(user or password or authorization or in_params)

        def mixed(first: str, second: str) -> QueryError:
            return QueryError.of(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED",
                                 f"Invalid authentication: it is not allowed to use {first} and {second} simultaneously")

        if user or password:
            if authorization:
                raise mixed("X-ClickHouse HTTP headers", "Authorization HTTP header")
            if in_params:
                raise mixed("X-ClickHouse HTTP headers", "authentication via parameters")
            name = user
        elif authorization:
            if in_params:
                raise mixed("Authorization HTTP header", "authentication via parameters")
            scheme, _, info = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise QueryError.of(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED",
                                    f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported")
            try:
                name, _, password = base64.b64decode(info.strip()).decode().partition(":")
            except Exception:
                raise QueryError.of(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED",
                                    "Invalid authentication: malformed Basic credentials") from None
        elif in_params:
            name, password = params.get("user", "default"), params.get("password", "")
        for reserved in ("user", "password", "quota_key"):
            params.pop(reserved, None)
        if not name:
            raise QueryError.of(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED", "Got an empty user name")
        if not given:
            # There is no anonymous `default` user: ask for credentials as ClickHouse does (24.11+) when
            # the default user needs a password.
            raise QueryError.of(REQUIRED_PASSWORD, "REQUIRED_PASSWORD",
                                "default: Authentication required: give the user and password of an analyst "
                                "(HTTP basic auth, X-ClickHouse-User and X-ClickHouse-Key, or user and password parameters)")
        known = self.users.get(name)
        candidate = known or SqlUser(name, b"\0" * 32)
        if not candidate.accepts(password) or known is None:
            log.info("SQL endpoint: authentication failed for user %r from %s", name,
                     request.client.host if request.client else "?")
            raise QueryError.of(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED",
                                f"{name}: Authentication failed: password is incorrect, or there is no user with such name")
        return known

    def _sql_request(self, request: Any, sql: str, params: dict[str, str], user: SqlUser, query_id: str) -> SqlRequest:
        if _flag(params.get("compress")) or _flag(params.get("decompress")):
            raise QueryError.of(NOT_IMPLEMENTED, "NOT_IMPLEMENTED",
                                "ClickHouse's internal compression (compress=1, decompress=1) is not supported by this "
                                "endpoint; use enable_http_compression=1 with an Accept-Encoding header")
        database = request.headers.get("x-clickhouse-database", "") or params.get("database", "") or self.engine.database
        default_format = (request.headers.get("x-clickhouse-format", "") or params.get("default_format", "")
                          or "TabSeparated")
        parameters: dict[str, str] = {}
        settings: dict[str, str] = {}
        for name, value in params.items():
            if name.startswith("param_"):
                parameters[name[len("param_"):]] = value
            elif name in ("database", "default_format") or name in _RESERVED_PARAMS or not name:
                continue
            else:
                settings[name] = value
        if not sql.strip():
            raise QueryError.of(SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
        return SqlRequest(user, sql, database, default_format, settings, parameters, query_id)


def _query_id(given: str) -> str:
    """The client's query id, or a new one. It goes back in the X-ClickHouse-Query-Id header, so it must be
    a header's value: one with spaces at either end, a line break or a character outside latin-1 made
    the HTTP server drop the connection or answer 500."""
    if not given:
        return str(uuid.uuid4())
    if not _HEADER_VALUE.fullmatch(given):
        raise QueryError.of(BAD_ARGUMENTS, "BAD_ARGUMENTS", "A query_id must be printable latin-1 text, "
                                                            "without spaces at either end")
    return given


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise QueryError.of(BAD_ARGUMENTS, "BAD_ARGUMENTS", "The query is not valid UTF-8") from None


# ---- the server ------------------------------------------------------------------------------------


class SqlHttpServer:
    """The endpoint on host:port, served by uvicorn in a thread of this process."""

    def __init__(self, settings: Settings, users: dict[str, SqlUser] | None = None, limits: Limits | None = None,
                 host: str | None = None, port: int | None = None):
        self.settings = settings
        self.users = load_users(settings) if users is None else users
        self.limits = limits or Limits.from_settings(settings)
        self.host = host or settings.sql_host
        self.port = settings.sql_port if port is None else port
        self.engine: Engine | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        import uvicorn

        self.engine = Engine(self.settings, self.limits)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            self.engine.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(SqlApp(self.engine, self.users), log_config=None, access_log=False, lifespan="off",
                                timeout_keep_alive=30, timeout_graceful_shutdown=5, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="sql-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the SQL endpoint did not start on {self.url}")
            time.sleep(0.05)
        log.info("SQL endpoint on %s (users: %s; limits: %s)", self.url, ", ".join(sorted(self.users)) or "none",
                 self.limits)
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def start_beside_writer(settings: Settings) -> SqlHttpServer | None:
    """For `crm writer`: serve the endpoint when this process owns the embedded database and analysts
    are configured. A failure is logged, never fatal: the projections matter more."""
    reason = _off_reason(settings)
    if reason:
        log.info("SQL endpoint off: %s", reason)
        return None
    server = SqlHttpServer(settings)
    try:
        server.start()
    except Exception as exc:
        log.error("SQL endpoint could not start on %s: %s", server.url, exc)
        return None
    return server


def _off_reason(settings: Settings) -> str | None:
    if settings.clickhouse_dsn:
        return "CRM_CLICKHOUSE_DSN is set, analysts query that ClickHouse server directly"
    if not settings.sql_port:
        return "CRM_SQL_PORT=0"
    try:
        if not load_users(settings):
            return "no analyst users (set CRM_SQL_USERS=name:password or CRM_SQL_USERS_FILE)"
    except (OSError, ValueError) as exc:
        return f"cannot read the analyst users: {exc}"
    return None


def describe(settings: Settings, probe: bool = True) -> str:
    """One line for `crm status`."""
    reason = _off_reason(settings)
    if reason:
        return f"sql endpoint: off ({reason})"
    url = SqlHttpServer(settings, users={}).url
    if not probe:
        return f"sql endpoint: {url} (served by the writer; docs/sql-http.md)"
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
            answering = answer.read() == b"Ok.\n"
    except OSError:
        answering = False
    return f"sql endpoint: {url} ({'answering' if answering else 'not answering'})"
