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
analyst does outlives the request): the user's limits are set, then the analysts' settings profile
(projections/sql_profile.py: the limits capped, the output settings free, every other setting constant),
then the settings of the request and `readonly = 2`, which makes the engine refuse writes and DDL. Before
that, ClickHouse's own parser (`formatQuerySingleLine`, the query passed as a parameter, never spliced
into SQL) turns the query into one canonical statement, which is checked for what the embedded engine
would let through but a server's HTTP interface or an analyst's grants would not: more than one
statement, statements other than SELECT/SHOW/DESCRIBE/EXISTS/EXPLAIN/USE/SET, `INTO OUTFILE`, the
`file()` function and table functions other than a few local ones (url(...), s3(...), eval(...), ...).

Results are streamed as the engine produces them, where the format allows it, with an error part-way
reported as ClickHouse 25.11+ does (an `__exception__` block tagged with X-ClickHouse-Exception-Tag, then
the connection broken off). The writer also serves a local admin (`crm sql` while the stack runs): a
random password in $CRM_STATE_DIR/run/sql-admin, a read-only session without the analysts' limits.

With CRM_CLICKHOUSE_DSN (a ClickHouse server) none of this runs: analysts connect to the server, as a
read-only user created as docs/sql-http.md shows.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import hmac
import json
import logging
import lzma
import os
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from projections.sql_profile import ANALYST_SETTINGS, HTTP_SETTINGS, PROFILE, Limits, number
from streams.config import Settings

log = logging.getLogger("crm.sql_http")

MAX_REQUEST_BYTES = 16 * 1024 * 1024  # request body, before and after decompression: queries, not data
SLOT_WAIT_SECONDS = 10.0  # how long a query waits for one of the concurrent-query slots
SPOOL_MEMORY_BYTES = 1024 * 1024  # wait_end_of_query=1: this much of a result in memory, the rest in a file
SPOOL_READ_BYTES = 1024 * 1024  # and read back in pieces this large
MAX_EXCEPTION_BYTES = 16 * 1024  # an error reported part-way through a body, as ClickHouse cuts it
ADMIN_USER = "crm_admin"

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
    "close_session", "role",
}) | HTTP_SETTINGS

# Statements an analyst may run (first word of the canonical statement). The engine's readonly = 2 and
# the profile's constraints refuse what changes data or settings within these.
_ALLOWED_STATEMENTS = frozenset({"SELECT", "WITH", "(", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "USE", "SET"})
_NO_RESULT_STATEMENTS = frozenset({"USE", "SET"})
_QUERY_STATEMENTS = frozenset({"SELECT", "WITH", "("})  # the ones chdb can stream
# Formats whose output of a result is the output of its blocks one after another. chdb's streaming writes
# each chunk as an output of its own (a JSON document, a CSVWithNames header, a Parquet file each), so
# only these are streamed; the others are made whole first.
_STREAMED_FORMATS = frozenset(name.lower() for name in (
    "TabSeparated", "TSV", "TabSeparatedRaw", "TSVRaw", "Raw", "CSV", "JSONEachRow", "JSONLines", "NDJSON",
    "JSONStringsEachRow", "JSONCompactEachRow", "JSONCompactStringsEachRow", "TSKV", "LineAsString", "RawBLOB",
    "Native", "RowBinary", "MsgPack", "BSONEachRow", "Null"))
# What chdb's streaming would write per chunk or drop, not once per result: totals and extremes (the text
# formats lose them), and JSONEachRow as one array.
_WHOLE_OUTPUT = re.compile(r"\b(?:TOTALS|extremes|output_format_json_array_of_rows)\b", re.I)
# Table functions that read nothing outside the database; every other one (url, s3, file, remote,
# mysql, python, eval, ...) is refused, in any statement (DESCRIBE url(...) fetches the URL too).
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
_CLIENT_WRAPPING = re.compile(r"(?: \(version [^()]*\))?(?: \(for url [^()]*\))?\s*$")
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
        # query parameter, say): the message is then the bytes it failed on (which its streaming API wraps
        # in a ChdbError of its own).
        failed = exc if isinstance(exc, UnicodeDecodeError) else exc.__cause__
        text = (bytes(failed.object).decode(errors="replace") if isinstance(failed, UnicodeDecodeError)
                else str(exc)).strip()
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


