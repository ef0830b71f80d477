"""The key store (privacy/keystore.py) against the real broker, on a key topic of its own: a master
key rotation wraps every live data key again, so the old master key can go, and every customer's
values still open."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from privacy.fields import seal_event, unseal_event
from privacy.keystore import KeyStore
from privacy.seal import new_key
from privacy.secrets import MasterKeyring
from streams import topics
from tests.factories import submitted

pytestmark = pytest.mark.integration

OLD, NEW = ("m1", new_key()), ("m2", new_key())
CUSTOMERS = [f"rotation-{n}" for n in range(25)]


@pytest.fixture
def key_topic(stack):
    name = f"test.customer-keys.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(name, num_partitions=topics.CUSTOMER_KEYS.partitions, replication_factor=1,
                                      topic_configs={"cleanup.policy": "compact"})])
        yield name
        admin.delete_topics([name])
    finally:
        admin.close()


def store(stack, topic: str, *masters: tuple[str, bytes]) -> KeyStore:
    return KeyStore(stack.settings.kafka_bootstrap, MasterKeyring(masters), topic).open(follow=False)


def test_a_rotation_rewraps_every_live_key_under_the_new_master_and_the_old_one_can_go(stack, key_topic):
    before = store(stack, key_topic, OLD)
    try:
        keys = before.keys_for(CUSTOMERS)
        before.shred([keys[CUSTOMERS[0]][0]])  # an erased customer's key is not brought back
        registration = submitted("customer_registered", customer_id=CUSTOMERS[1],
                                 payload={"name": "Ada Lovelace", "email": "ada@example.org"})
        sealed = seal_event(registration, *keys[CUSTOMERS[1]])
    finally:
        before.close()

    rotating = store(stack, key_topic, NEW, OLD)
    try:
        assert rotating.rewrap() == len(CUSTOMERS) - 1
        assert rotating.rewrap() == 0
    finally:
        rotating.close()

    after = store(stack, key_topic, NEW)  # the old master key dropped from the keyring
    try:
        assert {customer: after.key_ids_of(customer) for customer in CUSTOMERS} == {
            customer: ([] if customer == CUSTOMERS[0] else [keys[customer][0]]) for customer in CUSTOMERS}
        assert all(after.data_key(keys[customer][0]) == keys[customer][1] for customer in CUSTOMERS[1:])
        assert after.data_key(keys[CUSTOMERS[0]][0]) is None
        assert unseal_event(sealed, after.data_key)["payload"]["name"] == "Ada Lovelace"
    finally:
        after.close()
