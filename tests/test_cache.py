"""WorkflowRadixCache on SGLang's real unified radix tree (no model, no server)."""

from __future__ import annotations

import random

import pytest
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvflow.cache.workflow_table import WorkflowTable
from kvflow.config import KVFlowConfig
from kvflow.harness.offline import CacheDriver
from kvflow.hints import WorkflowHint

SYSTEM = list(range(1, 31))  # a 30-token system prompt shared by every agent


def agent_prompt(index: int, length: int = 20) -> list[int]:
    return [1000 * (index + 1) + j for j in range(length)]


def dynamic(tag: int, length: int = 5) -> list[int]:
    return [500_000 + 10 * tag + j for j in range(length)]


def hint(
    agent: str, fixed: int | None, steps: dict[str, int] | None = None, workflow: str = "wf"
) -> WorkflowHint:
    return WorkflowHint(workflow, agent, fixed, steps or {})


def test_shared_system_prompt_is_protected_by_its_most_urgent_user_without_copying_ownership():
    driver = CacheDriver(size=400)
    fixed = len(SYSTEM) + 20
    driver.serve(SYSTEM + agent_prompt(0) + dynamic(0), hint("a", fixed, {"a": 0, "b": 3}))
    driver.serve(SYSTEM + agent_prompt(1) + dynamic(1), hint("b", fixed, {"a": 2, "b": 0}))
    agents = driver.cache.kvflow.workflows.workflows()[0].agents
    a_node, b_node = agents["a"].node, agents["b"].node
    assert a_node is not None and b_node is not None and a_node is not b_node
    shared = a_node.parent
    assert shared is b_node.parent and len(shared.key) == len(SYSTEM)
    # b finished, so it became the farthest (3); a, next up, protects the shared prompt
    assert (agents["a"].steps, agents["b"].steps) == (2, 3)
    assert agents["a"].next_use < agents["b"].next_use
    assert shared.kvflow.owners == [] and shared.kvflow.next_use == agents["a"].next_use
    assert a_node.kvflow.owners == [agents["a"]] and a_node.kvflow.next_use == agents["a"].next_use
    assert b_node.kvflow.next_use == agents["b"].next_use
    suffix = next(iter(a_node.children.values()))
    assert suffix.kvflow.owners == [] and suffix.kvflow.next_use is None  # dynamic part stays un-owned


def test_split_puts_the_boundary_exactly_at_fixed_prefix_len():
    driver = CacheDriver(size=200)
    prompt = agent_prompt(0, 30)
    driver.serve(prompt)  # one 30-token node, inserted before any hint
    root = driver.cache.tree_core.root_node
    (whole,) = root.children.values()
    assert len(whole.key) == 30
    driver.cache.kvflow.observe_hint(hint("a", 18), prompt)
    (boundary,) = root.children.values()
    assert len(boundary.key) == 18 and boundary.kvflow.owners[0].agent_id == "a"
    (tail,) = boundary.children.values()
    assert tail is whole and len(tail.key) == 12 and tail.kvflow.owners == [] and tail.kvflow.next_use is None
    driver.check_accounting()


def test_a_later_split_above_the_boundary_does_not_copy_ownership_up():
    driver = CacheDriver(size=200)
    prompt = agent_prompt(0, 30)
    driver.serve(prompt, hint("a", 30, {"a": 4}))
    boundary = driver.cache.kvflow.workflows.workflows()[0].agents["a"].node
    driver.serve(prompt[:10] + [7, 7, 7])  # diverges inside the owned node
    assert boundary.parent is not driver.cache.tree_core.root_node
    assert len(boundary.key) == 20 and boundary.kvflow.owners[0].agent_id == "a"
    assert (
        boundary.parent.kvflow.owners == []
        and boundary.parent.kvflow.next_use == boundary.kvflow.owners[0].next_use
    )


