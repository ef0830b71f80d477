"""Personal-data endpoints of the ingestion API (docs/privacy.md), mounted by services/ingest/api.py:

- `GET  /v1/privacy/customers/{customer}/personal?reason=...`  the support read (support, privacy_officer)
- `GET  /v1/privacy/customers/{customer}/export?reason=...`    the export (support, privacy_officer)
- `POST /v1/privacy/customers/{customer}/erasure`  `{"reason", "request_id"}`  (privacy_officer)

Same keys as the events endpoints (`Authorization: Bearer`); POS and app keys, and back-office keys
without a role, are refused (403). Every request that names its key is audited on crm.audit, allowed
or refused, before it is answered: no audit, no answer (503). An erased customer is 410 Gone."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import orjson
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from services.ingest.problems import ErrorBody, Problem
from services.ingest.keys import ApiKey
from services.privacy import audit
from services.privacy.access import Gone, Reader, TokenRejected, UnknownCustomer, dumps
from services.privacy.erasure import erasure_event, shred_keys_of
from services.privacy.reader import NoReader, sql_client
from services.privacy.roles import may, refusal, role_of
from streams import topics

log = logging.getLogger("crm.privacy")
TIMEOUT_SECONDS = 30.0

router = APIRouter(prefix="/v1/privacy", tags=["privacy"])
_keystore_lock = threading.Lock()

RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody, "description": text} for code, text in {
    401: "no API key, or an unknown or revoked one",
    403: "the key's role may not do this (POS and app keys may do none of it)",
    404: "the platform holds nothing about this customer",
    410: "the customer was erased: nothing personal remains",
    422: "no reason given, or a sealed value that does not open (altered or forged; the field is named)",
    503: "Kafka (the audit) or the projections could not be reached; retry",
}.items()}


class ErasureRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=200, description="why: the data subject's request, a ticket")
    request_id: str = Field(min_length=1, max_length=200, description="the erasure request's id in your records")


class ErasureAccepted(BaseModel):
    customer_key: str
    request_id: str
    event_id: str
    status: str = "requested"


def _authenticate(request: Request) -> ApiKey:
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    key = request.app.state.edge.keys.authenticate(secret.strip()) if scheme.lower() == "bearer" and secret else None
    if key is None:
        raise Problem(401, "unauthorized", "send `Authorization: Bearer <API key>` with an active key",
                      {"WWW-Authenticate": "Bearer"})
    request.state.key_id = key.key_id
    return key


async def _audit(request: Request, record: Any) -> None:
    key, value = audit.encode(record)
    try:
        await asyncio.wait_for(request.app.state.edge.producer.send_and_wait(audit.TOPIC, key=key, value=value),
                               timeout=TIMEOUT_SECONDS)
    except (KafkaError, asyncio.TimeoutError) as exc:
        log.error("audit record not written: %r", exc)
        raise Problem(503, "audit_unavailable", f"the audit record could not be written, so nothing is answered: "
                                                f"{exc!r}", {"Retry-After": "5"}) from exc


def _keystore(request: Request) -> Any:
    """The API's key store (opened by its lifespan for sealing), or one of our own."""
    state = request.app.state
    store = getattr(state, "keystore", None) or getattr(state, "privacy_keystore", None)
    if store is None:
        with _keystore_lock:
            store = getattr(state, "privacy_keystore", None)
            if store is None:
                from privacy.keystore import KeyStore
                from privacy.secrets import master_keyring

                settings = state.edge.settings
                store = KeyStore(settings.kafka_bootstrap, master_keyring(settings.state_dir)).open()
                state.privacy_keystore = store
    return store


def _reader(request: Request) -> Reader:
    client, query_settings = sql_client(request.app.state.edge.settings, claim=False)
    store = _keystore(request)
    return Reader(client, query_settings, store.data_key, store.catch_up, store.key_ids_of)


def _with_reader(request: Request, work: Any) -> Any:
    reader = _reader(request)
    try:
        return work(reader)
    finally:
        reader.client.close()  # a client per request: its own connection (or engine handle), closed after