# ---- users -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqlUser:
    name: str
    password_sha256: bytes = field(repr=False)
    admin: bool = False  # the local admin: read-only, but without the analysts' profile and limits

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
    wait_end_of_query: bool = False  # the whole result before the first byte, as ClickHouse's parameter asks


@dataclass(frozen=True)
class Statement:
    """A request's query as ClickHouse's parser printed it, string literals blanked out."""

    kind: str  # its first word, upper case, or "("
    format: str | None  # of its FORMAT clause
    code: str


class Body:
    """The bytes of a result as the engine produces them: a chunk (a block) at a time, each fetched when
    the client is ready for it, so that memory stays bounded whatever the result's size. It holds its
    engine connection until close(), which also cancels a query the client stopped reading."""

    def __init__(self, connection: Any, release: Callable[[], None]):
        self.connection: Any = connection
        self._release = release  # the concurrent-query slot
        self._stream: Any = None
        self._ready: list[bytes] = []
        self._spool: Any = None
        self._lock = threading.Lock()  # a fetch runs in one thread, close() may come from another
        self._started = time.monotonic()
        self._figures = dict.fromkeys(("read_rows", "read_bytes", "result_rows", "result_bytes"), 0)

    def whole(self, result: Any) -> None:
        self._count(result)
        self._ready.append(result.bytes() or b"")

    def stream(self, stream: Any) -> None:
        """Fetches the first chunk now: an error before any data then gets its own HTTP status."""
        self._stream = stream
        self._ready.append(self._fetch() or b"")

    def read(self) -> bytes | None:
        """The next piece, None at the end; QueryError when the query fails part-way."""
        with self._lock:
            if self._ready:
                return self._ready.pop(0)
            if self._spool is not None:
                return self._spool.read(SPOOL_READ_BYTES) or None
            return self._fetch()

    def spool(self) -> None:
        """The whole result now (wait_end_of_query=1), its first megabyte in memory, the rest in a
        temporary file, as ClickHouse buffers it: an error then still gets its own HTTP status."""
        spool = tempfile.SpooledTemporaryFile(SPOOL_MEMORY_BYTES)
        while (chunk := self.read()) is not None:
            spool.write(chunk)
        spool.seek(0)
        self._spool = spool

    def summary(self) -> dict[str, str]:
        """X-ClickHouse-Summary, of what was fetched so far."""
        figures = self._figures
        return {"read_rows": str(figures["read_rows"]), "read_bytes": str(figures["read_bytes"]),
                "written_rows": "0", "written_bytes": "0", "total_rows_to_read": str(figures["read_rows"]),
                "result_rows": str(figures["result_rows"]), "result_bytes": str(figures["result_bytes"]),
                "elapsed_ns": str(int((time.monotonic() - self._started) * 1e9))}

    def close(self) -> None:
        with self._lock:
            if self.connection is None:
                return
            stream, self._stream = self._stream, None
            try:
                if stream is not None:
                    stream.cancel()
            finally:
                self.connection.close()
                self.connection = None
                if self._spool is not None:
                    self._spool.close()
                self._release()

    def _fetch(self) -> bytes | None:
        if self._stream is None:
            return None
        try:
            chunk = self._stream.fetch()
        except Exception as exc:  # chdb's ChdbError, "Streaming query failed: Code: ..."
            self._stream = None
            raise QueryError.from_engine(exc) from None
        if chunk is None:
            self._stream = None
            return None
        self._count(chunk)
        return chunk.bytes() or b""

    def _count(self, result: Any) -> None:
        for name, method in (("read_rows", "storage_rows_read"), ("read_bytes", "storage_bytes_read"),
                             ("result_rows", "rows_read"), ("result_bytes", "bytes_read")):
            try:
                self._figures[name] += int(getattr(result, method)())
            except Exception:  # a figure chdb does not have for this result
                continue


@dataclass
class SqlResult:
    format: str | None  # None: the statement writes no result (USE, SET)
    timezone: str
    body: Body


