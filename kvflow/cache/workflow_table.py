"""What the server knows about each workflow: its agents' steps and fixed prompts.

Merging rule: a workflow's view is the union of the ``steps_to_execution``
maps its requests carried, the most recent value per agent winning; an agent a
request does not name keeps its last value. The agent issuing a request is
running, so it is at step 0 unless the request's map says otherwise.
When the agent's request finishes and no newer hint moved it, the agent is no
longer running: it becomes the farthest agent of its workflow (one more than
the largest known value), as the agent that just finished is in a loop.
A workflow not hinted for ``ttl`` seconds is forgotten (:meth:`expire`).

Next use: an agent's steps become the time it is expected at on the table's
logical clock (:mod:`kvflow.cache.urgency`), fixed when they are set: a hint
moves the agents it names (a restated value is measured again from the
workflow's latest step) and leaves the others where their last hint put them,
so its cost does not grow with the agents it does not name. Stalled workflows
are found through a lazy-deletion heap of review times (:mod:`kvflow.cache.lazy_heap`):
every tracked workflow has one current entry, due at its ``review_at``.

Fixed-prompt boundary: ``fixed_prefix_len`` when the request gives it (the
latest value wins). Otherwise it is inferred as the longest prefix the agent's
requests have consistently shared: the first request only records its prompt;
each later one moves the boundary to the common prefix of that record and its
own prompt, so the boundary never grows past what really repeats. The record
keeps at most :data:`MAX_REFERENCE_TOKENS` tokens (8 bytes each), so tracked
state stays bounded: at most ``max_agents`` agents over all workflows, each
with one such record (past the cap the least recently hinted workflows go first).
"""

from __future__ import annotations

import heapq
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvflow.cache.lazy_heap import check_heap_order, needs_compaction, next_version
from kvflow.cache.pauses import AgentPauses
from kvflow.cache.urgency import LogicalClock, WorkflowPace, smoothed
from kvflow.config import KVFlowConfig
from kvflow.expiring_table import ExpiringTable, WhenFull
from kvflow.hints import MAX_STEPS_ENTRIES, WorkflowHint, common_prefix_len

MAX_REFERENCE_TOKENS = 16384


@dataclass
class InvocationCounters:
    """Fixed-prompt reuse over finished requests."""

    invocations: int = 0
    fixed_hit_invocations: int = 0
    fixed_tokens_hit: int = 0
    fixed_tokens_from_device: int = 0
    fixed_tokens_from_host: int = 0
    fixed_tokens_recomputed: int = 0

    def record(self, fixed_len: int, cached_tokens: int, device: int, host: int) -> None:
        """Account one finished request whose fixed prompt was ``fixed_len`` tokens.

        ``device`` / ``host`` split the cached prefix by tier (device first).
        """
        hit = min(fixed_len, cached_tokens)
        from_device = min(hit, device)
        self.invocations += 1
        self.fixed_hit_invocations += int(fixed_len > 0 and hit == fixed_len)
        self.fixed_tokens_hit += hit
        self.fixed_tokens_from_device += from_device
        self.fixed_tokens_from_host += min(hit - from_device, host)
        self.fixed_tokens_recomputed += fixed_len - hit