def test_two_workflows_sharing_a_prefix_never_collide_and_take_the_lowest_steps():
    driver = CacheDriver(size=400)
    fixed = len(SYSTEM) + 20
    driver.serve(SYSTEM + agent_prompt(0) + dynamic(0), hint("agent", fixed, {"agent": 5}, workflow="w1"))
    driver.serve(SYSTEM + agent_prompt(1) + dynamic(1), hint("agent", fixed, {"agent": 1}, workflow="w2"))
    w1, w2 = (wf.agents["agent"] for wf in driver.cache.kvflow.workflows.workflows())
    assert w1 is not w2 and w1.node is not w2.node
    assert w1.steps == 5 and w2.steps == 1
    assert w2.next_use < w1.next_use and w1.node.parent.kvflow.next_use == w2.next_use


def test_unowned_nodes_are_evicted_before_any_owned_node_lru_among_them():
    driver = CacheDriver(size=100)
    driver.serve(agent_prompt(0, 40), hint("a", 40, {"a": 9}))  # owned, far away
    driver.serve(agent_prompt(1, 20))  # un-hinted traffic, older
    driver.serve(agent_prompt(2, 20))  # un-hinted traffic, newer
    driver.allocator.freed.clear()
    driver.cache.evict(EvictParams(num_tokens=30))
    owned = agent_prompt(0, 40)
    assert len(driver.allocator.freed) == 40  # both un-owned nodes, nothing owned
    assert driver.cached_len(owned) == 40
    assert driver.cached_len(agent_prompt(1, 20)) == 0 and driver.cached_len(agent_prompt(2, 20)) == 0
    assert driver.cache.tree_core.kvflow_evictions["device"]["unowned"]["nodes"] == 2
    assert driver.cache.tree_core.kvflow_evictions["device"]["owned"]["nodes"] == 0


def test_owned_nodes_go_farthest_steps_first_and_follow_step_updates():
    driver = CacheDriver(size=60)
    views = [{"a": 0, "b": 1, "c": 2}, {"a": 2, "b": 0, "c": 1}, {"a": 1, "b": 2, "c": 0}]
    for i, (agent, view) in enumerate(zip("abc", views, strict=True)):
        driver.serve(agent_prompt(i), hint(agent, 20, view))
    # the last view (a=1, b=2, c=0), then c finished and became the farthest: c=3
    agents = driver.cache.kvflow.workflows.workflows()[0].agents
    assert [agents[x].steps for x in "abc"] == [1, 2, 3]
    driver.cache.evict(EvictParams(num_tokens=20))
    assert driver.cached_len(agent_prompt(2)) == 0  # c, farthest
    assert driver.cached_len(agent_prompt(0)) == 20 and driver.cached_len(agent_prompt(1)) == 20
    driver.cache.kvflow.observe_hint(hint("b", 20, {"a": 5, "b": 0}), agent_prompt(1))
    driver.cache.evict(EvictParams(num_tokens=20))
    assert driver.cached_len(agent_prompt(0)) == 0  # a moved to 5
    assert driver.cached_len(agent_prompt(1)) == 20
    assert driver.cache.tree_core.kvflow_evictions["device"]["owned"]["nodes"] == 2


def test_equal_steps_across_workflows_go_by_when_they_are_needed_the_later_first():
    driver = CacheDriver(size=60)
    prompts = {"w1": agent_prompt(0), "w2": agent_prompt(1)}
    for workflow, prompt in prompts.items():  # same pace (the prior); w2 stepped later
        driver.serve(prompt, hint("agent", 20, {"agent": 0, "next": 1}, workflow=workflow))
    w1, w2 = (wf.agents["agent"] for wf in driver.cache.kvflow.workflows.workflows())
    assert w1.steps == w2.steps and w1.next_use < w2.next_use
    driver.cache.evict(EvictParams(num_tokens=20))
    assert driver.cached_len(prompts["w2"]) == 0 and driver.cached_len(prompts["w1"]) == 20


