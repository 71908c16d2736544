"""Overlapped prefetch: load the fixed prompts of the agents due next from host to device.

Runs on the scheduler thread once per iteration (from the cache's
``check_hicache_events``). For every agent whose steps-to-execution is between
1 and ``steps_limit`` and whose fixed prompt is backed up on the host but not
on the device, nearest first (by ``AgentState.next_use``: when it is expected to
run), it issues SGLang's own ``load_back`` for that path, bounded by SGLang's
free load slots and ``max_tokens`` in flight. A load is issued only if it will
survive until use: room comes only from nodes needed later than the prompt
(un-owned nodes and owned nodes next used strictly later; eviction order takes
those first, so evicting exactly the tokens they hold never reaches a nearer
agent), and that room must also cover what the running requests may still
decode and the waiting ones will prefill and decode (``reserved_tokens``), and
what the requests of the due agents will allocate when they come (each one's
``request_tokens``, however near: expected times of workflows that advance
alike nearly tie, so any of them may come first), plus the prompt of a nearer
one not on the device (it will be loaded on demand first); otherwise the prompt
waits. Until a load is
acknowledged its nodes are *pending*: the scheduler holds back every waiting
request whose prompt runs through them (``blocks``), so no batch reads KV
before it landed and no second load is issued; once acknowledged the request
is matched again and uses the loaded KV.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.utils.rank_consensus_checker import rank_consensus

from kvflow.cache.workflow_table import AgentState


@dataclass
class PrefetchRecord:
    agent: AgentState
    node: Any
    path: list[Any]  # the device-evicted nodes this load brings back
    tokens: int
    done: bool = False
    used: bool = False


@dataclass
class PrefetchCounters:
    issued: int = 0
    completed: int = 0
    timely: int = 0
    late: int = 0
    held: int = 0  # requests held back by ``blocks`` (each counted once)
    wasted: int = 0
    dropped_stale: int = 0
    skipped_no_room: int = 0  # due prompts that had to wait for room (each counted once while due)
    tokens_loaded: int = 0


@dataclass
class Prefetcher:
    """Decides and issues prefetches for one ``WorkflowRadixCache``."""

    cache: Any
    steps_limit: int = 1
    max_tokens: int = 65536
    records: dict[int, PrefetchRecord] = field(default_factory=dict)  # by agent id()
    counters: PrefetchCounters = field(default_factory=PrefetchCounters)
    # Agents whose steps were last set within [1, steps_limit], by id(): the only ones worth a
    # look each iteration (thousands of workflows would make a scan of every agent cost ms).
    due: dict[int, AgentState] = field(default_factory=dict)
    # Tokens the running and waiting requests will still take (set each scheduling pass by the hook,
    # patches/prefetch_hold.py): room a prefetch must leave them, or its prompt is evicted again.
    reserved_tokens: float = 0.0
    # Due agents found without room, by id(): counted once until issued or no longer due.
    waiting: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        workflows = self.cache.kvflow.workflows.workflows()
        self.watch(agent for workflow in workflows for agent in workflow.agents.values())

    def watch(self, agents: Iterable[AgentState]) -> None:
        """Note agents whose steps just changed (the cache calls this for every change)."""
        for agent in agents:
            if self._is_due(agent):
                self.due[id(agent)] = agent

    def forget_loads(self) -> None:
        """The tree was reset: no load is in flight, and every due agent is looked at again."""
        self.records.clear()
        self.waiting.clear()

    def _is_due(self, agent: AgentState) -> bool:
        return agent.steps is not None and 1 <= agent.steps <= self.steps_limit

    # ---- scheduler iteration ---------------------------------------------

    def step(self) -> None:
        """Reap finished loads, then issue new ones."""
        self._reap()
        self._issue()

    @property
    def loading(self) -> bool:
        """Whether any issued load is not acknowledged yet."""
        return any(not r.done for r in self.records.values())

    def _pending_tokens(self) -> int:
        return sum(r.tokens for r in self.records.values() if not r.done)

    def _reap(self) -> None:
        ongoing = self.cache.ongoing_load_back
        for key, record in list(self.records.items()):
            if not record.done and record.node.id not in ongoing:
                record.done = True
                self.counters.completed += 1
                self.counters.tokens_loaded += record.tokens
            elif (
                record.done
                and not record.used
                and (record.node.evicted or record.agent.node is not record.node)
            ):
                # Evicted (demoted, or deleted from the tree and so released by its owner) before use.
                self.counters.wasted += 1
                del self.records[key]
            elif record.done and (record.agent.steps is None or record.agent.steps > self.steps_limit):
                # Loaded, then the workflow moved on: nothing to undo, the node is evicted as usual.
                self.counters.dropped_stale += 1
                del self.records[key]

    def _due_nearest_first(self) -> list[AgentState]:
        """The due agents, nearest first; none if no prompt of theirs could be loaded now."""
        for key, agent in list(self.due.items()):
            if not self._is_due(agent):  # moved on, or its workflow was forgotten (steps None)
                del self.due[key]
                self.waiting.discard(key)
        if not any(self._loadable(agent) for agent in self.due.values()):
            return []
        return sorted(self.due.values(), key=lambda a: a.next_use)

    def _loadable(self, agent: AgentState) -> bool:
        """Due, its prompt on the host only, and no load of it issued yet."""
        node = agent.node
        return (
            self._is_due(agent)
            and node is not None
            and node.evicted
            and node.backuped
            and id(agent) not in self.records
        )

    def _issue(self) -> None:
        # Agents come nearest first, and a farther one may take room only from KV next used later
        # still and after all the nearer ones need, so what did not fit for one does not fit for
        # any later one this pass.
        too_big = math.inf
        due = self._due_nearest_first()
        ahead = sum(agent.request_tokens or 0.0 for agent in due)  # what their requests will allocate
        for agent in due:
            if id(agent) in self.records:
                continue  # loading or loaded: its request will find the prompt on the device
            tokens = _off_device_tokens(agent)
            # Making room for an earlier agent evicts, and an eviction may expire workflows.
            if self._loadable(agent):
                if not self.cache.has_free_load_back_slot():
                    return
                path = _evicted_path(agent.node)  # before making room, which may reach it
                if self._pending_tokens() + tokens > self.max_tokens:
                    pass  # over the in-flight bound: it waits, not counted as lacking room
                elif tokens >= too_big or not self._make_room(tokens, agent.next_use, ahead):
                    too_big = min(tokens, too_big)
                    self._note_waiting(agent)
                elif self._issue_load(agent, path, tokens):
                    continue
            ahead += tokens  # not issued: its request loads the prompt on demand before farther ones

    def _note_waiting(self, agent: AgentState) -> None:
        """The agent's prompt found no room: counted once while it stays due."""
        if id(agent) not in self.waiting:
            self.waiting.add(id(agent))
            self.counters.skipped_no_room += 1

    def _issue_load(self, agent: AgentState, path: list[Any], tokens: int) -> bool:
        """Load ``path`` for the agent, unless the room just made reached it (TTL expiry, ancestors)."""
        if not self._loadable(agent) or _evicted_path(agent.node) != path or not self._load(agent):
            return False
        self.records[id(agent)] = PrefetchRecord(agent, agent.node, path, tokens)
        self.waiting.discard(id(agent))
        self.counters.issued += 1
        return True

    @rank_consensus(same_params=["agent.workflow_id", "agent.agent_id", "agent.node.id"], same_results=True)
    def _load(self, agent: AgentState) -> bool:
        """Start loading the agent's prompt from the host (every tensor-parallel rank alike)."""
        if not self.cache.load_back(agent.node.id):
            return False
        self.cache.ready_to_load_host_cache()
        return True

    def _make_room(self, tokens: int, next_use: Any, ahead: float = 0.0) -> bool:
        """Free ``tokens`` for a prompt next used at ``next_use``, if that room outlasts the requests due.

        Room counts free slots and device KV next used later than ``next_use`` (eviction takes that
        first), and must cover the prompt plus ``reserved_tokens`` (what the running and waiting
        requests will still take) plus ``ahead`` (what the requests of the due agents will
        allocate): otherwise they would evict the loaded prompt again before its request comes.
        Only the prompt's own shortfall is evicted now; they take theirs when due.
        """
        allocator = self.cache.token_to_kv_pool_allocator
        available = allocator.available_size()
        needed = tokens + self.reserved_tokens + ahead - available
        if needed > 0 and _evictable_farther_than(self.cache.tree_core.root_node, next_use, needed) < needed:
            return False
        if available < tokens:
            self.cache.evict(EvictParams(num_tokens=tokens - available))
        return allocator.available_size() >= tokens

    # ---- request admission -----------------------------------------------

    def on_admit(self, agent: AgentState, held: bool = False) -> None:
        """The agent's request is matched: its prefetch was timely, or late if the request waited for it.

        A request held back while the load was in flight (``held``) is matched only once it is done.
        """
        record = self.records.get(id(agent))
        if record is None or record.used:
            return
        record.used = True
        if record.done and not held:
            self.counters.timely += 1
        else:
            self.counters.late += 1
        if record.done:
            del self.records[id(agent)]

    def blocks(self, key: RadixKey) -> bool:
        """Whether a waiting prompt runs through a node whose load is not acknowledged yet."""
        pending = {id(node) for r in self.records.values() if not r.done for node in r.path}
        if not pending:
            return False
        tree = self.cache.tree_core
        node, offset = tree.root_node, 0
        while offset + tree.page_size <= len(key):
            child = node.children.get(key.child_key_at(offset, tree.page_size))
            if child is None:
                return False
            if id(child) in pending:
                return True
            offset += len(child.key)
            node = child
        return False


