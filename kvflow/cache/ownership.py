"""Agent ownership of radix-tree nodes and the priority it gives them.

An agent owns the node where its fixed prompt ends. Each node caches
``kvflow_min``: the minimum rank (steps-to-execution, see ``AgentState.rank``) over the owners in its subtree
(None when no owner with a known value lives below it). The value changes only
along the path from a node whose owners or owners' steps changed up to the
root, so :func:`refresh_upward` recomputes just that path and stops as soon as
a node's value is unchanged: no whole-tree walk, and ownership itself is never
copied to other nodes.
"""

from __future__ import annotations

from typing import Any

from kvflow.cache.workflow_table import AgentState


def init_node(node: Any) -> None:
    """Give a freshly created tree node its (empty) ownership fields."""
    node.kvflow_owners = []
    node.kvflow_min = None


def _merge(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _subtree_min(node: Any) -> int | None:
    value = None
    for owner in node.kvflow_owners:
        value = _merge(value, owner.rank)
    for child in node.children.values():
        value = _merge(value, child.kvflow_min)
    return value


def refresh_upward(node: Any) -> None:
    """Recompute ``kvflow_min`` from ``node`` toward the root (the root itself is never evicted)."""
    while node is not None and node.parent is not None:
        value = _subtree_min(node)
        if value == node.kvflow_min:
            return
        node.kvflow_min = value
        node = node.parent


def assign(agent: AgentState, node: Any) -> None:
    """Make ``agent`` the owner of ``node``, releasing any node it owned before."""
    if agent.node is node:
        return
    release(agent)
    node.kvflow_owners.append(agent)
    agent.node = node
    refresh_upward(node)


def release(agent: AgentState) -> None:
    """Drop the agent's ownership (its workflow expired or its prompt moved)."""
    node = agent.node
    if node is None:
        return
    node.kvflow_owners.remove(agent)
    agent.node = None
    refresh_upward(node)


def detach_removed_node(node: Any, parent: Any) -> None:
    """Forget the owners of a node just deleted from the tree, then fix its ancestors."""
    for agent in node.kvflow_owners:
        agent.node = None
    node.kvflow_owners = []
    if node.kvflow_min is not None:
        node.kvflow_min = None
        refresh_upward(parent)
