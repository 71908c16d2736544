"""``WorkflowCache``: kvflow's core, the state one SGLang cache is driven by.

One object per cache owns the workflow table, the stamped clock, the protected-share
budget, the prefetcher, the counters and the config, and answers every call the
scheduler's cache overrides (:mod:`kvflow.cache.radix_cache`) and the patches make.
It holds the SGLang cache it serves for its tree core, page size and pool.

- A request's hint is read once, when the scheduler first matches it (:meth:`admit`).
- Every change of an agent's steps or node refreshes its node's next use and re-applies its
  workflow's budget (:mod:`kvflow.cache.budget`) before the next eviction.
- A forgotten workflow (ended, past its TTL or the caps) owns no node and never
  claims again: its KV is plain LRU at once.
- An agent that resumes its contexts (:mod:`kvflow.cache.contexts`) owns the end of what its
  finished request left in the tree; a prompt that does not resume it releases it.
- Decisions read time only from the HTTP process's stamps and are checked by SGLang's
  rank-consensus checker, so every tensor-parallel rank makes them alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.utils.rank_consensus_checker import rank_consensus

from kvflow.cache import integrity
from kvflow.cache.budget import apply_budget
from kvflow.cache.contexts import ResumeTracker
from kvflow.cache.eviction import WorkflowAwareStrategy
from kvflow.cache.prefetch import Prefetcher
from kvflow.cache.request_state import request_state
from kvflow.cache.stamped_clock import StampedClock
from kvflow.cache.stats import render_stats
from kvflow.cache.workflow_table import AgentState, InvocationCounters, WorkflowState, WorkflowTable
from kvflow.config import KVFlowConfig
from kvflow.hints import WorkflowHint, decode_transport, transport_time
from kvflow.stats_query import StatsQuery


class WorkflowCache:
    """The workflow state of one SGLang radix cache (``cache``), and every decision made on it."""

    def __init__(self, cache: Any, config: KVFlowConfig, eviction_policy: str) -> None:
        self.cache = cache
        self.config = config
        self.eviction_policy = eviction_policy
        strategy = cache.tree_core.eviction_strategy
        urgency = strategy.urgency if isinstance(strategy, WorkflowAwareStrategy) else "time"
        # TTLs run on the HTTP process's stamps, never this rank's clock (stamped_clock.py).
        self.clock = StampedClock()
        self.workflows = WorkflowTable(
            config.hint_ttl,
            config.max_workflows,
            clock=self.clock,
            max_agents=config.max_tracked_agents,
            urgency=urgency,
        )
        self.totals = InvocationCounters()
        self.contexts = ResumeTracker()
        self.hinted_requests = 0
        self.aborted_requests = 0
        self.prefetcher: Prefetcher | None = None

    # ---- the scheduler loop ------------------------------------------------

    def start_prefetching(self) -> None:
        """The cache's host tier is set up: prefetch over it, if the config asks to."""
        if self.config.prefetch and self.cache.cache_controller is not None:
            self.prefetcher = Prefetcher(
                self.cache, self.config.prefetch_steps, self.config.max_prefetch_tokens
            )

    def prefetch_step(self) -> None:
        """Once per scheduler iteration: reap finished prefetches, issue new ones."""
        if self.prefetcher is not None:
            self.prefetcher.step()

    def blocks(self, req: Req) -> bool:
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

    def note_reserved_tokens(self, estimate: Callable[[], float]) -> None:
        """``estimate()`` is what the running and waiting requests will still take (the scheduler
        hook, each pass); it is computed only when this cache prefetches."""
        if self.prefetcher is not None:
            self.prefetcher.reserved_tokens = estimate()

    def tree_reset(self) -> None:
        """SGLang rebuilt the tree empty (``/flush_cache``): no agent owns a node and no prefetch is
        in flight; the workflows and their steps stay."""
        for workflow in self.workflows.workflows():
            for agent in workflow.agents.values():
                agent.node, agent.over_budget = None, False
                agent.context, agent.context_over_budget = None, False
        if self.prefetcher is not None:
            self.prefetcher.forget_loads()

    # ---- request lifecycle -------------------------------------------------

    def admit(self, req: Req) -> None:
        """Apply the request's hint, the first time the scheduler matches it."""
        state = request_state(req)
        if state.admitted:
            return
        state.admitted = True
        custom_params = req.sampling_params.custom_params
        hint = decode_transport(custom_params)
        if hint is None:
            return
        stamp = transport_time(custom_params)
        agent = self.observe_hint(hint, req.origin_input_ids, req.extra_key, req.cache_salt, stamp)
        if agent is not None:
            state.agent, state.keep_context = agent, hint.keep_context
            state.expected_pause_s, state.admitted_at = hint.expected_pause_s, agent.pauses.last_request
            state.fixed_len = min(agent.fixed_prefix_len or 0, len(req.origin_input_ids))
            if self.prefetcher is not None:
                self.prefetcher.on_admit(agent, held=state.held)

    def request_inserted(self, req: Req, up_to: int) -> None:
        """The request's KV is in the tree up to ``up_to``: its agent's boundary may only now exist,
        claim it; a finished request's inserted tokens are its agent's next context."""
        state = request_state(req)
        agent = state.agent
        if agent is not None and req.finished():
            state.context_len = up_to
        # Only a request whose fixed prompt is still the agent's may move the agent's boundary.
        if agent is not None and agent.steps is not None and state.fixed_len == agent.fixed_prefix_len:
            self.claim(agent, req.origin_input_ids, req.extra_key, req.cache_salt)

    def request_released(self, req: Req) -> None:
        """The scheduler released the request: once finished, it counts as its agent's invocation."""
        state = request_state(req)
        agent = state.agent
        if agent is None or not req.finished():
            return
        if isinstance(req.finished_reason, FINISH_ABORT):
            # Aborted (a client that disconnected): not an invocation, and the agent did not finish.
            self.aborted_requests += 1
            return
        for counters in (agent.counters, self.totals):
            counters.record(
                state.fixed_len, req.cached_tokens, req.cached_tokens_device, req.cached_tokens_host
            )
        agent.request_finished(len(req.origin_input_ids) - state.fixed_len + len(req.output_ids))
        if state.expected_pause_s is not None:
            self.expect_pause(agent, state.expected_pause_s, state.admitted_at)
        if state.context_len:
            context = (req.origin_input_ids + req.output_ids)[: state.context_len]
            self.claim_context(agent, context, req.extra_key, req.cache_salt, keep=state.keep_context)
        self.agent_finished(agent)

    # ---- hints and ownership -----------------------------------------------

    # kvflow's decisions, checked by SGLang's rank-consensus checker (SGLANG_ENABLE_RANK_CONSENSUS_CHECKER=1)
    # like the base class's: every tensor-parallel rank must make them alike (stamped_clock.py).
    @rank_consensus(
        same_params=["hint", "len(token_ids)", "stamp"],
        same_results=["None if result is None else (result.agent_id, result.next_use)"],
    )
    def observe_hint(
        self,
        hint: WorkflowHint,
        token_ids: Sequence[int],
        extra_key: str | None = None,
        cache_salt: str | None = None,
        stamp: float | None = None,
    ) -> AgentState | None:
        """Apply one request's hint: merge steps, refresh next uses, and claim the agent's boundary.

        ``stamp``: the HTTP process's time stamp on the request (:func:`kvflow.hints.transport`), if any.
        """
        if stamp is not None:
            self.clock.advance(stamp)
        self.expire(room_for=len(hint.steps_to_execution) + 1)
        self.hinted_requests += 1
        clock_reading = self.clock() if stamp is not None else None
        agent, changed = self.workflows.observe(hint, token_ids, clock_reading)
        if agent is not None:
            self.claim(agent, token_ids, extra_key, cache_salt, rebudget=False)
            self.contexts.observe(agent, token_ids)
            if not (hint.keep_context and self.contexts.protects(agent)):
                reason = "not_resumed" if hint.keep_context else "last_turn"
                self.cache.tree_core.ownership.release_context(agent, reason)
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
            limit = self.config.max_protected_fraction * self.cache.token_to_kv_pool_allocator.size
            agents = [*agents, *apply_budget(workflow, limit)]
        nodes = {node: None for agent in agents for node in (agent.node, agent.context)}
        self.cache.tree_core.ownership.refresh_many(nodes)
        if self.prefetcher is not None:
            self.prefetcher.watch(agents)

    def expect_pause(self, agent: AgentState, seconds: float, admitted_at: int) -> bool:
        """The agent's request admitted at ``admitted_at`` finished, its hint expecting the next
        request ``seconds`` later (``expected_pause_s``): rank its context by that pause. False
        when the hint cannot apply (:meth:`WorkflowTable.expect_pause`)."""
        applied = self.workflows.expect_pause(agent, seconds, admitted_at)
        if applied:
            self._refresh_next_use([agent], self.workflows.get(agent.workflow_id))
        return applied

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
        length = fixed // self.cache.page_size * self.cache.page_size
        if length == 0:
            self.cache.tree_core.ownership.release(agent)
            return
        if len(token_ids) < fixed:
            return  # a shorter prompt than the agent's fixed one: it does not say where that ends
        node = self._boundary_node(token_ids, length, extra_key, cache_salt)
        if node is not None and node is not agent.node:
            self.cache.tree_core.ownership.assign(agent, node)
            agent.node_tokens = length
            if rebudget:
                self._refresh_next_use([], self.workflows.get(agent.workflow_id))

    def claim_context(
        self,
        agent: AgentState,
        token_ids: Sequence[int],
        extra_key: str | None = None,
        cache_salt: str | None = None,
        keep: bool = True,
    ) -> None:
        """The agent's request finished and left ``token_ids`` (prompt + output) in the tree: if
        the agent resumes its contexts, the node where they end (the last whole page) is its context.
        ``keep`` False (the request's ``keep_context``): it is not, and the agent owns no context."""
        ownership = self.cache.tree_core.ownership
        length = len(token_ids) // self.cache.page_size * self.cache.page_size
        protects = keep and agent.steps is not None and self.contexts.protects(agent)
        if not protects or length <= (agent.fixed_prefix_len or 0):
            ownership.release_context(agent, "not_resumed" if keep else "last_turn")
            return
        node = self._boundary_node(token_ids, length, extra_key, cache_salt)
        if node is None:
            ownership.release_context(agent, "evicted")
            return
        ownership.assign_context(agent, node, length)
        self._refresh_next_use([], self.workflows.get(agent.workflow_id))
        if self.prefetcher is not None:
            self.prefetcher.watch_context(agent)  # paused until its next request: prefetch it then

    def _boundary_node(
        self, token_ids: Sequence[int], length: int, extra_key: str | None, cache_salt: str | None
    ) -> Any | None:
        """The tree node ending exactly at ``token_ids[:length]`` (split if needed), or None when that
        path is not resident."""
        # Slicing keeps the container type, which must match the keys already in the tree.
        key = RadixKey(token_ids=token_ids[:length], extra_key=extra_key, cache_salt=cache_salt)
        node, actions = self.cache.tree_core.find_boundary_node(key)
        self.cache._apply_cache_actions(actions)
        return node

    # ---- forgetting workflows ----------------------------------------------

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
        self.clock.advance(stamp)
        self.expire()

    @rank_consensus(same_params=True, same_results=True)
    def expire(self, room_for: int = 0) -> list[str]:
        """Forget the workflows past their TTL or the caps (before every eviction); return their ids."""
        expired = self.workflows.expire(room_for)
        for workflow in expired:
            self._forget(workflow)
        return [workflow.workflow_id for workflow in expired]

    def _forget(self, workflow: WorkflowState) -> None:
        ownership = self.cache.tree_core.ownership
        for agent in workflow.agents.values():
            agent.steps = None  # in-flight requests of this agent must not re-claim
            agent.over_budget = agent.context_over_budget = False
            ownership.release(agent)
            ownership.release_context(agent, "forgotten")

    # ---- invariants and observability --------------------------------------

    def check_integrity(self) -> None:
        """SGLang's pool accounting and tree checks, then kvflow's ownership bookkeeping
        (:func:`kvflow.cache.integrity.check_integrity`); raises ``AssertionError``."""
        integrity.check_integrity(self.cache)

    def check_ownership(self) -> None:
        """kvflow's bookkeeping alone (what the server adds to SGLang's idle check)."""
        integrity.check_ownership(self.cache)

    def stats(self, query: StatsQuery | None = None) -> dict[str, Any]:
        """``GET /kvflow/stats`` (:func:`kvflow.cache.stats.render_stats`)."""
        return render_stats(self, query)
