"""Overlapped prefetch: load the fixed prompts and contexts due next from host to device.

Runs on the scheduler thread once per iteration (from the cache's
``check_hicache_events``). It loads two kinds of KV that are backed up on the
host but not on the device: the fixed prompt of every agent whose
steps-to-execution is between 1 and ``steps_limit``, and the context of every
paused agent (:mod:`kvflow.cache.contexts`) whose next request is expected
within the next ``steps_limit`` ticks of the logical clock (one tick per hinted
request admitted; :mod:`kvflow.cache.pauses`), found through a lazy-deletion
heap of expected times, so the clock alone makes a context due. Nearest first
(by ``AgentState.next_use`` or ``context_next_use``, the keys eviction orders
them by), it issues SGLang's own ``load_back`` for that path, bounded by SGLang's
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
waits. Contexts follow the same rules. Until a load is
acknowledged its nodes are *pending*: the scheduler holds back every waiting
request whose prompt runs through them (``blocks``), so no batch reads KV
before it landed and no second load is issued; once acknowledged the request
is matched again and uses the loaded KV.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.utils.rank_consensus_checker import rank_consensus

from kvflow.cache.lazy_heap import needs_compaction, next_version
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
    # Contexts of paused agents (the counters above are fixed prompts'): loads issued, tokens of
    # those acknowledged, used by the agent's next request (done before it came, or it waited)
    # or wasted (evicted before it, or that request did not resume the context), due contexts
    # that had to wait for room (each counted once while due).
    context_issued: int = 0
    context_tokens_loaded: int = 0
    context_timely: int = 0
    context_late: int = 0
    context_wasted: int = 0
    context_skipped_no_room: int = 0


@dataclass
class Prefetcher:
    """Decides and issues prefetches for one ``WorkflowRadixCache``."""

    cache: Any
    steps_limit: int = 1
    max_tokens: int = 65536
    records: dict[int, PrefetchRecord] = field(default_factory=dict)  # fixed prompts, by agent id()
    context_records: dict[int, PrefetchRecord] = field(default_factory=dict)  # contexts, by agent id()
    counters: PrefetchCounters = field(default_factory=PrefetchCounters)
    # Agents whose steps were last set within [1, steps_limit], by id(): the only ones worth a
    # look each iteration (thousands of workflows would make a scan of every agent cost ms).
    due: dict[int, AgentState] = field(default_factory=dict)
    # Agents whose context is due (see ``_context_due``), by id(), and the heap the clock makes
    # them due from: (expected, version, agent), each agent's current entry's version in
    # ``context_entries`` (kvflow.cache.lazy_heap), popped once the clock reaches the horizon.
    due_contexts: dict[int, AgentState] = field(default_factory=dict)
    context_heap: list[tuple[float, int, AgentState]] = field(default_factory=list)
    context_entries: dict[AgentState, tuple[float, int]] = field(default_factory=dict)
    # Tokens the running and waiting requests will still take (set each scheduling pass by the hook,
    # patches/prefetch_hold.py): room a prefetch must leave them, or its prompt is evicted again.
    reserved_tokens: float = 0.0
    # Due (agent id(), is a context) found without room: counted once until issued or no longer due.
    waiting: set[tuple[int, bool]] = field(default_factory=set)

    def __post_init__(self) -> None:
        workflows = self.cache.kvflow.workflows.workflows()
        self.watch(agent for workflow in workflows for agent in workflow.agents.values())

    def watch(self, agents: Iterable[AgentState]) -> None:
        """Note agents whose steps or pauses just changed (the cache calls this for every change)."""
        for agent in agents:
            if self._is_due(agent):
                self.due[id(agent)] = agent
            self.watch_context(agent)

    def watch_context(self, agent: AgentState) -> None:
        """Note that the agent's context or its expected resumption changed (the cache calls this
        when it assigns a context): it is queued at the time its next request is expected."""
        expected = agent.pauses.expected
        if agent.context is None or self.context_entries.get(agent, (None,))[0] == expected:
            return
        version = next_version()
        self.context_entries[agent] = (expected, version)
        heapq.heappush(self.context_heap, (expected, version, agent))
        tracked = self.cache.kvflow.workflows.agent_count
        if needs_compaction(len(self.context_heap), len(self.context_entries)) or needs_compaction(
            len(self.context_entries), tracked
        ):
            self._compact_contexts()

    def _compact_contexts(self) -> None:
        """Drop the entries of agents without a context or forgotten; rebuild the heap from the rest."""
        self.context_entries = {
            agent: entry
            for agent, entry in self.context_entries.items()
            if agent.context is not None and agent.steps is not None
        }
        self.context_heap = [(key, version, agent) for agent, (key, version) in self.context_entries.items()]
        heapq.heapify(self.context_heap)

    def forget_loads(self) -> None:
        """The tree was reset: no load is in flight, and every due agent is looked at again."""
        self.records.clear()
        self.context_records.clear()
        self.waiting.clear()

    def _is_due(self, agent: AgentState) -> bool:
        return agent.steps is not None and 1 <= agent.steps <= self.steps_limit

    def _context_due(self, agent: AgentState) -> bool:
        """Whether the agent owns a context, in its workflow's share, and its next request is
        expected within ``steps_limit`` ticks of now (or is overdue); urgency ``time`` only."""
        clock = agent.pace.clock
        return (
            agent.context is not None
            and agent.steps is not None
            and not agent.context_over_budget
            and clock.mode == "time"
            and agent.pauses.expected <= clock.now + self.steps_limit
        )

    # ---- scheduler iteration ---------------------------------------------

    def step(self) -> None:
        """Reap finished loads, then issue new ones."""
        self._reap()
        self._reap_contexts()
        self._issue()

    def _all_records(self) -> Iterable[PrefetchRecord]:
        yield from self.records.values()
        yield from self.context_records.values()

    @property
    def loading(self) -> bool:
        """Whether any issued load is not acknowledged yet."""
        return any(not r.done for r in self._all_records())

    def _pending_tokens(self) -> int:
        return sum(r.tokens for r in self._all_records() if not r.done)

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

    def _reap_contexts(self) -> None:
        """Acknowledge finished context loads; drop those used, or evicted or released before use
        (wasted). A loaded context whose agent's pause ran long stays: eviction orders it."""
        ongoing = self.cache.ongoing_load_back
        for key, record in list(self.context_records.items()):
            if not record.done:
                if record.node.id in ongoing:
                    continue
                record.done = True
                self.counters.context_tokens_loaded += record.tokens
            if record.used:
                del self.context_records[key]
            elif record.node.evicted or record.agent.context is not record.node:
                self.counters.context_wasted += 1
                del self.context_records[key]

    def _due_contexts(self) -> None:
        """Move the contexts the clock made due from the heap to ``due_contexts``, and those no
        longer due back to the heap: O(due + log n) per call."""
        now = self.cache.kvflow.workflows.logical_clock.now
        heap, entries = self.context_heap, self.context_entries
        while heap and heap[0][0] <= now + self.steps_limit:
            expected, version, agent = heapq.heappop(heap)
            if entries.get(agent, (None, None))[1] != version:
                continue  # superseded
            del entries[agent]
            if agent.pauses.expected != expected:
                self.watch_context(agent)  # moved without a word (a review): queued at its new time
            elif self._context_due(agent):
                self.due_contexts[id(agent)] = agent
        for key, agent in list(self.due_contexts.items()):
            if not self._context_due(agent):
                del self.due_contexts[key]
                self.waiting.discard((key, True))
                self.watch_context(agent)  # resumed, reviewed or over budget: due again later, maybe

    def _due_nearest_first(self) -> list[tuple[AgentState, bool]]:
        """The due prompts and contexts, as (agent, is a context), nearest first; none if none of
        them could be loaded now."""
        for key, agent in list(self.due.items()):
            if not self._is_due(agent):  # moved on, or its workflow was forgotten (steps None)
                del self.due[key]
                self.waiting.discard((key, False))
        self._due_contexts()
        due = [(agent, False) for agent in self.due.values()]
        due += [(agent, True) for agent in self.due_contexts.values()]
        if not any(self._loadable(agent, context) for agent, context in due):
            return []
        return sorted(due, key=lambda item: _next_use(*item))

    def _loadable(self, agent: AgentState, context: bool = False) -> bool:
        """Due, on the host only, and no load of it issued yet."""
        node = _node(agent, context)
        return (
            (self._context_due(agent) if context else self._is_due(agent))
            and node is not None
            and node.evicted
            and node.backuped
            and id(agent) not in self._records(context)
        )

    def _records(self, context: bool) -> dict[int, PrefetchRecord]:
        return self.context_records if context else self.records

    def _issue(self) -> None:
        # Agents come nearest first, and a farther one may take room only from KV next used later
        # still and after all the nearer ones need, so what did not fit for one does not fit for
        # any later one this pass.
        too_big = math.inf
        due = self._due_nearest_first()
        # What their requests will allocate (each agent once, though its prompt and context be due).
        ahead = sum(agent.request_tokens or 0.0 for agent in {id(a): a for a, _ in due}.values())
        for agent, context in due:
            if id(agent) in self._records(context):
                continue  # loading or loaded: its request will find the KV on the device
            tokens = _off_device_tokens(agent, context)
            # Making room for an earlier agent evicts, and an eviction may expire workflows.
            if self._loadable(agent, context):
                if not self.cache.has_free_load_back_slot():
                    return
                path = _evicted_path(_node(agent, context))  # before making room, which may reach it
                if self._pending_tokens() + tokens > self.max_tokens:
                    pass  # over the in-flight bound: it waits, not counted as lacking room
                elif tokens >= too_big or not self._make_room(tokens, _next_use(agent, context), ahead):
                    too_big = min(tokens, too_big)
                    self._note_waiting(agent, context)
                elif self._issue_load(agent, context, path, tokens):
                    continue
            ahead += tokens  # not issued: its request loads the KV on demand before farther ones

    def _note_waiting(self, agent: AgentState, context: bool = False) -> None:
        """The agent's prompt or context found no room: counted once while it stays due."""
        key = (id(agent), context)
        if key not in self.waiting:
            self.waiting.add(key)
            if context:
                self.counters.context_skipped_no_room += 1
            else:
                self.counters.skipped_no_room += 1

    def _issue_load(self, agent: AgentState, context: bool, path: list[Any], tokens: int) -> bool:
        """Load ``path`` for the agent, unless the room just made reached it (TTL expiry, ancestors)."""
        node = _node(agent, context)
        if not self._loadable(agent, context) or _evicted_path(node) != path or not self._load(agent, node):
            return False
        self._records(context)[id(agent)] = PrefetchRecord(agent, node, path, tokens)
        self.waiting.discard((id(agent), context))
        if context:
            self.counters.context_issued += 1
        else:
            self.counters.issued += 1
        return True

    @rank_consensus(same_params=["agent.workflow_id", "agent.agent_id", "node.id"], same_results=True)
    def _load(self, agent: AgentState, node: Any) -> bool:
        """Start loading the agent's ``node`` (its prompt or context) from the host (every
        tensor-parallel rank alike)."""
        if not self.cache.load_back(node.id):
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
        if record is not None and not record.used:
            record.used = True
            if record.done and not held:
                self.counters.timely += 1
            else:
                self.counters.late += 1
            if record.done:
                del self.records[id(agent)]
        self._context_admitted(agent, held)

    def _context_admitted(self, agent: AgentState, held: bool) -> None:
        """The agent's next request after a context prefetch: it resumed that context (still the
        agent's once its hint was applied) or the load was wasted."""
        record = self.context_records.get(id(agent))
        if record is None or record.used:
            return
        record.used = True
        if agent.context is not record.node:
            self.counters.context_wasted += 1
        elif record.done and not held:
            self.counters.context_timely += 1
        else:
            self.counters.context_late += 1
        if record.done:
            del self.context_records[id(agent)]

    def blocks(self, key: RadixKey) -> bool:
        """Whether a waiting prompt runs through a node whose load is not acknowledged yet."""
        pending = {id(node) for r in self._all_records() if not r.done for node in r.path}
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


def _node(agent: AgentState, context: bool) -> Any:
    """The node a prefetch of the agent's prompt (or ``context``) loads up to."""
    return agent.context if context else agent.node


def _next_use(agent: AgentState, context: bool) -> Any:
    """The key eviction orders that node by (its owner's part in it)."""
    return agent.context_next_use if context else agent.next_use


def _off_device_tokens(agent: AgentState, context: bool = False) -> int:
    """The tokens of the agent's fixed prompt (or ``context``) that are not on the device (all of
    the fixed prompt if untracked)."""
    node = _node(agent, context)
    if node is None:
        return 0 if context else agent.fixed_prefix_len or 0
    return sum(len(node.key) for node in _evicted_path(node))


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
