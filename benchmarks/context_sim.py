"""A radix-trie simulator of SGLang's device cache, for reference eviction policies on contexts.

It does what :class:`kvflow.harness.offline.CacheDriver` does on a real ``UnifiedRadixCache``
at page size 1, with the same pool size and token accounting: match the request's tokens
(splitting a node where they diverge), lock the matched path, evict whole unlocked leaves in
rank order until the free pool covers the unmatched rest, insert that rest as one new leaf.
With ``partial`` it cuts the last victim (a node split) and evicts only the tokens still needed,
so a reference is not handicapped by node sizes; Belady is still not a strict optimum (nodes of
different sizes), but then stays at or below the online references on the traces tried.

- Recency is a logical clock touched as SGLang touches it: a split refreshes the split-off
  child, a served path is refreshed root to leaf. :class:`Lru` therefore evicts what the real
  ``lru`` evicts, token for token (``tests/test_session_replay.py`` checks it).
- A node's owners are the sessions whose contexts pass through it; the references rank a
  node by its owners (the soonest-needed owner counts), ties by recency.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.workloads import AgentTrace, SessionTurn

INF = float("inf")


class _Node:
    __slots__ = ("key", "parent", "children", "time", "owners")

    def __init__(self, key: tuple[int, ...], parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.time = 0
        self.owners: set[str] = set()


class TrieCache:
    """A ``size``-token pool; ``rank(node)`` orders eviction (smallest first)."""

    def __init__(self, size: int, rank: Callable[[_Node], tuple], partial: bool = False) -> None:
        self.size = size
        self.rank = rank
        self.partial = partial
        self.used = 0
        self.clock = 0
        self.root = _Node((), None)
        self.leaves: set[_Node] = set()

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def serve(self, tokens: tuple[int, ...], owner: str) -> int:
        """Serve one request; return how many of its tokens were cached."""
        path, hit = self._match(tokens)
        need = len(tokens) - hit
        if self.size - self.used < need:
            self._evict(need - (self.size - self.used), set(path))
        assert self.size - self.used >= need, "pool exhausted"
        if need:
            parent = path[-1] if path else self.root
            leaf = _Node(tokens[hit:], parent)
            parent.children[tokens[hit]] = leaf
            self.leaves.discard(parent)
            self.leaves.add(leaf)
            self.used += need
            path.append(leaf)
        for node in path:
            node.time = self._tick()
            node.owners.add(owner)
        return hit

    def _match(self, tokens: tuple[int, ...]) -> tuple[list[_Node], int]:
        node, pos, path = self.root, 0, []
        while pos < len(tokens) and tokens[pos] in node.children:
            child = node.children[tokens[pos]]
            size = len(child.key)
            if tokens[pos : pos + size] != child.key:
                shared = next(
                    i for i, t in enumerate(child.key) if pos + i >= len(tokens) or tokens[pos + i] != t
                )
                path.append(self._split(child, shared))
                return path, pos + shared
            path.append(child)
            node, pos = child, pos + size
        return path, pos

    def _split(self, child: _Node, at: int) -> _Node:
        top = _Node(child.key[:at], child.parent)
        top.owners = set(child.owners)
        top.time = child.time
        child.parent.children[child.key[0]] = top
        child.key = child.key[at:]
        child.parent = top
        top.children[child.key[0]] = child
        child.time = self._tick()
        return top

    def _evict(self, amount: int, locked: set[_Node]) -> None:
        heap = [(self.rank(n), n.time, id(n), n) for n in self.leaves if n not in locked]
        heapq.heapify(heap)
        freed = 0
        while freed < amount and heap:
            victim = heapq.heappop(heap)[-1]
            if self.partial and freed + len(victim.key) > amount:
                self.leaves.add(self._split(victim, len(victim.key) - (amount - freed)))
            parent = victim.parent
            del parent.children[victim.key[0]]
            self.leaves.discard(victim)
            freed += len(victim.key)
            self.used -= len(victim.key)
            if parent is not self.root and not parent.children:
                self.leaves.add(parent)
                if parent not in locked:
                    heapq.heappush(heap, (self.rank(parent), parent.time, id(parent), parent))


@dataclass
class Policy:
    """A reference's view of the trace: :meth:`arrive` before each request, :meth:`rank` a node."""

    trace: AgentTrace

    def arrive(self, index: int, turn: SessionTurn) -> None:
        """Turn ``index`` of the trace is about to be served."""

    def rank(self, node: _Node) -> tuple:
        return ()


class Lru(Policy):
    """Least recently used first: SGLang's ``lru`` (ties cannot happen: the clock is unique)."""


