"""An in-process "the alert log grew" signal: live streams wake at once instead of at their next poll.
They still poll (every half second), so a missed ring costs latency, never an alert."""

from __future__ import annotations

import asyncio


class Bell:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False

    def ring(self) -> None:
        # Wake everyone waiting now; later waiters wait for the next ring.
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        """The service is stopping: waiters return, and streams end instead of holding the shutdown up."""
        self.closed = True
        self.ring()

    async def wait(self, timeout: float) -> None:
        if self.closed:
            return
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass
