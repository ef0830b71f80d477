"""The ingestion API (FastAPI): POS terminals, apps and back offices send events over HTTP; each is
checked (hygiene.py), de-duplicated by event_id (seen.py), sealed (sealing.py: personal fields under
the customer's data key, one key store call per request) and written to `crm.events` keyed by
customer. A request is answered only after Kafka acknowledged every accepted event (acks=all,
idempotent producer); every refused event is written to the dead-letter topic with the reason, the
key that sent it and its body, personal values redacted (`_dead_letter`). The OpenAPI description is served at /openapi.json, Prometheus
metrics at /metrics (services/ingest/metrics.py, docs/operations.md)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, AsyncIterator, Literal

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from kafka.errors import KafkaError as KeyStoreKafkaError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from privacy.fields import redact
from schemas.codec import fingerprint, to_json_dict
from services.ingest import metrics
from services.ingest.hygiene import Checked, FieldError, Refused, check
from services.ingest.keys import ApiKey, ApiKeyStore
from services.ingest.problems import ErrorBody, Problem
from services.ingest.ratelimit import RateLimiter
from services.ingest.sealing import Sealer
from services.ingest.seen import SeenEvents
from services.privacy.api import router as privacy_router
from streams import topics
from streams.config import Settings

log = logging.getLogger("crm.ingest")

MAX_BATCH_EVENTS = 500
MAX_BODY_BYTES = 5 * 1024 * 1024
KAFKA_TIMEOUT_SECONDS = 30.0
MAX_DEAD_LETTER_BYTES = 900 * 1024  # under Kafka's default 1 MiB record limit, with room for headers


# --- what the API answers (also its OpenAPI description) ---------------------------------------------

class ErrorDetail(BaseModel):
    field: str
    message: str


class ItemResult(BaseModel):
    index: int = Field(description="position of the event in the request")
    event_id: str | None = None
    status: Literal["accepted", "duplicate", "rejected"]
    late: bool = Field(False, description="accepted, but occurred more than 7 days before receipt")
    reason: str | None = Field(None, description="why it was rejected: schema_invalid, unknown_type, ...")
    errors: list[ErrorDetail] = []


class BatchResult(BaseModel):
    request_id: str
    accepted: int
    duplicates: int
    rejected: int
    results: list[ItemResult]


EVENT_BODY = {"type": "object", "description": "one event of the catalog (docs/events.md; JSON Schemas in "
                                               "schemas/jsonschema/)", "additionalProperties": True}
BATCH_BODY = {"type": "object", "required": ["events"], "additionalProperties": False, "properties": {
    "events": {"type": "array", "maxItems": MAX_BATCH_EVENTS, "items": EVENT_BODY}}}
ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    400: "the body is not JSON, or not the shape this endpoint takes",
    401: "no API key, or an unknown or revoked one",
    413: "the body or the batch is larger than the limits",
    429: "the key's rate limit; retry after the Retry-After header's seconds",
    503: "Kafka did not acknowledge in time; nothing is lost by retrying the same request",
}.items()}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@dataclass
class Edge:
    """Everything a request needs, created once per process."""
    settings: Settings
    keys: ApiKeyStore
    seen: SeenEvents
    limiter: RateLimiter
    producer: AIOKafkaProducer | None = None
    # The key store (crm.customer-keys) and the identity secret, opened at start, closed at shutdown.
    sealer: Sealer | None = None
    # Event ids being written by a request right now, with their fingerprint and whether the write
    # succeeded: a concurrent request with the same id waits for that answer instead of writing again.
    in_flight: dict[str, tuple[str, asyncio.Future[bool]]] = field(default_factory=dict)


def create_app(settings: Settings) -> FastAPI:
    edge = Edge(settings, ApiKeyStore(settings.ingest_db), SeenEvents(settings.ingest_db), RateLimiter())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        edge.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                         enable_idempotence=True, linger_ms=5, request_timeout_ms=30_000)
        await edge.producer.start()
        # The key store reads crm.customer-keys to its end (blocking kafka-python): in a thread.
        edge.sealer = await asyncio.get_running_loop().run_in_executor(None, Sealer.open, settings)
        app.state.keystore = edge.sealer.store
        edge.seen.forget_old()
        try:
            yield
        finally:
            await edge.producer.stop()
            edge.sealer.close()
            edge.keys.close()
            edge.seen.close()

    app = FastAPI(title="crm ingestion API", version="1", lifespan=lifespan,
                  description="Send customer events. Authenticate with `Authorization: Bearer <API key>` "
                              "(created with `crm keys create`). Limits and rules: docs/ingestion.md.")
    app.state.edge = edge
    # Support read, export and erasure requests by keys with a role, audited (docs/privacy.md); they use
    # the edge's keys and producer and the key store on app.state.
    app.include_router(privacy_router)

    @app.middleware("http")
    async def request_ids_and_logs(request: Request, call_next: Any) -> Response:
        request_id = (request.headers.get("x-request-id") or "")[:100] or uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            log.exception("request failed", extra={"request_id": request_id})
            response = JSONResponse({"request_id": request_id, "error": "internal_error",
                                     "detail": "the request failed; retrying it is safe"}, status_code=500)
        response.headers["X-Request-ID"] = request_id
        seconds = time.perf_counter() - started
        log.info("request", extra={"fields": {
            "request_id": request_id, "method": request.method, "path": request.url.path,
            "status": response.status_code, "key_id": getattr(request.state, "key_id", None),
            "counts": getattr(request.state, "counts", None), "ms": round(seconds * 1000, 1)}})
        # The router put the matched route in the scope: its template, not the path, keeps the labels few.
        route = request.scope.get("route")
        metrics.answered(request.method, getattr(route, "path", None), response.status_code, seconds)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"request_id": request.state.request_id, "error": error, "detail": str(exc.detail)},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem) -> JSONResponse:
        return JSONResponse({"request_id": request.state.request_id, "error": exc.error, "detail": exc.detail},
                            status_code=exc.status, headers=exc.headers)

    @app.get("/health", summary="the process is up")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="the process can accept events (Kafka reachable)",
             responses={503: {"model": ErrorBody}})
    async def ready(request: Request) -> JSONResponse:
        try:
            partitions = await asyncio.wait_for(edge.producer.partitions_for(topics.EVENTS.name), timeout=5)  # type: ignore[union-attr]
        except (KafkaError, asyncio.TimeoutError) as exc:
            raise Problem(503, "not_ready", f"Kafka: {exc!r}") from exc
        return JSONResponse({"status": "ready", "partitions": len(partitions or ())})

    # For Prometheus, without a key (the API listens on 127.0.0.1 unless told otherwise); an operator's
    # endpoint, not part of the producers' API, so not in its OpenAPI description (docs/operations.md).
    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/events", summary="send one event", response_model=BatchResult,
              responses={**ERRORS, 422: {"model": BatchResult, "description": "the event was rejected"}},
              openapi_extra=_body(EVENT_BODY))
    async def send_one(request: Request) -> JSONResponse:
        body, key, _ = await _read(request, edge)
        result = await _ingest(request, edge, key, [body])
        status = 422 if result.rejected else 200
        return JSONResponse(result.model_dump(), status_code=status)

    @app.post("/v1/events/batch", summary=f"send up to {MAX_BATCH_EVENTS} events", response_model=BatchResult,
              responses=ERRORS, openapi_extra=_body(BATCH_BODY))
    async def send_batch(request: Request) -> JSONResponse:
        body, key, _ = await _read(request, edge)
        if not isinstance(body, dict) or set(body) != {"events"} or not isinstance(body["events"], list):
            raise Problem(400, "bad_request", 'the body must be {"events": [ ... ]}')
        if len(body["events"]) > MAX_BATCH_EVENTS:
            raise Problem(413, "too_many_events", f"{len(body['events'])} events; at most {MAX_BATCH_EVENTS} per batch")
        result = await _ingest(request, edge, key, body["events"])
        return JSONResponse(result.model_dump())

    return app


async def _read(request: Request, edge: Edge) -> tuple[Any, ApiKey, bytes]:
    authorization = request.headers.get("authorization", "")
    scheme, _, secret = authorization.partition(" ")
    key = edge.keys.authenticate(secret.strip()) if scheme.lower() == "bearer" and secret else None
    if key is None:
        raise Problem(401, "unauthorized", "send `Authorization: Bearer <API key>` with an active key",
                      {"WWW-Authenticate": "Bearer"})
    request.state.key_id = key.key_id
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise Problem(413, "body_too_large", f"{len(raw)} bytes; at most {MAX_BODY_BYTES}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        await _dead_letter(edge, key, request.state.request_id, 0, raw, "malformed_json", str(exc))
        raise Problem(400, "malformed_json", f"the body is not JSON: {exc}") from exc
    return body, key, raw


async def _ingest(request: Request, edge: Edge, key: ApiKey, items: list[Any]) -> BatchResult:
    """Refused items are dead-lettered as JSON re-encoded from the parsed body, personal values
    redacted (`_kept`)."""
    request_id = request.state.request_id
    wait = edge.limiter.take(key.key_id, max(len(items), 1), key.rate_per_second, key.burst)
    if wait:
        raise Problem(429, "rate_limited", f"key {key.key_id}: {key.rate_per_second:g} events/s, burst {key.burst}",
                      {"Retry-After": str(wait)})
    received_at = datetime.now(UTC)
    results: list[ItemResult | None] = [None] * len(items)
    refused: list[tuple[int, Refused]] = []
    checked: dict[int, Checked] = {}
    for index, item in enumerate(items):
        outcome = check(item, key, received_at, edge.settings.phone_region, edge.sealer.identity_secret)  # type: ignore[union-attr]
        if isinstance(outcome, Refused):
            refused.append((index, outcome))
        else:
            checked[index] = outcome

    # De-duplication: against what was written before, what another request is writing now, and
    # within this request. No await from here to the reservations, so no request slips in between.
    prints = {index: fingerprint(c.event) for index, c in checked.items()}
    known = edge.seen.fingerprints(list({str(c.event.event_id) for c in checked.values()}))
    to_write: dict[int, Checked] = {}
    waiting: dict[int, tuple[str, asyncio.Future[bool]]] = {}
    reserved: dict[str, asyncio.Future[bool]] = {}
    for index, c in checked.items():
        event_id = str(c.event.event_id)
        if event_id in edge.in_flight and event_id not in reserved:
            waiting[index] = edge.in_flight[event_id]
            continue
        earlier = known.get(event_id) or (edge.in_flight[event_id][0] if event_id in reserved else None)
        if earlier is None:
            reserved[event_id] = asyncio.get_running_loop().create_future()
            edge.in_flight[event_id] = (prints[index], reserved[event_id])
            to_write[index] = c
        else:
            results[index] = _repeat(index, c, earlier == prints[index], refused)

    try:
        try:
            if to_write:
                # Personal fields sealed under each customer's data key: one key store call for the
                # request, in a thread (it may write new keys and wait for Kafka's acknowledgement).
                sealed = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                    None, edge.sealer.seal, [to_json_dict(c.event) for c in to_write.values()]),  # type: ignore[union-attr]
                    timeout=KAFKA_TIMEOUT_SECONDS)
                with metrics.KAFKA_SEND_SECONDS.labels(topics.EVENTS.name).time():
                    sends = [await edge.producer.send(topics.EVENTS.name, key=c.event.customer_key.encode(),  # type: ignore[union-attr]
                                                      value=orjson.dumps(value))
                             for c, value in zip(to_write.values(), sealed)]
                    await asyncio.wait_for(asyncio.gather(*sends), timeout=KAFKA_TIMEOUT_SECONDS)
        except (KafkaError, KeyStoreKafkaError, asyncio.TimeoutError) as exc:  # the key store's client is kafka-python
            raise Problem(503, "kafka_unavailable", f"Kafka did not acknowledge: {exc!r}", {"Retry-After": "5"}) from exc
        edge.seen.remember([(str(c.event.event_id), prints[index]) for index, c in to_write.items()])
        written = True
    except BaseException:
        written = False
        raise
    finally:
        for event_id, future in reserved.items():
            edge.in_flight.pop(event_id, None)
            future.set_result(written)
    for index, c in to_write.items():
        results[index] = ItemResult(index=index, event_id=str(c.event.event_id), status="accepted", late=c.late)
    for index, (earlier, future) in waiting.items():
        if not await future:
            raise Problem(503, "kafka_unavailable", "a concurrent request with the same event failed to write it; "
                                                    "retry", {"Retry-After": "1"})
        results[index] = _repeat(index, checked[index], earlier == prints[index], refused)

    for index, refusal in refused:
        item = items[index]
        event_id = item.get("event_id") if isinstance(item, dict) and isinstance(item.get("event_id"), str) else None
        results[index] = ItemResult(index=index, event_id=event_id, status="rejected", reason=refusal.reason,
                                    errors=[ErrorDetail(**e.to_dict()) for e in refusal.errors])
    await asyncio.gather(*(_dead_letter(edge, key, request_id, index, _kept(items[index]), refusal.reason,
                                        refusal.detail) for index, refusal in refused))
    final = [r for r in results if r is not None]
    counts = {status: sum(r.status == status for r in final) for status in ("accepted", "duplicate", "rejected")}
    request.state.counts = counts
    metrics.ACCEPTED.inc(counts["accepted"])
    metrics.DUPLICATES.inc(counts["duplicate"])
    return BatchResult(request_id=request_id, accepted=counts["accepted"], duplicates=counts["duplicate"],
                       rejected=counts["rejected"], results=final)


def _repeat(index: int, c: Checked, same: bool, refused: list[tuple[int, Refused]]) -> ItemResult | None:
    """An event id written before: a duplicate if the content is the same, else refused."""
    if same:
        return ItemResult(index=index, event_id=str(c.event.event_id), status="duplicate", late=c.late)
    refused.append((index, Refused("conflicting_duplicate", [FieldError(
        "event_id", f"{c.event.event_id} was sent before with different content")])))
    return None


def _kept(item: Any) -> bytes:
    """What a dead letter keeps of a refused item: the item re-encoded as JSON with every plain
    personal value (name, e-mail, phone, birthday, address, `identifiers.email` / `.phone`) replaced by
    "[redacted]". The dead-letter topic is kept forever and cannot be erased per customer, so it must
    hold no personal data; the rest of the item still shows what was wrong (docs/ingestion.md)."""
    return _encoded(redact(item))


def _encoded(item: Any) -> bytes:
    try:
        return orjson.dumps(item)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes: keep what can be kept
        return repr(item).encode()


async def _dead_letter(edge: Edge, key: ApiKey, request_id: str, index: int, original: bytes, reason: str,
                       detail: str) -> None:
    """The refused item (as `_kept` keeps it; a body that is not JSON, as sent), with why and who sent it. Its position in the dead-letter
    table is derived from the request id and the item's index, so a retried request's letters
    replace each other rather than pile up."""
    metrics.REFUSED.labels(reason).inc()
    position = zlib.crc32(f"{request_id}|{index}".encode()) << 16 | (index & 0xFFFF)
    headers = [
        ("crm.dlq.reason", reason.encode()),
        ("crm.dlq.detail", detail.encode()[:4000]),
        ("crm.dlq.source.topic", b"api"),
        ("crm.dlq.source.partition", b"0"),
        ("crm.dlq.source.offset", str(position).encode()),
        ("crm.dlq.source.timestamp", str(int(time.time() * 1000)).encode()),
        ("crm.dlq.api.key_id", key.key_id.encode()),
        ("crm.dlq.api.source", f"{key.source.value}:{key.store_id or key.name}".encode()),
        ("crm.dlq.api.request_id", request_id.encode()),
    ]
    if len(original) > MAX_DEAD_LETTER_BYTES:
        # Kafka refuses records over a megabyte; the head of the body and its size still say what came.
        headers.append(("crm.dlq.truncated_from", str(len(original)).encode()))
        original = original[:MAX_DEAD_LETTER_BYTES]
    try:
        with metrics.KAFKA_SEND_SECONDS.labels(topics.DEAD_LETTERS.name).time():
            await edge.producer.send_and_wait(topics.DEAD_LETTERS.name, value=original, key=key.key_id.encode(),  # type: ignore[union-attr]
                                              headers=headers)
    except KafkaError as exc:
        raise Problem(503, "kafka_unavailable", f"Kafka did not acknowledge the dead letter: {exc!r}",
                      {"Retry-After": "5"}) from exc