@dataclass(eq=False)
class AgentState:
    """One agent of one workflow (agents of different workflows never collide)."""

    workflow_id: str
    agent_id: str
    pace: WorkflowPace  # its workflow's, shared by all of that workflow's agents
    _steps: int | None = field(default=None, repr=False)
    expected_at: float | None = None  # the time its steps put it at, fixed when they are set
    fixed_prefix_len: int | None = None
    reference_prompt: array | None = None
    node: Any = None  # the radix-tree node where its fixed prompt ends, if resident
    node_tokens: int = 0  # the tokens from the root to ``node`` (set with it; a split keeps them)
    counters: InvocationCounters = field(default_factory=InvocationCounters)
    over_budget: bool = False  # past its workflow's share of the pool (see ``next_use``)
    # Tokens its requests took beyond the fixed prompt (the rest of the prompt and the output),
    # smoothed over its finished ones: what its next request is expected to allocate.
    request_tokens: float | None = None
    context: Any = None  # the node where its latest context ends, while it resumes (cache/contexts.py)
    context_tokens: int = 0  # the tokens from the root to ``context`` (set with it)
    context_over_budget: bool = False  # its context is past its workflow's share of the pool
    resumes: bool | None = None  # its latest prompt extended the one before (None: not seen twice)
    prompt_record: tuple[int, int] | None = None  # (length, hash) of its latest prompt
    pauses: AgentPauses = field(init=False)  # its gaps between requests: when its context resumes
    review_version: int = -1  # the version of its current pause-review heap entry

    def __post_init__(self) -> None:
        self.pauses = AgentPauses(self.pace.clock)

    @property
    def steps(self) -> int | None:
        """Its steps-to-execution (None: unknown). Setting them fixes :attr:`expected_at`."""
        return self._steps

    @steps.setter
    def steps(self, value: int | None) -> None:
        self._steps = value
        self.anchor()

    def request_finished(self, tokens: int) -> None:
        """One of its requests finished, having taken ``tokens`` beyond its fixed prompt."""
        self.request_tokens = smoothed(self.request_tokens or 0.0, tokens, self.request_tokens is not None)

    def anchor(self) -> None:
        """Fix when its steps put it from its workflow's pace now (``WorkflowPace.expected_at``)."""
        self.expected_at = None if self._steps is None else self.pace.expected_at(self._steps)

    @property
    def next_use(self) -> tuple[int, float] | None:
        """When its KV is next used, the key eviction orders its prompt by (smaller kept longer):
        ``(over_budget, the time its steps put it at)``, so an over-budget prompt goes before every
        in-budget prompt of any workflow; None when its steps are unknown."""
        if self.expected_at is None:
            return None
        return (int(self.over_budget), self.expected_at)

    @property
    def context_next_use(self) -> tuple[int, float] | None:
        """The key its context is ordered by: ``(context over budget, when its next request is
        expected)``, from its own pauses (:mod:`kvflow.cache.pauses`); with urgency ``hops``, its
        steps as for :attr:`next_use`. None when its steps are unknown (forgotten)."""
        if self.expected_at is None:
            return None
        if self.pace.clock.mode == "hops":
            return (int(self.context_over_budget), self.expected_at)
        return (int(self.context_over_budget), self.pauses.expected)


@dataclass(eq=False)
class WorkflowState:
    workflow_id: str
    pace: WorkflowPace
    agents: dict[str, AgentState] = field(default_factory=dict)
    review_version: int = -1  # the version of its current review heap entry

    def agent(self, agent_id: str, create: bool = True) -> AgentState | None:
        """The agent's state, created on first sight if ``create`` (None past the per-workflow cap)."""
        state = self.agents.get(agent_id)
        if state is None and create and len(self.agents) < MAX_STEPS_ENTRIES:
            state = self.agents[agent_id] = AgentState(self.workflow_id, agent_id, self.pace)
        return state


def _token_record(prompt: Sequence[int]) -> array:
    """A compact copy of a prompt's first tokens (empty for ids no 64-bit integer holds)."""
    try:
        return array("q", prompt[:MAX_REFERENCE_TOKENS])
    except OverflowError:
        return array("q")


