"""The alert service's HTTP API (FastAPI): webhook subscriptions, their dead letters, and the live
alert stream (Server-Sent Events). Callers authenticate with an ingestion API key of source kind
`backoffice` (`crm keys create --source backoffice`), sent as `Authorization: Bearer <key>`.

Every handler is `async def`: they run on the service's event loop, the one thread that uses the
store's SQLite connection and the dispatcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

import orjson
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.alerts import AlertChange, AlertType, Severity
from services.alerts import metrics
from services.alerts.bell import Bell
from services.alerts.consumer import ConsumerStats
from services.alerts.filters import Filters
from services.alerts.store import AlertStore, Delivery, NotFound, Subscription
from services.ingest.keys import ApiKey, ApiKeyStore, SourceKind

STREAM_POLL_SECONDS = 0.5   # a live stream looks at the log at least this often (the bell usually wakes it sooner)
STREAM_BATCH = 200


@dataclass
class Runtime:
    """What the API works with, owned by the service (services/alerts/service.py)."""
    store: AlertStore
    keys: ApiKeyStore
    bell: Bell
    changed: Callable[[], None] = lambda: None          # subscriptions or dead letters changed: the dispatcher looks now
    consumer: ConsumerStats | None = None
    heartbeat_seconds: float = 15.0


# --- what the API takes and answers (also its OpenAPI description) --------------------------------------

class FilterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    types: list[AlertType] = Field(default_factory=list, description="alert types; empty: any")
    min_severity: Severity | None = Field(None, description="this severity or higher (low < medium < high < critical)")
    stores: list[str] = Field(default_factory=list, description="the customer's store_id; empty: any")
    segments: list[str] = Field(default_factory=list,
                                description='any of these segments, as "value_tier:high" or just "high"; empty: any')

    def filters(self) -> Filters:
        return Filters.build([t.value for t in self.types], self.min_severity.value if self.min_severity else None,
                             self.stores, self.segments)


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: AnyHttpUrl = Field(description="where alerts are POSTed (http or https)")
    filters: FilterSpec = Field(default_factory=FilterSpec)


class WebhookOut(BaseModel):
    id: str
    url: str
    filters: dict[str, Any]
    created_at: float
    active: bool
    deliveries: dict[str, int] = Field(description="how many are pending, delivered and dead")


class WebhookCreated(WebhookOut):
    secret: str = Field(description="signs every request (X-CRM-Signature); shown only now")


class DeadLetter(BaseModel):
    seq: int = Field(description="position in the alert log; redeliver one with ?seq=")
    change_id: str
    customer_key: str
    attempts: int
    last_error: str | None
    response_status: int | None
    failed_at: float
    alert: dict[str, Any]


class ErrorBody(BaseModel):
    error: str
    detail: str


class Problem(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


ERRORS = {401: {"model": ErrorBody, "description": "no key, or an unknown or revoked one"},
          403: {"model": ErrorBody, "description": "the key is not a backoffice key"}}
NOT_FOUND = {404: {"model": ErrorBody, "description": "no such webhook"}}
UNREADABLE = {400: {"model": ErrorBody, "description": "a body that cannot be read as JSON (not UTF-8, say)"}}
MAX_SEQ = 2**63 - 1  # SQLite's largest integer: a larger seq= would fail in the driver instead of finding nothing


async def backoffice_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> ApiKey:
    """The caller's key; only back offices may manage webhooks and read the stream."""
    scheme, _, secret = (authorization or "").partition(" ")
    keys: ApiKeyStore = request.app.state.runtime.keys
    key = keys.authenticate(secret.strip()) if scheme.lower() == "bearer" and secret.strip() else None
    if key is None:
        raise Problem(401, "unauthorized", "send `Authorization: Bearer <API key>` with an active backoffice key",
                      {"WWW-Authenticate": "Bearer"})
    if key.source is not SourceKind.BACKOFFICE:
        raise Problem(403, "forbidden", f"key {key.key_id} is a {key.source.value} key; alerts need a backoffice "
                                        "key (crm keys create --source backoffice)")
    return key