class Engine:
    """Runs the endpoint's queries on the embedded ClickHouse this process owns."""

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
        try:
            self._client.command(f"SELECT 1 SETTINGS profile = {_quoted(PROFILE)}")
        except Exception as exc:
            self._client.close()
            raise RuntimeError(f"the embedded ClickHouse has no profile {PROFILE} (projections/sql_profile.py): it was "
                               f"started before projections.clickhouse.connect configured it ({exc})") from None
        catalog = self._client.query("SELECT name, value FROM system.settings").result_rows
        self._settings_catalog: dict[str, str] = {name: value for name, value in catalog}
        functions = self._client.query("SELECT name FROM system.table_functions").result_rows
        self._denied_calls = ({name.lower() for (name,) in functions} - _LOCAL_TABLE_FUNCTIONS) | _HOST_FUNCTIONS
        self.version, self.timezone = self._client.query("SELECT version(), timezone()").result_rows[0]

    def close(self) -> None:
        self._client.close()

    def run(self, request: SqlRequest) -> SqlResult:
        """The query started, with its first chunk fetched (or all of it, where it cannot stream); the
        caller closes the body, which frees the query's slot."""
        changes = self._requested_settings(request)
        if request.default_format.lower() in _CHDB_PYTHON_FORMATS:
            raise QueryError.of(UNKNOWN_FORMAT, "UNKNOWN_FORMAT", f"Unknown format {request.default_format}")
        body = self._session()
        try:
            statement = self._open(body.connection, request, changes)
            self._start(body, statement, request)
        except BaseException:
            body.close()
            raise
        output = None if statement.kind in _NO_RESULT_STATEMENTS else (statement.format or request.default_format)
        return SqlResult(output, request.settings.get("session_timezone") or self.timezone, body)

    def _session(self) -> Body:
        """A connection of its own and one of the concurrent-query slots, both held until the body closes."""
        if not self._slots.acquire(timeout=SLOT_WAIT_SECONDS):
            raise QueryError.of(TOO_MANY_SIMULTANEOUS_QUERIES, "TOO_MANY_SIMULTANEOUS_QUERIES",
                                f"Too many simultaneous queries. Maximum: {self.limits.max_concurrent}")
        try:
            import chdb

            return Body(chdb.connect(self._path), self._slots.release)
        except BaseException:
            self._slots.release()
            raise

    def _open(self, connection: Any, request: SqlRequest, changes: dict[str, str]) -> Statement:
        """The session of one request, as a ClickHouse server would set up a user's: an analyst's with
        the limits, then the profile's constraints; the admin's without either. Both end `readonly = 2`:
        no writes, no DDL, and `readonly` itself may no longer change."""
        if not request.user.admin:
            self._set(connection, self.limits.profile())
            self._engine(connection, f"SET profile = {_quoted(PROFILE)}")
        statement = self._check(connection, request)
        self._set(connection, {**changes, "readonly": "2"})
        self._engine(connection, f"USE {_identifier(request.database)}")
        return statement

    @staticmethod
    def _start(body: Body, statement: Statement, request: SqlRequest) -> None:
        streams = _streams(statement, request)
        start = body.connection.send_query if streams else body.connection.query
        try:
            started = start(request.query, request.default_format, params=request.parameters)
        except Exception as exc:  # chdb raises ChdbError (or RuntimeError) carrying ClickHouse's message
            raise QueryError.from_engine(exc) from None
        if streams:
            body.stream(started)
        else:
            body.whole(started)

    def _requested_settings(self, request: SqlRequest) -> dict[str, str]:
        """The request's settings that apply. The admin's are the engine's to check; an analyst's are checked
        as a server checks them for a readonly = 1 user whose limits have max constraints."""
        changes: dict[str, str] = {}
        for name, value in request.settings.items():
            if name == "readonly":
                if value.strip() not in ("1", "2"):
                    raise QueryError.of(READONLY, "READONLY", "Cannot modify 'readonly' setting in readonly mode")
            elif request.user.admin and name in self._settings_catalog:
                changes[name] = value
            elif name in self.limits.caps():
                changes[name] = self._capped(name, value)
            elif name not in self._settings_catalog:
                raise QueryError.of(UNKNOWN_SETTING, "UNKNOWN_SETTING",
                                    f"Setting {name} is neither a builtin setting nor started with the prefix "
                                    "'SQL_' registered for user-defined settings")
            elif name in ANALYST_SETTINGS:
                changes[name] = value
            elif value != self._settings_catalog[name]:
                raise QueryError.of(READONLY, "READONLY", f"Cannot modify '{name}' setting in readonly mode")
        return changes

    def _capped(self, name: str, value: str) -> str:
        try:
            figure = float(value)
        except ValueError:
            raise QueryError.of(CANNOT_PARSE_TEXT, "CANNOT_PARSE_TEXT",
                                f"Cannot parse '{value}' as the value of setting {name}") from None
        cap = self.limits.caps()[name]
        if figure <= 0 and cap:
            raise QueryError.of(SETTING_CONSTRAINT_VIOLATION, "SETTING_CONSTRAINT_VIOLATION",
                                f"Setting {name} shouldn't be unlimited (0) for this user; the maximum is {number(cap)}")
        if cap and figure > cap:
            raise QueryError.of(SETTING_CONSTRAINT_VIOLATION, "SETTING_CONSTRAINT_VIOLATION",
                                f"Setting {name} shouldn't be greater than {number(cap)}")
        return value

    def _check(self, connection: Any, request: SqlRequest) -> Statement:
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
        return Statement(kind, trailing.group(1) if trailing else None, code)

    @staticmethod
    def _engine(connection: Any, sql: str, fmt: str = "TabSeparated", parameters: dict[str, str] | None = None) -> Any:
        try:
            return connection.query(sql, fmt, params=parameters or {})
        except Exception as exc:  # chdb raises ChdbError (or RuntimeError) carrying ClickHouse's message
            raise QueryError.from_engine(exc) from None

    def _set(self, connection: Any, values: dict[str, str]) -> None:
        if values:
            self._engine(connection, "SET " + ", ".join(f"{name} = {_quoted(value)}" for name, value in values.items()))


