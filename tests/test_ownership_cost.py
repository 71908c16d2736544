"""Subtree minima at a cost that does not grow with fan-out (issue 12, part 3).

- The per-child structure stays exact: seeded random runs of next-use changes, splits, evictions and
  expiries through :class:`CacheDriver` (which calls ``check_integrity()`` after every request),
  and the integrity check catches a structure broken behind its back.
- Cost is counted, not timed: key comparisons per refresh and per removed sibling at 10 and at
  10^4 siblings, and nodes looked at by ``_evictable_farther_than`` once it has enough.
- A CI-sized run of ``benchmarks.cache_cost``.
"""

from __future__ import annotations

import json
import math
import random
from functools import total_ordering
from types import SimpleNamespace
from typing import Any

import pytest
from sglang.srt.mem_cache.unified_cache.components import ComponentType

from kvflow.cache.node_state import NodeState
from kvflow.cache.ownership import Ownership
from kvflow.cache.prefetch import _evictable_farther_than
from kvflow.harness.offline import CacheDriver
from kvflow.hints import WorkflowHint

# ---- the structure stays exact on the real cache ------------------------------------------------


def _random_run(seed: int, page_size: int, steps: int = 120) -> CacheDriver:
    rng = random.Random(seed)
    driver = CacheDriver(size=160, page_size=page_size)
    cache = driver.cache
    systems = [list(range(1, 13)), list(range(1, 7)) + list(range(40, 46)), list(range(60, 68))]
    agents = [(f"w{w}", f"a{a}") for w in range(3) for a in range(4)]
    for _ in range(steps):
        roll = rng.random()
        workflow, agent = rng.choice(agents)
        if roll < 0.7:  # a request: shared system prompts split at several depths, random steps
            prompt = rng.choice(systems)[: rng.randint(4, 12)] + [1000 + agents.index((workflow, agent))] * 4
            steps_map = {a: rng.randint(0, 6) for w, a in agents if w == workflow and rng.random() < 0.5}
            fixed = rng.choice([None, len(prompt) - rng.randint(0, 4)])
            tail = [rng.randint(2000, 2100) for _ in range(rng.randint(0, 20))]
            driver.serve(prompt + tail, WorkflowHint(workflow, agent, fixed, steps_map))
        elif roll < 0.85:  # a steps change from outside a request
            cache.kvflow.set_steps(workflow, {agent: rng.randint(0, 9)})
        elif roll < 0.95:  # a big un-hinted request: evicts owned and un-owned nodes
            driver.serve([rng.randint(3000, 3050) for _ in range(rng.randint(40, 120))])
        else:
            cache.kvflow.end_workflow(workflow)
        cache.kvflow.check_integrity()
    return driver


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("page_size", [1, 4])
def test_the_per_child_structure_stays_exact_under_random_refreshes_splits_and_evictions(seed, page_size):
    driver = _random_run(seed, page_size)
    assert sum(c["nodes"] for tier in driver.cache.tree_core.kvflow_evictions.values() for c in tier.values())


def _node_with_structure(driver: CacheDriver) -> Any:
    stack = [driver.cache.tree_core.root_node]
    while stack:
        node = stack.pop()
        if node.kvflow.child_mins is not None and node.kvflow.child_mins.values:
            return node
        stack.extend(node.children.values())
    raise AssertionError("no node holds a per-child structure")


def _fan_driver() -> CacheDriver:
    driver = CacheDriver(size=256)
    system = list(range(1, 9))
    for i in range(6):
        driver.serve(system + [100 + i] * 4, WorkflowHint("wf", f"a{i}", 12, {f"a{i}": i}))
    return driver


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s, child: s.values.pop(child), "per-child structure holds"),
        (lambda s, child: s.values.__setitem__(child, (-5, s.values[child][1])), "per-child structure has"),
        (lambda s, child: s.heap.clear(), "live heap entries"),
        (lambda s, child: s.heap.reverse(), "heap order"),
    ],
)
def test_the_integrity_check_catches_a_broken_per_child_structure(corrupt, message):
    driver = _fan_driver()
    driver.cache.kvflow.check_integrity()
    node = _node_with_structure(driver)
    structure = node.kvflow.child_mins
    corrupt(structure, next(iter(structure.values)))
    with pytest.raises(AssertionError, match=message):
        driver.cache.kvflow.check_ownership()


def test_the_integrity_check_catches_a_stale_own_minimum():
    driver = _fan_driver()
    agent = driver.cache.kvflow.workflows.get("wf").agents["a3"]
    agent.node.kvflow.own_next_use = -1
    with pytest.raises(AssertionError, match="own_next_use"):
        driver.cache.kvflow.check_ownership()


