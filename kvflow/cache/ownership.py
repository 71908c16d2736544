"""Agent ownership of radix-tree nodes and the priority it gives them.

An agent owns the node where its fixed prompt ends. Each node caches
``kvflow_min``: the minimum rank (``AgentState.rank``, an opaque comparable
number; None means "no rank") over the owners in its subtree (None when no
owner with a rank lives below it). The value changes only along the path from
a node whose owners or owners' ranks changed up to the root, so
:func:`refresh_upward` recomputes just that path and stops as soon as a node's
value is unchanged: no whole-tree walk, and ownership itself is never copied to
other nodes.

Cost does not grow with a node's fan-out. Besides ``kvflow_min`` each node keeps

- ``kvflow_own_min``: the minimum rank over its own owners (recomputed from
  ``kvflow_owners`` only when they or their ranks change: a scan of that one
  node's owners, not of its siblings), and
- ``kvflow_children``: a :class:`ChildMins` over its children's ``kvflow_min``
  (None until a child first has a value), so one child's change costs
  O(log k) amortized for k children instead of a scan of all k.

so ``kvflow_min == min(kvflow_own_min, kvflow_children.min())``. The root keeps
neither (it is never evicted and its value is never read).

The tree core must tell this module about every change of a node's children:
:func:`init_node` for a new node (it has no value, so its parent's structure is
unchanged), :func:`split` when a node is put between a child and its parent,
and :func:`detach_removed_node` when a leaf is deleted. SGLang's Python core
changes children nowhere else (inserts add nodes without a value; nodes are
never re-parented except by a split).

Each change of a node's ``kvflow_min`` is reported to the tree core's victim heap
(:meth:`kvflow.cache.victims.VictimHeap.rank_changed`), which may have to move the node
earlier. :func:`split` needs not: its new node was entered as a leaf (if it is one) before it
had a value, at a lower priority than it has with one, which the heap allows.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from itertools import count
from typing import Any

from kvflow.cache.victims import VictimHeap
from kvflow.cache.workflow_table import AgentState

_versions = count()


class ChildMins:
    """The minimum of a node's children's values, O(log k) amortized per change.

    A binary heap with lazy invalidation: ``values`` maps each child with a
    value to ``(value, version)``, and the heap holds one live entry per child
    (the one with its current version; versions are unique, so tuples never
    compare the children themselves), keyed at most its value. A value that
    falls is pushed under a new version; one that rises keeps its entry, which
    is moved down to the current value when it reaches the top. Superseded entries are dropped
    when they reach the top, and the heap is rebuilt from ``values`` once they
    outnumber live ones, so its size stays O(live children).
    """

    __slots__ = ("heap", "values")

    def __init__(self) -> None:
        self.values: dict[Any, tuple[Any, int]] = {}
        self.heap: list[tuple[Any, int, Any]] = []

    def set(self, child: Any, value: Any) -> None:
        """Record ``child``'s value (None removes it)."""
        if value is None:
            self.discard(child)
            return
        current = self.values.get(child)
        if current is not None and not value < current[0]:
            self.values[child] = (value, current[1])  # its entry's key stays at most the value
            return
        version = next(_versions)
        self.values[child] = (value, version)
        heapq.heappush(self.heap, (value, version, child))
        self._maybe_compact()

    def discard(self, child: Any) -> None:
        if self.values.pop(child, None) is not None:
            self._maybe_compact()

    def min(self) -> Any:
        """The smallest recorded value, or None."""
        heap, values = self.heap, self.values
        while heap:
            key, version, child = heap[0]
            current = values.get(child)
            if current is None or current[1] != version:
                heapq.heappop(heap)
            elif current[0] == key:
                return key
            else:
                heapq.heapreplace(heap, (current[0], version, child))
        return None

    def _maybe_compact(self) -> None:
        if len(self.heap) > 2 * len(self.values) + 8:
            self.heap = [(value, version, child) for child, (value, version) in self.values.items()]
            heapq.heapify(self.heap)

    def live_entries(self) -> list[tuple[Any, int, Any]]:
        """The heap entries that are current (for the integrity check)."""
        values = self.values
        return [entry for entry in self.heap if values.get(entry[2], (None, None))[1] == entry[1]]


