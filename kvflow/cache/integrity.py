"""Invariant checks for a :class:`~kvflow.cache.WorkflowRadixCache`, for tests and offline drivers.

Each check raises ``AssertionError`` naming the first violation it finds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    from kvflow.cache.radix_cache import WorkflowRadixCache
    from kvflow.cache.workflow_table import AgentState


def check_pool_accounting(cache: UnifiedRadixCache) -> None:
    """Every KV slot is free, cached-evictable or cached-protected, exactly once.

    The paged allocator hands out whole pages, ``size // page_size`` of them
    (its padding page 0 is not among them), and ``available_size()`` counts
    free pages in tokens; the tree holds only whole pages, so the sum is exact.
    """
    allocator = cache.token_to_kv_pool_allocator
    capacity = allocator.size // allocator.page_size * allocator.page_size
    available, evictable, protected = (
        allocator.available_size(),
        cache.evictable_size(),
        cache.protected_size(),
    )
    assert available + evictable + protected == capacity, (
        f"pool accounting drifted: available {available} + evictable {evictable} "
        f"+ protected {protected} != capacity {capacity}"
    )


def _tree_nodes(root: Any) -> list[Any]:
    nodes, stack = [], [root]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes


def _name(agent: AgentState) -> str:
    return f"agent {agent.workflow_id}/{agent.agent_id}"


def _expected_min(node: Any) -> int | None:
    # From the children's cached values: every node is checked, so those are verified too.
    ranks = [owner.rank for owner in node.kvflow_owners if owner.rank is not None]
    ranks += [child.kvflow_min for child in node.children.values() if child.kvflow_min is not None]
    return min(ranks, default=None)


def check_integrity(cache: WorkflowRadixCache) -> None:
    """Check SGLang's own invariants and kvflow's ownership bookkeeping.

    SGLang's side: :func:`check_pool_accounting`, then the cache's
    ``sanity_check()`` (tree links, evictable-leaf sets, LRU lists, recomputed
    evictable/protected sizes). The scheduler runs that check only when idle,
    but it holds with locks taken too (locked tokens count as protected); it
    skips itself while a streaming session holds KV.

    kvflow's side: each node's cached ``kvflow_min`` is the minimum
    ``AgentState.rank`` over the owners in its subtree (None if none has one;
    the root, never evicted, is never refreshed and owns nothing); owners and
    ``agent.node`` point at each other; no agent owns two nodes; every owner is
    an agent the workflow table still tracks, and every tracked agent's node is
    in the tree.
    """
    check_pool_accounting(cache)
    cache.sanity_check()
    check_ownership(cache)


def check_ownership(cache: WorkflowRadixCache) -> None:
    """kvflow's own bookkeeping alone (see :func:`check_integrity`); what the server checks when idle."""
    root = cache.tree_core.root_node
    assert not root.kvflow_owners, f"the root has owners: {[_name(a) for a in root.kvflow_owners]}"
    nodes = _tree_nodes(root)
    owners: list[Any] = []
    for node in nodes:
        for owner in node.kvflow_owners:
            assert owner.node is node, (
                f"{_name(owner)} is listed on node {node.id} but points at another node"
            )
        owners += node.kvflow_owners
        if node is not root:
            expected = _expected_min(node)
            assert node.kvflow_min == expected, (
                f"node {node.id}: kvflow_min {node.kvflow_min} != recomputed {expected}"
            )
    assert len({id(owner) for owner in owners}) == len(owners), "an agent owns two nodes (or one twice)"

    in_tree = {id(node) for node in nodes}
    tracked = [agent for workflow in cache.workflows.workflows() for agent in workflow.agents.values()]
    assert {id(owner) for owner in owners} <= {id(agent) for agent in tracked}, (
        "a node is owned by an agent the workflow table no longer tracks"
    )
    for agent in tracked:
        if agent.node is not None:
            assert agent in agent.node.kvflow_owners, f"{_name(agent)} points at a node that does not list it"
            assert id(agent.node) in in_tree, f"{_name(agent)} owns a node removed from the tree"
