from collections import Counter

from schemas import decode_event
from schemas.codec import DecodeError
from services.simulator import Simulator, Workload


def test_the_workload_is_deterministic_for_a_seed():
    first = [m.value for m in Simulator(Workload(customers=40, days=30, seed=3)).messages()]
    again = [m.value for m in Simulator(Workload(customers=40, days=30, seed=3)).messages()]
    assert first == again


def test_valid_messages_decode_and_bad_ones_do_not():
    messages = list(Simulator(Workload(customers=120, days=60, seed=5, bad_input_rate=0.05)).messages())
    kinds = Counter(m.kind for m in messages)
    assert kinds["valid"] > 1000 and kinds["duplicate"] > 0 and kinds["malformed"] > 0
    for message in messages:
        decoded = decode_event(message.value)
        if message.kind in ("valid", "duplicate"):
            assert not isinstance(decoded, DecodeError), decoded
            assert message.key == decoded.customer_key.encode()
        else:
            assert isinstance(decoded, DecodeError)


def test_some_events_name_the_customer_only_by_an_alias():
    events = Simulator(Workload(customers=300, days=60, seed=2)).events()
    anonymous = [e for e in events if "customer_id" not in e]
    assert {e["type"] for e in anonymous} == {"product_viewed", "purchase_completed"}
    assert all(len(e["identifiers"]) == 1 for e in anonymous)


def test_some_customers_go_quiet():
    sim = Simulator(Workload(customers=300, days=120, seed=1))
    events = sim.events()
    end = max(e["occurred_at"] for e in events)
    last_purchase = {}
    for e in events:
        if e["type"] == "purchase_completed":
            last_purchase[e["identifiers"]["loyalty_card"]] = e["occurred_at"]
    quiet = [c for c, at in last_purchase.items() if (end - at).days > 21]
    assert 0 < len(quiet) < len(last_purchase)