def test_a_slow_workflows_next_agent_goes_before_a_fast_workflows_farther_one():
    driver = CacheDriver(size=400)
    fast_cycle, slow_cycle = ["f0", "f1", "f2"], ["s0", "s1"]
    prompts = {name: agent_prompt(i) for i, name in enumerate(fast_cycle + slow_cycle)}
    turns = {"fast": 0, "slow": 0}

    def step(workflow: str, cycle: list[str]) -> None:
        turn = turns[workflow]
        steps = {a: (j - turn) % len(cycle) for j, a in enumerate(cycle)}
        running = cycle[turn % len(cycle)]
        driver.serve(prompts[running] + dynamic(sum(turns.values()), 4), hint(running, 20, steps, workflow))
        turns[workflow] += 1

    for _ in range(3):  # the slow workflow steps once while the fast one steps nine times
        step("slow", slow_cycle)
        for _ in range(9):
            step("fast", fast_cycle)
    step("slow", slow_cycle)
    step("fast", fast_cycle)
    slow = driver.cache.kvflow.workflows.get("slow")
    fast = driver.cache.kvflow.workflows.get("fast")
    assert slow.pace.interval > 5 * fast.pace.interval
    slow_next = min((a for a in slow.agents.values() if a.steps > 0), key=lambda a: a.steps)
    fast_farthest = max(fast.agents.values(), key=lambda a: a.steps)
    assert slow_next.steps < fast_farthest.steps  # by hops the slow one's next agent would be kept...
    assert slow_next.next_use > fast_farthest.next_use  # ...but it is needed later


@pytest.mark.parametrize("tie_break, evicted", [("lru", "w1"), ("mru", "w2")])
def test_with_hop_urgency_equal_steps_across_workflows_are_broken_by_the_tie_break(tie_break, evicted):
    driver = CacheDriver(size=60, policy_config={"tie_break": tie_break, "urgency": "hops"})
    prompts = {"w1": agent_prompt(0), "w2": agent_prompt(1)}
    for workflow, prompt in prompts.items():  # w1 first (least recently used), then w2
        driver.serve(prompt, hint("agent", 20, {"agent": 0, "next": 1}, workflow=workflow))
    steps = [wf.agents["agent"].steps for wf in driver.cache.kvflow.workflows.workflows()]
    assert steps[0] == steps[1]
    driver.cache.evict(EvictParams(num_tokens=20))
    kept = "w2" if evicted == "w1" else "w1"
    assert driver.cached_len(prompts[evicted]) == 0 and driver.cached_len(prompts[kept]) == 20


def test_an_unknown_tie_break_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="'tie_break'.*lru, mru"):
        CacheDriver(size=60, policy_config={"tie_break": "lfu"})


def test_nothing_is_pinned_owned_prompts_are_evicted_under_pressure():
    driver = CacheDriver(size=60)
    for i, agent in enumerate("abc"):
        driver.serve(agent_prompt(i), hint(agent, 20, {agent: 0}))
    hit = driver.serve(agent_prompt(3, 60))  # needs the whole pool
    assert hit == 0
    assert all(driver.cached_len(agent_prompt(i)) == 0 for i in range(3))
    assert all(agent.node is None for agent in driver.cache.kvflow.workflows.workflows()[0].agents.values())


def test_stale_workflows_expire_back_to_plain_lru(monkeypatch):
    monkeypatch.setenv("KVFLOW_CONFIG", '{"hint_ttl": 0.2, "max_workflows": 16}')
    assert KVFlowConfig.from_env().hint_ttl == 0.2
    driver = CacheDriver(size=40)
    table = driver.cache.kvflow.workflows
    assert (table.ttl, table.max_workflows) == (0.2, 16)  # the cache took its table's caps from the config
    now = [0.0]
    driver.cache.kvflow.workflows = WorkflowTable(0.2, 16, clock=lambda: now[0], max_agents=table.max_agents)
    driver.serve(agent_prompt(0), hint("a", 20, {"a": 0}))
    driver.serve(agent_prompt(1))  # newer un-owned traffic
    now[0] = 0.2
    driver.cache.evict(EvictParams(num_tokens=0))
    assert len(driver.cache.kvflow.workflows) == 1  # not past the TTL yet
    now[0] = 0.3
    driver.cache.evict(EvictParams(num_tokens=20))  # expiry runs first, then plain LRU
    assert len(driver.cache.kvflow.workflows) == 0
    assert driver.cached_len(agent_prompt(0)) == 0  # older, no longer protected
    assert driver.cached_len(agent_prompt(1)) == 20


