"""Sealing at the edge: what every producer of the platform that writes personal data into
`crm.events` does to it first (the ingestion API, the intake process, `crm import`, `crm produce` and
the demo). Events travel here as JSON dicts, after the submitted model checked them.

A batch of events is sealed with one call to the key store (`keys_for`, which creates and writes the
data keys of customers who have none and waits for Kafka to acknowledge them), so the cost is one
round trip per batch, not per event. Sealing is deterministic (privacy/seal.py): the same event
sealed twice gives the same bytes, so a producer that resends after a crash resends the very record
the worker already has, and the worker's de-duplication by content holds.

`Sealer` takes the key lookup as a function, so tests and benchmarks can seal without Kafka
(`offline_keys`); `Sealer.open(settings)` is the real one, over the key store in crm.customer-keys and
the identity secret."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from typing import Any

from privacy.fields import personal_values, seal_event, unsealed_fields
from privacy.seal import keyed_hash
from schemas.envelope import AliasType

KeysFor = Callable[[Iterable[str]], dict[str, tuple[str, bytes]]]


def customer_key(event: dict[str, Any]) -> str | None:
    """The key Envelope.customer_key gives this event (customer_id, else the first alias by the
    catalog's precedence), from its JSON form; None when it names nobody."""
    customer_id = event.get("customer_id")
    if isinstance(customer_id, str) and customer_id:
        return customer_id
    identifiers = event.get("identifiers")
    if isinstance(identifiers, dict):
        for alias in AliasType:
            value = identifiers.get(alias.value)
            if isinstance(value, str) and value:
                return f"{alias.value}:{value}"
    return None


def needs_sealing(event: dict[str, Any]) -> bool:
    """Whether the event carries a personal value that is not sealed yet."""
    return bool(unsealed_fields(event))


class Sealer:
    """Seals batches of events under their customers' data keys, and hashes identifiers with the
    identity secret."""

    def __init__(self, keys_for: KeysFor, identity_secret: bytes, close: Callable[[], None] = lambda: None,
                 store: Any = None):
        self.keys_for = keys_for
        self.identity_secret = identity_secret
        self._close = close
        self.store = store  # the KeyStore behind `keys_for`, when there is one (others may read it)

    @classmethod
    def open(cls, settings: Any, follow: bool = True, producer: Any = None) -> Sealer:
        """Over the stack's key store (it reads crm.customer-keys to its end first) and secrets.
        `follow=False` for a short-lived sender whose customers no other process makes keys for at
        the same time (one `crm import` process per partition): it skips reading every other
        process's new keys back. `producer` writes the new keys (KeyStore.open)."""
        from privacy.keystore import KeyStore
        from privacy.secrets import identity_secret, master_keyring

        store = KeyStore(settings.kafka_bootstrap, master_keyring(settings.state_dir)).open(follow=follow, producer=producer)
        return cls(store.keys_for, identity_secret(settings.state_dir), store.close, store)

    def close(self) -> None:
        self._close()

    def hash(self, normalised: str) -> str:
        """The alias value of a normalised phone (E.164) or e-mail (lower case): keyed HMAC-SHA256."""
        return keyed_hash(self.identity_secret, normalised)

    def seal(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events in their log form, in order: those with plain personal values sealed under their
        customer's data key (one `keys_for` for the batch), the others as they are."""
        wanted = {customer_key(event) for event in events if personal_values(event)} - {None}
        if not wanted:
            return events
        keys = self.keys_for(wanted)
        sealed = []
        for event in events:
            key = customer_key(event) if personal_values(event) else None
            if key is None:
                sealed.append(event)
            else:
                key_id, data_key = keys[key]
                sealed.append(seal_event(event, key_id, data_key))
        return sealed


def offline_keys(secret: bytes) -> KeysFor:
    """A key lookup without Kafka, for tests and benchmarks: each customer's key is derived from
    `secret`. Tokens sealed with it open only with the same lookup; never for a real stack."""
    def keys_for(customer_keys: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        return {key: (hmac.new(secret, b"id|" + key.encode(), hashlib.sha256).hexdigest()[:32],
                      hmac.new(secret, b"key|" + key.encode(), hashlib.sha256).digest())
                for key in set(customer_keys)}
    return keys_for