def _streams(statement: Statement, request: SqlRequest) -> bool:
    """Whether chdb's streaming of this query writes what the whole result would be (_STREAMED_FORMATS)."""
    output = (statement.format or request.default_format).lower()
    return (statement.kind in _QUERY_STATEMENTS and output in _STREAMED_FORMATS
            and not _WHOLE_OUTPUT.search(statement.code)
            and not any(_WHOLE_OUTPUT.fullmatch(name) and _flag(value) for name, value in request.settings.items()))


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



class _Lz4Frame:
    """lz4.frame's compressor, writing the frame's header with its first output, as the others do."""

    def __init__(self) -> None:
        self._compressor = _lz4.LZ4FrameCompressor()
        self._header = self._compressor.begin()

    def compress(self, data: bytes) -> bytes:
        header, self._header = self._header, b""
        return header + self._compressor.compress(data)

    def flush(self) -> bytes:
        header, self._header = self._header, b""
        return header + self._compressor.flush()


# Compressors of a response body as it streams (compress(data) as it comes, flush() at the end), given the
# http_zlib_compression_level; in ClickHouse's order of preference (chooseHTTPCompressionMethod). br and
# snappy need modules this project does not have, zstd and lz4 are there with clickhouse-connect's own.
_ENCODERS: dict[str, Callable[[int], Any]] = {
    **({"zstd": lambda level: _zstd.ZstdCompressor()} if _zstd else {}),
    **({"lz4": lambda level: _Lz4Frame()} if _lz4 else {}),
    "gzip": lambda level: zlib.compressobj(min(max(level, 1), 9), zlib.DEFLATED, 16 + zlib.MAX_WBITS),
    "deflate": lambda level: zlib.compressobj(min(max(level, 1), 9)),
    "xz": lambda level: lzma.LZMACompressor(),
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


class _BrokenOff(Exception):
    """Ends a response whose query failed part-way, once the error is written into it: uvicorn then closes
    the connection without the body's last chunk, as ClickHouse breaks it off, so that no HTTP client takes
    the body for whole."""


class _QuietBreaks(logging.Filter):
    """uvicorn logs an exception that ends a response as its own failure; a query that failed part-way is
    logged as a refused query already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _BrokenOff))


_QUIET_BREAKS = _QuietBreaks()


def _exception_block(text: str, tag: str) -> bytes:
    """An error after the response began, as ClickHouse 25.11+ writes it at the end of the body (its status
    and headers are sent): between __exception__ markers that carry the response's X-ClickHouse-Exception-Tag,
    with the length of the message, which is cut to fit in 16 KiB."""
    room = MAX_EXCEPTION_BYTES - (2 + 13 + 2 + len(tag) + 2 + 8 + 1 + len(tag) + 2 + 13 + 2)
    message = text.encode()[:room].rstrip(b"\n") + b"\n"
    return (b"\r\n__exception__\r\n" + tag.encode() + b"\r\n" + message
            + f"{len(message)} {tag}\r\n__exception__\r\n".encode())


class SqlApp:
    """The ASGI application: ClickHouse's HTTP interface in front of an Engine."""

    def __init__(self, engine: Engine, users: dict[str, SqlUser]):
        from concurrent.futures import ThreadPoolExecutor

        self.engine = engine
        self.users = users
        self.display_name = socket.gethostname()
        # The engine's blocking calls: queries waiting for a slot must leave threads to those that stream.
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="sql-http")

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        from starlette.requests import Request

        if scope["type"] != "http":  # uvicorn runs it with lifespan="off"
            return
        response, body = await self.respond(Request(scope, receive))
        try:
            await response(scope, receive, send)
        finally:
            if body is not None:  # sent, broken off, or left by its client: the query ends here
                await asyncio.shield(self._blocking(body.close))

    async def _blocking(self, function: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def respond(self, request: Any) -> tuple[Any, Body | None]:
        """The response, and the body of the result it streams (None for any other)."""
        from starlette.responses import Response

        path, method = request.url.path, request.method
        if path in ("/ping", "/replicas_status") or (path == "/" and method in ("GET", "HEAD") and not request.url.query):
            return Response(b"Ok.\n", media_type="text/html; charset=UTF-8"), None
        if path != "/":
            return Response(f"There is no handle {path}\n\nUse / or /ping for health checks.\n"
                            "Send queries with POST or GET /?query=...\n".encode(), status_code=404,
                            media_type="text/plain; charset=UTF-8"), None
        if method not in ("GET", "POST"):
            return self._error(QueryError.of(1, "UNSUPPORTED_METHOD", f"HTTP method {method} is not supported"), {},
                               status=405), None
        query_id = ""
        try:
            body = await self._body(request)
            sql, params = self._parse(request, body)
            user = self._authenticate(request, params)
            query_id = _query_id(params.pop("query_id", "") or request.headers.get("x-clickhouse-query-id", ""))
            sql_request = self._sql_request(request, sql, params, user, query_id)
            result = await self._result(sql_request)
        except QueryError as error:
            if error.code not in (REQUIRED_PASSWORD, AUTHENTICATION_FAILED):
                log.info("refused query %s: %s", query_id or "-", error.text.splitlines()[0][:300])
            return self._error(error, {"X-ClickHouse-Query-Id": query_id} if query_id else {}), None
        except Exception:
            log.exception("SQL endpoint failed on query %s", query_id or "-")
            return self._error(QueryError.of(UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", "Internal error of the SQL endpoint"),
                               {"X-ClickHouse-Query-Id": query_id} if query_id else {}), None
        return self._streamed(request, params, result, query_id), result.body

    async def _result(self, request: SqlRequest) -> SqlResult:
        result = await self._blocking(self.engine.run, request)
        if request.wait_end_of_query:
            try:
                await self._blocking(result.body.spool)
            except BaseException:
                await self._blocking(result.body.close)
                raise
        return result

    def _streamed(self, request: Any, params: dict[str, str], result: SqlResult, query_id: str) -> Any:
        """The result as ClickHouse sends it: its headers (the summary of what was read so far), then the
        body as the engine produces it, compressed as the client asked (enable_http_compression=1)."""
        from starlette.responses import StreamingResponse

        tag = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(16))
        headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": result.timezone,
                   "X-ClickHouse-Server-Display-Name": self.display_name, "X-ClickHouse-Exception-Tag": tag,
                   "X-ClickHouse-Summary": json.dumps(result.body.summary(), separators=(",", ":")),
                   "Content-Type": _content_type(result.format)}
        if result.format:
            headers["X-ClickHouse-Format"] = result.format
        compressor = None
        if _flag(params.get("enable_http_compression")):
            accepted = request.headers.get("accept-encoding", "")
            encoding = next((name for name in _ENCODERS if name in accepted), None)
            if encoding:
                try:  # not isdigit() first: it takes '²', and thousands of digits, which int() refuses
                    level = int(params.get("http_zlib_compression_level", "3"))
                except ValueError:
                    level = 3
                compressor = _ENCODERS[encoding](level)
                headers["Content-Encoding"] = encoding
        return StreamingResponse(self._chunks(result.body, compressor, tag, query_id), headers=headers)

    async def _chunks(self, body: Body, compressor: Any, tag: str, query_id: str) -> AsyncIterator[bytes]:
        def out(data: bytes) -> bytes:
            return compressor.compress(data) if compressor is not None else data

        try:
            while (chunk := await self._blocking(body.read)) is not None:
                if chunk := out(chunk):
                    yield chunk
        except QueryError as error:
            log.info("query %s failed part-way: %s", query_id, error.text.splitlines()[0][:300])
            yield out(_exception_block(self._error_text(error), tag)) + (compressor.flush() if compressor else b"")
            raise _BrokenOff(error.text) from None
        if compressor is not None and (rest := compressor.flush()):
            yield rest

    def _error_text(self, error: QueryError) -> str:
        return error.text if "(version " in error.text[-60:] else f"{error.text} (version {self.engine.version})"

    def _error(self, error: QueryError, headers: dict[str, str], status: int | None = None) -> Any:
        from starlette.responses import Response

        headers = {**headers, "X-ClickHouse-Exception-Code": str(error.code),
                   "X-ClickHouse-Server-Display-Name": self.display_name}
        if error.code == REQUIRED_PASSWORD:
            headers["WWW-Authenticate"] = 'Basic realm="ClickHouse server HTTP API"'
        return Response((self._error_text(error) + "\n").encode(), status_code=status or error.http_status,
                        headers=headers, media_type="text/plain; charset=UTF-8")

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
        wait = _flag(params.get("wait_end_of_query")) or _flag(params.get("http_wait_end_of_query"))
        return SqlRequest(user, sql, database, default_format, settings, parameters, query_id, wait)


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
    """The endpoint on host:port, served by uvicorn in a thread of this process. With admin=True it also
    serves the local admin, whose credential it writes to $CRM_STATE_DIR/run/sql-admin (0600) with the
    address it bound (a free port when the configured one is taken), and removes when it stops."""

    def __init__(self, settings: Settings, users: dict[str, SqlUser] | None = None, limits: Limits | None = None,
                 host: str | None = None, port: int | None = None, admin: bool = False):
        self.settings = settings
        self.users = load_users(settings) if users is None else users
        self.limits = limits or Limits.from_settings(settings)
        self.host = host or settings.sql_host
        self.port = settings.sql_port if port is None else port
        self.admin = admin
        self.engine: Engine | None = None
        self._app: SqlApp | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    def start(self, timeout: float = 30.0) -> str:
        import uvicorn

        self.engine = Engine(self.settings, self.limits)
        try:
            sock = self._listen()
        except OSError:
            self.engine.close()
            raise
        users, password = dict(self.users), secrets.token_urlsafe(24)
        if self.admin:
            users[ADMIN_USER] = SqlUser(ADMIN_USER, hashlib.sha256(password.encode()).digest(), admin=True)
        self._app = SqlApp(self.engine, users)
        logging.getLogger("uvicorn.error").addFilter(_QUIET_BREAKS)
        config = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
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
        if self.admin:
            _write_private(admin_file(self.settings), json.dumps(
                {"host": self.host, "port": self.port, "user": ADMIN_USER, "password": password}))
        log.info("SQL endpoint on %s (users: %s; limits: %s)", self.url, ", ".join(sorted(users)) or "none",
                 self.limits)
        return self.url

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for port in (self.port, 0) if self.admin and self.port else (self.port,):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, port))
                sock.listen(128)
            except OSError as exc:
                sock.close()
                if port == 0 or exc.errno != errno.EADDRINUSE:
                    raise
                log.warning("SQL endpoint: %s is taken, serving on a free port (in %s)", self.url,
                            admin_file(self.settings))
                continue
            self.port = sock.getsockname()[1]
            return sock
        raise OSError(errno.EADDRINUSE, f"{self.url} is taken")

    def stop(self, timeout: float = 30.0) -> None:
        if self.admin:
            admin_file(self.settings).unlink(missing_ok=True)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._app is not None:
            self._app.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None