async def _serve(request: Request, customer_key: str, action: str, reason: str | None, work: Any) -> Any:
    """Authenticate, check the role and the reason, do `work(reader)` in a thread; audit every outcome."""
    key = _authenticate(request)
    role = role_of(key)

    async def record(outcome: str, detail: str) -> None:
        await _audit(request, audit.build(key.key_id, role, action, outcome, customer_key, reason, detail))

    if not may(role, action):
        await record("refused", refusal(role, action))
        raise Problem(403, "forbidden", refusal(role, action))
    if not (reason or "").strip():
        await record("refused", "no reason given")
        raise Problem(422, "reason_required", "give the reason for this request: ?reason=<ticket or request id>")
    try:
        result = await run_in_threadpool(_with_reader, request, work)
    except Gone as gone:
        await record("refused", str(gone))
        raise Problem(410, "erased", str(gone)) from None
    except UnknownCustomer as unknown:
        await record("allowed", str(unknown))
        raise Problem(404, "unknown_customer", str(unknown)) from None
    except TokenRejected as rejected:
        await record("failed", str(rejected))
        raise Problem(422, "sealed_value_rejected", f"{rejected}; nothing was answered") from None
    except NoReader as why:
        await record("failed", f"projections unavailable: {why}")
        raise Problem(503, "projections_unavailable", str(why), {"Retry-After": "5"}) from None
    except Problem:
        raise
    except Exception as exc:
        await record("failed", f"{type(exc).__name__}: {str(exc)[:300]}")
        raise
    return result, record


@router.get("/customers/{customer_key}/personal", summary="support read: one customer's current personal fields",
            responses=RESPONSES)
async def read_personal(request: Request, customer_key: str, reason: str | None = None) -> JSONResponse:
    answer, record = await _serve(request, customer_key, "read_personal", reason, lambda r: r.personal(customer_key))
    await record("allowed", f"fields: {', '.join(sorted(answer['fields'])) or 'none'}")
    return JSONResponse(answer)


@router.get("/customers/{customer_key}/export", summary="everything held about one customer, as one JSON file",
            responses=RESPONSES)
async def export(request: Request, customer_key: str, reason: str | None = None) -> Response:
    document, record = await _serve(request, customer_key, "export", reason, lambda r: r.export(customer_key))
    await record("allowed", f"{len(document['events'])} events, {len(document['dead_letters'])} dead letters")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in customer_key)[:100]
    return Response(dumps(document), media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="crm-export-{safe}.json"'})


@router.post("/customers/{customer_key}/erasure", summary="request the erasure of one customer (privacy officer)",
             status_code=202, response_model=ErasureAccepted, responses=RESPONSES)
async def erase(request: Request, customer_key: str) -> JSONResponse:
    key = _authenticate(request)
    role = role_of(key)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    given = body.get("reason") if isinstance(body, dict) and isinstance(body.get("reason"), str) else None
    if not may(role, "erase"):
        await _audit(request, audit.build(key.key_id, role, "erase", "refused", customer_key, given,
                                          refusal(role, "erase")))
        raise Problem(403, "forbidden", refusal(role, "erase"))
    try:
        asked = ErasureRequest.model_validate(body)
    except ValidationError as exc:
        await _audit(request, audit.build(key.key_id, role, "erase", "refused", customer_key, given,
                                          'the body must be {"reason", "request_id"}'))
        raise Problem(422, "bad_request", 'the body must be {"reason": "...", "request_id": "..."}: '
                                          f"{exc.errors(include_url=False, include_input=False)}") from None
    try:
        event = erasure_event(customer_key, asked.request_id, key.key_id)
    except ValueError as exc:
        await _audit(request, audit.build(key.key_id, role, "erase", "refused", customer_key, asked.reason,
                                          f"not a customer key: {str(exc)[:200]}"))
        raise Problem(422, "bad_customer_key", f"{customer_key!r} is not a customer key") from None
    detail = f"request {asked.request_id}: event {event['event_id']}"
    await _audit(request, audit.build(key.key_id, role, "erase", "allowed", customer_key, asked.reason, detail))
    try:
        await asyncio.wait_for(request.app.state.edge.producer.send_and_wait(
            topics.EVENTS.name, key=customer_key.encode(), value=orjson.dumps(event)), timeout=TIMEOUT_SECONDS)
    except (KafkaError, asyncio.TimeoutError) as exc:
        await _audit(request, audit.build(key.key_id, role, "erase", "failed", customer_key, asked.reason,
                                          f"{detail} not written: {exc!r}"))
        raise Problem(503, "kafka_unavailable", f"the erasure request was not written: {exc!r}; send it again",
                      {"Retry-After": "5"}) from exc
    try:
        await asyncio.to_thread(shred_keys_of, _keystore(request), customer_key)
    except Exception:  # noqa: BLE001 - the request is in the log and the fold shreds what its events name
        log.exception("erasure of %s: the keys the key store holds under it were not shredded; request the "
                      "erasure again to retry", customer_key)
    return JSONResponse(ErasureAccepted(customer_key=customer_key, request_id=asked.request_id,
                                        event_id=event["event_id"]).model_dump(), status_code=202)