def test_a_split_above_an_owned_node_moves_it_into_the_new_node_structure():
    driver = _fan_driver()
    system_node = driver.cache.kvflow.workflows.get("wf").agents["a0"].node.parent
    # A prompt sharing half the system prompt splits the node every agent's prompt hangs under.
    driver.serve(list(range(1, 5)) + [900] * 6)
    upper = system_node.parent
    assert len(upper.key) == 4 and len(system_node.key) == 4 and upper.parent.parent is None
    assert list(upper.kvflow.child_mins.values) == [system_node]  # the new prompt's node has no value
    assert upper.kvflow.next_use is not None and upper.kvflow.next_use == system_node.kvflow.next_use
    driver.cache.kvflow.check_integrity()


# ---- cost is counted --------------------------------------------------------------------------


@total_ordering
class CountedKey:
    """A next-use key that counts every comparison made with it (the unit of work of a refresh)."""

    comparisons = 0

    def __init__(self, value: float) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        CountedKey.comparisons += 1
        return isinstance(other, CountedKey) and self.value == other.value

    def __lt__(self, other: CountedKey) -> bool:
        CountedKey.comparisons += 1
        return self.value < other.value

    __hash__ = None  # type: ignore[assignment]


OWNERSHIP = Ownership()  # with no victim heap, as SGLang's own eviction heap would run


class FakeNode:
    """Just what ownership reads of a tree node (hashed by identity, like SGLang's nodes)."""

    def __init__(self, parent: Any) -> None:
        self.parent, self.children = parent, {}


def _node(parent: Any = None) -> FakeNode:
    node = FakeNode(parent)
    OWNERSHIP.init_node(node)
    if parent is not None:
        parent.children[id(node)] = node
    return node


def _fan(siblings: int, seed: int = 0) -> tuple[FakeNode, list[SimpleNamespace]]:
    """root -> system prompt -> ``siblings`` agents' nodes, each owned by one agent with a next use."""
    rng = random.Random(seed)
    root = _node()
    system = _node(root)
    agents = []
    for _ in range(siblings):
        agent = SimpleNamespace(next_use=CountedKey(rng.random()), node=None)
        OWNERSHIP.assign(agent, _node(system))
        agents.append(agent)
    return system, agents


def _reference_min(node: Any) -> Any:
    keys = [a.next_use for a in node.kvflow.owners] + [c.kvflow.next_use for c in node.children.values()]
    keys = [k for k in keys if k is not None]
    return min(keys, key=lambda k: k.value, default=None)


def _comparisons_per_refresh(siblings: int, refreshes: int = 400) -> float:
    system, agents = _fan(siblings)
    rng = random.Random(1)
    CountedKey.comparisons = 0
    for _ in range(refreshes):
        agent = rng.choice(agents)
        agent.next_use = CountedKey(rng.random())
        OWNERSHIP.refresh_upward(agent.node)
    per_op = CountedKey.comparisons / refreshes
    assert system.kvflow.next_use is _reference_min(system)
    return per_op


def _comparisons_per_removal(siblings: int, removals: int = 400) -> float:
    system, agents = _fan(siblings)
    rng = random.Random(2)
    CountedKey.comparisons = 0
    for agent in rng.sample(agents, removals):  # a leaf evicted: what the tree core reports
        node = agent.node
        del system.children[id(node)]
        OWNERSHIP.detach_removed_node(node, system)
    per_op = CountedKey.comparisons / removals
    assert system.kvflow.next_use is _reference_min(system)
    return per_op


def test_a_refresh_costs_logarithmically_many_comparisons_in_the_number_of_siblings():
    small, large = _comparisons_per_refresh(10), _comparisons_per_refresh(10_000)
    # A scan of every sibling would make the large fan cost >= 10^4 comparisons per refresh.
    assert large < 4 * math.log2(10_000) + 10
    assert large < 6 * small


def test_evicting_a_sibling_costs_logarithmically_many_comparisons_in_the_number_of_siblings():
    small, large = _comparisons_per_removal(400), _comparisons_per_removal(10_000)
    assert large < 4 * math.log2(10_000) + 10
    assert large < 3 * small


def test_a_refresh_stops_at_the_first_ancestor_whose_minimum_is_unchanged():
    root = _node()
    chain = [_node(root)]
    for _ in range(50):
        chain.append(_node(chain[-1]))
    near = SimpleNamespace(next_use=CountedKey(0.0), node=None)
    OWNERSHIP.assign(near, chain[0])  # the minimum of the whole chain sits at its top
    far = SimpleNamespace(next_use=CountedKey(5.0), node=None)
    OWNERSHIP.assign(far, chain[-1])
    CountedKey.comparisons = 0
    far.next_use = CountedKey(6.0)
    OWNERSHIP.refresh_upward(far.node)
    assert all(n.kvflow.next_use.value == 6.0 for n in chain[1:])
    assert chain[0].kvflow.next_use is near.next_use
    assert CountedKey.comparisons < 4 * len(chain)  # each node on the path once, no sibling scans


