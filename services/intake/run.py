"""`crm intake` in the foreground (`crm start` runs it in the background), and its `crm status` lines."""

from __future__ import annotations

import logging
import os
import signal
import threading

from streams.config import Settings

NAME = "intake"


def metrics_port() -> int:
    """CRM_INTAKE_METRICS_PORT; default 9103, or a free port when it is taken (announced in run/intake.metrics)."""
    return int(os.environ.get("CRM_INTAKE_METRICS_PORT", "9103"))


def main(settings: Settings) -> int:
    from deploy.metrics_endpoint import serve
    from services.intake.agent import Intake

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    endpoint = serve(NAME, settings.state_dir, metrics_port())
    logging.getLogger("crm.intake").info("metrics at %s", endpoint.url)
    try:
        Intake(settings).run(stop)
    finally:
        endpoint.close()
    return 0


def status_lines(settings: Settings, pid: int | None) -> list[str]:
    """What `crm status` says of the intake: whether it runs, and its counts from its /metrics."""
    lines = [f"{NAME}: " + (f"running (pid {pid})" if pid else "not running")]
    if not pid:
        return lines
    import httpx

    from deploy.metrics_endpoint import read_address
    from services.health import scrape
    from services.intake.metrics import summary

    url = read_address(settings.state_dir, NAME)
    if url is None:
        return [*lines, "  metrics: none announced yet"]
    try:
        samples = scrape(url)
    except (httpx.HTTPError, ValueError) as exc:
        return [*lines, f"  metrics: DOWN, {url} does not answer ({type(exc).__name__})"]
    return [*lines, f"  metrics: up, {url}", *(f"  {line}" for line in summary(samples))]
