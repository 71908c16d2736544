"""``GET /kvflow/stats``: one cache's counters and limits, rendered as the route's JSON.

:func:`render_stats` reads a :class:`~kvflow.cache.workflow_cache.WorkflowCache`
and changes nothing. The same summary feeds ``patches/metrics.py``.

- The summary's size and cost do not grow with the tracked state: counters, limits
  and how many workflows and agents are tracked, never one entry per workflow.
- Detail comes one page at a time, only when the query asks for it: one workflow's
  agents (``workflow_id``; None when it is not tracked) or the tracked workflows.
  Each agent's residency walks its paths to the root: O(depth), on that page only.
"""

from __future__ import annotations

from dataclasses import asdict
from itertools import islice
from typing import TYPE_CHECKING, Any

from kvflow.stats_query import StatsQuery

if TYPE_CHECKING:
    from kvflow.cache.workflow_cache import WorkflowCache
    from kvflow.cache.workflow_table import AgentState


def render_stats(core: WorkflowCache, query: StatsQuery | None = None) -> dict[str, Any]:
    """The bounded summary, plus one page of detail when ``query`` asks for it."""
    config, workflows, tree_core = core.config, core.workflows, core.cache.tree_core
    stats: dict[str, Any] = {
        "eviction_policy": core.eviction_policy,
        "tie_break": getattr(tree_core.eviction_strategy, "tie_break", None),
        "urgency": {
            "mode": workflows.logical_clock.mode,
            "clock": workflows.logical_clock.now,
            "prior_interval": workflows.logical_clock.prior_interval,
            "prior_pause": workflows.logical_clock.prior_pause,
            "ticks_per_second": workflows.logical_clock.ticks_per_second,
        },
        "pool_tokens": core.cache.token_to_kv_pool_allocator.size,
        "totals": {
            **asdict(core.totals),
            "hinted_requests": core.hinted_requests,
            "aborted_requests": core.aborted_requests,
        },
        "evictions": tree_core.kvflow_evictions,
        "contexts": {**asdict(tree_core.ownership.context_totals), "resume_prior": core.contexts.prior},
        "prefetch": asdict(core.prefetcher.counters) if core.prefetcher is not None else None,
        "link_emulation_gbps": config.emulate_link_gbps,
        "tracked": {"workflows": len(workflows), "agents": workflows.agent_count},
        "limits": {
            "max_workflows": config.max_workflows,
            "max_tracked_agents": config.max_tracked_agents,
            "max_protected_fraction": config.max_protected_fraction,
            "hint_ttl": config.hint_ttl,
        },
    }
    if query is not None and query.workflow_id is not None:
        stats["workflow"] = _workflow_detail(core, query)
    elif query is not None:
        page = workflows.page(query.offset, query.limit)
        stats["workflows"] = {
            "offset": query.offset,
            "total": len(workflows),
            "items": [{"workflow_id": w.workflow_id, "agents": len(w.agents)} for w in page],
        }
    return stats


def _workflow_detail(core: WorkflowCache, query: StatsQuery) -> dict[str, Any] | None:
    workflow = core.workflows.get(query.workflow_id)
    if workflow is None:
        return None
    agents = list(islice(workflow.agents.values(), query.offset, query.offset + query.limit))
    return {
        "workflow_id": workflow.workflow_id,
        "pace": {
            "last_step": workflow.pace.last_step,
            "interval": workflow.pace.interval,
            "measured": workflow.pace.measured,
        },
        "offset": query.offset,
        "total": len(workflow.agents),
        "agents": {
            agent.agent_id: {
                "steps_to_execution": agent.steps,
                "next_use": agent.next_use,
                "fixed_prefix_len": agent.fixed_prefix_len,
                "over_budget": agent.over_budget,
                "request_tokens": agent.request_tokens,
                "owned_tokens_resident": _resident_tokens(agent.node)[0],
                **asdict(agent.counters),
                "context": _context_detail(agent),
            }
            for agent in agents
        },
    }


def _context_detail(agent: AgentState) -> dict[str, Any]:
    """The context the agent owns (tokens 0: none) and its pauses between requests."""
    on_device, on_host = _resident_tokens(agent.context)
    pauses = agent.pauses
    return {
        "tokens": agent.context_tokens if agent.context is not None else 0,
        "on_device": on_device,
        "on_host": on_host,
        "resumes": agent.resumes,
        "over_budget": agent.context_over_budget,
        "next_use": agent.context_next_use,
        "pauses": {
            "observed": pauses.observed,
            "gap": pauses.length,
            "gap_source": pauses.source,
            "stretch": pauses.stretch,
            "last_request": pauses.last_request,
            "paused_for": pauses.clock.now - pauses.last_request if pauses.last_request else None,
            "expected": pauses.expected,
            "review_at": pauses.review_at,
        },
    }


def _resident_tokens(node: Any) -> tuple[int, int]:
    """Tokens on the path from the root to ``node`` on the device, and with a host copy."""
    on_device = on_host = 0
    while node is not None and node.parent is not None:
        if not node.evicted:
            on_device += len(node.key)
        if node.backuped:
            on_host += len(node.key)
        node = node.parent
    return on_device, on_host
