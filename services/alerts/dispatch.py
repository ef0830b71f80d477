"""Webhook delivery: one loop per subscription, each with its own HTTP client, timeout and limit on
requests in flight, so a slow or dead receiver only ever holds up itself.

A loop asks the store for due deliveries (the oldest pending one of each customer whose previous
alert is settled, see AlertStore.due), sends each in its own task, and records the outcome: 2xx is
delivered; anything else, a timeout or a connection error is a failed attempt, retried after an
exponential backoff with full jitter (or the receiver's Retry-After, if longer) until the attempts
run out and the delivery is dead. Everything is in SQLite, so a restart resumes where it stopped; a
request cut off by the stop is sent again (receivers de-duplicate on X-CRM-Change-Id)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from services.alerts import metrics
from services.alerts.bell import wait_event
from services.alerts.signing import HEADER as SIGNATURE_HEADER
from services.alerts.signing import sign
from services.alerts.store import AlertStore, Due, Subscription
from streams.config import Settings

log = logging.getLogger("crm.alerts.dispatch")

# How often a loop looks at the store even without a nudge: picks up redeliveries and subscriptions
# that the CLI wrote from another process.
POLL_SECONDS = 1.0
# A receiver's Retry-After is honoured up to this: beyond it a typo on their side would park the
# customer's alerts for days.
MAX_RETRY_AFTER_SECONDS = 3600.0
ERROR_BODY_BYTES = 200  # of a failed response's body, kept in last_error
ACK_BODY_BYTES = 64 * 1024  # read of a success's body, to reuse the connection; a longer one closes it


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_seconds: float = 1.0
    cap_seconds: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.alerts_max_attempts, settings.alerts_backoff_base_seconds,
                   settings.alerts_backoff_cap_seconds)

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt number `attempt` (1-based): base, 2 base, 4 base, ... up to the cap."""
        return min(self.cap_seconds, self.base_seconds * 2 ** (attempt - 1))

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Equal jitter (uniform between half the ceiling and the ceiling): receivers that failed
        together, for example after an outage, are not hit again all at once, and the retries still
        span at least `guaranteed_window()`. A Retry-After from the receiver is a minimum."""
        ceiling = self.ceiling(attempt)
        wait = (rng or random).uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER_SECONDS))
        return wait

    def guaranteed_window(self) -> float:
        """The shortest time from a delivery's first attempt to its last: a receiver down for less
        than this gets the delivery when it is back, never on the dead-letter list."""
        return sum(self.ceiling(attempt) / 2 for attempt in range(1, self.max_attempts))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as delta seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def request_headers(subscription: Subscription, due: Due, attempt: int, now: float | None = None) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "crm-alerts/1",
        "X-CRM-Alert-Id": due.alert_id,
        "X-CRM-Change-Id": due.change_id,
        "X-CRM-Delivery-Attempt": str(attempt),
        SIGNATURE_HEADER: sign(subscription.secret, due.record, None if now is None else int(now)),
    }


class SubscriptionLoop:
    """Delivers one subscription's alerts until cancelled."""

    def __init__(self, store: AlertStore, subscription: Subscription, policy: RetryPolicy, timeout_seconds: float,
                 concurrency: int):
        self.store, self.subscription, self.policy = store, subscription, policy
        self.timeout_seconds, self.concurrency = timeout_seconds, max(1, concurrency)
        self.wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}  # by customer key: one request per customer at a time

    def nudge(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        # Its own client: its own connection pool and timeouts, nothing shared with other receivers.
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout_seconds, limits=limits, follow_redirects=False) as client:
            try:
                while True:
                    self.wake.clear()
                    now = time.time()
                    next_at = None
                    free = self.concurrency - len(self._in_flight)
                    if free > 0:
                        due, next_at = self.store.due(self.subscription.id, now, self._in_flight, free)
                        for delivery in due:
                            task = asyncio.create_task(self._attempt(client, delivery),
                                                       name=f"deliver {self.subscription.id} #{delivery.seq}")
                            self._in_flight[delivery.customer_key] = task
                            task.add_done_callback(lambda done, key=delivery.customer_key: self._settled(key, done))
                    until_due = POLL_SECONDS if next_at is None else max(0.0, next_at - now)
                    await wait_event(self.wake, min(POLL_SECONDS, until_due))
            finally:
                for task in self._in_flight.values():
                    task.cancel()
                await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    def _settled(self, customer_key: str, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(customer_key, None)
        if not task.cancelled() and task.exception() is not None:
            # Recording the outcome failed (the store): the delivery is still pending and is tried again.
            log.error("webhook %s: delivery for %s failed", self.subscription.id, customer_key,
                      exc_info=task.exception())
        self.wake.set()  # the customer's next alert, if any, may go now

    async def _attempt(self, client: httpx.AsyncClient, due: Due) -> None:
        attempt = due.attempts + 1
        status: int | None = None
        retry_after: float | None = None
        started = time.perf_counter()
        try:
            # The timeout bounds the whole exchange; httpx's own bounds each read, which a receiver
            # trickling bytes would never trip.
            async with asyncio.timeout(self.timeout_seconds):
                async with client.stream("POST", self.subscription.url, content=due.record,
                                         headers=request_headers(self.subscription, due, attempt)) as response:
                    status = response.status_code
                    if 200 <= status < 300:
                        error = None
                        # Read the (usually empty) answer so the connection goes back to the pool:
                        # left unread, httpx closes it, and every alert pays a new TCP/TLS handshake.
                        await _start_of(response, ACK_BODY_BYTES)
                    else:
                        retry_after = retry_after_seconds(response.headers.get("retry-after"))
                        error = f"HTTP {status}: {await _start_of(response)}"
        except TimeoutError:
            error, status = f"no answer within {self.timeout_seconds:g} s", None
        except httpx.HTTPError as exc:
            error, status = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None
        except Exception as exc:  # a bad URL and the like: count it as a failed attempt, keep the loop alive
            log.exception("delivery %s #%s failed unexpectedly", self.subscription.id, due.seq)
            error, status = f"{type(exc).__name__}: {exc}", None
        seconds = time.perf_counter() - started
        if error is None:
            self.store.delivered(self.subscription.id, due.seq, attempt, status)  # type: ignore[arg-type]
            metrics.attempted(self.subscription.id, attempt, "delivered", seconds)
            return
        dead = attempt >= self.policy.max_attempts
        metrics.attempted(self.subscription.id, attempt, "dead" if dead else "failed", seconds)
        retry_at = None if dead else time.time() + self.policy.delay(attempt, retry_after)
        self.store.failed(self.subscription.id, due.seq, attempt, error, status, retry_at)
        log.warning("webhook %s: alert %s (seq %s) attempt %s failed: %s%s", self.subscription.id, due.change_id,
                    due.seq, attempt, error,
                    " - dead, see `crm webhooks dead`" if dead
                    else f" - retry at {datetime.fromtimestamp(retry_at, UTC).isoformat(timespec='seconds')}")


async def _start_of(response: httpx.Response, limit: int = ERROR_BODY_BYTES) -> str:
    """The first bytes of a body (for last_error); never the whole of whatever a receiver sends."""
    kept = b""
    async for chunk in response.aiter_bytes():
        kept += chunk
        if len(kept) >= limit:
            break
    return kept[:limit].decode("utf-8", "replace").strip() or "(empty body)"


class Dispatcher:
    """Keeps one SubscriptionLoop running per active subscription, starting and stopping loops as
    subscriptions come and go (also when the CLI changes them from another process)."""

    def __init__(self, store: AlertStore, policy: RetryPolicy, timeout_seconds: float = 10.0, concurrency: int = 4):
        self.store, self.policy = store, policy
        self.timeout_seconds, self.concurrency = timeout_seconds, concurrency
        self._loops: dict[str, tuple[SubscriptionLoop, asyncio.Task[None]]] = {}
        self._changed = asyncio.Event()

    @classmethod
    def from_settings(cls, store: AlertStore, settings: Settings) -> Dispatcher:
        return cls(store, RetryPolicy.from_settings(settings), settings.alerts_timeout_seconds,
                   settings.alerts_concurrency)

    def nudge(self) -> None:
        """New alerts or redeliveries: every loop looks at the store now instead of at its next poll."""
        for loop, _ in self._loops.values():
            loop.nudge()

    def subscriptions_changed(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        try:
            while True:
                self._changed.clear()
                try:
                    self._reconcile()
                except Exception:  # the store, briefly unavailable: deliveries go on, try again shortly
                    log.exception("could not read the webhook subscriptions")
                await wait_event(self._changed, POLL_SECONDS)
        finally:
            tasks = [task for _, task in self._loops.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loops.clear()

    def _reconcile(self) -> None:
        active = {s.id: s for s in self.store.subscriptions()}
        for subscription_id in list(self._loops):
            loop, task = self._loops[subscription_id]
            if subscription_id not in active:
                task.cancel()
                del self._loops[subscription_id]
                log.info("webhook %s removed: its deliveries stopped", subscription_id)
            elif task.done():
                # A loop only ends by cancellation; anything else is a bug or a broken store. Say so
                # and start it again rather than silently stop delivering to this receiver.
                if not task.cancelled() and task.exception() is not None:
                    log.error("webhook %s delivery loop failed; restarting it", subscription_id,
                              exc_info=task.exception())
                del self._loops[subscription_id]
        for subscription_id, subscription in active.items():
            if subscription_id not in self._loops:
                loop = SubscriptionLoop(self.store, subscription, self.policy, self.timeout_seconds, self.concurrency)
                self._loops[subscription_id] = (loop, asyncio.create_task(loop.run(), name=f"webhook {subscription_id}"))
