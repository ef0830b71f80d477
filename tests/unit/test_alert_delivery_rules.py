"""The pure parts of alert delivery: signatures, filters, the retry schedule, and how the consumer
reads records (valid, invalid, sent twice) into the alert log. No network, no Kafka."""

from __future__ import annotations

import random
from email.utils import format_datetime
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from services.alerts.consumer import parse, store_batch
from services.alerts.dispatch import MAX_RETRY_AFTER_SECONDS, RetryPolicy, retry_after_seconds
from services.alerts.filters import Filters
from services.alerts.signing import SignatureError, sign, signature, verify
from services.alerts.store import AlertStore, InvalidRecord
from tests.unit.test_alert_delivery import alert, encoded

SECRET = "whsec_test"
BODY = b'{"type":"alert_change","change_id":"x"}'


# --- signatures -----------------------------------------------------------------------------------------

def test_a_signature_verifies_with_the_same_secret_and_body():
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    assert header == f"t=1700000000,v1={signature(SECRET, 1_700_000_000, BODY)}"
    assert verify(SECRET, header, BODY, now=1_700_000_010) == 1_700_000_000
    assert verify(SECRET, sign(SECRET, BODY), BODY)  # signed now, checked against the real clock


@pytest.mark.parametrize("secret, body, match", [
    ("whsec_other", BODY, "does not match"),
    (SECRET, BODY + b" ", "does not match"),           # re-encoded JSON is different bytes
    (SECRET, BODY.replace(b"x", b"y"), "does not match"),
])
def test_another_secret_or_body_is_rejected(secret, body, match):
    with pytest.raises(SignatureError, match=match):
        verify(secret, sign(SECRET, BODY, 1_700_000_000), body, now=1_700_000_000)


def test_an_old_timestamp_is_rejected_so_a_captured_request_cannot_be_replayed():
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    assert verify(SECRET, header, BODY, now=1_700_000_000 + 300)
    with pytest.raises(SignatureError, match="outside"):
        verify(SECRET, header, BODY, now=1_700_000_000 + 301)
    with pytest.raises(SignatureError, match="outside"):
        verify(SECRET, header, BODY, now=1_700_000_000 - 301)     # from the future: a clock that is off
    assert verify(SECRET, header, BODY, tolerance_s=3600, now=1_700_000_000 + 3000)
    # Moving the timestamp forward breaks the signature: it is signed with the body.
    forged = header.replace("t=1700000000", "t=1700000400")
    with pytest.raises(SignatureError, match="does not match"):
        verify(SECRET, forged, BODY, now=1_700_000_400)


@pytest.mark.parametrize("header", [None, "", "v1=abc", "t=1700000000", "t=soon,v1=abc", "garbage"])
def test_a_malformed_header_is_rejected_clearly(header):
    with pytest.raises(SignatureError):
        verify(SECRET, header, BODY, now=1_700_000_000)


def test_any_of_several_v1_signatures_may_match():
    header = f"t=1700000000,v1={signature('old', 1_700_000_000, BODY)},v1={signature(SECRET, 1_700_000_000, BODY)}"
    assert verify(SECRET, header, BODY, now=1_700_000_000)


# --- filters --------------------------------------------------------------------------------------------

def test_empty_filters_match_everything():
    assert Filters().empty and Filters().matches(alert())


def test_each_criterion():
    a = alert(alert_type="bad_experience", severity="medium", store_id="store-2",
              segments=("value_tier:high", "rfm:champions", "tag:detractor"))
    assert Filters.build(types=["bad_experience", "churn_risk"]).matches(a)
    assert not Filters.build(types=["churn_risk"]).matches(a)
    assert Filters.build(min_severity="low").matches(a)
    assert Filters.build(min_severity="medium").matches(a)
    assert not Filters.build(min_severity="high").matches(a)
    assert Filters.build(stores=["store-1", "store-2"]).matches(a)
    assert not Filters.build(stores=["store-1"]).matches(a)
    assert not Filters.build(stores=["store-1"]).matches(alert(store_id=""))   # no favourite store
    assert Filters.build(segments=["rfm:champions"]).matches(a)
    assert Filters.build(segments=["champions"]).matches(a)                     # bare segment name
    assert Filters.build(segments=["detractor", "lifecycle:lapsed"]).matches(a)
    assert not Filters.build(segments=["rfm:loyal", "lapsed"]).matches(a)
    assert not Filters.build(segments=["value_tier:champions"]).matches(a)      # right name, other dimension


