"""The abuse caps on the real cache: a workflow's protected share of the pool, and the total
number of tracked agents (no server)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from kvflow.cache.radix_cache import WorkflowRadixCache
from kvflow.config import KVFlowConfig
from kvflow.harness.offline import CacheDriver
from kvflow.hints import MAX_STEPS_ENTRIES, WorkflowHint
from kvflow.stats_query import StatsQuery


def prompt(workflow: int, agent: int, length: int = 20) -> list[int]:
    return [100_000 * (workflow + 1) + 100 * agent + j for j in range(length)]


def driver_with(size: int, **options) -> CacheDriver:
    driver = CacheDriver(size=size)
    driver.cache.kvflow.config = replace(driver.cache.kvflow.config, **options)
    driver.cache.kvflow.workflows.max_agents = driver.cache.kvflow.config.max_tracked_agents
    return driver


def test_past_its_share_a_workflows_farthest_prompts_go_before_every_other_workflows_protected_ones():
    driver = driver_with(200, max_protected_fraction=0.5)  # 100 tokens per workflow
    hog = {f"h{i}": i for i in range(6)}
    for i in range(6):  # 6 x 20 tokens asked to be protected, nearest first
        driver.serve(prompt(0, i), WorkflowHint("hog", f"h{i}", 20, hog))
    agents = driver.cache.kvflow.workflows.get("hog").agents
    assert [agents[f"h{i}"].over_budget for i in range(6)] == [False] * 5 + [True]
    assert agents["h5"].next_use[0] == 1 and all(agents[f"h{i}"].next_use[0] == 0 for i in range(5))
    driver.serve(prompt(1, 0), WorkflowHint("small", "s", 20, {"s": 50}))  # far, but within its share
    driver.cache.evict(EvictParams(num_tokens=20))
    assert driver.cached_len(prompt(0, 5)) == 0  # the hog's excess went first...
    assert driver.cached_len(prompt(1, 0)) == 20  # ...before a farther prompt within its share
    assert driver.cached_len(prompt(0, 0)) == 20


def test_within_one_workflow_the_order_stays_by_steps_whatever_the_share():
    orders = []
    for fraction in (1.0, 0.25):
        driver = driver_with(120, max_protected_fraction=fraction)
        steps = {f"a{i}": 5 - i for i in range(5)}
        for i in range(5):
            driver.serve(prompt(0, i), WorkflowHint("wf", f"a{i}", 20, steps))
        order = []
        while len(order) < 5:
            driver.cache.evict(EvictParams(num_tokens=20))
            order += [i for i in range(5) if driver.cached_len(prompt(0, i)) == 0 and i not in order]
        orders.append(order)
    assert orders[0] == orders[1]


def test_a_shared_system_prompt_counts_once_against_the_share():
    driver = driver_with(400, max_protected_fraction=0.5)  # 200 tokens
    system = list(range(1, 121))
    steps = {"a": 0, "b": 1, "c": 2}
    for i, agent in enumerate("abc"):
        driver.serve(system + prompt(0, i), WorkflowHint("wf", agent, 140, steps))
    agents = driver.cache.kvflow.workflows.get("wf").agents
    # 120 shared + 3 x 20 own = 180 tokens: within 200, although 3 x 140 = 420 would not be
    assert not any(agent.over_budget for agent in agents.values())


def test_the_tracked_agent_cap_forgets_the_least_recently_hinted_workflows():
    driver = driver_with(2000, max_tracked_agents=10)
    for w in range(4):
        steps = {f"x{i}": i for i in range(4)}
        driver.serve(prompt(w, 0), WorkflowHint(f"w{w}", "x0", 20, steps))
    table = driver.cache.kvflow.workflows
    assert table.agent_count <= 10
    assert table.get("w0") is None and table.get("w3") is not None
    summary = driver.cache.kvflow.stats()
    assert summary["tracked"] == {"workflows": len(table), "agents": table.agent_count}
    # a forgotten workflow's prompt is plain LRU again
    (node,) = [
        n for n in driver.cache.tree_core.root_node.children.values() if n.key.token_ids[0] == prompt(0, 0)[0]
    ]
    assert node.kvflow.next_use is None and node.kvflow.owners == []


def test_stats_detail_comes_in_pages_and_the_summary_does_not_grow():
    driver = CacheDriver(size=4000)
    small = driver.cache.kvflow.stats()
    for w in range(30):
        steps = {f"agent-{i}": i for i in range(50)}
        driver.serve(prompt(w, 0), WorkflowHint(f"w{w}", "agent-0", 20, steps))
    big = driver.cache.kvflow.stats()
    assert set(big) == set(small) and big["tracked"] == {"workflows": 30, "agents": 1500}
    page = driver.cache.kvflow.stats(StatsQuery("w7", offset=10, limit=5))["workflow"]
    assert page["total"] == 50 and list(page["agents"]) == [f"agent-{i}" for i in range(10, 15)]
    listing = driver.cache.kvflow.stats(StatsQuery(None, offset=28, limit=5))["workflows"]
    assert listing["total"] == 30 and [item["workflow_id"] for item in listing["items"]] == ["w28", "w29"]
    assert driver.cache.kvflow.stats(StatsQuery("unknown"))["workflow"] is None


def test_config_refuses_fractions_outside_the_unit_interval():
    assert KVFlowConfig(max_protected_fraction=0).error() is not None
    assert KVFlowConfig(max_protected_fraction=1.5).error() is not None
    assert KVFlowConfig(max_tracked_agents=0).error() is not None
    assert KVFlowConfig().error() is None
    assert isinstance(CacheDriver(size=10).cache, WorkflowRadixCache)


def test_a_full_steps_map_does_not_crowd_out_the_requesting_agent():
    driver = CacheDriver(size=200)
    steps = {f"s{i}": 1 for i in range(MAX_STEPS_ENTRIES)}
    driver.serve(prompt(0, 0), WorkflowHint("big", "me", 20, steps))
    agents = driver.cache.kvflow.workflows.get("big").agents
    assert len(agents) == MAX_STEPS_ENTRIES and "me" in agents
    assert agents["me"].node is not None and agents["me"].fixed_prefix_len == 20


def test_the_idle_check_hook_finds_a_corrupted_subtree_minimum(monkeypatch):
    from types import SimpleNamespace

    from kvflow.patches import idle_integrity

    monkeypatch.setenv("SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK", "1")
    driver = CacheDriver(size=200)
    driver.serve(prompt(0, 0), WorkflowHint("wf", "a", 20, {"a": 3}))
    checker = SimpleNamespace(tree_cache=driver.cache)  # SGLang's checker only lends its tree_cache
    idle_integrity._check_ownership(None, checker)
    driver.cache.kvflow.workflows.get("wf").agents["a"].node.kvflow.next_use = 99
    with pytest.raises(AssertionError, match="next_use"):
        idle_integrity._check_ownership(None, checker)
    monkeypatch.setenv("SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK", "0")
    idle_integrity._check_ownership(None, checker)  # off unless SGLang's own flag is on
