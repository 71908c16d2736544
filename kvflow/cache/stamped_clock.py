"""The scheduler's reading of time: the latest stamp the HTTP process wrote on a hint or a command.

Tensor-parallel ranks each run a scheduler and a cache on the same inputs, broadcast from rank 0
(requests and control requests alike). A decision that read a rank's own clock, such as a
workflow's hint expiring after its TTL, could go one way on one rank and the other way on
another. The HTTP process stamps every hinted request and every kvflow command with its
``time.monotonic()`` (:func:`kvflow.hints.transport`, ``patches/workflow_endpoints.py``), and
sends a clock command every quarter TTL, so every rank reads the same time at the same point of
its input stream and stale hints still expire while only un-hinted requests arrive.
"""

from __future__ import annotations

import math


class StampedClock:
    """Seconds as last stamped; call it to read. Never reads this process's own clock."""

    def __init__(self) -> None:
        self._now = 0.0

    def __call__(self) -> float:
        return self._now

    def advance(self, stamp: float | None) -> None:
        """Move to ``stamp`` if it is later (concurrent requests reach the scheduler out of order)."""
        if stamp is not None and math.isfinite(stamp) and stamp > self._now:
            self._now = stamp
