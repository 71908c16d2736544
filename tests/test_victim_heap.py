"""Device victims from one heap kept across evictions (kvflow.cache.victims, issue 12, part 3).

- Same victims as SGLang's own per-eviction heap with the same strategy: seeded random runs of
  hinted and un-hinted requests, steps changes, lookups (touches), expiries and evictions through two
  :class:`CacheDriver` caches in lockstep, every freed slot and every hit compared, and the
  integrity check (heap invariant included) after every request.
- Cost is counted, not timed: priorities computed per eviction at 10 and at 2000 leaves.
- Where the heap is kept, and the integrity check catching a broken one.
"""

from __future__ import annotations

import heapq
import random

import pytest
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from kvflow.cache.lazy_heap import next_version
from kvflow.cache.tree_core import WorkflowTreeCore
from kvflow.harness.offline import CacheDriver
from kvflow.hints import WorkflowHint


def _driver(incremental: bool, monkeypatch: pytest.MonkeyPatch, **kwargs) -> CacheDriver:
    with monkeypatch.context() as patch:
        if not incremental:  # the reference: SGLang's per-eviction heap over the same priorities
            patch.setattr(WorkflowTreeCore, "_victim_heap", lambda self: None)
        driver = CacheDriver(**kwargs)
    assert (driver.cache.tree_core.ownership.victims is not None) == incremental
    return driver


def _lockstep(seed: int, page_size: int, urgency: str, monkeypatch: pytest.MonkeyPatch) -> list[CacheDriver]:
    config = {"urgency": urgency}
    drivers = [
        _driver(flag, monkeypatch, size=128, page_size=page_size, policy_config=config)
        for flag in (True, False)
    ]
    rng = random.Random(seed)
    systems = [list(range(1, 13)), list(range(1, 7)) + list(range(40, 46)), list(range(60, 68))]
    agents = [(f"w{w}", f"a{a}") for w in range(3) for a in range(5)]
    for step in range(150):
        roll = rng.random()
        workflow, agent = rng.choice(agents)
        if roll < 0.6:  # a hinted request: shared system prompts split at several depths
            prompt = rng.choice(systems)[: rng.randint(4, 12)] + [1000 + agents.index((workflow, agent))] * 4
            steps_map = {a: rng.randint(0, 6) for w, a in agents if w == workflow and rng.random() < 0.5}
            fixed = rng.choice([None, len(prompt) - rng.randint(0, 4)])
            tail = [rng.randint(2000, 2100) for _ in range(rng.randint(0, 12))]
            hits = [d.serve(prompt + tail, WorkflowHint(workflow, agent, fixed, steps_map)) for d in drivers]
        elif roll < 0.7:  # a lookup: touches a path, so older heap entries fall below its priority
            probe = rng.choice(systems)[: rng.randint(2, 12)] + [1000 + rng.randrange(len(agents))] * 4
            hits = [d.cached_len(probe) for d in drivers]
        elif roll < 0.8:  # a steps change from outside a request
            steps = {agent: rng.randint(0, 9)}
            hits = [d.cache.kvflow.set_steps(workflow, steps) for d in drivers]
        elif roll < 0.9:  # a big un-hinted request: evicts owned and un-owned nodes
            tokens = [rng.randint(3000, 3050) for _ in range(rng.randint(70, 124))]
            hits = [d.serve(tokens) for d in drivers]
        elif roll < 0.95:  # an eviction on its own
            count = rng.randint(1, 40)
            hits = [d.cache.evict(EvictParams(num_tokens=count)).num_tokens_evicted for d in drivers]
            drivers[0].cache.kvflow.check_integrity()
        else:
            hits = [d.cache.kvflow.end_workflow(workflow) for d in drivers]
        assert hits[0] == hits[1], f"step {step}"
        if page_size == 1:
            assert drivers[0].allocator.freed == drivers[1].allocator.freed, f"step {step}"
        evictions = [d.cache.tree_core.kvflow_evictions for d in drivers]
        assert evictions[0] == evictions[1], f"step {step}"
    return drivers


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("page_size", [1, 4])
def test_the_heap_kept_across_evictions_picks_the_victims_sglangs_heap_picks(seed, page_size, monkeypatch):
    drivers = _lockstep(seed, page_size, "time", monkeypatch)
    evicted = drivers[0].cache.tree_core.kvflow_evictions["device"]
    assert evicted["owned"]["nodes"] and evicted["unowned"]["nodes"]


@pytest.mark.parametrize("seed", range(2))
def test_the_same_victims_with_hop_urgency(seed, monkeypatch):
    _lockstep(seed, 1, "hops", monkeypatch)


def _fan(leaves: int) -> CacheDriver:
    """One shared 8-token prompt and ``leaves`` hinted agents' 8-token prompts below it, pool full."""
    driver = CacheDriver(size=8 + 8 * leaves, check_every=10**9)
    for i in range(leaves):
        hint = WorkflowHint(f"wf{i // 64}", f"a{i % 64}", 16)
        driver.serve(list(range(1, 9)) + [10 * (i + 1) + j for j in range(8)], hint)
    return driver


def _priorities_per_eviction(leaves: int, evictions: int = 50) -> tuple[float, float]:
    """Priorities computed per eviction: in a first batch after the build, then in a second."""
    driver = _fan(leaves)
    victims = driver.cache.tree_core.ownership.victims
    computed, priority = [0], victims.priority

    def counted(node):
        computed[0] += 1
        return priority(node)

    victims.priority = counted
    per_batch = []
    for _ in range(2):
        computed[0] = 0
        for _ in range(evictions):
            assert driver.cache.evict(EvictParams(num_tokens=8)).num_tokens_evicted == 8
        per_batch.append(computed[0] / evictions)
    victims.priority = priority
    driver.cache.kvflow.check_integrity()
    return per_batch[0], per_batch[1]


def test_an_eviction_computes_priorities_for_its_victims_not_for_every_leaf():
    (_, small), (first, large) = _priorities_per_eviction(10, evictions=5), _priorities_per_eviction(2_000)
    # SGLang's heap computes one priority per leaf per eviction: 2000 here. Each leaf was re-keyed
    # when it was claimed (it left the un-owned class then), so even the first batch after the
    # build computes only its victims' (41 per eviction there when claims deferred the re-key).
    assert first <= 4 and large <= 4
    assert max(first, large) <= 2 * small + 1


@pytest.mark.parametrize(
    ("policy", "config", "kept"),
    [
        ("kvflow", None, True),
        ("kvflow", {"urgency": "hops"}, True),
        ("kvflow", {"tie_break": "mru"}, False),
        ("lru", None, False),
    ],
)
def test_the_heap_is_kept_only_where_priorities_only_grow_between_next_use_changes(policy, config, kept):
    driver = CacheDriver(size=64, policy=policy, policy_config=config)
    for i in range(12):
        driver.serve(list(range(1, 9)) + [100 + i] * 8, WorkflowHint("wf", f"a{i % 4}", 12))
    tree = driver.cache.tree_core
    assert (tree.ownership.victims is not None) == kept
    assert sum(c["nodes"] for c in tree.kvflow_evictions["device"].values())  # it evicted either way
    driver.cache.kvflow.check_integrity()


def _corrupt_missing(victims, leaf):
    victims.heap = [entry for entry in victims.heap if entry[2] is not leaf]
    heapq.heapify(victims.heap)


def _corrupt_above(victims, leaf):
    state = leaf.kvflow
    state.victim_key, state.victim_version = (2, 0, 0, 0.0), next_version()
    victims.heap.append((state.victim_key, state.victim_version, leaf))
    heapq.heapify(victims.heap)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(_corrupt_missing, "has no current victim heap entry"), (_corrupt_above, "above its priority")],
)
def test_the_integrity_check_catches_a_broken_victim_heap(corrupt, message):
    driver = _fan(6)
    victims = driver.cache.tree_core.ownership.victims
    driver.cache.kvflow.check_integrity()
    corrupt(victims, next(iter(victims.leaves)))
    with pytest.raises(AssertionError, match=message):
        driver.cache.kvflow.check_integrity()


def test_the_heap_is_rebuilt_so_it_stays_proportional_to_the_leaves():
    driver = _fan(50)
    cache, victims = driver.cache, driver.cache.tree_core.ownership.victims
    rng = random.Random(4)
    sizes = []
    for _ in range(2000):  # steps changes and touches, each pushing an entry
        agent = rng.randrange(50)
        cache.kvflow.set_steps(f"wf{agent // 64}", {f"a{agent % 64}": rng.randint(0, 99)})
        driver.cached_len(list(range(1, 9)) + [10 * (rng.randrange(50) + 1) + j for j in range(8)])
        sizes.append(len(victims.heap))
    assert max(sizes) <= 2 * len(victims.leaves) + 65
    assert len(victims.leaves) == 50
    cache.kvflow.check_integrity()
