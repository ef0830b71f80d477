"""`crm privacy export|read|erase|rotate-master` (docs/privacy.md). The command line acts as the
operator (`cli:<os user>`, role `operator`): whoever runs it on the platform's machine holds its
secrets anyway. Every command is audited on crm.audit, allowed or failed, before its answer is
printed or written.

Exit codes: 0 done; 1 failed (a sealed value that does not open, an invalid request); 2 the
projections or Kafka cannot be reached; 3 the customer was erased (the API's 410); 4 the platform
holds nothing about the customer (the API's 404)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from services.privacy import audit
from services.privacy.access import Gone, Reader, TokenRejected, UnknownCustomer, dumps
from services.privacy.reader import NoReader, sql_client
from services.privacy.roles import OPERATOR
from streams.config import Settings

ERASED, UNKNOWN = 3, 4


def kafka_needed(command: Callable[..., int]) -> Callable[..., int]:
    """Without Kafka nothing can be audited, so nothing is done: a clear message and exit code 2."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> int:
        from kafka.errors import KafkaError

        try:
            return command(*args, **kwargs)
        except KafkaError as exc:
            print(f"error: Kafka does not answer ({exc!r}): the audit record cannot be written, so nothing was "
                  "done. Is the stack running (crm status)?", file=sys.stderr)
            return 2
    return run


def _keystore(settings: Settings) -> Any:
    from privacy.keystore import KeyStore
    from privacy.secrets import master_keyring

    return KeyStore(settings.kafka_bootstrap, master_keyring(settings.state_dir)).open(follow=False)


@kafka_needed
def read(settings: Settings, action: str, customer_key: str, reason: str, out: str | None = None) -> int:
    """`export` (the whole document, to `out` or stdout) or `read_personal` (the current fields)."""
    actor = audit.cli_actor()
    writer = audit.AuditWriter(settings.kafka_bootstrap)
    store = client = None

    def record(outcome: str, detail: str) -> None:
        writer.write(audit.build(actor, OPERATOR, action, outcome, customer_key, reason, detail))

    try:
        try:
            client, query_settings = sql_client(settings)
            store = _keystore(settings)
            reader = Reader(client, query_settings, store.data_key, store.catch_up, store.key_ids_of)
            answer = reader.export(customer_key) if action == "export" else reader.personal(customer_key)
        except Gone as gone:
            record("refused", str(gone))
            print(f"error: {gone}", file=sys.stderr)
            return ERASED
        except UnknownCustomer as unknown:
            record("allowed", str(unknown))
            print(f"error: {unknown}", file=sys.stderr)
            return UNKNOWN
        except TokenRejected as rejected:
            record("failed", str(rejected))
            print(f"error: a sealed value does not open (altered or forged?): {rejected}", file=sys.stderr)
            return 1
        except NoReader as why:
            record("failed", f"projections unavailable: {why}")
            print(f"error: {why}", file=sys.stderr)
            return 2
        except Exception as exc:
            record("failed", f"{type(exc).__name__}: {str(exc)[:300]}")
            raise
        if action == "export":
            record("allowed", f"{len(answer['events'])} events, {len(answer['dead_letters'])} dead letters"
                              + (f", to {out}" if out else ""))
            data = dumps(answer)
        else:
            record("allowed", f"fields: {', '.join(sorted(answer['fields'])) or 'none'}")
            data = orjson.dumps(answer, option=orjson.OPT_INDENT_2)
        if out:
            path = Path(out)
            path.write_bytes(data + b"\n")
            path.chmod(0o600)  # personal data: readable by the operator alone
            print(f"wrote {path} ({len(data):,} bytes); it holds personal data: hand it over, then delete it",
                  file=sys.stderr)
        else:
            sys.stdout.write(data.decode() + "\n")
        return 0
    finally:
        if client is not None:
            client.close()
        if store is not None:
            store.close()
        writer.close()


@kafka_needed
def erase(settings: Settings, customer_key: str, reason: str, request_id: str) -> int:
    from kafka import KafkaProducer

    from services.privacy.erasure import erasure_event, shred_keys_of
    from streams import topics

    actor = audit.cli_actor()
    writer = audit.AuditWriter(settings.kafka_bootstrap)
    try:
        try:
            event = erasure_event(customer_key, request_id, actor)
        except ValueError as exc:
            writer.write(audit.build(actor, OPERATOR, "erase", "refused", customer_key, reason,
                                     f"not a customer key: {str(exc)[:200]}"))
            print(f"error: {customer_key!r} is not a customer key", file=sys.stderr)
            return 1
        detail = f"request {request_id}: event {event['event_id']}"
        writer.write(audit.build(actor, OPERATOR, "erase", "allowed", customer_key, reason, detail))
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
        try:
            producer.send(topics.EVENTS.name, key=customer_key.encode(), value=orjson.dumps(event)).get(timeout=30)
        except Exception as exc:
            writer.write(audit.build(actor, OPERATOR, "erase", "failed", customer_key, reason,
                                     f"{detail} not written: {exc!r}"))
            print(f"error: the erasure request was not written: {exc!r}; run the command again", file=sys.stderr)
            return 2
        finally:
            producer.close(timeout=10)
        try:
            store = _keystore(settings)
            try:
                shred_keys_of(store, customer_key)
            finally:
                store.close()
        except Exception as exc:  # noqa: BLE001 - the request is in the log; the fold shreds what its events name
            print(f"warning: the data keys held under {customer_key} were not shredded now ({exc!r}); the worker "
                  f"still shreds those its events name. Run the command again to retry", file=sys.stderr)
        print(f"erasure of {customer_key} requested (request {request_id}, event {event['event_id']}); the worker "
              f"carries it out when it folds the event. Check: crm privacy export {customer_key} --reason ... "
              f"answers that the customer was erased (docs/privacy.md)")
        return 0
    finally:
        writer.close()


@kafka_needed
def rotate_master(settings: Settings, reason: str) -> int:
    from privacy.secrets import master_keyring

    actor = audit.cli_actor()
    keyring = master_keyring(settings.state_dir)
    writer = audit.AuditWriter(settings.kafka_bootstrap)
    try:
        store = None
        try:
            store = _keystore(settings)
            count = store.rewrap()
        except Exception as exc:
            writer.write(audit.build(actor, OPERATOR, "rotate_master_key", "failed", "", reason,
                                     f"{type(exc).__name__}: {str(exc)[:300]}"))
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if store is not None:
                store.close()
        current = keyring.current[0]
        old = [key_id for key_id, _ in keyring.keys[1:]]
        writer.write(audit.build(actor, OPERATOR, "rotate_master_key", "allowed", "", reason,
                                 f"{count} data keys rewrapped under master key {current}"))
        print(f"{count} data keys rewrapped under master key {current}."
              + (f" Drop {', '.join(old)} from CRM_MASTER_KEYS only after compaction removed the old wrappings "
                 f"(at most about 2 hours; docs/privacy.md)." if old else ""))
        return 0
    finally:
        writer.close()