class WorkflowTable:
    """Per-workflow agent state with merge, boundary inference and TTL expiry."""

    def __init__(
        self,
        ttl: float,
        max_workflows: int,
        clock: Callable[[], float] = time.monotonic,
        max_agents: int = KVFlowConfig.max_tracked_agents,
        urgency: str = "time",
    ) -> None:
        self.max_agents = max_agents  # over all workflows
        # Next uses run on this logical clock; ``clock`` (seconds) only times the TTL.
        self.logical_clock = LogicalClock(urgency)
        # (review_at, version, workflow), earliest first: stalled workflows to move (urgency.py).
        self._reviews: list[tuple[float, int, WorkflowState]] = []
        # (review_at, version, agent), earliest first: agents paused long, to move (pauses.py).
        self._pause_reviews: list[tuple[float, int, AgentState]] = []
        self.agent_count = 0
        # Least recently hinted first. Cap rules: past max_workflows the oldest is dropped, and
        # expire() keeps dropping the oldest while max_agents would be exceeded (never refused).
        self._workflows: ExpiringTable[WorkflowState] = ExpiringTable(
            max_workflows, WhenFull.DROP_OLDEST, ttl=ttl, clock=clock
        )

    @property
    def ttl(self) -> float:
        return self._workflows.ttl

    @property
    def max_workflows(self) -> int:
        return self._workflows.capacity

    def __len__(self) -> int:
        return len(self._workflows)

    def workflows(self) -> list[WorkflowState]:
        return list(self._workflows.values())

    def get(self, workflow_id: str) -> WorkflowState | None:
        return self._workflows.get(workflow_id)

    def page(self, offset: int, limit: int) -> list[WorkflowState]:
        """Workflows ``offset .. offset + limit - 1``, least recently hinted first."""
        return self._workflows.page(offset, limit)

    def observe(
        self, hint: WorkflowHint, prompt: Sequence[int], stamp: float | None = None
    ) -> tuple[AgentState | None, list[AgentState]]:
        """Apply a request's hint (``stamp``: the stamped clock's reading, if the request was stamped);
        return its agent and the agents whose steps or next use changed."""
        workflow = self._workflows.get(hint.workflow_id)
        if workflow is None:
            workflow = WorkflowState(hint.workflow_id, WorkflowPace(self.logical_clock))
        self._workflows.put(hint.workflow_id, workflow)
        workflow.pace.step()
        if stamp is not None:
            self.logical_clock.stamped(stamp)
        workflow.review_version = -1  # its review time moved: its entry is stale until rescheduled

        # The requesting agent first: a full steps map must not crowd it out of the per-workflow cap.
        agent = self._agent(workflow, hint.agent_id)
        if agent is not None:
            self._update_fixed_prefix(agent, hint, prompt)
            agent.pauses.request()
        steps = dict(hint.steps_to_execution)
        steps.setdefault(hint.agent_id, 0)
        changed = self._merge_steps(workflow, steps)
        if self.logical_clock.mode == "time":
            changed += self._review_stalled()  # the clock ticked: it may have reached other reviews
            changed += self._review_paused()
            self._schedule_review(workflow)
            if agent is not None:
                self._schedule_pause_review(agent)
        return agent, changed

    def expect_pause(self, agent: AgentState, seconds: float, admitted_at: int) -> bool:
        """The agent's request admitted at ``admitted_at`` finished, its hint expecting the next one
        ``seconds`` later: set that pause's length. False (nothing set) when the agent was hinted
        again since, is no longer tracked, the clock's rate is not measured yet, or urgency is ``hops``."""
        ticks = self.logical_clock.ticks_for(seconds)
        if (
            ticks is None
            or self.logical_clock.mode != "time"
            or agent.pauses.last_request != admitted_at
            or agent.steps is None
        ):
            return False
        agent.pauses.hint(ticks)
        self._schedule_pause_review(agent)
        return True

    def _schedule_pause_review(self, agent: AgentState) -> None:
        version = agent.review_version = next_version()
        heapq.heappush(self._pause_reviews, (agent.pauses.review_at, version, agent))
        if needs_compaction(len(self._pause_reviews), self.agent_count):
            self._pause_reviews = [entry for entry in self._pause_reviews if self._live_pause_review(entry)]
            heapq.heapify(self._pause_reviews)

    def _live_pause_review(self, entry: tuple[float, int, AgentState]) -> bool:
        """Whether ``entry`` is its agent's current one (still tracked, not resumed since)."""
        _, version, agent = entry
        if version != agent.review_version:
            return False
        workflow = self._workflows.get(agent.workflow_id)
        return workflow is not None and workflow.agents.get(agent.agent_id) is agent

    def _review_paused(self) -> list[AgentState]:
        """Stretch the pauses past their review time; return the agents owning a context among them."""
        now, changed = self.logical_clock.now, []
        while self._pause_reviews and self._pause_reviews[0][0] <= now:
            entry = heapq.heappop(self._pause_reviews)
            if not self._live_pause_review(entry):
                continue
            agent = entry[2]
            agent.pauses.review()
            if agent.context is not None:
                changed.append(agent)
            self._schedule_pause_review(agent)
        return changed

    def _schedule_review(self, workflow: WorkflowState) -> None:
        version = workflow.review_version = next_version()
        heapq.heappush(self._reviews, (workflow.pace.review_at, version, workflow))
        if needs_compaction(len(self._reviews), len(self._workflows)):
            self._reviews = [entry for entry in self._reviews if self._live_review(entry)]
            heapq.heapify(self._reviews)

    def _live_review(self, entry: tuple[float, int, WorkflowState]) -> bool:
        """Whether ``entry`` is its workflow's current one (not forgotten, nor stepped since)."""
        _, version, workflow = entry
        return version == workflow.review_version and self._workflows.get(workflow.workflow_id) is workflow

    def check(self) -> None:
        """Assert the review heap's invariant: heap-ordered, and with urgency ``time`` every tracked
        workflow's current entry in it, due at its ``review_at``."""
        check_heap_order(self._reviews, "review heap")
        if self.logical_clock.mode != "time":
            return
        current = {id(entry[2]): entry[0] for entry in self._reviews if self._live_review(entry)}
        for workflow in self._workflows.values():
            due, review_at = current.get(id(workflow)), workflow.pace.review_at
            assert due == review_at, (
                f"workflow {workflow.workflow_id}: review entry due {due}, not {review_at}"
            )
        check_heap_order(self._pause_reviews, "pause review heap")
        paused = {id(e[2]): e[0] for e in self._pause_reviews if self._live_pause_review(e)}
        for workflow in self._workflows.values():
            for agent in workflow.agents.values():
                if agent.pauses.last_request:
                    due, review_at = paused.get(id(agent)), agent.pauses.review_at
                    assert due == review_at, (
                        f"agent {agent.workflow_id}/{agent.agent_id}: pause review due {due}, not {review_at}"
                    )

    def _review_stalled(self) -> list[AgentState]:
        """Stretch the workflows whose step is past its review time; return their agents."""
        now, changed = self.logical_clock.now, []
        while self._reviews and self._reviews[0][0] <= now:
            entry = heapq.heappop(self._reviews)
            if not self._live_review(entry):
                continue  # forgotten, or stepped (and rescheduled) since
            workflow = entry[2]
            workflow.pace.review()
            for agent in workflow.agents.values():
                agent.anchor()
            changed += [a for a in workflow.agents.values() if a.steps is not None]
            self._schedule_review(workflow)
        return changed

    def set_steps(self, workflow_id: str, steps: dict[str, int]) -> list[AgentState] | None:
        """Merge a steps view sent outside a request (e.g. by a registered workflow); None if unknown."""
        workflow = self._workflows.get(workflow_id)
        if workflow is None:
            return None
        self._workflows.touch(workflow_id)
        return self._merge_steps(workflow, steps)

    def _agent(self, workflow: WorkflowState, agent_id: str) -> AgentState | None:
        """``workflow``'s agent, created if the per-workflow and total caps allow."""
        known = len(workflow.agents)
        agent = workflow.agent(agent_id, create=self.agent_count < self.max_agents)
        self.agent_count += len(workflow.agents) - known
        return agent

    def _merge_steps(self, workflow: WorkflowState, steps: dict[str, int]) -> list[AgentState]:
        """Set each named agent's steps (a restated value is anchored again, at the workflow's
        latest step); return the agents whose steps or next use changed."""
        changed = []
        for agent_id, value in steps.items():
            agent = self._agent(workflow, agent_id)
            if agent is not None:
                before = agent.steps, agent.next_use
                agent.steps = value
                if (agent.steps, agent.next_use) != before:
                    changed.append(agent)
        return changed

    @staticmethod
    def _update_fixed_prefix(agent: AgentState, hint: WorkflowHint, prompt: Sequence[int]) -> None:
        if hint.fixed_prefix_len is not None:
            agent.fixed_prefix_len = min(hint.fixed_prefix_len, len(prompt))
            agent.reference_prompt = None
            return
        if agent.reference_prompt is None:
            agent.reference_prompt = _token_record(prompt)
            return
        shared = common_prefix_len(agent.reference_prompt, prompt)
        del agent.reference_prompt[shared:]
        agent.fixed_prefix_len = shared

    def finish(self, agent: AgentState) -> bool:
        """The agent's request finished; return True if its steps changed."""
        workflow = self._workflows.get(agent.workflow_id)
        if workflow is None or workflow.agents.get(agent.agent_id) is not agent or agent.steps != 0:
            return False
        agent.steps = max(a.steps for a in workflow.agents.values() if a.steps is not None) + 1
        return True

    def pop(self, workflow_id: str) -> WorkflowState | None:
        """Forget one workflow now (it ended); return its state if it was known."""
        workflow = self._workflows.pop(workflow_id)
        if workflow is not None:
            self.agent_count -= len(workflow.agents)
        return workflow

    def expire(self, room_for: int = 0) -> list[WorkflowState]:
        """Forget workflows past their TTL or past the caps; return them, least recently hinted first.

        Drops from the oldest while it is past the TTL, more than ``max_workflows``
        are tracked, or the agent cap would be exceeded: ``room_for`` agents about
        to be added must fit, ``agent_count + room_for <= max_agents``.
        """
        now = self._workflows.clock()
        dropped = []
        while self._workflows and (self._workflows.due(now) or self.agent_count + room_for > self.max_agents):
            dropped.append(self.pop(self._workflows.oldest()))
        return dropped
