"""Pieces of SQL over HTTP that need no engine: how an error part-way through a result is written (read
back with clickhouse-connect's own parser), the text `crm sql` prints of a failed query, and the
analysts' profile in the engine's users file."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

from clickhouse_connect.driver.transform import extract_exception_with_tag

from projections.sql_profile import PROFILE, Limits, _users_xml
from services.sql_http import MAX_EXCEPTION_BYTES, _exception_block, error_text

TAG = "abcdefghij012345"


def test_an_error_part_way_is_written_as_clickhouse_writes_it_and_clickhouse_connect_reads_it():
    text = "Code: 395. DB::Exception: boom. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO) (version 26.9.2.1)"
    block = _exception_block(text, TAG)
    assert block == (b"\r\n__exception__\r\n" + TAG.encode() + b"\r\n" + text.encode() + b"\n"
                     + f"{len(text) + 1} {TAG}\r\n__exception__\r\n".encode())
    assert extract_exception_with_tag(b"1\n2\n" + block, TAG) == text


def test_a_long_error_is_cut_so_that_the_block_fits_in_16_kib():
    block = _exception_block("Code: 62. DB::Exception: " + "x" * 100_000, TAG)
    assert len(block) <= MAX_EXCEPTION_BYTES
    assert extract_exception_with_tag(block, TAG).startswith("Code: 62. DB::Exception: xxx")


def test_crm_sql_prints_the_engines_text_of_an_error_whichever_way_it_came():
    engine = "Code: 60. DB::Exception: Unknown table expression identifier 'x'. (UNKNOWN_TABLE)"
    over_http = (f"Received ClickHouse exception, code: 60, server response: {engine} (version 26.9.2.1) "
                 "(for url http://127.0.0.1:8123)")
    assert error_text(Exception(engine)) == error_text(Exception(over_http)) == engine


def test_the_profile_caps_the_limits_frees_the_output_settings_and_fixes_the_rest():
    limits = Limits(max_execution_seconds=30, max_result_rows=500, max_result_bytes=1000, max_memory_bytes=0)
    names = ("max_execution_time", "max_result_rows", "max_result_bytes", "max_memory_usage", "max_block_size",
             "enable_http_compression", "readonly", "database", "max_threads", "allow_ddl")
    profile = ElementTree.fromstring(_users_xml(names, limits)).find(f"profiles/{PROFILE}/constraints")
    rules = {element.tag: {rule.tag: rule.text for rule in element} for element in profile}
    assert rules == {"max_execution_time": {"min": "0.001", "max": "30"}, "max_result_rows": {"min": "1", "max": "500"},
                     "max_result_bytes": {"min": "1", "max": "1000"}, "max_threads": {"const": None},
                     "allow_ddl": {"const": None}}


def test_the_dashboard_asks_the_sql_endpoint_where_the_writer_announced_it(tmp_path, monkeypatch):
    from services.dashboard.sql import endpoint_url
    from services.sql_http import admin_file
    from streams.config import Settings

    monkeypatch.setenv("CRM_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("CRM_SQL_PORT", "8123")
    settings = Settings()
    assert endpoint_url(settings) == "http://127.0.0.1:8123/"
    admin_file(settings).parent.mkdir(parents=True)
    admin_file(settings).write_text('{"host": "127.0.0.1", "port": 40123, "user": "crm_admin", "password": "x"}')
    assert endpoint_url(settings) == "http://127.0.0.1:40123/"
