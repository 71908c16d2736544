"""The one staleness scheme of kvflow's lazy-deletion heaps.

Three heaps never delete an entry in place: :class:`~kvflow.cache.ownership.ChildMins` (a node's
children's ``next_use``), :class:`~kvflow.cache.victims.VictimHeap` (device eviction victims) and
the workflow table's review heap (stalled workflows). An item whose key changes gets a new entry
instead, and the old one is dropped when it reaches the top. All three follow the same rules:

- an entry is ``(key, version, item)``; versions come from :func:`next_version`, never reused, so
  no two entries compare equal and items themselves are never compared;
- each item records the version of its one current entry, and an entry is stale iff its version
  is not that one (stale entries are skipped without computing a key; a heap may also skip current
  entries of items it no longer holds, e.g. nodes that stopped being leaves);
- a heap is rebuilt from its live entries (current, of items it holds) once
  :func:`needs_compaction` says so, which keeps its size O(live items) at O(1) amortized per push;
- each heap's own ``check()`` asserts its invariant, with :func:`check_heap_order` for the order.
"""

from __future__ import annotations

from itertools import count
from typing import Any

COMPACT_MARGIN = 8

next_version = count().__next__


def needs_compaction(entries: int, live: int) -> bool:
    """Whether a heap of ``entries`` entries, ``live`` of them live, is to be rebuilt from those."""
    return entries > 2 * live + COMPACT_MARGIN


def check_heap_order(heap: list[Any], what: str) -> None:
    """Assert that ``heap`` is a binary min-heap (``what`` names it in the message)."""
    for i in range(1, len(heap)):
        assert not heap[i] < heap[(i - 1) // 2], f"{what}: heap order broken at {i}"
