"""SGLang's Python radix-tree core, extended to keep workflow ownership consistent.

Registered as the tree-core backend ``kvflow`` (SGLang's tree-core registry). It adds only what
the tree itself must do, through its :class:`~kvflow.cache.ownership.Ownership` (``ownership``):

- every node it creates carries ``node.kvflow`` (:class:`~kvflow.cache.node_state.NodeState`),
  un-owned, the one kvflow attribute on SGLang's nodes;
- a split leaves the owners on the node that keeps the boundary (the new parent inherits only the
  subtree's ``next_use``), and a deleted node releases its owners and leaves its parent's
  per-child structure: the only places SGLang's Python core changes a node's children or parent
  (``_add_new_node`` and ``insert_host`` add nodes with no value, which changes no structure);
- evictions are counted by class (owned or not);
- where the eviction order allows it, its evictable device leaves are kept in one
  :class:`~kvflow.cache.victims.VictimHeap` across evictions (``ownership.victims``, else None),
  which the cache's Full component pops victims from.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.tree_core_registry import (
    get_tree_core_factory,
    register_tree_core_backend,
)
from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore

from kvflow import NAME
from kvflow.cache.eviction import WorkflowAwareStrategy
from kvflow.cache.ownership import Ownership
from kvflow.cache.victims import VictimHeap

TREE_CORE_NAME = NAME


class WorkflowTreeCore(UnifiedTreeCore):
    """``UnifiedTreeCore`` with ownership bookkeeping on every node (``node.kvflow``)."""

    def reset(self) -> None:
        self.kvflow_evictions = {
            tier: {"unowned": {"nodes": 0, "tokens": 0}, "owned": {"nodes": 0, "tokens": 0}}
            for tier in ("device", "host")
        }
        # Before the root is made, which it initializes.
        self.ownership = Ownership(self._victim_heap())
        super().reset()
        if self.ownership.victims is not None:
            self.evictable_device_leaves = self.ownership.victims.leaves

    def _victim_heap(self) -> VictimHeap | None:
        strategy = self.eviction_strategy
        if not isinstance(strategy, WorkflowAwareStrategy) or not strategy.incremental:
            return None
        if self.enable_session_radix_cache:  # the Full component's priority reads session references
            return None
        return VictimHeap(strategy.get_priority)

    def _new_node(self, priority: int = 0):
        node = super()._new_node(priority)
        self.ownership.init_node(node)
        return node

    def _split_node(self, key: RadixKey, child: Any, split_len: int):
        new_node, action = super()._split_node(key, child, split_len)
        # The child keeps its boundary and owners; the new parent's subtree is the child's.
        self.ownership.split(new_node, child)
        return new_node, action

    def _remove_leaf_from_parent(self, node: Any) -> None:
        parent = node.parent
        super()._remove_leaf_from_parent(node)
        self.ownership.detach_removed_node(node, parent)

    def _count_eviction(self, tier: str, owned: bool, tokens: int) -> None:
        counter = self.kvflow_evictions[tier]["owned" if owned else "unowned"]
        counter["nodes"] += 1
        counter["tokens"] += tokens

    def evict_device_leaf(self, node_id, is_write_back: bool):
        node = self.node_by_id(node_id)
        owned, tokens = node.kvflow.next_use is not None, len(node.key)
        result = super().evict_device_leaf(node_id, is_write_back)
        if result.backup_kv is None:  # evicted now, not deferred to a write-back
            self._count_eviction("device", owned, tokens)
        return result

    def _evict_host_leaf(self, node, *args, **kwargs):
        self._count_eviction("host", node.kvflow.next_use is not None, len(node.key))
        return super()._evict_host_leaf(node, *args, **kwargs)

    def find_boundary_node(self, key: RadixKey) -> tuple[Any | None, list]:
        """The node ending exactly at ``len(key)`` along ``key``, splitting one if needed.

        Returns ``(None, [])`` when the path is not (device- or host-) resident
        up to that depth. The actions are the split's, for the cache to apply.
        """
        node, offset, depth = self.root_node, 0, len(key)
        while offset < depth:
            child = node.children.get(key.child_key_at(offset, self.page_size))
            if child is None or (child.evicted and not child.backuped):
                return None, []
            matched = child.key.match_at(key, offset, page_size=self.page_size)
            if matched < len(child.key):
                if offset + matched < depth:
                    return None, []
                split, action = self._split_node(child.key, child, matched)
                return split, [action] if action is not None else []
            node, offset = child, offset + matched
        return (node if node is not self.root_node else None), []


def register_tree_core() -> None:
    """Register :class:`WorkflowTreeCore` under :data:`TREE_CORE_NAME` (idempotent)."""
    if get_tree_core_factory(TREE_CORE_NAME) is None:
        register_tree_core_backend(TREE_CORE_NAME, WorkflowTreeCore)
