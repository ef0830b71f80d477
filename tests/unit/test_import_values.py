"""Reading one cell of an export (services/importer/values.py)."""

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from services.importer.values import Format, RowError, numeric_pattern

GERMAN = Format(timezone="Europe/Berlin", datetime_format="%d.%m.%Y %H:%M", date_format="%d.%m.%Y",
                decimal_separator=",", thousands_separator=".", true_values=("Ja",), false_values=("nein",))


def reason(call) -> str:
    with pytest.raises(RowError) as raised:
        call()
    return raised.value.reason


def test_german_amounts_are_read_with_their_separators():
    assert GERMAN.money("1.299,00", "price") == Decimal("1299.00")
    assert GERMAN.money("3,5", "price") == Decimal("3.50")
    assert str(GERMAN.money("2", "price")) == "2.00"


def test_money_has_two_places_and_more_are_refused_unless_they_are_zeros():
    assert GERMAN.money("2,500", "price") == Decimal("2.50")
    assert reason(lambda: GERMAN.money("2,505", "price")) == "too_many_decimals"


def test_negative_or_unreadable_money_is_refused_with_its_reason():
    assert reason(lambda: GERMAN.money("-1,00", "price")) == "negative_amount"
    assert reason(lambda: GERMAN.money("zwei", "price")) == "unparseable_number"
    assert reason(lambda: Format().money(float("inf"), "price")) == "unparseable_number"


def test_typed_cells_from_json_and_parquet_are_read_as_they_are():
    plain = Format()
    assert plain.money(19.99, "price") == Decimal("19.99")
    assert plain.money(Decimal("7.1"), "price") == Decimal("7.10")
    assert plain.integer(3.0, "quantity") == plain.integer(3, "quantity") == plain.integer(" 3 ", "quantity") == 3
    assert reason(lambda: plain.integer(2.5, "quantity")) == "unparseable_number"
    assert reason(lambda: plain.integer(True, "quantity")) == "unparseable_number"
    assert plain.text(10001.0) == "10001"
    assert plain.text(date(2020, 1, 2)) == "2020-01-02"


def test_naive_timestamps_are_local_time_of_the_file_and_come_out_in_utc():
    assert GERMAN.moment("15.01.2020 10:00", "at") == datetime(2020, 1, 15, 9, 0, tzinfo=UTC)
    assert GERMAN.moment("15.07.2020 10:00", "at") == datetime(2020, 7, 15, 8, 0, tzinfo=UTC)  # summer time
    assert GERMAN.moment(datetime(2020, 7, 15, 10, 0), "at") == datetime(2020, 7, 15, 8, 0, tzinfo=UTC)
    assert GERMAN.moment(date(2020, 7, 15), "at") == datetime(2020, 7, 14, 22, 0, tzinfo=UTC)


def test_timestamps_with_an_offset_keep_it():
    iso = Format(timezone="Europe/Berlin")
    assert iso.moment("2020-07-15T10:00:00-05:00", "at") == datetime(2020, 7, 15, 15, 0, tzinfo=UTC)


def test_an_impossible_date_is_unparseable_and_the_detail_names_value_and_format():
    with pytest.raises(RowError) as raised:
        GERMAN.moment("31.02.2019 12:00", "registered_at")
    assert raised.value.reason == "unparseable_date"
    assert "31.02.2019 12:00" in raised.value.detail and "%d.%m.%Y %H:%M" in raised.value.detail


def test_booleans_are_the_mappings_words_in_any_case():
    assert GERMAN.boolean("ja", "consent") is True
    assert GERMAN.boolean("NEIN", "consent") is False
    assert reason(lambda: GERMAN.boolean("vielleicht", "consent")) == "unparseable_boolean"


def test_patterns_with_other_directives_are_left_to_strptime():
    assert numeric_pattern("%d/%m/%Y %I:%M %p") is None
    assert numeric_pattern("%H:%M") is None  # no date
    assert numeric_pattern("%d.%m.%Y %H:%M:%S") is not None


PATTERNS = ["%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%Y-%m-%d", "%m/%d/%Y %H:%M", "%Y%m%d%H%M%S", "%d.%m.%Y"]


def _both(pattern: str, text: str):
    regex = numeric_pattern(pattern)
    found = regex.fullmatch(text)
    try:
        ours = datetime(**{k: int(v) for k, v in found.groupdict().items()}) if found else None
    except ValueError:
        ours = None
    try:
        theirs = datetime.strptime(text, pattern)
    except ValueError:
        theirs = None
    return ours, theirs


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PATTERNS), st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2199, 12, 31)),
       st.booleans())
def test_the_fast_date_reader_reads_every_formatted_date_as_strptime_does(pattern, moment, unpadded):
    text = moment.strftime(pattern)
    if unpadded:
        text = text.replace(".0", ".").replace(" 0", " ").replace(":0", ":").lstrip("0")
    ours, theirs = _both(pattern, text)
    assert ours == theirs


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(PATTERNS), st.text(alphabet="0123456789 .:-/", max_size=22))
def test_the_fast_date_reader_refuses_what_strptime_refuses(pattern, text):
    ours, theirs = _both(pattern, text)
    assert ours == theirs


def test_a_format_crosses_to_another_process_without_the_timestamps_it_cached():
    import pickle

    reading = Format(timezone="Europe/Berlin")
    moments = [reading.moment(f"2024-03-{day:02d}T10:00:00", "occurred_at") for day in range(1, 29)]
    copy = pickle.loads(pickle.dumps(reading))
    assert len(pickle.dumps(reading)) < 1000
    assert [copy.moment(f"2024-03-{day:02d}T10:00:00", "occurred_at") for day in range(1, 29)] == moments
