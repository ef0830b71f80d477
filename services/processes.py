"""Background processes of the local stack (worker, projection writer, intake, alert service, dashboard): started
detached with a pid file and a log under the state directory, stopped with SIGTERM (then SIGKILL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deploy.process import process_alive, terminate
from streams.config import Settings


class Daemon:
    def __init__(self, settings: Settings, name: str, argv: list[str]):
        self.name = name
        self.argv = argv
        self.pid_file = settings.state_dir / "run" / f"{name}.pid"
        self.log_file = settings.state_dir / "logs" / f"{name}.log"
        self.env = {**os.environ, "CRM_STATE_DIR": str(settings.state_dir)}

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def start(self) -> int:
        running = self.pid()
        if running:
            return running
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "services.cli", *self.argv], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                       start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
        self.pid_file.write_text(str(process.pid))
        return process.pid

    def stop(self, timeout: float = 30.0) -> None:
        pid = self.pid()
        if pid is not None:
            terminate(pid, timeout)
        self.pid_file.unlink(missing_ok=True)


def worker(settings: Settings) -> Daemon:
    return Daemon(settings, "worker", ["worker"])


def writer(settings: Settings) -> Daemon:
    return Daemon(settings, "writer", ["writer"])


def alerts(settings: Settings) -> Daemon:
    return Daemon(settings, "alerts", ["alerts"])


def dashboard(settings: Settings) -> Daemon:
    return Daemon(settings, "dashboard", ["dashboard"])


def intake(settings: Settings) -> Daemon:
    return Daemon(settings, "intake", ["intake"])
