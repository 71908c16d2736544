"""kvflow's Prometheus series (patches/metrics.py) on the real cache, no server: each series equals
the ``GET /kvflow/stats`` summary it mirrors, under SGLang's scheduler labels, and stays monotonic."""

from __future__ import annotations

from kvflow.patches.metrics import KVFlowMetrics
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from kvflow.harness.offline import CacheDriver
from kvflow.hints import WorkflowHint

# The labels SGLang's SchedulerMetricsCollector.init_new gives a DP rank's scheduler.
SCHEDULER_LABELS = {
    "model_name": "m",
    "engine_type": "unified",
    "tp_rank": "0",
    "pp_rank": "0",
    "moe_ep_rank": "0",
    "dp_rank": "1",
}

Series = dict[tuple[str, frozenset], float]


def expected_series(summary: dict) -> Series:
    """Every kvflow sample (name, its own labels) and its value, read from a ``/kvflow/stats`` summary."""
    totals, evictions, prefetch = summary["totals"], summary["evictions"], summary["prefetch"]
    series: Series = {
        ("kvflow:fixed_prompt_cached_tokens_total", frozenset({("cache_source", "device")})): totals[
            "fixed_tokens_from_device"
        ],
        ("kvflow:fixed_prompt_cached_tokens_total", frozenset({("cache_source", "host")})): totals[
            "fixed_tokens_from_host"
        ],
        ("kvflow:fixed_prompt_recomputed_tokens_total", frozenset()): totals["fixed_tokens_recomputed"],
        ("kvflow:agent_invocations_total", frozenset()): totals["invocations"],
        ("kvflow:tracked_workflows", frozenset()): summary["tracked"]["workflows"],
        ("kvflow:tracked_agents", frozenset()): summary["tracked"]["agents"],
        ("kvflow:context_agents", frozenset()): summary["contexts"]["agents"],
        ("kvflow:context_tokens", frozenset()): summary["contexts"]["tokens"],
        ("kvflow:prior_pause", frozenset()): summary["urgency"]["prior_pause"],
        ("kvflow:contexts_shrunk_total", frozenset()): summary["contexts"]["shrunk"],
    }
    for reason in ("not_resumed", "last_turn", "forgotten", "evicted"):
        labels = frozenset({("reason", reason)})
        series[("kvflow:contexts_released_total", labels)] = summary["contexts"]["released"][reason]
    for tier in ("device", "host"):
        for cls in ("owned", "unowned"):
            labels = frozenset({("tier", tier), ("class", cls)})
            series[("kvflow:evicted_tokens_total", labels)] = evictions[tier][cls]["tokens"]
            series[("kvflow:evicted_nodes_total", labels)] = evictions[tier][cls]["nodes"]
    if prefetch is not None:
        for name, field in (
            ("issued", "issued"),
            ("completed", "completed"),
            ("loaded_tokens", "tokens_loaded"),
            ("held_requests", "held"),
            ("skipped_no_room", "skipped_no_room"),
        ):
            series[(f"kvflow:prefetch_{name}_total", frozenset())] = prefetch[field]
        for outcome in ("timely", "late", "wasted", "dropped_stale"):
            series[("kvflow:prefetch_outcomes_total", frozenset({("outcome", outcome)}))] = prefetch[outcome]
    return series


OWN_LABELS = ("cache_source", "tier", "class", "outcome", "reason")


def kvflow_samples(exposition: str) -> tuple[Series, list[dict]]:
    """The kvflow samples of a Prometheus text exposition, keyed by name and their own labels,
    and the rest of each sample's labels (the scheduler's)."""
    series, scheduler_labels = {}, []
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if not sample.name.startswith("kvflow:") or sample.name.endswith("_created"):
                continue
            own = frozenset((k, v) for k, v in sample.labels.items() if k in OWN_LABELS)
            series[(sample.name, own)] = sample.value
            scheduler_labels.append({k: v for k, v in sample.labels.items() if k not in OWN_LABELS})
    return series, scheduler_labels


def prompt(agent: int, length: int = 20) -> list[int]:
    return [1000 + 100 * agent + j for j in range(length)]


