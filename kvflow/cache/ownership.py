"""Agent ownership of radix-tree nodes and the ``next_use`` it gives them.

An agent owns the node where its fixed prompt ends and, while it resumes its contexts
(:mod:`kvflow.cache.contexts`), the node where its latest context ends. Its
``AgentState.next_use`` (``context_next_use`` for the context) is when that KV is next used (an
opaque comparable key; None: unknown), and each node's ``node.kvflow``
(:class:`~kvflow.cache.node_state.NodeState`) caches the minimum over the owners below it.
:class:`Ownership`, one per tree core, keeps those values and tells the tree core's victim heap of
every change. Invariants, for every node but the root (never evicted, never refreshed):

- ``next_use == min(own_next_use, child_mins.min())``, None when no owner below has one;
- ``own_next_use`` is the minimum over the node's own owners, ``child_mins`` (a :class:`ChildMins`,
  None until a child first has a value) holds exactly the children with a ``next_use``, at it;
- a change is propagated from the node up the path to the root and stops at the first unchanged
  value, at O(log k) amortized per node of k children: no whole-tree walk, no sibling scan;
- ``agent.node`` and the node's ``owners`` point at each other, ``agent.context`` and its
  ``contexts`` too; an agent owns at most one node of each kind.

The tree core reports every change of a node's children: :meth:`Ownership.init_node` for a new
node (no value, so its parent is unchanged), :meth:`Ownership.split` when a node is put between a
child and its parent, :meth:`Ownership.detach_removed_node` when a leaf is deleted.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvflow.cache.lazy_heap import check_heap_order, needs_compaction, next_version
from kvflow.cache.node_state import NodeState
from kvflow.cache.victims import VictimHeap
from kvflow.cache.workflow_table import AgentState


class ChildMins:
    """The minimum of a node's children's values, O(log k) amortized per change.

    A lazy-deletion heap (:mod:`kvflow.cache.lazy_heap`): ``values`` maps each child with a value
    to ``(value, version)``, and the heap holds each child's current entry keyed at most its
    value. A value that falls is pushed under a new version; one that rises keeps its entry, which
    is moved down to the current value when it reaches the top.
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
        version = next_version()
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
        if needs_compaction(len(self.heap), len(self.values)):
            self.heap = [(value, version, child) for child, (value, version) in self.values.items()]
            heapq.heapify(self.heap)

    def check(self, what: str) -> None:
        """Assert the invariant: one current entry per child, keyed at most its value, the heap
        ordered and compacted (``what`` names the structure in the message)."""
        values = self.values
        live = [entry for entry in self.heap if values.get(entry[2], (None, None))[1] == entry[1]]
        assert len(live) == len(values), f"{what}: {len(live)} live heap entries for {len(values)} children"
        for key, _version, child in live:
            assert not values[child][0] < key, f"{what}: a child's heap key {key} is above its value"
        check_heap_order(self.heap, what)
        assert not needs_compaction(len(self.heap), len(values)), (
            f"{what}: {len(self.heap)} heap entries for {len(values)} children"
        )


# Why an agent stopped owning its context: its latest prompt did not resume it (or the context
# would not reach past its fixed prompt), its request said ``keep_context`` false, its workflow
# was forgotten, or its end was evicted with nothing past the fixed prompt left.
RELEASE_REASONS = ("not_resumed", "last_turn", "forgotten", "evicted")


@dataclass
class ContextTotals:
    """The contexts agents of one tree own now, and counts of how they stopped being owned."""

    agents: int = 0  # agents owning a context
    tokens: int = 0  # their ``context_tokens``, summed (a shared prefix counts once per agent)
    shrunk: int = 0  # contexts whose end was evicted and that kept what was left
    released: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELEASE_REASONS, 0))

    def add(self, tokens: int, sign: int) -> None:
        self.agents += sign
        self.tokens += sign * tokens