def _evicted_path(node: Any) -> list[Any]:
    """The device-evicted nodes from ``node`` up to the first device-resident ancestor."""
    path = []
    while node is not None and node.parent is not None and node.evicted:
        path.append(node)
        node = node.parent
    return path


def _off_device_tokens(agent: AgentState) -> int:
    """The tokens of the agent's fixed prompt that are not on the device (all of it if untracked)."""
    if agent.node is None:
        return agent.fixed_prefix_len or 0
    return sum(len(node.key) for node in _evicted_path(agent.node))


def _evictable_farther_than(root: Any, next_use: Any, needed: float = math.inf) -> int:
    """Device tokens eviction may take before touching any owner next used at or before ``next_use``.

    Qualifying nodes (no owner below, or every owner farther) form whole
    subtrees, and eviction order exhausts them first. The count stops as soon
    as it reaches ``needed`` (then it is some number >= ``needed``, not the
    total): a caller asking "is there room for ``needed`` more?" pays only for
    the nodes it looks at until the answer is yes. Device-evicted nodes are
    skipped with their subtrees (SGLang keeps no device KV below an evicted node).
    """
    total, stack = 0, list(root.children.values())
    while stack and total < needed:
        node = stack.pop()
        if node.component_data[ComponentType.FULL].value is None:
            continue
        node_next_use = node.kvflow.next_use
        if node_next_use is None or node_next_use > next_use:
            total += _unlocked_device_tokens(node, needed - total)
        else:
            stack.extend(node.children.values())
    return total


def _unlocked_device_tokens(node: Any, needed: float = math.inf) -> int:
    """Unlocked device tokens in ``node``'s subtree, counting stopped once ``needed`` are found."""
    total, stack = 0, [node]
    while stack and total < needed:
        current = stack.pop()
        data = current.component_data[ComponentType.FULL]
        if data.value is None:
            continue  # and nothing below it is on the device
        if data.lock_ref == 0:
            total += len(current.key)
        stack.extend(current.children.values())
    return total