def serve_cycle(driver: CacheDriver, workflow_id: str, agents: int) -> None:
    for i in range(agents):
        steps = {f"a{j}": (j - i) % agents for j in range(agents)}
        driver.serve(prompt(i), WorkflowHint(workflow_id, f"a{i}", 20, steps))


def scrape(registry: CollectorRegistry) -> tuple[Series, list[dict]]:
    return kvflow_samples(generate_latest(registry).decode())


def test_each_series_equals_the_summary_under_the_schedulers_labels_and_stays_monotonic():
    driver = CacheDriver(size=60)  # three 20-token prompts: a cycle of four evicts
    registry = CollectorRegistry()
    metrics = KVFlowMetrics(SCHEDULER_LABELS, driver.cache.kvflow.stats, registry=registry)
    metrics.update()
    series, labels = scrape(registry)
    assert series == expected_series(driver.cache.kvflow.stats())
    # Every series present from the start: counts at 0, the prior pause at its prior (1 tick).
    assert all(value == (name == "kvflow:prior_pause") for (name, _), value in series.items())
    assert labels and all(sample == SCHEDULER_LABELS for sample in labels)

    for _ in range(3):
        serve_cycle(driver, "w", 4)
    driver.cache.kvflow.totals.record(20, 20, 12, 8)  # one finished request, as on_release records it
    metrics.update()
    summary = driver.cache.kvflow.stats()
    assert summary["evictions"]["device"]["owned"]["nodes"] > 0 and summary["tracked"]["agents"] == 4
    assert scrape(registry)[0] == expected_series(summary)

    # A tree reset (SGLang's /flush_cache) starts the tree core's eviction counts again from zero
    # (WorkflowTreeCore.reset); a count found lower than last exported restarted, and the Counter goes on.
    before = scrape(registry)[0]
    for tier in driver.cache.tree_core.kvflow_evictions.values():
        for counts in tier.values():
            counts.update(nodes=0, tokens=0)
    driver.cache.evict(EvictParams(num_tokens=20))
    metrics.update()
    after, summary = scrape(registry)[0], driver.cache.kvflow.stats()
    key = ("kvflow:evicted_nodes_total", frozenset({("tier", "device"), ("class", "owned")}))
    grown = summary["evictions"]["device"]["owned"]["nodes"]
    assert 0 < grown < before[key] and after[key] == before[key] + grown
    assert all(after[k] >= before[k] for k in before)


def test_without_a_prefetcher_there_are_no_prefetch_series():
    driver = CacheDriver(size=60)
    registry = CollectorRegistry()
    KVFlowMetrics(SCHEDULER_LABELS, driver.cache.kvflow.stats, registry=registry).update()
    names = {name for name, _ in scrape(registry)[0]}
    assert driver.cache.kvflow.stats()["prefetch"] is None
    assert names and not any("prefetch" in name for name in names)


def test_the_context_series_follow_the_agents_contexts():
    driver = CacheDriver(size=200)
    registry = CollectorRegistry()
    metrics = KVFlowMetrics(SCHEDULER_LABELS, driver.cache.kvflow.stats, registry=registry)
    contexts = {agent: prompt(0) + [7000 + ord(agent)] for agent in "ab"}
    for turn in range(3):  # two agents taking turns, each turn extending the agent's one before
        for agent, context in contexts.items():
            contexts[agent] = context = context + [100 * ord(agent) + 10 * turn + j for j in range(8)]
            driver.serve(context, WorkflowHint(f"w{agent}", agent, 20, {agent: 0}))
    driver.cache.evict(EvictParams(num_tokens=1))  # the end of one context: it shrinks
    driver.cache.kvflow.end_workflow("wb")
    metrics.update()
    series, summary = scrape(registry)[0], driver.cache.kvflow.stats()
    assert series == expected_series(summary)
    context = driver.cache.kvflow.workflows.get("wa").agents["a"].context_tokens
    assert series[("kvflow:context_agents", frozenset())] == 1
    assert series[("kvflow:context_tokens", frozenset())] == context > 20
    assert series[("kvflow:contexts_shrunk_total", frozenset())] == 1
    assert series[("kvflow:contexts_released_total", frozenset({("reason", "forgotten")}))] == 1
    assert series[("kvflow:prior_pause", frozenset())] == 2  # each agent's turns 2 requests apart
    driver.check_accounting()
