"""Device eviction victims from one heap kept across evictions, not one built per eviction.

SGLang's Full component heaps every evictable device leaf on each eviction (O(leaves) per call);
:class:`VictimHeap` keeps them in one lazy-deletion heap (:mod:`kvflow.cache.lazy_heap`, a node's
current entry recorded in ``node.kvflow``) that :class:`WorkflowFullComponent` pops. It is used
only where priorities grow between ``next_use`` changes (the kvflow policy with LRU ties, no
session-aware caching); elsewhere SGLang's own heap runs. Invariant and why it holds:

- every evictable device leaf's current entry is in the heap, keyed at most its priority: a new
  leaf is pushed (:class:`EvictableLeaves` sees every node SGLang adds), a leaf whose ``next_use``
  change lowered its priority is pushed again (:meth:`VictimHeap.next_use_changed`), one that
  gains an owner too (:meth:`VictimHeap.owner_assigned`), and ``last_access_time`` only grows;
- so the first current entry at the top whose node is a leaf at that priority is the victim
  SGLang's heap would pop (leaves' keys never tie: their access times differ); a top entry whose
  priority rose is moved down, stale ones, non-leaves' and those taken by the eviction in progress
  are dropped unevaluated;
- within one eviction a node is handed out once; one still a leaf at its end is pushed back.

The last victim is cut to what the eviction still needs when it is the end of an agent's context
(:meth:`WorkflowFullComponent.trim_to_shortfall`): a context is a prefix its agent resumes, so its
first tokens are worth keeping even when its last ones must go. The node is split and only its
tail is evicted; the context then shrinks onto the rest (``Ownership.detach_removed_node``).
Fixed prompts and un-owned nodes are evicted whole, as stock SGLang does.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from sglang.srt.mem_cache.unified_cache.components.full import FullComponent

from kvflow.cache.lazy_heap import check_heap_order, needs_compaction, next_version


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
        state = node.kvflow
        key = state.victim_key = self.priority(node)
        version = state.victim_version = next_version()
        heapq.heappush(self.heap, (key, version, node))
        if needs_compaction(len(self.heap), len(self.leaves)):
            leaves = self.leaves
            self.heap = [
                entry
                for entry in self.heap
                if entry[1] == entry[2].kvflow.victim_version and entry[2] in leaves
            ]
            heapq.heapify(self.heap)

    def next_use_changed(self, node: Any) -> None:
        """``node``'s ``next_use`` changed: re-enter it if a leaf whose priority dropped below its
        entry's key (one that rose keeps its entry, moved down when it reaches the top)."""
        if node in self.leaves and self.priority(node) < node.kvflow.victim_key:
            self.push(node)

    def owner_assigned(self, node: Any) -> None:
        """``node`` just gained an owner: re-enter it at its priority now if it is a leaf.

        A claim lifts a leaf out of the un-owned class. Left to the lazy rule, every leaf of a
        tree built without evictions would keep its un-owned key, and the first eviction would
        move all of them down (about 0.4 s at 10^5 leaves); one push per claim spreads that out.
        """
        if node in self.leaves and self.priority(node) != node.kvflow.victim_key:
            self.push(node)

    def take(self) -> Any | None:
        """The leaf of smallest priority not handed out yet in this eviction (None if none)."""
        heap, leaves, taken, priority = self.heap, self.leaves, self.taken, self.priority
        while heap:
            key, version, node = heap[0]
            state = node.kvflow
            if version != state.victim_version or node not in leaves or node in taken:
                heapq.heappop(heap)
                continue
            current = priority(node)
            if current == key:
                heapq.heappop(heap)
                taken.add(node)
                return node
            state.victim_key = current  # touched since its push: move it down
            heapq.heapreplace(heap, (current, version, node))
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
        check_heap_order(self.heap, "victim heap")
        current = {id(node): key for key, version, node in self.heap if version == node.kvflow.victim_version}
        for node in leaves:
            assert id(node) in current, f"evictable leaf {node.id} has no current victim heap entry"
            key = current[id(node)]
            assert key == node.kvflow.victim_key, (
                f"evictable leaf {node.id}: heap key {key} is not its recorded key"
            )
            assert not self.priority(node) < key, (
                f"evictable leaf {node.id}: heap key {key} above its priority {self.priority(node)}"
            )


class WorkflowFullComponent(FullComponent):
    """SGLang's Full component, taking device victims from the tree core's :class:`VictimHeap`
    where it keeps one (``ownership.victims``), else from SGLang's own per-eviction heap."""

    # The pool's free size an allocation-driven eviction stops at (``UnifiedRadixCache.evict_for_alloc``
    # stops once it is reached, not at a token count); None: a plain ``evict`` of a token count.
    available_target: int | None = None

    def _evict_device_start(self, request_cnt: int) -> None:
        if self.tree_core.ownership.victims is None:
            super()._evict_device_start(request_cnt)
            return
        self._evict_device_request_cnt = request_cnt

    def _evict_device_next_node(
        self, tracker: dict, device_frees: dict, host_frees: dict, cache_actions: list
    ) -> int | None:
        victims = self.tree_core.ownership.victims
        if victims is None:
            return super()._evict_device_next_node(tracker, device_frees, host_frees, cache_actions)
        if tracker[self.component_type] >= self._evict_device_request_cnt:
            return None
        node = victims.take()
        if node is None:
            return None
        self.trim_to_shortfall(node, tracker)
        return node.id

    def shortfall(self, tracker: dict) -> int:
        """The device tokens this eviction still has to free."""
        if self.available_target is not None:
            return self.available_target - self.cache._component_available_size(self.component_type)
        return self._evict_device_request_cnt - tracker[self.component_type]

    def trim_to_shortfall(self, node: Any, tracker: dict) -> None:
        """If ``node`` ends a context and holds more than the eviction still needs, split it so
        that ``node`` keeps only its last tokens (the shortfall, in whole pages): the victim.

        Only a device-only node with no transfer pending is split: the split then needs no
        action from the cache (``UnifiedTreeCore._split_node`` returns None).
        """
        state = node.kvflow
        if not state.contexts or state.owners:
            return
        tree = self.tree_core
        if (
            node.backuped
            or node.write_through_pending_id is not None
            or node.load_back_pending_id is not None
            or tree.is_host_memory_buffer_only
        ):
            return
        page = tree.page_size
        need = -(-self.shortfall(tracker) // page) * page
        keep = len(node.key) - need
        if need <= 0 or keep <= 0:
            return
        _, action = tree._split_node(node.key, node, keep)
        assert action is None, f"splitting evictable leaf {node.id} asked the cache for {action}"

    def _evict_device_end(self) -> None:
        victims = self.tree_core.ownership.victims
        if victims is None:
            super()._evict_device_end()
            return
        victims.end_eviction()