def _merge(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def owners_next_use(state: NodeState) -> Any:
    """The minimum next use over a node's own owners, fixed prompts and contexts (None if none has one)."""
    value = None
    for owner in state.owners:
        value = _merge(value, owner.next_use)
    for owner in state.contexts:
        value = _merge(value, owner.context_next_use)
    return value


def _set_child_value(parent: NodeState, child: Any, value: Any) -> None:
    structure = parent.child_mins
    if structure is None:
        if value is None:
            return
        structure = parent.child_mins = ChildMins()
    structure.set(child, value)


class Ownership:
    """Which agent owns which node of one tree, and every node's ``next_use`` kept exact.

    ``victims`` is the tree core's :class:`~kvflow.cache.victims.VictimHeap` (None where it keeps
    none), told of every change of a node's ``next_use``: it may have to move the node earlier.
    A split needs not tell it: its new node entered as a leaf (if it is one) before it had a value,
    at a lower priority than it has with one, which the heap allows.
    """

    __slots__ = ("context_totals", "victims")

    def __init__(self, victims: VictimHeap | None = None) -> None:
        self.victims = victims
        self.context_totals = ContextTotals()

    @staticmethod
    def init_node(node: Any) -> None:
        """Give a freshly created tree node its (empty) state."""
        node.kvflow = NodeState()

    def _recompute(self, node: Any) -> Any | None:
        """Recompute ``node``'s ``next_use`` from its own minimum and children's structure; return
        its parent if that changed the parent's structure (the parent must be recomputed), else None."""
        state = node.kvflow
        children = state.child_mins
        value = _merge(state.own_next_use, None if children is None else children.min())
        if value == state.next_use:
            return None
        state.next_use = value
        if self.victims is not None:
            self.victims.next_use_changed(node)
        parent = node.parent
        if parent.parent is None:
            return None
        _set_child_value(parent.kvflow, node, value)
        return parent

    def _propagate(self, node: Any | None) -> None:
        """``node``'s own minimum or children's structure changed: recompute it and its ancestors,
        stopping at the first unchanged value (the root is never refreshed)."""
        while node is not None and node.parent is not None:
            node = self._recompute(node)

    def refresh_upward(self, node: Any) -> None:
        """Re-read the ``next_use`` of ``node``'s owners and fix the values from there to the root."""
        self.refresh_many((node,))

    def refresh_many(self, nodes: Iterable[Any]) -> None:
        """:meth:`refresh_upward` for each of ``nodes``, each parent's propagation done once.

        A workflow's step moves all of its agents, whose nodes are often siblings (one shared
        prompt above many agents'): each node is recomputed, then each parent whose structure
        changed propagates once, instead of once per child.
        """
        parents: dict[Any, None] = {}
        for node in nodes:
            if node is None or node.parent is None:
                continue
            node.kvflow.own_next_use = owners_next_use(node.kvflow)
            parent = self._recompute(node)
            if parent is not None:
                parents[parent] = None
        for parent in parents:
            self._propagate(parent)

    def assign(self, agent: AgentState, node: Any) -> None:
        """Make ``agent`` the owner of ``node`` (its fixed prompt), releasing any node it owned before."""
        self._attach(agent, node, "node", "owners")

    def release(self, agent: AgentState) -> None:
        """Drop the agent's ownership of its fixed prompt (its workflow expired or its prompt moved)."""
        self._detach(agent, "node", "owners")

    def assign_context(self, agent: AgentState, node: Any, tokens: int) -> None:
        """Make ``node``, ``tokens`` from the root, the end of ``agent``'s context, releasing the
        context it owned before."""
        if agent.context is not None:
            self.context_totals.add(agent.context_tokens, -1)
        self.context_totals.add(tokens, 1)
        agent.context_tokens = tokens
        self._attach(agent, node, "context", "contexts")

    def release_context(self, agent: AgentState, reason: str) -> None:
        """Drop the agent's ownership of its context, counted under ``reason`` (``RELEASE_REASONS``)."""
        if agent.context is not None:
            self.context_totals.add(agent.context_tokens, -1)
            self.context_totals.released[reason] += 1
        self._detach(agent, "context", "contexts")

    def _attach(self, agent: AgentState, node: Any, slot: str, owners: str) -> None:
        if getattr(agent, slot) is node:
            return
        self._detach(agent, slot, owners)
        getattr(node.kvflow, owners).append(agent)
        setattr(agent, slot, node)
        self.refresh_upward(node)
        if self.victims is not None:
            self.victims.owner_assigned(node)

    def _detach(self, agent: AgentState, slot: str, owners: str) -> None:
        node = getattr(agent, slot)
        if node is None:
            return
        getattr(node.kvflow, owners).remove(agent)
        setattr(agent, slot, None)
        self.refresh_upward(node)

    @staticmethod
    def split(new_node: Any, child: Any) -> None:
        """``new_node`` was just put between ``child`` and its old parent (a node split).

        The new node owns nothing and its subtree is the child's, so its value is the
        child's; its parent's structure now holds it in the child's place.
        """
        value = child.kvflow.next_use
        new_state = new_node.kvflow
        new_state.next_use = value
        if value is None:
            return
        _set_child_value(new_state, child, value)
        parent = new_node.parent
        if parent.parent is not None:
            parent.kvflow.child_mins.discard(child)
            _set_child_value(parent.kvflow, new_node, value)

    def detach_removed_node(self, node: Any, parent: Any) -> None:
        """Forget the owners of a node just deleted from the tree, then fix its ancestors.

        A context whose end was evicted shrinks to ``parent`` while that still ends past the
        agent's fixed prompt: what is left of it is still the agent's to resume (a prefix hit).
        """
        state = node.kvflow
        for agent in state.owners:
            agent.node = None
        shrunk = state.contexts
        for agent in shrunk:
            agent.context = None
        state.owners, state.contexts = [], []
        state.own_next_use = None
        state.child_mins = None
        if state.next_use is not None:
            state.next_use = None
            if parent.parent is not None:
                parent.kvflow.child_mins.discard(node)
                self._propagate(parent)
        totals = self.context_totals
        for agent in shrunk:
            totals.add(agent.context_tokens, -1)
            agent.context_tokens -= len(node.key)
            if parent.parent is not None and agent.context_tokens > (agent.fixed_prefix_len or 0):
                self.assign_context(agent, parent, agent.context_tokens)
                totals.shrunk += 1
            else:
                totals.released["evicted"] += 1
