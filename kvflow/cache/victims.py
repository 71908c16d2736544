"""Device eviction victims from one heap kept across evictions, not one built per eviction.

SGLang's Full component builds a heap of every evictable device leaf's priority on each
eviction (``FullComponent._evict_device_start``): O(leaves) per call however little it frees,
and kvflow's priority costs more per leaf than LRU's float. :class:`VictimHeap` keeps the
leaves in one heap instead, and :class:`WorkflowFullComponent` pops its victims from it.

Invariant: every evictable device leaf's latest entry ``(key, node)`` is in the heap, with a key
at most the node's current priority. It holds because

- a node that becomes a leaf is pushed at its priority (:class:`EvictableLeaves`, the tree
  core's leaf set, sees every node SGLang adds);
- a node whose cached subtree minimum (``kvflow_min``) changes is pushed again if that
  dropped its priority below its entry's key (:func:`kvflow.cache.ownership` calls
  :meth:`VictimHeap.rank_changed`), and a leaf that gains an owner is pushed again at once
  (:meth:`VictimHeap.owner_assigned`: a rise the invariant allows to defer, but not for every
  leaf of a large tree at once);
- the rest of the priority, ``last_access_time``, only grows (SGLang's global counter), and the
  strategy declares (``incremental``) that a priority then only grows too (LRU ties), so a
  touched leaf's latest entry stays at or below its new priority.

So the first latest entry at the top whose node is a leaf at its current priority is a minimum
over all leaves: exactly the victim SGLang's own heap would pop. A top entry whose node has a
larger priority now is moved down to it (``heapreplace``); entries superseded by a later push
(each node keeps its latest key, ``kvflow_victim_key``), of nodes no longer leaves, or of nodes
taken by the eviction in progress are dropped when they reach the top, without computing a
priority. Within one eviction a node is handed out once (as by SGLang's heap); one that is
still a leaf when the eviction ends (its write-back failed) is pushed back. A push that leaves
the heap with more than twice as many entries as there are leaves (plus a margin) compacts it to
the latest entries of leaves (no priority computed), so its size stays O(leaves) and stale
entries release their nodes; that costs O(leaves), once per as many pushes.

The order is SGLang's only where priorities behave like that: the tree core uses this for the
kvflow policy with LRU ties and without session-aware caching (whose priority also reads
session references); otherwise :class:`WorkflowFullComponent` runs SGLang's own heap.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from sglang.srt.mem_cache.unified_cache.components.full import FullComponent

REBUILD_MARGIN = 64


class EvictableLeaves(set):
    """The tree core's set of evictable device leaves, pushing each node it gains onto a heap."""

    __slots__ = ("victims",)

    def __init__(self, victims: VictimHeap) -> None:
        super().__init__()
        self.victims = victims

    def add(self, node: Any) -> None:
        if node not in self:
            set.add(self, node)
            self.victims.push(node)


class VictimHeap:
    """The evictable device leaves in a heap by ``priority``, smallest (next victim) first."""

    def __init__(self, priority: Callable[[Any], Any]) -> None:
        self.priority = priority
        self.leaves = EvictableLeaves(self)
        self.heap: list[tuple[Any, Any]] = []
        self.taken: set[Any] = set()  # handed out by the eviction in progress

    def push(self, node: Any) -> None:
        """Enter ``node`` at its current priority."""
        key = node.kvflow_victim_key = self.priority(node)
        heapq.heappush(self.heap, (key, node))
        if len(self.heap) > 2 * len(self.leaves) + REBUILD_MARGIN:
            leaves = self.leaves
            self.heap = [
                entry for entry in self.heap if entry[0] is entry[1].kvflow_victim_key and entry[1] in leaves
            ]
            heapq.heapify(self.heap)

    def rank_changed(self, node: Any) -> None:
        """``node``'s ``kvflow_min`` changed: re-enter it if a leaf whose priority dropped below its
        entry's key (one that rose keeps its entry, moved down when it reaches the top)."""
        if node in self.leaves and self.priority(node) < node.kvflow_victim_key:
            self.push(node)

    def owner_assigned(self, node: Any) -> None:
        """``node`` just gained an owner: re-enter it at its priority now if it is a leaf.

        A claim lifts a leaf out of the un-owned class. Left to the lazy rule, every leaf of a
        tree built without evictions would keep its un-owned key, and the first eviction would
        move all of them down (about 0.4 s at 10^5 leaves); one push per claim spreads that out.
        """
        if node in self.leaves and self.priority(node) != node.kvflow_victim_key:
            self.push(node)

    def take(self) -> Any | None:
        """The leaf of smallest priority not handed out yet in this eviction (None if none)."""
        heap, leaves, taken, priority = self.heap, self.leaves, self.taken, self.priority
        while heap:
            key, node = heap[0]
            if key is not node.kvflow_victim_key or node not in leaves or node in taken:
                heapq.heappop(heap)
                continue
            current = priority(node)
            if current == key:
                heapq.heappop(heap)
                taken.add(node)
                return node
            node.kvflow_victim_key = current  # touched since its push: move it down
            heapq.heapreplace(heap, (current, node))
        return None

    def end_eviction(self) -> None:
        """Put back the nodes handed out that are still leaves (their eviction did not happen)."""
        taken, self.taken = self.taken, set()
        for node in taken:
            if node in self.leaves:
                self.push(node)

    def check(self, leaves: set[Any]) -> None:
        """Assert the invariant (see the module docstring) for the tree core's ``leaves``."""
        assert leaves is self.leaves, "the tree core's evictable-leaf set is not the heap's"
        assert not self.taken, f"{len(self.taken)} victims still taken outside an eviction"
        heap = self.heap
        for i in range(1, len(heap)):
            assert not heap[i] < heap[(i - 1) // 2], f"victim heap order broken at {i}"
        latest = {id(node) for key, node in heap if key is node.kvflow_victim_key}
        for node in leaves:
            assert id(node) in latest, f"evictable leaf {node.id} has no current victim heap entry"
            key = node.kvflow_victim_key
            assert not self.priority(node) < key, (
                f"evictable leaf {node.id}: heap key {key} above its priority {self.priority(node)}"
            )


class WorkflowFullComponent(FullComponent):
    """SGLang's Full component, taking device victims from the tree core's :class:`VictimHeap`
    where it keeps one (``kvflow_victims``), else from SGLang's own per-eviction heap."""

    def _evict_device_start(self, request_cnt: int) -> None:
        if self.tree_core.kvflow_victims is None:
            super()._evict_device_start(request_cnt)
            return
        self._evict_device_request_cnt = request_cnt

    def _evict_device_next_node(
        self, tracker: dict, device_frees: dict, host_frees: dict, cache_actions: list
    ) -> int | None:
        victims = self.tree_core.kvflow_victims
        if victims is None:
            return super()._evict_device_next_node(tracker, device_frees, host_frees, cache_actions)
        if tracker[self.component_type] >= self._evict_device_request_cnt:
            return None
        node = victims.take()
        return None if node is None else node.id

    def _evict_device_end(self) -> None:
        victims = self.tree_core.kvflow_victims
        if victims is None:
            super()._evict_device_end()
            return
        victims.end_eviction()