def test_criteria_combine_with_and():
    a = alert(alert_type="churn_risk", severity="critical", store_id="store-1", segments=("lifecycle:active",))
    assert Filters.build(["churn_risk"], "high", ["store-1"], ["active"]).matches(a)
    assert not Filters.build(["churn_risk"], "high", ["store-9"], ["active"]).matches(a)


def test_unknown_types_and_severities_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown alert type \\['churn'\\]"):
        Filters.build(types=["churn"])
    with pytest.raises(ValueError, match="unknown severity 'urgent'"):
        Filters.build(min_severity="urgent")
    assert Filters.from_dict(Filters.build(["churn_risk"], "high", ["s"], ["x"]).to_dict()) == \
        Filters.build(["churn_risk"], "high", ["s"], ["x"])


# --- the retry schedule ---------------------------------------------------------------------------------

def test_backoff_doubles_from_the_base_up_to_the_cap():
    policy = RetryPolicy(max_attempts=12, base_seconds=1.0, cap_seconds=300.0)
    assert [policy.ceiling(n) for n in range(1, 12)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_equal_jitter_stays_between_half_the_ceiling_and_the_ceiling_and_spreads():
    policy = RetryPolicy(base_seconds=1.0, cap_seconds=300.0)
    rng = random.Random(7)
    delays = [policy.delay(4, rng=rng) for _ in range(2000)]
    assert all(4 <= d <= 8 for d in delays)
    assert min(delays) < 4.1 and max(delays) > 7.9       # spread over the whole range, not clustered


def test_the_default_policy_waits_out_a_receiver_down_for_forty_minutes():
    from streams.config import Settings

    policy = RetryPolicy.from_settings(Settings())
    assert policy.guaranteed_window() > 40 * 60
    # The window is the sum of the shortest waits: half of 1, 2, 4 ... 256, then half the cap.
    assert RetryPolicy(max_attempts=11, base_seconds=1.0, cap_seconds=300.0).guaranteed_window() == 511 / 2 + 150


def test_retry_after_is_a_minimum_within_reason():
    policy = RetryPolicy(base_seconds=1.0, cap_seconds=300.0)
    rng = random.Random(1)
    assert all(policy.delay(1, retry_after=30, rng=rng) == 30 for _ in range(50))
    assert policy.delay(1, retry_after=10 ** 9, rng=rng) == MAX_RETRY_AFTER_SECONDS


def test_retry_after_header_in_seconds_or_as_a_date():
    assert retry_after_seconds("120") == 120
    now = 1_700_000_000
    assert retry_after_seconds(format_datetime(datetime.fromtimestamp(now + 90, UTC), usegmt=True), now=now) == 90
    assert retry_after_seconds(format_datetime(datetime.fromtimestamp(now - 90, UTC), usegmt=True), now=now) == 0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


# --- reading records into the log ----------------------------------------------------------------------

def record(value: bytes | None, offset: int, partition: int = 0) -> SimpleNamespace:
    return SimpleNamespace(topic="crm.alerts", partition=partition, offset=offset, value=value, key=b"k")


def test_invalid_records_are_explained_and_skipped():
    not_json = parse(record(b"{not json", 1))
    assert isinstance(not_json, InvalidRecord) and "not a valid AlertChange" in not_json.error
    body = alert().model_dump(mode="json")
    del body["severity"]
    body["version"] = 0
    wrong = parse(record(encoded(body), 2))
    assert isinstance(wrong, InvalidRecord)
    assert "severity: Field required" in wrong.error and "version:" in wrong.error
    assert "tombstone" in parse(record(None, 3)).error


def test_a_batch_logs_valid_alerts_once_and_counts_the_rest(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    first, second = alert("c1"), alert("c2")
    appended = store_batch(store, [record(encoded(first), 0), record(b"[]", 1), record(encoded(second), 2),
                                   record(encoded(first), 3)])          # a re-send of the first
    assert (appended.alerts, appended.duplicates, appended.invalid) == (2, 1, 1)
    # The same batch again, as after a crash before the offset commit: nothing changes.
    again = store_batch(store, [record(encoded(first), 0), record(b"[]", 1), record(encoded(second), 2)])
    assert (again.alerts, again.duplicates) == (0, 2)
    assert [a.change_id for a in store.alerts_after(0)] == [str(first.change_id), str(second.change_id)]
    assert store.alerts_after(0)[0].record == encoded(first)              # the bytes as they came
    assert store.invalid_count() == 1 and store.invalid_records()[0].offset == 1
    store.close()
