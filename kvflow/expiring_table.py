"""An ordered map by last use that forgets entries idle past a TTL, with an explicit capacity rule
(used by the scheduler's workflow table and by the HTTP process's registry and graph learner)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, ValuesView
from enum import Enum
from itertools import islice
from typing import Generic, TypeVar

V = TypeVar("V")


class WhenFull(Enum):
    """What a table holding more than its capacity does."""

    DROP_OLDEST = "drop_oldest"  # expiry drops the least recently used entries down to the capacity
    REFUSE = "refuse"  # expiry never drops for the capacity: the caller checks ``full`` and refuses new keys


class ExpiringTable(Generic[V]):
    """Values by ``str`` key, least recently used first, forgotten after ``ttl`` unused seconds."""

    def __init__(
        self,
        capacity: int,
        when_full: WhenFull,
        ttl: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.when_full = when_full
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._last_used: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def full(self) -> bool:
        """Whether the table holds ``capacity`` entries or more."""
        return len(self._entries) >= self.capacity

    def get(self, key: str) -> V | None:
        """The value of ``key`` (None if absent); does not count as a use."""
        return self._entries.get(key)

    def values(self) -> ValuesView[V]:
        """The values, least recently used first."""
        return self._entries.values()

    def page(self, offset: int, limit: int) -> list[V]:
        """Values ``offset .. offset + limit - 1``, least recently used first."""
        return list(islice(self._entries.values(), offset, offset + limit))

    def put(self, key: str, value: V) -> None:
        """Set ``key`` to ``value`` and mark it used now."""
        self._entries[key] = value
        self.touch(key)

    def touch(self, key: str) -> None:
        """Mark ``key`` (which must be present) used now."""
        self._entries.move_to_end(key)
        self._last_used[key] = self.clock()

    def pop(self, key: str) -> V | None:
        """Forget ``key``; return its value (None if absent)."""
        self._last_used.pop(key, None)
        return self._entries.pop(key, None)

    def oldest(self) -> str:
        """The least recently used key (the table must not be empty)."""
        return next(iter(self._entries))

    def due(self, now: float) -> bool:
        """Whether the oldest entry must go at ``now``: idle past the TTL, or over capacity if DROP_OLDEST."""
        if not self._entries:
            return False
        over = self.when_full is WhenFull.DROP_OLDEST and len(self._entries) > self.capacity
        return over or now - self._last_used[self.oldest()] > self.ttl

    def expire(self) -> list[tuple[str, V]]:
        """Drop entries from the oldest while :meth:`due`; return them, oldest first."""
        now = self.clock()
        dropped = []
        while self.due(now):
            key, value = self._entries.popitem(last=False)
            del self._last_used[key]
            dropped.append((key, value))
        return dropped