def init_node(node: Any, victims: VictimHeap | None = None) -> None:
    """Give a freshly created tree node its (empty) ownership fields; ``victims`` is told of
    every change of its ``kvflow_min``."""
    node.kvflow_owners = []
    node.kvflow_min = None
    node.kvflow_own_min = None
    node.kvflow_children = None
    node.kvflow_victims = victims


def _merge(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def owners_min(node: Any) -> Any:
    """The minimum rank over ``node``'s own owners (None if none has one)."""
    value = None
    for owner in node.kvflow_owners:
        value = _merge(value, owner.rank)
    return value


def _set_child_value(parent: Any, child: Any, value: Any) -> None:
    structure = parent.kvflow_children
    if structure is None:
        if value is None:
            return
        structure = parent.kvflow_children = ChildMins()
    structure.set(child, value)


def _recompute(node: Any) -> Any | None:
    """Recompute ``node``'s ``kvflow_min`` from its own minimum and children's structure; return
    its parent if that changed the parent's structure (the parent must be recomputed), else None."""
    children = node.kvflow_children
    value = _merge(node.kvflow_own_min, None if children is None else children.min())
    if value == node.kvflow_min:
        return None
    node.kvflow_min = value
    if node.kvflow_victims is not None:
        node.kvflow_victims.rank_changed(node)
    parent = node.parent
    if parent.parent is None:
        return None
    _set_child_value(parent, node, value)
    return parent


def _propagate(node: Any | None) -> None:
    """``node``'s own minimum or children's structure changed: recompute it and its ancestors,
    stopping at the first unchanged value (the root is never refreshed)."""
    while node is not None and node.parent is not None:
        node = _recompute(node)


def refresh_upward(node: Any) -> None:
    """Re-read the ranks of ``node``'s owners and fix ``kvflow_min`` from there toward the root."""
    refresh_many((node,))


def refresh_many(nodes: Iterable[Any]) -> None:
    """:func:`refresh_upward` for each of ``nodes``, each parent's propagation done once.

    A workflow's step re-ranks all of its agents, whose nodes are often siblings (one shared
    prompt above many agents'): each node is recomputed, then each parent whose structure
    changed propagates once, instead of once per child.
    """
    parents: dict[Any, None] = {}
    for node in nodes:
        if node is None or node.parent is None:
            continue
        node.kvflow_own_min = owners_min(node)
        parent = _recompute(node)
        if parent is not None:
            parents[parent] = None
    for parent in parents:
        _propagate(parent)


def assign(agent: AgentState, node: Any) -> None:
    """Make ``agent`` the owner of ``node``, releasing any node it owned before."""
    if agent.node is node:
        return
    release(agent)
    node.kvflow_owners.append(agent)
    agent.node = node
    refresh_upward(node)
    if node.kvflow_victims is not None:
        node.kvflow_victims.owner_assigned(node)


def release(agent: AgentState) -> None:
    """Drop the agent's ownership (its workflow expired or its prompt moved)."""
    node = agent.node
    if node is None:
        return
    node.kvflow_owners.remove(agent)
    agent.node = None
    refresh_upward(node)


def split(new_node: Any, child: Any) -> None:
    """``new_node`` was just put between ``child`` and its old parent (a node split).

    The new node owns nothing and its subtree is the child's, so its value is the
    child's; its parent's structure now holds it in the child's place.
    """
    value = child.kvflow_min
    new_node.kvflow_min = value
    if value is None:
        return
    _set_child_value(new_node, child, value)
    parent = new_node.parent
    if parent.parent is not None:
        parent.kvflow_children.discard(child)
        _set_child_value(parent, new_node, value)


def detach_removed_node(node: Any, parent: Any) -> None:
    """Forget the owners of a node just deleted from the tree, then fix its ancestors."""
    for agent in node.kvflow_owners:
        agent.node = None
    node.kvflow_owners = []
    node.kvflow_own_min = None
    node.kvflow_children = None
    if node.kvflow_min is not None:
        node.kvflow_min = None
        if parent.parent is not None:
            parent.kvflow_children.discard(node)
            _propagate(parent)
