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
        if not self.closed:
            await wait_event(self._event, timeout)


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until the event is set or the timeout passed, whichever is first.

    Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as the event is set,
    and a loop that waits that way then never stops (cpython gh-86296). asyncio.timeout does not."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