Authorized = Annotated[ApiKey, Depends(backoffice_key)]


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="crm alerts API", version="1",
                  description="Webhook subscriptions for churn alerts, their dead letters, and the live alert "
                              "stream. Authenticate with `Authorization: Bearer <backoffice API key>`. "
                              "docs/webhooks.md")
    app.state.runtime = runtime
    store = runtime.store

    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": error, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer, but a body that is not UTF-8 is echoed with replacement characters:
        # FastAPI decodes it strictly, which failed with a 500 instead of this 422.
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")})
        return JSONResponse({"detail": errors}, status_code=422)

    def found(subscription_id: str) -> Subscription:
        try:
            return store.subscription(subscription_id)
        except NotFound as exc:
            raise Problem(404, "not_found", str(exc)) from None

    def described(subscription: Subscription) -> dict[str, Any]:
        return {**subscription.public(), "deliveries": store.delivery_counts(subscription.id)}

    # For Prometheus, without a key (the service listens on 127.0.0.1 unless told otherwise); an
    # operator's endpoint, not part of the back offices' API, so not in its OpenAPI description.
    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        metrics.count_deliveries(store)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", summary="the process is up; what it has consumed")
    async def health() -> dict[str, Any]:
        consumer = runtime.consumer
        return {"status": "ok", "consumer": consumer.state if consumer else "off",
                "consumer_error": consumer.last_error if consumer else None,
                "alerts_logged": store.alert_count(), "invalid_records": store.invalid_count(),
                "webhooks": len(store.subscriptions())}

    @app.post("/v1/webhooks", status_code=201, response_model=WebhookCreated, summary="subscribe a URL",
              responses={**ERRORS, **UNREADABLE})
    async def create_webhook(body: WebhookIn, key: Authorized) -> dict[str, Any]:
        subscription = store.create_subscription(str(body.url), body.filters.filters())
        runtime.changed()
        return {**described(subscription), "secret": subscription.secret}

    @app.get("/v1/webhooks", summary="active webhooks", responses=ERRORS)
    async def list_webhooks(key: Authorized) -> dict[str, list[WebhookOut]]:
        return {"webhooks": [WebhookOut(**described(s)) for s in store.subscriptions()]}

    @app.get("/v1/webhooks/{subscription_id}", response_model=WebhookOut, summary="one webhook",
             responses={**ERRORS, **NOT_FOUND})
    async def get_webhook(subscription_id: str, key: Authorized) -> dict[str, Any]:
        return described(found(subscription_id))

    @app.delete("/v1/webhooks/{subscription_id}", status_code=204, summary="stop delivering to a webhook",
                responses={**ERRORS, **NOT_FOUND})
    async def delete_webhook(subscription_id: str, key: Authorized) -> Response:
        try:
            store.remove_subscription(subscription_id)
        except NotFound as exc:
            raise Problem(404, "not_found", str(exc)) from None
        runtime.changed()
        return Response(status_code=204)

    @app.get("/v1/webhooks/{subscription_id}/dead", summary="deliveries that ran out of attempts",
             responses={**ERRORS, **NOT_FOUND})
    async def dead_letters(subscription_id: str, key: Authorized,
                           limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> dict[str, list[DeadLetter]]:
        found(subscription_id)
        return {"dead": [_dead_letter(d) for d in store.dead(subscription_id, limit)]}

    @app.post("/v1/webhooks/{subscription_id}/dead/redeliver", summary="try dead deliveries again",
              responses={**ERRORS, **NOT_FOUND})
    async def redeliver(subscription_id: str, key: Authorized,
                        seq: Annotated[int | None, Query(ge=1, le=MAX_SEQ,
                                                         description="only this one (alert log seq); default all")] = None,
                        ) -> dict[str, int]:
        found(subscription_id)
        try:
            count = store.redeliver(subscription_id, seq)
        except NotFound as exc:
            raise Problem(404, "not_found", str(exc)) from None
        runtime.changed()
        return {"redelivered": count}

    @app.get("/v1/alerts/stream", summary="live alerts (Server-Sent Events), resumable", responses={
        **ERRORS, 400: {"model": ErrorBody, "description": "unknown Last-Event-ID, type or severity"},
        200: {"content": {"text/event-stream": {}}, "description": "`event: alert`, `id:` the change_id, `data:` "
                                                                   "the AlertChange JSON"}})
    async def stream(key: Authorized,
                     type: Annotated[list[str], Query(description="alert type; repeatable")] = [],  # noqa: A002,B006
                     min_severity: Annotated[str | None, Query()] = None,
                     store_id: Annotated[list[str], Query(alias="store", description="repeatable")] = [],  # noqa: B006
                     segment: Annotated[list[str], Query(description="repeatable")] = [],  # noqa: B006
                     last_event_id: Annotated[str | None, Query(description="resume after this change_id")] = None,
                     start: Annotated[str | None, Query(
                         alias="from", description="`start`: the whole log (also when the Last-Event-ID is "
                                                   "unknown); default: new alerts only")] = None,
                     last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                     ) -> EventSourceResponse:
        try:
            filters = Filters.build(type, min_severity, store_id, segment)
        except ValueError as exc:
            raise Problem(400, "bad_filter", str(exc)) from None
        if start not in (None, "start", "now"):
            raise Problem(400, "bad_request", f"from={start!r}: use from=start, or leave it out for new alerts only")
        position = _start_position(store, last_event_id_header or last_event_id, start)
        return EventSourceResponse(_alerts(runtime, filters, position), ping=runtime.heartbeat_seconds)

    return app


def _start_position(store: AlertStore, resume_after: str | None, start: str | None) -> int:
    """The alert-log seq the stream continues after."""
    if resume_after:
        try:
            seq = store.seq_of(str(UUID(resume_after.strip())))
        except ValueError:
            seq = None
        if seq is not None:
            return seq
        if start == "start":
            return 0
        raise Problem(400, "unknown_event_id",
                      f"Last-Event-ID {resume_after[:64]!r} is not a change_id in this service's alert log; add "
                      "from=start to read the whole log, or leave both out for new alerts only")
    return 0 if start == "start" else store.last_seq()


async def _alerts(runtime: Runtime, filters: Filters, position: int) -> AsyncIterator[ServerSentEvent]:
    with metrics.STREAMS.track_inprogress():  # until the client goes away or the service stops
        while not runtime.bell.closed:
            batch = runtime.store.alerts_after(position, STREAM_BATCH)
            for alert in batch:
                position = alert.seq
                if filters.empty or filters.matches(AlertChange.model_validate_json(alert.record)):
                    yield ServerSentEvent(data=alert.record.decode(), id=alert.change_id, event="alert")
            if len(batch) < STREAM_BATCH:
                await runtime.bell.wait(STREAM_POLL_SECONDS)
            else:
                await asyncio.sleep(0)  # a long backlog: let other requests run between batches


def _dead_letter(delivery: Delivery) -> DeadLetter:
    return DeadLetter(seq=delivery.seq, change_id=delivery.change_id, customer_key=delivery.customer_key,
                      attempts=delivery.attempts, last_error=delivery.last_error,
                      response_status=delivery.response_status, failed_at=delivery.updated_at,
                      alert=orjson.loads(delivery.record))
