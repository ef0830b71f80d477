"""The settings profile that analysts' SQL runs under on the embedded ClickHouse (services/sql_http.py,
docs/sql-http.md), and the engine configuration that defines it.

A ClickHouse server gives a read-only analyst a profile: the limits capped, the settings that only shape
the output changeable, every other setting fixed. Its `system.settings` then says which is which
(`readonly`, `min`, `max`), clients such as clickhouse-connect read that and send only what may change,
and the engine itself refuses the rest, in the URL, in SET and in a SETTINGS clause alike.

The embedded engine (clickhouse-local) can do that only from the users file it reads when it starts: it
has no writable access storage (CREATE SETTINGS PROFILE), does not reload users, and ignores
access_control_improvements, so not `readonly = 1` with CHANGEABLE_IN_READONLY settings, which needs
settings_constraints_replace_previous. What it can do is the equivalent `readonly = 2` profile, which
needs a constraint per fixed setting: so the engine's settings are listed first, from an in-memory
engine, and the file is written before the data directory's engine starts (projections/clickhouse.py).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from streams.config import Settings

log = logging.getLogger("crm.sql_profile")

PROFILE = "crm_analyst"

# Settings an analyst may change: they shape how results are written, not what the engine may do.
ANALYST_SETTINGS = frozenset({
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
# Settings of the HTTP interface, which the endpoint reads itself (or ignores) and the engine never uses.
HTTP_SETTINGS = frozenset({
    "enable_http_compression", "http_zlib_compression_level", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close", "http_response_buffer_size",
    "http_wait_end_of_query", "add_http_cors_header", "http_write_exception_in_output_format",
    "http_native_compression_disable_checksumming_on_decompress",
})
# `readonly` is guarded by the engine itself (at 2 it may not change), `database` is what USE changes.
_FREE = ANALYST_SETTINGS | HTTP_SETTINGS | {"readonly", "database"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Limits:
    """What every analyst query may use: exceeding one stops the query with TIMEOUT_EXCEEDED (159),
    TOO_MANY_ROWS_OR_BYTES (396) or MEMORY_LIMIT_EXCEEDED (241); an analyst may lower them per query (a
    MAX constraint), not raise or lift them. 0 means no limit."""

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
        """The settings a session starts with."""
        profile = {"max_execution_time": number(self.max_execution_seconds), "timeout_overflow_mode": "throw",
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


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def engine_options(settings: Settings) -> dict[str, str]:
    """chdb options for the engine of settings.chdb_dir: its configuration file, with the analysts' profile.
    Empty when the engine's settings cannot be listed (an engine of another path is open in this process,
    so this one cannot start either) and no file was written before."""
    config = settings.state_dir / "run" / "clickhouse.xml"
    names = _setting_names()
    if names:
        users = config.with_name("clickhouse-users.xml")
        _write(users, _users_xml(names, Limits.from_settings(settings)))
        _write(config, f"<clickhouse><users_config>{escape(str(users))}</users_config></clickhouse>\n")
    return {"config-file": str(config)} if config.exists() else {}


@functools.cache
def _setting_names() -> tuple[str, ...]:
    """The engine's settings, from an in-memory engine; chdb refuses to start one while an engine of a data
    directory is open in this process, which then already has its configuration."""
    import chdb

    try:
        connection = chdb.connect(":memory:")
    except RuntimeError as exc:
        log.debug("cannot list the engine's settings: %s", exc)
        return ()
    try:
        return tuple(connection.query("SELECT name FROM system.settings", "TabSeparatedRaw").bytes().decode().split())
    finally:
        connection.close()


def _users_xml(names: tuple[str, ...], limits: Limits) -> str:
    """chdb's own default user, and the analysts' profile: limits capped, output settings free, the rest CONST.
    A cap has MIN 1 as well, since 0 means no limit."""
    caps = limits.caps()
    constraints = []
    for name in names:
        if not _NAME.fullmatch(name) or name in _FREE or (name in caps and not caps[name]):
            continue
        rule = f"<min>{_smallest(name)}</min><max>{number(caps[name])}</max>" if name in caps else "<const/>"
        constraints.append(f"<{name}>{rule}</{name}>")
    return ("<clickhouse>\n<profiles><default/>\n"
            f"<{PROFILE}><constraints>\n" + "\n".join(constraints) + f"\n</constraints></{PROFILE}>\n</profiles>\n"
            "<users><default><password></password><networks><ip>::/0</ip></networks><profile>default</profile>"
            "<quota>default</quota><named_collection_control>1</named_collection_control></default></users>\n"
            "<quotas><default/></quotas>\n</clickhouse>\n")


def _smallest(name: str) -> str:
    """The lowest value of a limit short of 0 (no limit): a second may be cut into fractions, rows not."""
    return "0.001" if name == "max_execution_time" else "1"


def _write(path: Path, text: str) -> None:
    """Whole or not at all: another process may be starting an engine from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)
