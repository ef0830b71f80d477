"""Chromium for the dashboard's browser test (tests/integration/test_dashboard.py): Debian's package,
installed with apt-get when it is missing, so that `crm test` on a fresh machine needs nothing by hand.

Playwright (a dev dependency) drives it; its own browser downloads are never used. The launch flags
keep Chromium off the network (no background requests, updates, sync or QUIC: this machine reaches
nothing but its package mirrors) and let it run as root, as tests and CI do here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
_APT = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q"]


class BrowserUnavailable(RuntimeError):
    """Chromium is missing and this machine cannot install it; the message says what to run."""


def ensure_chromium() -> Path:
    """Debian's Chromium, installed first if it is missing (an `apt-get update` first if the package
    lists do not know it yet)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise BrowserUnavailable(f"no {CHROMIUM}: install Debian's package as root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*_APT, "install", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run([*_APT, "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise BrowserUnavailable(f"apt-get could not install chromium:\n{done.stderr[-2000:]}")
    if not CHROMIUM.exists():
        raise BrowserUnavailable(f"the chromium package is installed but {CHROMIUM} is missing")
    return CHROMIUM
