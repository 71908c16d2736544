"""Hostile input for WorkflowRadixCache: random interleavings of every cache operation, offline.

Two Hypothesis state machines run at page sizes 1, 4 and 16 and call
the cache's ``check_integrity()`` after every step. Prompts are drawn
from a small alphabet of shared segments, so prefixes are shared and nodes
split at every depth, page-aligned or not. Besides the integrity invariants
they carry over the randomized checks of SGLang's own ``UnifiedRadixCache``
unit suite: an inserted prompt matches for its page-aligned length, eviction
reports exactly the evictable size it removed and never touches a locked
prefix, and evicting everything leaves a bare root. Runs are derandomized, so
CI sees the same examples every time. The explicit tests first reproduce two
``claim()`` bugs: an ``IndexError`` at page size 4, a too-short boundary at 1.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvflow.cache.integrity import check_pool_accounting
from kvflow.cache.workflow_table import AgentState, WorkflowTable
from kvflow.harness.offline import CacheDriver
from kvflow.hints import MAX_STEPS_VALUE, WorkflowHint

PAGE_SIZES = (1, 4, 16)
POOL = 96  # tokens: two of the longest prompts at page size 16
TTL = 10.0
FUZZ_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Shared system prompts, then turns: every prompt is one system prompt, up to three turns, cut anywhere.
SYSTEMS = (list(range(1, 10)), list(range(20, 36)))
TURNS = (list(range(100, 103)), list(range(110, 115)), list(range(120, 127)), list(range(130, 138)))
WORKFLOWS = ("w0", "w1", "w2", "w3")
AGENTS = ("a", "b", "c")


def _depth(node: Any) -> int:
    depth = 0
    while node.parent is not None:
        depth += len(node.key)
        node = node.parent
    return depth


# ---- the two claim() bugs ---------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_prompt_shorter_than_the_fixed_prefix_neither_raises_nor_moves_the_boundary(page_size):
    driver = CacheDriver(size=64, page_size=page_size)
    first = list(range(1, 13))
    driver.serve(first, WorkflowHint("wf", "a", 8))  # 12-token prompt, fixed 8
    agent = driver.cache.kvflow.workflows.get("wf").agents["a"]
    assert _depth(agent.node) == 8
    shorter = first[:6]
    driver.serve(shorter, WorkflowHint("wf", "a"))  # no fixed_prefix_len: the boundary stays 8
    driver.cache.kvflow.claim(agent, shorter)
    driver.cache.kvflow.check_integrity()
    assert agent.fixed_prefix_len == 8
    assert agent.node is not None and _depth(agent.node) == 8  # still the first prompt's boundary


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_newer_hint_observed_before_an_older_requests_claim_neither_raises_nor_owns_a_short_node(
    page_size,
):
    driver = CacheDriver(size=64, page_size=page_size)
    cache = driver.cache
    request1 = list(range(1, 7))
    request2 = request1 + list(range(50, 56))
    # Both are admitted (hint observed, nothing cached yet) before request 1's KV is inserted.
    agent = cache.kvflow.observe_hint(WorkflowHint("wf", "a", 4), request1)
    assert cache.kvflow.observe_hint(WorkflowHint("wf", "a", 12), request2) is agent
    driver.serve(request1)
    cache.kvflow.claim(agent, request1)  # request 1's claim once its KV is in the tree
    cache.kvflow.check_integrity()
    assert agent.fixed_prefix_len == 12
    assert agent.node is None  # request 1 (6 tokens) does not hold the 12-token boundary
    driver.serve(request2)
    cache.kvflow.claim(agent, request2)
    cache.kvflow.check_integrity()
    assert _depth(agent.node) == 12


# ---- strategies --------------------------------------------------------------


class Request(NamedTuple):
    tokens: list[int]
    hint: WorkflowHint | None


def _prompt(system: int, turns: list[int], cut: int) -> list[int]:
    return [t for segment in [SYSTEMS[system], *(TURNS[i] for i in turns)] for t in segment][:cut]


prompts = st.builds(
    _prompt,
    st.integers(0, len(SYSTEMS) - 1),
    st.lists(st.integers(0, len(TURNS) - 1), max_size=3),
    st.integers(0, 40),
)
steps_maps = st.dictionaries(
    st.sampled_from(AGENTS), st.one_of(st.integers(0, 5), st.just(MAX_STEPS_VALUE)), max_size=3
)


@st.composite
def requests(draw: st.DrawFn, always_hinted: bool = False) -> Request:
    """A prompt and maybe a hint whose fixed_prefix_len is None, 0, or around (shorter, equal, longer
    than, unaligned to) the prompt length, or anywhere in range."""
    tokens = draw(prompts)
    if not always_hinted and not draw(st.booleans()):
        return Request(tokens, None)
    fixed = draw(
        st.one_of(
            st.none(),
            st.just(0),
            st.integers(-5, 5).map(lambda d: max(0, len(tokens) + d)),
            st.integers(0, 44),
        )
    )
    hint = WorkflowHint(
        draw(st.sampled_from(WORKFLOWS)), draw(st.sampled_from(AGENTS)), fixed, draw(steps_maps)
    )
    return Request(tokens, hint)


# ---- the state machines ------------------------------------------------------


class Lock(NamedTuple):
    handle: Any
    tokens: list[int]
    length: int  # the locked (device-matched) prefix length


class Side:
    """One driver and its held locks, with SGLang's unit-suite checks on every serve and evict."""

    def __init__(self, driver: CacheDriver) -> None:
        self.driver, self.cache, self.page = driver, driver.cache, driver.page_size
        self.locks: list[Lock] = []

    def serve(self, tokens: list[int], hint: WorkflowHint | None = None) -> int | None:
        """Serve if the pool can take the prompt while the locks hold; the hit, else None."""
        pages = -(-len(tokens) // self.page)
        if pages * self.page > self.driver.allocator.available_size() + self.cache.evictable_size():
            return None
        hit = self.driver.serve(tokens, hint)
        aligned = len(tokens) // self.page * self.page
        assert hit % self.page == 0 and hit <= aligned
        assert self.driver.cached_len(tokens) == aligned, "an inserted prompt must match its full pages"
        return hit

    def lock(self, tokens: list[int]) -> int:
        match = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        self.locks.append(Lock(self.cache.lock(match.last_device_node), tokens, match.device_prefix_len))
        return match.device_prefix_len

    def unlock(self, index: int) -> None:
        self.cache.unlock(self.locks.pop(index).handle)

    def evict(self, num_tokens: int) -> EvictResult:
        before = self.cache.evictable_size()
        result = self.cache.evict(EvictParams(num_tokens=num_tokens))
        after = self.cache.evictable_size()
        assert result.num_tokens_evicted == before - after
        assert after == 0 or result.num_tokens_evicted >= num_tokens
        for lock in self.locks:
            assert self.driver.cached_len(lock.tokens) >= lock.length, "eviction took a locked prefix"
        return result


class WorkflowCacheMachine(RuleBasedStateMachine):
    """Every public WorkflowRadixCache operation, interleaved, under a fake clock."""

    def __init__(self, page_size: int) -> None:
        super().__init__()
        self.side = Side(CacheDriver(size=POOL, page_size=page_size))
        self.cache = self.side.cache
        self.now = 0.0
        # Small caps and a small protected share, so that every kind of expiry, and budgets, happen.
        self.cache.kvflow.workflows = WorkflowTable(
            TTL, max_workflows=3, clock=lambda: self.now, max_agents=8
        )
        self.cache.kvflow.config = replace(self.cache.kvflow.config, max_protected_fraction=0.25)
        # Every agent met, those of forgotten workflows too, with its latest prompt.
        self.prompts: dict[AgentState, list[int]] = {}
        self.owned: dict[AgentState, Any] = {}  # the node each tracked agent owned after the last step

    def _tracked(self) -> list[AgentState]:
        return [agent for wf in self.cache.kvflow.workflows.workflows() for agent in wf.agents.values()]

    @invariant()
    def integrity(self) -> None:
        self.cache.kvflow.check_integrity()
        page = self.side.page
        for agent in self._tracked():
            if agent.node is not None and agent.node is not self.owned.get(agent):
                boundary = (agent.fixed_prefix_len or 0) // page * page
                assert _depth(agent.node) == boundary, "a newly owned node must end at the fixed prefix"
        self.owned = {agent: agent.node for agent in self._tracked()}

    @rule(request=requests())
    def serve(self, request: Request) -> None:
        hint = request.hint
        if self.side.serve(request.tokens, hint) is not None and hint is not None:
            workflow = self.cache.kvflow.workflows.get(hint.workflow_id)
            agent = workflow.agents.get(hint.agent_id) if workflow is not None else None
            if agent is not None:
                self.prompts[agent] = request.tokens

    @rule(request=requests(always_hinted=True))
    def observe_hint(self, request: Request) -> None:
        agent = self.cache.kvflow.observe_hint(request.hint, request.tokens)
        if agent is not None:
            self.prompts[agent] = request.tokens

    @precondition(lambda self: self._tracked())
    @rule(pick=st.integers(0, 50), shorter_by=st.integers(1, 8), tokens=st.none() | prompts)
    def claim_shorter_than_fixed(self, pick: int, shorter_by: int, tokens: list[int] | None) -> None:
        """A claim whose tokens stop before the agent's fixed prefix (by default its latest prompt's)."""
        tracked = self._tracked()
        agent = tracked[pick % len(tracked)]
        if tokens is None:
            tokens = self.prompts.get(agent, [])
        self.cache.kvflow.claim(agent, tokens[: max(0, (agent.fixed_prefix_len or 0) - shorter_by)])

    @rule(workflow_id=st.sampled_from(WORKFLOWS), steps=steps_maps)
    def set_steps(self, workflow_id: str, steps: dict[str, int]) -> None:
        self.cache.kvflow.set_steps(workflow_id, steps)

    @rule(workflow_id=st.sampled_from(WORKFLOWS))
    def end_workflow(self, workflow_id: str) -> None:
        self.cache.kvflow.end_workflow(workflow_id)

    @precondition(lambda self: self.prompts)
    @rule(pick=st.integers(0, 50))
    def agent_finished(self, pick: int) -> None:
        met = list(self.prompts)
        self.cache.kvflow.agent_finished(met[pick % len(met)])

    @rule(num_tokens=st.integers(0, POOL))
    def evict(self, num_tokens: int) -> None:
        self.side.evict(num_tokens)

    @precondition(lambda self: len(self.side.locks) < 3)
    @rule(tokens=prompts)
    def lock(self, tokens: list[int]) -> None:
        self.side.lock(tokens)

    @precondition(lambda self: self.side.locks)
    @rule(pick=st.integers(0, 2))
    def unlock(self, pick: int) -> None:
        self.side.unlock(pick % len(self.side.locks))

    @rule(seconds=st.floats(0, TTL))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: self.cache.evictable_size() + self.cache.protected_size() >= POOL // 2)
    @rule()
    def drain(self) -> None:
        """Unlock and evict everything: a bare root, and no agent owns a node."""
        while self.side.locks:
            self.side.unlock(0)
        self.side.evict(POOL)
        assert self.cache.evictable_size() == self.cache.protected_size() == 0
        assert not self.cache.tree_core.root_node.children
        assert all(agent.node is None for agent in self.prompts)


class StockLRUMachine(RuleBasedStateMachine):
    """Without hints, WorkflowRadixCache behaves exactly like stock LRU on every operation."""

    def __init__(self, page_size: int) -> None:
        super().__init__()
        self.ours = Side(CacheDriver(size=POOL, page_size=page_size))
        self.stock = Side(CacheDriver(POOL, UnifiedRadixCache, "lru", page_size=page_size))

    @invariant()
    def same_as_stock(self) -> None:
        self.ours.cache.kvflow.check_integrity()
        check_pool_accounting(self.stock.cache)
        ours, stock = self.ours.driver, self.stock.driver
        assert ours.allocator.available_size() == stock.allocator.available_size()
        assert ours.cache.evictable_size() == stock.cache.evictable_size()
        assert ours.cache.protected_size() == stock.cache.protected_size()
        if ours.page_size == 1:
            assert ours.allocator.freed == stock.allocator.freed

    @rule(tokens=prompts)
    def serve(self, tokens: list[int]) -> None:
        assert self.ours.serve(tokens) == self.stock.serve(tokens)

    @rule(num_tokens=st.integers(0, POOL))
    def evict(self, num_tokens: int) -> None:
        assert self.ours.evict(num_tokens) == self.stock.evict(num_tokens)

    @precondition(lambda self: len(self.ours.locks) < 3)
    @rule(tokens=prompts)
    def lock(self, tokens: list[int]) -> None:
        assert self.ours.lock(tokens) == self.stock.lock(tokens)

    @precondition(lambda self: self.ours.locks)
    @rule(pick=st.integers(0, 2))
    def unlock(self, pick: int) -> None:
        index = pick % len(self.ours.locks)
        self.ours.unlock(index)
        self.stock.unlock(index)

    @rule(tokens=prompts)
    def cached_len(self, tokens: list[int]) -> None:
        assert self.ours.driver.cached_len(tokens) == self.stock.driver.cached_len(tokens)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_random_interleavings_keep_the_cache_consistent(page_size):
    run_state_machine_as_test(lambda: WorkflowCacheMachine(page_size), settings=FUZZ_SETTINGS)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_without_hints_every_operation_matches_stock_lru(page_size):
    run_state_machine_as_test(lambda: StockLRUMachine(page_size), settings=FUZZ_SETTINGS)