def test_the_heap_is_compacted_so_it_stays_proportional_to_the_live_children():
    system, agents = _fan(100)
    rng = random.Random(3)
    for _ in range(5000):
        agent = rng.choice(agents)
        agent.next_use = CountedKey(rng.random())
        OWNERSHIP.refresh_upward(agent.node)
    structure = system.kvflow.child_mins
    assert len(structure.values) == 100
    assert len(structure.heap) <= 2 * 100 + 8


# ---- _evictable_farther_than looks only at what it needs -----------------------------------


class CountingData(dict):
    looked_at = 0

    def __getitem__(self, key: Any) -> Any:
        CountingData.looked_at += 1
        return super().__getitem__(key)


def _state(next_use: Any) -> NodeState:
    state = NodeState()
    state.next_use = next_use
    return state


def _prefetch_tree(rng: random.Random, nodes: int) -> SimpleNamespace:
    """A random tree of nodes with device values (evicted below an evicted node), locks and minima."""
    root = SimpleNamespace(parent=None, children={}, kvflow=NodeState(), key=[])
    pool = [root]
    for i in range(nodes):
        parent = rng.choice(pool)
        parent_evicted = parent is not root and parent.component_data[ComponentType.FULL].value is None
        data = SimpleNamespace(
            value=None if parent_evicted or rng.random() < 0.2 else object(),
            lock_ref=int(rng.random() < 0.2),
        )
        node = SimpleNamespace(
            parent=parent,
            children={},
            kvflow=_state(rng.choice([None, *range(6)])),
            key=[0] * rng.randint(1, 8),
            component_data=CountingData({ComponentType.FULL: data}),
        )
        parent.children[i] = node
        pool.append(node)
    return root


def _full_walk(root: Any, next_use: int) -> int:
    """The walk ``_evictable_farther_than`` did before it took ``needed`` (every node, no early stop)."""
    total, stack = 0, list(root.children.values())
    while stack:
        node = stack.pop()
        if node.kvflow.next_use is None or node.kvflow.next_use > next_use:
            inner = [node]
            while inner:
                current = inner.pop()
                data = current.component_data[ComponentType.FULL]
                if data.value is not None and data.lock_ref == 0:
                    total += len(current.key)
                inner.extend(current.children.values())
        else:
            stack.extend(node.children.values())
    return total


@pytest.mark.parametrize("seed", range(20))
def test_evictable_farther_than_answers_as_the_full_walk_did(seed):
    rng = random.Random(seed)
    root = _prefetch_tree(rng, rng.randint(1, 300))
    for next_use in range(-1, 7):
        full = _full_walk(root, next_use)
        assert _evictable_farther_than(root, next_use) == full
        for needed in (1, 7, full, full + 1, rng.randint(1, 2 * full + 2)):
            assert (_evictable_farther_than(root, next_use, needed) >= needed) == (full >= needed)


def test_evictable_farther_than_stops_once_it_found_what_is_needed():
    rng = random.Random(0)
    root = SimpleNamespace(parent=None, children={}, kvflow=NodeState(), key=[])
    for i in range(10_000):  # a wide fan of un-owned, unlocked device nodes of 16 tokens
        data = SimpleNamespace(value=object(), lock_ref=0)
        root.children[i] = SimpleNamespace(
            parent=root,
            children={},
            kvflow=_state(rng.choice([None, 9])),
            key=[0] * 16,
            component_data=CountingData({ComponentType.FULL: data}),
        )
    CountingData.looked_at = 0
    assert _evictable_farther_than(root, 3, needed=64) >= 64
    assert CountingData.looked_at <= 2 * 4 + 2
    CountingData.looked_at = 0
    assert _evictable_farther_than(root, 3) == 16 * 10_000
    assert CountingData.looked_at >= 10_000


# ---- the benchmark, CI-sized -------------------------------------------------------------------


def test_cache_cost_benchmark_smoke(tmp_path):
    from benchmarks import cache_cost

    out = tmp_path / "cache-cost.json"
    report = cache_cost.main(["--sizes", "1000", "--ops", "30", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == report["results"] and len(report["results"]) == 2
    for case in report["results"]:
        assert set(case["ops"]) == {"match", "evict", "insert", "mixed", "hint"}
        for op in ("match", "evict", "insert", "mixed"):
            per = case["ops"][op]
            assert per["kvflow"]["ops"] >= 20 and per["python"]["p50_us"] > 0
            assert per["kvflow_over_python"] > 0
            assert ("rust" in per) == report["rust"]["available"]
    assert "| fan | 1000 | evict |" in out.with_suffix(".md").read_text()
