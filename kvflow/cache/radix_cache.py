"""``WorkflowRadixCache``: SGLang's ``UnifiedRadixCache`` driven by workflow hints.

The cache reads each request's hint once, when the scheduler first matches it,
updates the workflow's steps, and gives the agent ownership of the node where
its fixed prompt ends (splitting a node so that the boundary exists). After the
request's KV is inserted it claims the boundary again, since the prompt may
only now be in the tree. Eviction order itself lives in
:class:`kvflow.cache.eviction.WorkflowAwareStrategy`, applied by the tree core on
both tiers. All methods run on the scheduler thread, like SGLang's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from itertools import islice
from typing import Any

from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_unified_radix_cache
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.utils.rank_consensus_checker import rank_consensus

from kvflow import NAME
from kvflow.cache import integrity
from kvflow.cache.eviction import WorkflowAwareStrategy
from kvflow.cache.prefetch import Prefetcher
from kvflow.cache.request_state import request_state
from kvflow.cache.stamped_clock import StampedClock
from kvflow.cache.tree_core import TREE_CORE_NAME
from kvflow.cache.victims import WorkflowFullComponent
from kvflow.cache.workflow_table import AgentState, InvocationCounters, WorkflowState, WorkflowTable
from kvflow.config import KVFlowConfig
from kvflow.hints import WorkflowHint, decode_transport, transport_time
from kvflow.stats_query import StatsQuery

CACHE_BACKEND_NAME = NAME


class WorkflowRadixCache(UnifiedRadixCache):
    """A ``UnifiedRadixCache`` on the ``kvflow`` tree core that tracks workflow hints."""

    def __init__(self, params: CacheInitParams) -> None:
        config = KVFlowConfig.from_env() or KVFlowConfig()
        params.tree_core_backend = TREE_CORE_NAME
        # Device victims come from the tree core's heap kept across evictions (kvflow.cache.victims).
        params.component_registry_override = {
            **(params.component_registry_override or {}),
            ComponentType.FULL: WorkflowFullComponent,
        }
        super().__init__(params)
        self.eviction_policy = params.eviction_policy
        strategy = self.tree_core.eviction_strategy
        urgency = strategy.urgency if isinstance(strategy, WorkflowAwareStrategy) else "time"
        # TTLs run on the HTTP process's stamps, never this rank's clock (stamped_clock.py).
        self.kvflow_clock = StampedClock()
        self.workflows = WorkflowTable(
            config.hint_ttl,
            config.max_workflows,
            clock=self.kvflow_clock,
            max_agents=config.max_tracked_agents,
            urgency=urgency,
        )
        self.kvflow_totals = InvocationCounters()
        self.kvflow_hinted_requests = 0
        self.kvflow_aborted_requests = 0
        self.kvflow_config = config
        self.prefetcher: Prefetcher | None = None

    def init_hicache(self, server_args: Any, params: CacheInitParams) -> None:
        super().init_hicache(server_args, params)
        config = self.kvflow_config
        if config.prefetch and self.cache_controller is not None:
            self.prefetcher = Prefetcher(self, config.prefetch_steps, config.max_prefetch_tokens)

    def check_hicache_events(self) -> None:
        super().check_hicache_events()
        if self.prefetcher is not None:
            self.prefetcher.step()

    def kvflow_blocks(self, req: Req) -> bool:
        """Whether ``req`` must wait: its prompt runs through a prefetch not acknowledged yet.

        The first time a request must wait it is marked and counted (``prefetch.held``).
        """
        # Called for every waiting request on every scheduling pass: cheap unless a load is in flight.
        if self.prefetcher is None or not self.prefetcher.loading:
            return False
        key = RadixKey(req.origin_input_ids, req.extra_key, cache_salt=req.cache_salt)
        blocked = self.prefetcher.blocks(key)
        state = request_state(req)
        if blocked and not state.held:
            state.held = True
            self.prefetcher.counters.held += 1
        return blocked

    def kvflow_note_reserved_tokens(self, estimate: Callable[[], float]) -> None:
        """``estimate()`` is what the running and waiting requests will still take (the scheduler
        hook, each pass); it is computed only when this cache prefetches."""
        if self.prefetcher is not None:
            self.prefetcher.reserved_tokens = estimate()

    # ---- request lifecycle -------------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        if params.req is not None and not request_state(params.req).admitted:
            self._admit(params.req)
        return super().match_prefix(params)

    def checkpoint_into_tree(self, req: Req, *, up_to: int, **kwargs) -> None:
        super().checkpoint_into_tree(req, up_to=up_to, **kwargs)
        state = request_state(req)
        agent = state.agent
        # Only a request whose fixed prompt is still the agent's may move the agent's boundary.
        if agent is not None and agent.steps is not None and state.fixed_len == agent.fixed_prefix_len:
            self.claim(agent, req.origin_input_ids, req.extra_key, req.cache_salt)

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        state = request_state(req)
        agent = state.agent
        if agent is None or not req.finished():
            return
        if isinstance(req.finished_reason, FINISH_ABORT):
            # Aborted (a client that disconnected): not an invocation, and the agent did not finish.
            self.kvflow_aborted_requests += 1
            return
        for counters in (agent.counters, self.kvflow_totals):
            counters.record(
                state.fixed_len, req.cached_tokens, req.cached_tokens_device, req.cached_tokens_host
            )
        agent.request_finished(len(req.origin_input_ids) - state.fixed_len + len(req.output_ids))
        self.agent_finished(agent)

    def evict(self, params: EvictParams) -> EvictResult:
        self._expire_workflows()
        return super().evict(params)

    # ---- hints and ownership -----------------------------------------------

    def _admit(self, req: Req) -> None:
        """Apply the request's hint (once per request)."""
        state = request_state(req)
        state.admitted = True
        custom_params = req.sampling_params.custom_params
        hint = decode_transport(custom_params)
        if hint is None:
            return
        self.kvflow_clock.advance(transport_time(custom_params))
        agent = self.observe_hint(hint, req.origin_input_ids, req.extra_key, req.cache_salt)
        if agent is not None:
            state.agent = agent
            state.fixed_len = min(agent.fixed_prefix_len or 0, len(req.origin_input_ids))
            if self.prefetcher is not None:
                self.prefetcher.on_admit(agent, held=state.held)

    # kvflow's decisions, checked by SGLang's rank-consensus checker (SGLANG_ENABLE_RANK_CONSENSUS_CHECKER=1)
    # like the base class's: every tensor-parallel rank must make them alike (stamped_clock.py).
    @rank_consensus(
        same_params=["hint", "len(token_ids)"],
        same_results=["None if result is None else (result.agent_id, result.next_use)"],
    )
    def observe_hint(
        self,
        hint: WorkflowHint,
        token_ids: Sequence[int],
        extra_key: str | None = None,
        cache_salt: str | None = None,
    ) -> AgentState | None:
        """Apply one request's hint: merge steps, refresh next uses, and claim the agent's boundary."""
        self._expire_workflows(room_for=len(hint.steps_to_execution) + 1)
        self.kvflow_hinted_requests += 1
        agent, changed = self.workflows.observe(hint, token_ids)
        if agent is not None:
            self.claim(agent, token_ids, extra_key, cache_salt, rebudget=False)
        self._refresh_next_use(changed, self.workflows.get(hint.workflow_id))
        return agent

    @rank_consensus(same_params=True, same_results=True)
    def set_steps(self, workflow_id: str, steps: dict[str, int]) -> bool:
        """Apply a steps view pushed by the server's workflow registry; False for an unknown workflow."""
        changed = self.workflows.set_steps(workflow_id, steps)
        self._refresh_next_use(changed or [], self.workflows.get(workflow_id))
        return changed is not None

    def _refresh_next_use(self, agents: list[AgentState], workflow: WorkflowState | None) -> None:
        """Refresh the nodes of agents whose next use changed, and re-apply their workflow's budget."""
        if workflow is not None:
            agents = [*agents, *self._apply_budget(workflow)]
        self.tree_core.ownership.refresh_many({agent.node: None for agent in agents})
        if self.prefetcher is not None:
            self.prefetcher.watch(agents)

    def _apply_budget(self, workflow: WorkflowState) -> list[AgentState]:
        """Mark the agents past the workflow's share of the pool, nearest first; return those changed.

        A node shared by several of the workflow's prompts counts once.
        """
        budget = self.kvflow_config.max_protected_fraction * self.token_to_kv_pool_allocator.size
        agents = workflow.agents.values()
        if sum(agent.node_tokens for agent in agents if agent.node is not None) <= budget:
            # Its prompts' paths hold at most that many tokens: none is past the budget.
            changed = [agent for agent in agents if agent.over_budget]
            for agent in changed:
                agent.over_budget = False
            return changed
        counted: set[int] = set()
        used, changed = 0, []
        for agent in sorted(agents, key=_nearest_first):
            node = agent.node
            while node is not None and node.parent is not None and id(node) not in counted:
                counted.add(id(node))
                used += len(node.key)
                node = node.parent
            over = agent.node is not None and agent.steps is not None and used > budget
            if over != agent.over_budget:
                agent.over_budget = over
                changed.append(agent)
        return changed

    def agent_finished(self, agent: AgentState) -> None:
        """The agent's request finished: unless a newer hint moved it, it becomes its workflow's farthest."""
        if self.workflows.finish(agent):
            self._refresh_next_use([agent], self.workflows.get(agent.workflow_id))

    def claim(
        self,
        agent: AgentState,
        token_ids: Sequence[int],
        extra_key: str | None = None,
        cache_salt: str | None = None,
        rebudget: bool = True,
    ) -> None:
        """Give ``agent`` the node where its fixed prompt ends, if ``token_ids`` holds that prompt
        and it is in the tree (page-aligned: the boundary is the last whole page of it)."""
        fixed = agent.fixed_prefix_len or 0
        length = fixed // self.page_size * self.page_size
        if length == 0:
            self.tree_core.ownership.release(agent)
            return
        if len(token_ids) < fixed:
            return  # a shorter prompt than the agent's fixed one: it does not say where that ends
        # Slicing keeps the container type, which must match the keys already in the tree.
        key = RadixKey(token_ids=token_ids[:length], extra_key=extra_key, cache_salt=cache_salt)
        node, actions = self.tree_core.find_boundary_node(key)
        self._apply_cache_actions(actions)
        if node is not None and node is not agent.node:
            self.tree_core.ownership.assign(agent, node)
            agent.node_tokens = length
            if rebudget:
                self._refresh_next_use([], self.workflows.get(agent.workflow_id))

    def reset(self) -> None:
        """SGLang's full reset (``/flush_cache``): the tree is rebuilt empty, so no agent owns a node
        and no prefetch is in flight; the workflows and their steps stay (SGLang's ``__init__``
        calls this before the workflow table exists)."""
        super().reset()
        if "workflows" not in vars(self):
            return
        for workflow in self.workflows.workflows():
            for agent in workflow.agents.values():
                agent.node, agent.over_budget = None, False
        if self.prefetcher is not None:
            self.prefetcher.forget_loads()

    @rank_consensus(same_params=True, same_results=True)
    def end_workflow(self, workflow_id: str) -> bool:
        """Forget a workflow at once: its nodes become plain LRU. False if it was unknown."""
        workflow = self.workflows.pop(workflow_id)
        if workflow is not None:
            self._forget(workflow)
        return workflow is not None

    @rank_consensus(same_params=True)
    def advance_clock(self, stamp: float | None) -> None:
        """The HTTP process's time reached ``stamp`` (a kvflow command): forget the stale workflows."""
        self.kvflow_clock.advance(stamp)
        self._expire_workflows()

    @rank_consensus(same_params=True, same_results=True)
    def _expire_workflows(self, room_for: int = 0) -> list[str]:
        """Forget the workflows past their TTL or the caps; return their ids."""
        expired = self.workflows.expire(room_for)
        for workflow in expired:
            self._forget(workflow)
        return [workflow.workflow_id for workflow in expired]

    def _forget(self, workflow: WorkflowState) -> None:
        for agent in workflow.agents.values():
            agent.steps = None  # in-flight requests of this agent must not re-claim
            agent.over_budget = False
            self.tree_core.ownership.release(agent)

    # ---- invariants and observability ----------------------------------------

    def check_integrity(self) -> None:
        """SGLang's pool accounting and tree checks, then kvflow's ownership bookkeeping
        (:func:`kvflow.cache.integrity.check_integrity`); raises ``AssertionError``."""
        integrity.check_integrity(self)

    def check_ownership(self) -> None:
        """kvflow's bookkeeping alone (what the server adds to SGLang's idle check)."""
        integrity.check_ownership(self)

    def _resident_tokens(self, node: Any) -> int:
        """Device-resident tokens on the path from the root to ``node``."""
        tokens = 0
        while node is not None and node.parent is not None:
            if not node.evicted:
                tokens += len(node.key)
            node = node.parent
        return tokens

    def kvflow_stats(self, query: StatsQuery | None = None) -> dict[str, Any]:
        """``GET /kvflow/stats``: a summary whose size and cost do not grow with the tracked state,
        plus one page of detail when ``query`` asks for it."""
        config = self.kvflow_config
        stats: dict[str, Any] = {
            "eviction_policy": self.eviction_policy,
            "tie_break": getattr(self.tree_core.eviction_strategy, "tie_break", None),
            "urgency": {
                "mode": self.workflows.logical_clock.mode,
                "clock": self.workflows.logical_clock.now,
                "prior_interval": self.workflows.logical_clock.prior_interval,
            },
            "pool_tokens": self.token_to_kv_pool_allocator.size,
            "totals": {
                **asdict(self.kvflow_totals),
                "hinted_requests": self.kvflow_hinted_requests,
                "aborted_requests": self.kvflow_aborted_requests,
            },
            "evictions": self.tree_core.kvflow_evictions,
            "prefetch": asdict(self.prefetcher.counters) if self.prefetcher is not None else None,
            "link_emulation_gbps": config.emulate_link_gbps,
            "tracked": {"workflows": len(self.workflows), "agents": self.workflows.agent_count},
            "limits": {
                "max_workflows": config.max_workflows,
                "max_tracked_agents": config.max_tracked_agents,
                "max_protected_fraction": config.max_protected_fraction,
                "hint_ttl": config.hint_ttl,
            },
        }
        if query is not None and query.workflow_id is not None:
            stats["workflow"] = self._workflow_detail(query)
        elif query is not None:
            page = self.workflows.page(query.offset, query.limit)
            stats["workflows"] = {
                "offset": query.offset,
                "total": len(self.workflows),
                "items": [{"workflow_id": w.workflow_id, "agents": len(w.agents)} for w in page],
            }
        return stats

    def _workflow_detail(self, query: StatsQuery) -> dict[str, Any] | None:
        workflow = self.workflows.get(query.workflow_id)
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
                    "owned_tokens_resident": self._resident_tokens(agent.node),
                    **asdict(agent.counters),
                }
                for agent in agents
            },
        }


def _nearest_first(agent: AgentState) -> float:
    return math.inf if agent.steps is None else agent.steps


def workflow_cache_factory(ctx: TreeCacheBuildContext) -> UnifiedRadixCache:
    """Radix-cache backend factory: SGLang's unified construction, our class."""
    return create_unified_radix_cache(ctx, cache_class=WorkflowRadixCache)
