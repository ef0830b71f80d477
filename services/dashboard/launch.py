"""The end of `crm demo`: the stack runs again, in the background, on the demo's data, with the dashboard,
so that what the demo did can be watched as charts; `crm --state-dir <demo dir> stop` ends it.

The demo's own process opened the embedded ClickHouse, and holds it until it exits (chdb lets one
process open a data directory, for the life of the process). So the projection writer, which serves
the SQL the dashboard shows, is started by a detached helper once the demo's process has gone:
`python -m services.dashboard.launch <pid>`. Until then the dashboard's panels say that the SQL
endpoint does not answer yet, and fill in at their next refresh."""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time

import httpx
from rich.console import Console

from deploy.process import process_alive
from services import processes
from services.dashboard.server import off_reason, url
from streams.config import PROJECT_ROOT, settings

READY_SECONDS = 60.0


def serve_after_demo(console: Console) -> None:
    """Starts what `crm start` starts. With no analysts configured, the demo makes one (`demo`, a fresh
    password, known to these processes only) and prints the login."""
    login = "an analyst of CRM_SQL_USERS"
    if off_reason(settings()):
        password = secrets.token_urlsafe(12)
        os.environ["CRM_SQL_USERS"] = f"demo:{password}"
        login = f"user demo, password {password}"
    from services.cli import cmd_kafka

    console.rule("[bold]Dashboard")
    cmd_kafka(argparse.Namespace(action="start"))
    config = settings()
    for daemon in (processes.worker(config), processes.intake(config), processes.alerts(config),
                   processes.dashboard(config)):
        console.print(f"{daemon.name} running (pid {daemon.start()}), log: {daemon.log_file}")
    subprocess.Popen([sys.executable, "-m", "services.dashboard.launch", str(os.getpid())], cwd=PROJECT_ROOT,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    console.print(f"writer: starts when this demo has exited, log: {processes.writer(config).log_file}")
    ready = _answering(f"{url(config)}/health")
    console.print(f"\n[bold]Dashboard:[/bold] {url(config)}  ({login}; docs/dashboard.md)"
                  + ("" if ready else "  [yellow]not answering yet: see its log above[/yellow]"))
    console.print(f"Stop the stack:  ./crm --state-dir {config.state_dir} stop")


def _answering(health: str) -> bool:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def start_writer_once_gone(pid: int) -> None:
    """The detached helper: waits for the demo's process to exit, then starts the writer daemon."""
    while process_alive(pid):
        time.sleep(0.2)
    processes.writer(settings()).start()


if __name__ == "__main__":
    start_writer_once_gone(int(sys.argv[1]))