def test_inferred_boundary_is_the_prefix_the_agent_keeps_repeating():
    driver = CacheDriver(size=200)
    fixed = agent_prompt(0, 25)
    driver.serve(fixed + dynamic(1), hint("a", None))
    agent = driver.cache.kvflow.workflows.workflows()[0].agents["a"]
    assert agent.fixed_prefix_len is None and agent.node is None  # one request proves nothing
    driver.serve(fixed + dynamic(2), hint("a", None))
    assert agent.fixed_prefix_len == 25 and len(agent.node.key) == 25


def _random_requests(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(5, 40))] for _ in range(6)]
    requests = []
    for _ in range(count):
        base = list(rng.choice(prefixes))
        base = base[: rng.randrange(1, len(base) + 1)]
        requests.append(base + [rng.randrange(1, 50) for _ in range(rng.randrange(0, 25))])
    return requests


@pytest.mark.parametrize("seed", range(5))
def test_without_hints_eviction_order_equals_stock_lru(seed):
    kvflow = CacheDriver(size=150)
    stock = CacheDriver(size=150, cache_class=UnifiedRadixCache, policy="lru")
    for tokens in _random_requests(seed, 120):
        assert kvflow.serve(tokens) == stock.serve(tokens)
    assert len(stock.allocator.freed) > 500  # the pool really was under pressure
    assert kvflow.allocator.freed == stock.allocator.freed


def _cyclic_workflow_hits(policy: str, agents: int = 6, fixed: int = 40, capacity_prompts: int = 4) -> float:
    """Fraction of invocations (after one warm-up round) whose fixed prompt was cached."""
    dyn = 4
    driver = CacheDriver(size=capacity_prompts * fixed + 2 * dyn, policy=policy)
    hits = total = 0
    for round_index in range(6):
        for i in range(agents):
            steps = {f"agent{j}": (j - i) % agents for j in range(agents)}
            hit = driver.serve(
                agent_prompt(i, fixed) + dynamic(round_index * agents + i, dyn),
                hint(f"agent{i}", fixed, steps),
            )
            if round_index > 0:
                total += 1
                hits += hit >= fixed
    return hits / total


def test_cyclic_workflow_reaches_the_offline_optimum_where_lru_hits_nothing():
    agents, capacity = 6, 4
    optimum = (capacity - 1) / (agents - 1)
    assert _cyclic_workflow_hits("kvflow", agents, capacity_prompts=capacity) >= 0.9 * optimum
    assert _cyclic_workflow_hits("lru", agents, capacity_prompts=capacity) == 0.0


def test_ending_a_workflow_makes_its_prompts_plain_lru_at_once():
    driver = CacheDriver(size=40)
    driver.serve(agent_prompt(0), hint("a", 20, {"a": 0}))
    driver.serve(agent_prompt(1))
    assert driver.cache.kvflow.end_workflow("wf") and not driver.cache.kvflow.end_workflow("wf")
    driver.cache.evict(EvictParams(num_tokens=20))
    assert driver.cached_len(agent_prompt(0)) == 0 and driver.cached_len(agent_prompt(1)) == 20


def test_a_full_reset_leaves_no_agent_owning_a_node_of_the_old_tree():
    # SGLang's /flush_cache: the tree cache is reset and the pool cleared.
    driver = CacheDriver(size=64)
    hint = WorkflowHint("w", "a0", 8, {"a0": 0, "a1": 1})
    driver.serve(list(range(10, 22)), hint)
    agent = driver.cache.kvflow.workflows.get("w").agents["a0"]
    assert agent.node is not None
    driver.cache.reset()
    driver.allocator.clear()
    assert agent.node is None
    driver.cache.kvflow.check_integrity()
    assert driver.serve(list(range(10, 22)), hint) == 0  # the tree is empty; the workflow is still known
    assert agent.node is not None and agent.steps is not None
    driver.cache.kvflow.check_integrity()
