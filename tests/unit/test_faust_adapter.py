"""The adapter over Faust's and aiokafka's private parts (streams/runtime/faust_adapter.py): it
refuses library versions it was not written for, the private names it uses exist in the installed
libraries, and its two helpers behave as the worker relies on."""

import asyncio
import inspect
from types import SimpleNamespace

import faust
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport import consumer as faust_consumer

from streams.runtime import faust_adapter
from streams.runtime.faust_adapter import Continuity, committed_offset


def test_it_refuses_library_versions_it_was_not_written_for(monkeypatch):
    monkeypatch.setattr(faust, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="check whether the fixes are still needed"):
        faust_adapter.apply()


def test_the_patched_functions_replace_library_functions_of_the_same_signature():
    originals = {"_drain_messages": faust_consumer.Consumer.__dict__["_drain_messages"],
                 "seek_to_committed": AIOKafkaConsumer.__dict__["seek_to_committed"]}
    if originals["_drain_messages"] is faust_adapter._drain_messages:
        pytest.skip("already applied in this process")
    for name, original in originals.items():
        assert list(inspect.signature(original).parameters) == \
            list(inspect.signature(getattr(faust_adapter, name)).parameters), name


def test_the_private_names_it_uses_exist_in_the_installed_libraries():
    source = inspect.getsource(faust_consumer.Consumer)
    for name in ("_read_offset", "_committed_offset", "suspend_flow", "_n_acked", "_add_gap"):
        assert name in source, name
    assert callable(faust_consumer.Consumer.seek_wait)
    assert "_fetcher" in inspect.getsource(AIOKafkaConsumer)


def fake_app(committed=None, sought=None):
    seeks = []

    async def seek_wait(positions):
        seeks.append(positions)

    consumer = SimpleNamespace(_committed_offset=committed or {}, _sought={} if sought is None else sought,
                               _read_offset={}, seek_wait=seek_wait)
    return SimpleNamespace(consumer=consumer), seeks


def message(offset, partition=0):
    return SimpleNamespace(tp=TopicPartition("crm.events", partition), offset=offset)


def test_committed_offset_is_that_of_the_partition_or_minus_one():
    app, _ = fake_app({TopicPartition("crm.events", 2): 41, TopicPartition("other", 0): 9})
    assert committed_offset(app, "crm.events", 2) == 41
    assert committed_offset(app, "crm.events", 3) == -1


def test_continuity_passes_records_in_order_and_seeks_back_over_a_gap():
    app, seeks = fake_app({TopicPartition("crm.events", 0): 10})
    continuity = Continuity(app)
    run = asyncio.run
    assert run(continuity.in_order(message(10)))
    assert run(continuity.in_order(message(11)))
    # 12 was skipped by the consumer: 13 is set aside and the partition sought back to 12.
    assert not run(continuity.in_order(message(13)))
    assert seeks == [{TopicPartition("crm.events", 0): 12}]
    assert app.consumer._sought[TopicPartition("crm.events", 0)] == 12
    assert app.consumer._read_offset[TopicPartition("crm.events", 0)] == 12
    assert run(continuity.in_order(message(12)))
    # A record older than expected (a redelivery after a seek) passes and never moves it back.
    assert run(continuity.in_order(message(5)))
    assert continuity.expected[TopicPartition("crm.events", 0)] == 13
