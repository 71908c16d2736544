"""Patch: kvflow's cache counters in SGLang's Prometheus ``/metrics`` (``--enable-metrics``).

:class:`KVFlowMetrics` exports the kvflow core's ``stats()`` summary (the one ``GET
/kvflow/stats`` answers) as series beside one scheduler's SGLang metrics.

- Without ``--enable-metrics`` SGLang makes no collector and nothing is created.
- The series are made with SGLang's metric classes (prometheus_client, or the collector's own
  injected ones) in the default registry, which SGLang's multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR``) exports from the HTTP process; prometheus_client is imported
  only then, after SGLang set that directory.
- Target ``Scheduler.init_metrics_reporter`` (AFTER, :func:`_attach`): attaches the series,
  labelled as this scheduler's, once the tree cache exists.
- Target ``SchedulerMetricsCollector.log_stats`` (AFTER, :func:`_update`): brings them up to date
  where SGLang pushes its scheduler gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow.cache.ownership import RELEASE_REASONS
from kvflow.cache.radix_cache import workflow_cache

TARGETS = (
    "sglang.srt.managers.scheduler.Scheduler.init_metrics_reporter",
    "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats",
)
TIERS = ("device", "host")
OWNER_CLASSES = ("owned", "unowned")
PREFETCH_OUTCOMES = ("timely", "late", "wasted", "dropped_stale")

Summary = Mapping[str, Any]
# A series' values read from the summary: label values (in ``labels`` order) -> value.
Reader = Callable[[Summary], dict[tuple[str, ...], float]]


@dataclass(frozen=True)
class SeriesSpec:
    """One kvflow metric: its name, help text, labels beyond SGLang's, and how to read it."""

    name: str
    documentation: str
    labels: tuple[str, ...]
    read: Reader


def _scalar(section: str, field: str) -> Reader:
    def read(summary: Summary) -> dict[tuple[str, ...], float]:
        values = summary[section]
        return {} if values is None else {(): values[field]}

    return read


def _fixed_cached(summary: Summary) -> dict[tuple[str, ...], float]:
    return {(tier,): summary["totals"][f"fixed_tokens_from_{tier}"] for tier in TIERS}


def _evicted(unit: str) -> Reader:
    def read(summary: Summary) -> dict[tuple[str, ...], float]:
        evictions = summary["evictions"]
        return {(tier, cls): evictions[tier][cls][unit] for tier in TIERS for cls in OWNER_CLASSES}

    return read


def _contexts_released(summary: Summary) -> dict[tuple[str, ...], float]:
    released = summary["contexts"]["released"]
    return {(reason,): released[reason] for reason in RELEASE_REASONS}


def _prefetch_outcomes(summary: Summary) -> dict[tuple[str, ...], float]:
    prefetch = summary["prefetch"]
    return {} if prefetch is None else {(outcome,): prefetch[outcome] for outcome in PREFETCH_OUTCOMES}


_PREFETCH = "Prefetches (host to device loads of the fixed prompts of the agents due next)"
COUNTERS = (
    SeriesSpec(
        "kvflow:fixed_prompt_cached_tokens_total",
        "Fixed-prompt tokens of finished hinted requests served from the cache, by tier (device/host).",
        ("cache_source",),
        _fixed_cached,
    ),
    SeriesSpec(
        "kvflow:fixed_prompt_recomputed_tokens_total",
        "Fixed-prompt tokens of finished hinted requests that were not cached and were prefilled again.",
        (),
        _scalar("totals", "fixed_tokens_recomputed"),
    ),
    SeriesSpec(
        "kvflow:agent_invocations_total",
        "Finished hinted requests (agent invocations), aborted ones excluded.",
        (),
        _scalar("totals", "invocations"),
    ),
    SeriesSpec(
        "kvflow:evicted_tokens_total",
        "Tokens evicted from the radix cache, by tier and by class (owned: a tracked agent's fixed prompt).",
        ("tier", "class"),
        _evicted("tokens"),
    ),
    SeriesSpec(
        "kvflow:evicted_nodes_total",
        "Radix-tree nodes evicted, by tier and by class (owned: a tracked agent's fixed prompt).",
        ("tier", "class"),
        _evicted("nodes"),
    ),
    SeriesSpec(
        "kvflow:contexts_shrunk_total",
        "Agent contexts whose end was evicted and that stayed owned, shorter.",
        (),
        _scalar("contexts", "shrunk"),
    ),
    SeriesSpec(
        "kvflow:contexts_released_total",
        "Agent contexts released, by reason: not_resumed (the next prompt did not extend it), "
        "last_turn (keep_context false), forgotten (its workflow ended or expired), "
        "evicted (nothing past the fixed prompt was left).",
        ("reason",),
        _contexts_released,
    ),
    SeriesSpec("kvflow:prefetch_issued_total", f"{_PREFETCH} issued.", (), _scalar("prefetch", "issued")),
    SeriesSpec(
        "kvflow:prefetch_completed_total",
        f"{_PREFETCH} whose load was acknowledged.",
        (),
        _scalar("prefetch", "completed"),
    ),
    SeriesSpec(
        "kvflow:prefetch_outcomes_total",
        f"{_PREFETCH} by outcome: timely (loaded before its request came), late (its request waited), "
        "wasted (evicted before use), dropped_stale (its workflow moved on).",
        ("outcome",),
        _prefetch_outcomes,
    ),
    SeriesSpec(
        "kvflow:prefetch_loaded_tokens_total",
        "Tokens loaded from host to device by acknowledged prefetches.",
        (),
        _scalar("prefetch", "tokens_loaded"),
    ),
    SeriesSpec(
        "kvflow:prefetch_held_requests_total",
        "Requests held back while a prefetch of their prompt was in flight (each counted once).",
        (),
        _scalar("prefetch", "held"),
    ),
    SeriesSpec(
        "kvflow:prefetch_skipped_no_room_total",
        "Due fixed prompts whose prefetch had to wait for device room (each counted once while due).",
        (),
        _scalar("prefetch", "skipped_no_room"),
    ),
)
GAUGES = (
    SeriesSpec("kvflow:tracked_workflows", "Workflows tracked now.", (), _scalar("tracked", "workflows")),
    SeriesSpec(
        "kvflow:tracked_agents", "Agents tracked now, over all workflows.", (), _scalar("tracked", "agents")
    ),
    SeriesSpec("kvflow:context_agents", "Agents owning a context now.", (), _scalar("contexts", "agents")),
    SeriesSpec(
        "kvflow:context_tokens",
        "Tokens of the contexts agents own now, summed over agents (a shared prefix once per agent).",
        (),
        _scalar("contexts", "tokens"),
    ),
    SeriesSpec(
        "kvflow:prior_pause",
        "The prior gap between one agent's requests, in logical-clock ticks (hinted requests admitted).",
        (),
        _scalar("urgency", "prior_pause"),
    ),
)


