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


def _path_tokens(node: Any) -> int:
    tokens = 0
    while node.parent is not None:
        tokens += len(node.key)
        node = node.parent
    return tokens


def _name(agent: AgentState) -> str:
    return f"agent {agent.workflow_id}/{agent.agent_id}"


def _owner_next_uses(state: Any) -> list[Any]:
    values = [owner.next_use for owner in state.owners] + [owner.context_next_use for owner in state.contexts]
    return [value for value in values if value is not None]


def _expected_next_use(node: Any) -> Any:
    # From the owners and the children's cached values directly, never through the per-child
    # structure (so a broken structure is caught); every node is checked, so the children's
    # values are verified too.
    values = _owner_next_uses(node.kvflow)
    values += [child.kvflow.next_use for child in node.children.values() if child.kvflow.next_use is not None]
    return min(values, default=None)


def _check_child_structure(node: Any) -> None:
    """``own_next_use`` and the :class:`~kvflow.cache.ownership.ChildMins` agree with the tree."""
    state = node.kvflow
    own = min(_owner_next_uses(state), default=None)
    assert state.own_next_use == own, (
        f"node {node.id}: own_next_use {state.own_next_use} != its owners' minimum {own}"
    )
    valued = {id(child): child for child in node.children.values() if child.kvflow.next_use is not None}
    structure = state.child_mins
    if structure is None:
        assert not valued, f"node {node.id}: children with a value but no per-child structure"
        return
    recorded = structure.values
    assert {id(child) for child in recorded} == set(valued), (
        f"node {node.id}: per-child structure holds children "
        f"{sorted(child.id for child in recorded)}, expected {sorted(c.id for c in valued.values())}"
    )
    for child, (value, _version) in recorded.items():
        assert value == child.kvflow.next_use, (
            f"node {node.id}: per-child structure has {value} for child {child.id}, "
            f"whose next_use is {child.kvflow.next_use}"
        )
    structure.check(f"node {node.id}'s per-child structure")


def check_integrity(cache: WorkflowRadixCache) -> None:
    """Check SGLang's own invariants and kvflow's ownership bookkeeping.

    SGLang's side: :func:`check_pool_accounting`, then the cache's
    ``sanity_check()`` (tree links, evictable-leaf sets, LRU lists, recomputed
    evictable/protected sizes). The scheduler runs that check only when idle,
    but it holds with locks taken too (locked tokens count as protected); it
    skips itself while a streaming session holds KV.

    kvflow's side (``node.kvflow``, see :mod:`kvflow.cache.ownership`): each
    node's cached ``next_use`` is the minimum ``AgentState.next_use`` over the
    owners in its subtree (None if none has one; the root, never evicted, is
    never refreshed, owns nothing and keeps no per-child structure), recomputed
    from the owners and children directly; each node's ``own_next_use`` and
    per-child structure (exactly the children with a value, at their values)
    agree with the tree; owners and ``agent.node`` point at each other, context
    owners and ``agent.context`` too; no agent owns two fixed-prompt nodes or two
    contexts; each context's ``context_tokens`` is its path's length, and the
    ownership's ``context_totals`` count them; every owner is an agent the
    workflow table still tracks, and every tracked agent's node and context are
    in the tree. Each lazy-deletion
    heap checks its own invariant: the per-child structures
    (:meth:`~kvflow.cache.ownership.ChildMins.check`), the victim heap where the
    tree core keeps one (:meth:`~kvflow.cache.victims.VictimHeap.check`) and the
    workflow table's review heap (:meth:`~kvflow.cache.workflow_table.WorkflowTable.check`).
    """
    check_pool_accounting(cache)
    cache.sanity_check()
    check_ownership(cache)


def check_ownership(cache: WorkflowRadixCache) -> None:
    """kvflow's own bookkeeping alone (see :func:`check_integrity`); what the server checks when idle."""
    tree = cache.tree_core
    root = tree.root_node
    assert not root.kvflow.owners, f"the root has owners: {[_name(a) for a in root.kvflow.owners]}"
    assert not root.kvflow.contexts, f"the root is a context: {[_name(a) for a in root.kvflow.contexts]}"
    assert root.kvflow.child_mins is None, "the root keeps a per-child structure"
    nodes = _tree_nodes(root)
    owners: list[Any] = []
    contexts: list[Any] = []
    for node in nodes:
        for owner in node.kvflow.owners:
            assert owner.node is node, (
                f"{_name(owner)} is listed on node {node.id} but points at another node"
            )
        for owner in node.kvflow.contexts:
            assert owner.context is node, (
                f"{_name(owner)}'s context is listed on node {node.id} but points at another node"
            )
        owners += node.kvflow.owners
        contexts += node.kvflow.contexts
        if node is not root:
            expected = _expected_next_use(node)
            assert node.kvflow.next_use == expected, (
                f"node {node.id}: next_use {node.kvflow.next_use} != recomputed {expected}"
            )
            _check_child_structure(node)
    assert len({id(owner) for owner in owners}) == len(owners), "an agent owns two nodes (or one twice)"
    assert len({id(owner) for owner in contexts}) == len(contexts), (
        "an agent owns two contexts (or one twice)"
    )
    totals = tree.ownership.context_totals
    tokens = sum(agent.context_tokens for agent in contexts)
    assert (totals.agents, totals.tokens) == (len(contexts), tokens), (
        f"context totals {totals.agents} agents, {totals.tokens} tokens; "
        f"the tree holds {len(contexts)} contexts of {tokens} tokens"
    )
    for agent in contexts:
        path = _path_tokens(agent.context)
        assert agent.context_tokens == path, (
            f"{_name(agent)}'s context_tokens {agent.context_tokens} != its path's {path} tokens"
        )
    if tree.ownership.victims is not None:
        tree.ownership.victims.check(tree.evictable_device_leaves)
    cache.kvflow.workflows.check()

    in_tree = {id(node) for node in nodes}
    tracked = [agent for workflow in cache.kvflow.workflows.workflows() for agent in workflow.agents.values()]
    assert {id(owner) for owner in owners + contexts} <= {id(agent) for agent in tracked}, (
        "a node is owned by an agent the workflow table no longer tracks"
    )
    for agent in tracked:
        if agent.node is not None:
            assert agent in agent.node.kvflow.owners, f"{_name(agent)} points at a node that does not list it"
            assert id(agent.node) in in_tree, f"{_name(agent)} owns a node removed from the tree"
        if agent.context is not None:
            assert agent in agent.context.kvflow.contexts, (
                f"{_name(agent)}'s context points at a node that does not list it"
            )
            assert id(agent.context) in in_tree, f"{_name(agent)}'s context was removed from the tree"