@dataclass
class Belady(Policy):
    """The leaf whose owners' next request comes last (never: first) goes first."""

    next_use: dict[str, float] = field(default_factory=dict)
    _following: list[float] = field(init=False)

    def __post_init__(self) -> None:
        upcoming: dict[str, float] = {}
        self._following = [INF] * len(self.trace.turns)
        for i in range(len(self.trace.turns) - 1, -1, -1):
            sid = self.trace.turns[i].session_id
            self._following[i] = upcoming.get(sid, INF)
            upcoming[sid] = i

    def arrive(self, index: int, turn: SessionTurn) -> None:
        self.next_use[turn.session_id] = self._following[index]

    def rank(self, node: _Node) -> tuple:
        return (-min(self.next_use[s] for s in node.owners),)


@dataclass
class OnlineMeanGap(Policy):
    """Knows each session's mean gap between requests and when it made its last one.

    A context is expected back at last request + mean gap; the one expected last goes first, and
    a session the client ended goes before all of them. It does not know the jitter, nor which
    sessions were abandoned: a context past its expected time keeps that estimate (the issue's
    reference), or with ``overdue`` is expected after as long again as it has waited so far
    (not the issue's reference: a comparison that lets abandoned contexts fall behind).
    """

    overdue: bool = False
    now: float = 0.0
    last: dict[str, float] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    gaps: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.gaps = self.trace.mean_gaps()

    def arrive(self, index: int, turn: SessionTurn) -> None:
        self.now = turn.start
        self.last[turn.session_id] = turn.start
        if turn.last:
            self.ended.add(turn.session_id)

    def expected(self, session: str) -> float:
        if session in self.ended:
            return INF
        due = self.last[session] + self.gaps[session]
        return 2 * self.now - self.last[session] if self.overdue and due < self.now else due

    def rank(self, node: _Node) -> tuple:
        return (-min(self.expected(s) for s in node.owners),)


@dataclass
class TtlPin(Policy):
    """Continuum-style: after a turn that calls a tool, its context is pinned for a TTL set from
    its reload cost (``ttl_s_per_token`` times its length); unpinned leaves go first (LRU), then
    pinned ones, the soonest to expire first. A turn with the end marker calls no tool: no pin.

    ``ttl_s_per_token`` defaults to the trace's mean tool pause over its mean context, so a
    context of average length is pinned for the average pause (``ttl_factor`` scales that).
    """

    ttl_factor: float = 1.0
    now: float = 0.0
    pinned_until: dict[str, float] = field(default_factory=dict)
    ttl_s_per_token: float = field(init=False)

    def __post_init__(self) -> None:
        contexts = [len(t.tokens) for t in self.trace.turns]
        mean_context = sum(contexts) / len(contexts)
        self.ttl_s_per_token = self.ttl_factor * mean_pause(self.trace) / mean_context

    def arrive(self, index: int, turn: SessionTurn) -> None:
        self.now = turn.start
        ttl = 0.0 if turn.last else self.ttl_s_per_token * len(turn.tokens)
        self.pinned_until[turn.session_id] = turn.end + ttl

    def rank(self, node: _Node) -> tuple:
        until = max(self.pinned_until[s] for s in node.owners)
        return (1, until) if until > self.now else (0,)


def mean_pause(trace: AgentTrace) -> float:
    """Mean time from a turn's end to the same session's next request."""
    ends: dict[str, float] = {}
    pauses = []
    for t in trace.turns:
        if t.session_id in ends:
            pauses.append(t.start - ends[t.session_id])
        ends[t.session_id] = t.end
    return sum(pauses) / max(len(pauses), 1)


# name -> (policy, partial): the references cut their victim to the tokens needed; ``sim_lru``
# evicts whole nodes like the real cache (the simulator's check), ``lru_cut`` shows what cutting
# alone is worth.
REFERENCES: dict[str, tuple[Callable[[AgentTrace], Policy], bool]] = {
    "belady": (Belady, True),
    "online_mean_gap": (OnlineMeanGap, True),
    "online_overdue": (lambda trace: OnlineMeanGap(trace, overdue=True), True),
    "ttl_pin": (TtlPin, True),
    "lru_cut": (Lru, True),
    "sim_lru": (Lru, False),
}


def simulate(trace: AgentTrace, size: int, policy: Policy, partial: bool = False) -> list[int]:
    """Each turn's cached prefix length when ``trace`` runs through a ``size``-token pool."""
    cache = TrieCache(size, policy.rank, partial)
    hits = []
    for index, turn in enumerate(trace.turns):
        policy.arrive(index, turn)
        hits.append(cache.serve(turn.tokens, turn.session_id))
    return hits