class EndpointUnavailable(RuntimeError):
    pass


def start_beside_writer(settings: Settings) -> SqlHttpServer | None:
    """For `crm writer`: serve the endpoint whenever this process owns the embedded database, to the local
    admin (`crm sql` while the stack runs) and to the analysts configured. A failure is logged, never
    fatal: the projections matter more."""
    reason = _off_reason(settings)
    if reason:
        log.info("SQL endpoint off: %s", reason)
        return None
    try:
        analysts = load_users(settings)
    except (OSError, ValueError) as exc:
        log.error("SQL endpoint: cannot read the analyst users, serving the local admin only: %s", exc)
        analysts = {}
    if analysts.pop(ADMIN_USER, None):
        log.warning("SQL endpoint: %s is the local admin's name, the analyst of that name is ignored", ADMIN_USER)
    server = SqlHttpServer(settings, users=analysts, admin=True)
    try:
        server.start()
    except Exception as exc:
        log.error("SQL endpoint could not start on %s: %s", server.url, exc)
        return None
    return server


def admin_client(settings: Settings) -> Any:
    """A clickhouse-connect client of the running writer's endpoint, as the local admin: how `crm sql`
    reads the embedded database while the writer owns it."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import OperationalError

    try:
        credential = json.loads(admin_file(settings).read_text())
    except FileNotFoundError:
        raise EndpointUnavailable("The writer serves no SQL endpoint (CRM_SQL_PORT=0?); see its log.") from None
    try:
        return clickhouse_connect.get_client(host=credential["host"], port=credential["port"],
                                             username=credential["user"], password=credential["password"],
                                             database=settings.clickhouse_database)
    except OperationalError as exc:
        raise EndpointUnavailable(f"The writer's SQL endpoint at {_url(credential['host'], credential['port'])} "
                                  f"does not answer: {exc}") from None


def error_text(exc: BaseException) -> str:
    """ClickHouse's text of a failed query, the same from the engine and from this endpoint: clickhouse-connect
    wraps the endpoint's in "Received ClickHouse exception, ..." and "(for url ...)"."""
    text = str(exc)
    at = text.find("Code: ")
    return _CLIENT_WRAPPING.sub("", text[at:] if at >= 0 else text)


def admin_file(settings: Settings) -> Path:
    return settings.state_dir / "run" / "sql-admin"


def _write_private(path: Path, text: str) -> None:
    """Readable by this user alone, and whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        out.write(text)
    partial.replace(path)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _off_reason(settings: Settings) -> str | None:
    if settings.clickhouse_dsn:
        return "CRM_CLICKHOUSE_DSN is set, analysts query that ClickHouse server directly"
    if not settings.sql_port:
        return "CRM_SQL_PORT=0"
    return None


def describe(settings: Settings) -> str:
    """One line for `crm status`: where the writer serves the endpoint (the address it announced, or the
    configured one), and whether it answers there."""
    reason = _off_reason(settings)
    if reason:
        return f"sql endpoint: off ({reason})"
    try:
        announced = json.loads(admin_file(settings).read_text())
        url = _url(announced["host"], announced["port"])
    except (OSError, ValueError, KeyError):
        url = _url(settings.sql_host, settings.sql_port)
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
            answering = answer.read() == b"Ok.\n"
    except OSError:
        answering = False
    return f"sql endpoint: {url} ({'answering' if answering else 'not answering'})"
