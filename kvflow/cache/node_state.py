"""kvflow's state on one SGLang radix-tree node: ``node.kvflow``, a :class:`NodeState`.

SGLang's tree node has no field for a cache's own per-node data, so the kvflow tree core sets
this one attribute on every node it creates (``WorkflowTreeCore._new_node``); nodes of any other
tree core have none, and the eviction order then treats them as un-owned. What the fields mean
and how they are kept is :mod:`kvflow.cache.ownership`'s (owners, ``next_use``) and
:mod:`kvflow.cache.victims`'s (the victim heap entry):

- ``next_use`` is the minimum over the owners in the node's subtree, of ``AgentState.next_use``
  for a fixed prompt ending there and ``AgentState.context_next_use`` for a context (None if
  none has one), and equals ``min(own_next_use, child_mins.min())``;
- ``victim_key`` / ``victim_version`` are the key and version of the node's current victim heap
  entry (meaningful only while it is an evictable device leaf).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvflow.cache.ownership import ChildMins
    from kvflow.cache.workflow_table import AgentState


class NodeState:
    """What kvflow keeps on one tree node."""

    __slots__ = (
        "child_mins",
        "contexts",
        "next_use",
        "own_next_use",
        "owners",
        "victim_key",
        "victim_version",
    )

    def __init__(self) -> None:
        self.owners: list[AgentState] = []  # the agents whose fixed prompt ends here
        self.contexts: list[AgentState] = []  # the agents whose latest context ends here
        self.next_use: Any = None  # minimum next use over the owners in its subtree
        self.own_next_use: Any = None  # minimum next use over ``owners`` and ``contexts``
        self.child_mins: ChildMins | None = None  # its children's ``next_use`` (None until one has one)
        self.victim_key: Any = None
        self.victim_version: int = -1
