"""`crm alerts`: one process, one event loop, three jobs: the consumer fills the alert log from
`crm.alerts`, the dispatcher delivers it to webhooks, and uvicorn serves the API and the live stream.

The process owns delivery for its state directory: it holds an exclusive lock
(`<state dir>/alerts/.owner.lock`), so a second `crm alerts` on the same directory stops with a
message instead of sending every alert twice."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import uvicorn

from deploy.metrics_endpoint import MetricsEndpoint, announce, local_url
from services.alerts.api import Runtime, create_app
from services.alerts.bell import Bell
from services.alerts.consumer import GROUP_ID, AlertConsumer
from services.alerts.dispatch import Dispatcher
from services.alerts.store import AlertStore
from services.ingest.keys import ApiKeyStore
from streams.config import Settings

log = logging.getLogger("crm.alerts")


class AlertsBusy(RuntimeError):
    """Another process delivers for this state directory."""


class AlertService:
    def __init__(self, settings: Settings, host: str | None = None, port: int | None = None,
                 consume: bool = True, group_id: str = GROUP_ID, heartbeat_seconds: float = 15.0):
        self.settings = settings
        self.host = host or settings.alerts_host
        self.port = settings.alerts_port if port is None else port   # 0: any free port; `port` is the real one once ready
        self.consume, self.group_id = consume, group_id     # consume=False: no Kafka (tests fill the log themselves)
        self.heartbeat_seconds = heartbeat_seconds           # SSE keep-alive comments, for proxies that drop idle streams
        self.ready = threading.Event()
        self.consumer: AlertConsumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def run(self) -> None:
        """Serve until stop() (or, in `crm alerts`, SIGTERM / SIGINT)."""
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        with _owner_lock(self.settings.alerts_db.parent), _listening(self.host, self.port) as sock:
            self.port = sock.getsockname()[1]
            store, keys, bell = AlertStore(self.settings.alerts_db), ApiKeyStore(self.settings.ingest_db), Bell()
            dispatcher = Dispatcher.from_settings(store, self.settings)

            def appended() -> None:
                bell.ring()
                dispatcher.nudge()

            def changed() -> None:
                dispatcher.subscriptions_changed()
                dispatcher.nudge()

            self.consumer = (AlertConsumer(store, self.settings.kafka_bootstrap, appended, self.group_id)
                             if self.consume else None)
            runtime = Runtime(store, keys, bell, changed, self.consumer.stats if self.consumer else None,
                              self.heartbeat_seconds)
            server = _Server(uvicorn.Config(create_app(runtime), log_config=None, access_log=False, lifespan="off",
                                            timeout_graceful_shutdown=5))
            jobs = [asyncio.create_task(dispatcher.run(), name="dispatcher"),
                    asyncio.create_task(server.serve(sockets=[sock]), name="http")]
            if self.consumer:
                jobs.append(asyncio.create_task(self.consumer.run(), name="consumer"))
            stop = asyncio.create_task(self._stop.wait())
            endpoint: MetricsEndpoint | None = None
            try:
                while not server.started and not any(job.done() for job in jobs):
                    await asyncio.sleep(0.02)
                if server.started:
                    log.info("alerts service on %s (state %s)", self.url, self.settings.alerts_db)
                    # Its /metrics, for `crm status` (deploy/metrics_endpoint.py); withdrawn below.
                    endpoint = announce("alerts", self.settings.state_dir, local_url(self.host, self.port))
                    self.ready.set()
                    # Until asked to stop, or until a job ends, which only happens when it failed.
                    await asyncio.wait([stop, *jobs], return_when=asyncio.FIRST_COMPLETED)
                for job in jobs:
                    if job.done() and not job.cancelled() and job.exception():
                        raise job.exception()  # type: ignore[misc]
                    if job.done() and not self._stop.is_set():
                        raise RuntimeError(f"the alert service's {job.get_name()} ended on its own")
            finally:
                bell.close()              # live streams end, so the server's shutdown does not wait for them
                server.should_exit = True
                with contextlib.suppress(Exception):   # its own failure, or not done in time: cancelled below
                    async with asyncio.timeout(10):
                        await asyncio.shield(jobs[1])
                for job in (*jobs, stop):
                    job.cancel()
                await asyncio.gather(*jobs, stop, return_exceptions=True)
                store.close()
                keys.close()
                if endpoint is not None:
                    endpoint.close()
                log.info("alerts service stopped")

    def stop(self) -> None:
        """From any thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def start_in_thread(self, timeout: float = 30.0) -> AlertService:
        """For tests and embedding: run on a thread's own event loop; returns once it serves."""
        def main() -> None:
            try:
                asyncio.run(self.run())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread below
                self._failure = exc
                self.ready.set()

        self._thread = threading.Thread(target=main, name="crm-alerts", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise TimeoutError(f"the alerts service did not start within {timeout:.0f} s")
        if self._failure is not None:
            raise self._failure
        return self


def run_forever(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """`crm alerts`: the service in the foreground, stopped by SIGTERM or Ctrl-C."""
    # httpx logs every request at INFO, a line per delivery; failed attempts are logged by dispatch.py.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    service = AlertService(settings, host, port)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    asyncio.run(main())


class _Server(uvicorn.Server):
    """uvicorn inside the service's loop. It would install its own SIGTERM/SIGINT handlers and re-raise
    the signal after serving, which would end the process before the consumer and the deliveries
    stopped cleanly; the service handles the signals and tells the server to exit instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def _listening(host: str, port: int) -> Iterator[socket.socket]:
    """Bind before anything starts, so a taken port is a clear error instead of uvicorn's sys.exit."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror} (CRM_ALERTS_HOST / "
                                 "CRM_ALERTS_PORT, or --host / --port)") from None
    sock.listen(128)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def _owner_lock(directory: Path) -> Iterator[IO[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / ".owner.lock", "a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise AlertsBusy(f"another alerts service (pid {lock.read().strip() or '?'}) delivers for {directory}; "
                             "stop it first (`crm stop`)") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield lock
    finally:
        lock.close()  # closing releases the lock