class KVFlowMetrics:
    """kvflow's counters as Prometheus series beside one scheduler's SGLang metrics.

    ``labels`` are the scheduler collector's (names and values); ``summary`` returns
    the kvflow core's ``stats()``. Monotonic counts are Counters advanced by what
    the summary gained since the last update; a count that went down started again
    from zero (``/flush_cache`` resets the tree core's eviction counts) and the
    Counter is advanced by its new value, so the series stays monotonic (a count
    that restarted and passed its old value before the next update is seen as growth).
    """

    def __init__(
        self,
        labels: Mapping[str, Any],
        summary: Callable[[], Summary],
        counter_cls: Any = None,
        gauge_cls: Any = None,
        registry: Any = None,
    ) -> None:
        from prometheus_client import Counter, Gauge

        self.labels = dict(labels)
        self.summary = summary
        kwargs = {} if registry is None else {"registry": registry}
        base = tuple(self.labels)
        self._counters = [
            (spec, (counter_cls or Counter)(spec.name, spec.documentation, (*base, *spec.labels), **kwargs))
            for spec in COUNTERS
        ]
        self._gauges = [
            (
                spec,
                (gauge_cls or Gauge)(
                    spec.name,
                    spec.documentation,
                    (*base, *spec.labels),
                    multiprocess_mode="mostrecent",
                    **kwargs,
                ),
            )
            for spec in GAUGES
        ]
        self._exported: dict[tuple[str, tuple[str, ...]], float] = {}

    def _child(self, metric: Any, spec: SeriesSpec, values: tuple[str, ...]) -> Any:
        return metric.labels(**self.labels, **dict(zip(spec.labels, values, strict=True)))

    def update(self) -> None:
        """Bring every series up to the cache's current summary."""
        summary = self.summary()
        for spec, counter in self._counters:
            for values, value in spec.read(summary).items():
                key = (spec.name, values)
                last = self._exported.get(key)
                if value == last:
                    continue
                # First sight incs by the whole value, 0 too: every series appears, so rate() has a start.
                self._child(counter, spec, values).inc(
                    value - last if last is not None and value > last else value
                )
                self._exported[key] = value
        for spec, gauge in self._gauges:
            for values, value in spec.read(summary).items():
                self._child(gauge, spec, values).set(value)


def _attach(result, scheduler, *args, **kwargs):
    """Attach a :class:`KVFlowMetrics` to the scheduler's ``SchedulerMetricsCollector``.

    ``init_metrics_reporter`` is where SGLang sets up its scheduler metrics, once the tree cache
    exists; this acts with ``--enable-metrics`` and the kvflow cache. The series carry the
    collector's own labels (``model_name``, ``engine_type``, ``tp_rank``, ``pp_rank``,
    ``moe_ep_rank``, ``dp_rank`` under DP, ``priority`` with priority scheduling,
    ``--extra-metric-labels``), so each series is this scheduler's, on its own ranks.
    """
    collector = scheduler.metrics_reporter.metrics_collector
    core = workflow_cache(scheduler.tree_cache)
    if collector is not None and core is not None:
        collector.kvflow_metrics = KVFlowMetrics(
            collector.labels, core.stats, collector._counter_cls, collector._gauge_cls
        )
    return result


def _update(result, collector, *args, **kwargs):
    """Bring the kvflow series up to date from the kvflow core's ``stats()`` summary.

    ``log_stats`` is where SGLang pushes its scheduler gauges: after each logged prefill batch,
    every ``--decode-log-interval`` decode steps, and when idle at most every 30 s.
    """
    metrics = getattr(collector, "kvflow_metrics", None)
    if metrics is not None:
        metrics.update()
    return result


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _attach, HookType.AFTER)
    HookRegistry.register(TARGETS[1], _update, HookType.AFTER)
