"""Where each process of the platform serves its Prometheus metrics, and how others find it.

Every process serves `/metrics` on 127.0.0.1 and writes the address it really bound, as one line
`http://127.0.0.1:PORT/metrics`, to `$CRM_STATE_DIR/run/<name>.metrics` (beside the pid files of
services/processes.py), so that `crm status` and the tests find it whatever port it got. The file
lives as long as the process: removed when it exits normally, left behind by a crash, in which case
whoever reads it finds nothing answering there.

The worker and the projection writer have no HTTP server of their own: `serve` starts
prometheus_client's on the configured port (0: any free port). A taken port (a second worker on the
host, another test session) is not a reason to stop a process that folds or writes: it serves on a
free port instead, with a warning. The ingestion API and the alerts service answer `/metrics` on
their own server and only `announce` it.

Here, in deploy/, because every process imports it: the worker (streams/), the writer (projections/,
which must not import services/) and the services."""

from __future__ import annotations

import atexit
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

log = logging.getLogger("crm.metrics")
HOST = "127.0.0.1"


def address_file(state_dir: Path, name: str) -> Path:
    return state_dir / "run" / f"{name}.metrics"


def read_address(state_dir: Path, name: str) -> str | None:
    """The URL a process announced, or None when it never did (or the file is empty)."""
    try:
        return address_file(state_dir, name).read_text().strip() or None
    except FileNotFoundError:
        return None


def local_url(host: str, port: int) -> str:
    """The URL that reaches a server bound to `host` from this host (a wildcard address is reached
    on the loopback)."""
    if host in ("", "0.0.0.0", "::"):
        host = HOST
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


@dataclass
class MetricsEndpoint:
    """An announced /metrics address; `server` is set when this module serves it."""
    url: str
    file: Path
    server: WSGIServer | None = field(default=None, repr=False)

    def close(self) -> None:
        """Stop serving and withdraw the address file, unless another process has written its own
        there since. Safe to call more than once."""
        atexit.unregister(self.close)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        try:
            if self.file.read_text().strip() == self.url:
                self.file.unlink()
        except FileNotFoundError:
            pass


def serve(name: str, state_dir: Path, port: int, registry: CollectorRegistry = REGISTRY) -> MetricsEndpoint:
    """Serve `registry` on 127.0.0.1:`port` (0: a free port; taken: a free port and a warning) in a
    daemon thread, and announce the address."""
    try:
        server, _ = start_http_server(port, addr=HOST, registry=registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port == 0:
            raise
        server, _ = start_http_server(0, addr=HOST, registry=registry)
        log.warning("metrics port %d is taken; %s serves /metrics on port %d instead (see %s)",
                    port, name, server.server_port, address_file(state_dir, name))
    endpoint = announce(name, state_dir, local_url(HOST, server.server_port))
    endpoint.server = server
    return endpoint


def announce(name: str, state_dir: Path, url: str) -> MetricsEndpoint:
    """Write the address file (whole or not at all: readers never see half a URL); it is withdrawn
    when the process exits normally."""
    file = address_file(state_dir, name)
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f".{file.name}.{os.getpid()}")
    partial.write_text(url + "\n")
    partial.replace(file)
    endpoint = MetricsEndpoint(url, file)
    atexit.register(endpoint.close)
    return endpoint
