"""What the server knows about each workflow: its agents' steps and fixed prompts.

Merging rule: a workflow's view is the union of the ``steps_to_execution``
maps its requests carried, the most recent value per agent winning; an agent a
request does not name keeps its last value. The agent issuing a request is
running, so it is at step 0 unless the request's map says otherwise.
When the agent's request finishes and no newer hint moved it, the agent is no
longer running: it becomes the farthest agent of its workflow (one more than
the largest known value), as the agent that just finished is in a loop.
A workflow not hinted for ``ttl`` seconds is forgotten (:meth:`expire`).

Fixed-prompt boundary: ``fixed_prefix_len`` when the request gives it (the
latest value wins). Otherwise it is inferred as the longest prefix the agent's
requests have consistently shared: the first request only records its prompt;
each later one moves the boundary to the common prefix of that record and its
own prompt, so the boundary never grows past what really repeats.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvflow.hints import MAX_STEPS_ENTRIES, WorkflowHint


@dataclass
class InvocationCounters:
    """Fixed-prompt reuse over finished requests."""

    invocations: int = 0
    fixed_hit_invocations: int = 0
    fixed_tokens_hit: int = 0
    fixed_tokens_from_device: int = 0
    fixed_tokens_from_host: int = 0
    fixed_tokens_recomputed: int = 0

    def record(self, fixed_len: int, cached_tokens: int, device: int | None = None, host: int = 0) -> None:
        """Account one finished request whose fixed prompt was ``fixed_len`` tokens.

        ``device`` / ``host`` split the cached prefix by tier (device first), when known.
        """
        hit = min(fixed_len, cached_tokens)
        from_device = hit if device is None else min(hit, device)
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
    steps: int | None = None
    fixed_prefix_len: int | None = None
    reference_prompt: tuple[int, ...] | None = None
    node: Any = None  # the radix-tree node where its fixed prompt ends, if resident
    counters: InvocationCounters = field(default_factory=InvocationCounters)


@dataclass(eq=False)
class WorkflowState:
    workflow_id: str
    agents: dict[str, AgentState] = field(default_factory=dict)

    def agent(self, agent_id: str) -> AgentState | None:
        """The agent's state, created on first sight (None past the per-workflow cap)."""
        state = self.agents.get(agent_id)
        if state is None and len(self.agents) < MAX_STEPS_ENTRIES:
            state = self.agents[agent_id] = AgentState(self.workflow_id, agent_id)
        return state


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class WorkflowTable:
    """Per-workflow agent state with merge, boundary inference and TTL expiry."""

    def __init__(
        self,
        ttl: float,
        max_workflows: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_workflows = max_workflows
        self._clock = clock
        # Ordered by last hint, oldest first, so expiry pops from the front.
        self._workflows: OrderedDict[str, WorkflowState] = OrderedDict()
        self._last_seen: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._workflows)

    def workflows(self) -> list[WorkflowState]:
        return list(self._workflows.values())

    def observe(
        self, hint: WorkflowHint, prompt: Sequence[int]
    ) -> tuple[AgentState | None, list[AgentState]]:
        """Apply a request's hint; return its agent and the agents whose steps changed."""
        workflow = self._workflows.get(hint.workflow_id)
        if workflow is None:
            workflow = self._workflows[hint.workflow_id] = WorkflowState(hint.workflow_id)
        self._workflows.move_to_end(hint.workflow_id)
        self._last_seen[hint.workflow_id] = self._clock()

        steps = dict(hint.steps_to_execution)
        steps.setdefault(hint.agent_id, 0)
        changed = self._merge_steps(workflow, steps)

        agent = workflow.agent(hint.agent_id)
        if agent is not None:
            self._update_fixed_prefix(agent, hint, prompt)
        return agent, changed

    def set_steps(self, workflow_id: str, steps: dict[str, int]) -> list[AgentState] | None:
        """Merge a steps view sent outside a request (e.g. by a registered workflow); None if unknown."""
        workflow = self._workflows.get(workflow_id)
        if workflow is None:
            return None
        self._workflows.move_to_end(workflow_id)
        self._last_seen[workflow_id] = self._clock()
        return self._merge_steps(workflow, steps)

    @staticmethod
    def _merge_steps(workflow: WorkflowState, steps: dict[str, int]) -> list[AgentState]:
        changed = []
        for agent_id, value in steps.items():
            agent = workflow.agent(agent_id)
            if agent is not None and agent.steps != value:
                agent.steps = value
                changed.append(agent)
        return changed

    @staticmethod
    def _update_fixed_prefix(agent: AgentState, hint: WorkflowHint, prompt: Sequence[int]) -> None:
        if hint.fixed_prefix_len is not None:
            agent.fixed_prefix_len = min(hint.fixed_prefix_len, len(prompt))
            agent.reference_prompt = None
            return
        if agent.reference_prompt is None:
            agent.reference_prompt = tuple(prompt)
            return
        shared = common_prefix_len(agent.reference_prompt, prompt)
        agent.reference_prompt = agent.reference_prompt[:shared]
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
        self._last_seen.pop(workflow_id, None)
        return self._workflows.pop(workflow_id, None)

    def expire(self) -> list[WorkflowState]:
        """Forget workflows past their TTL or past the cap; return them."""
        now = self._clock()
        dropped = []
        while self._workflows:
            workflow_id, workflow = next(iter(self._workflows.items()))
            stale = now - self._last_seen[workflow_id] > self.ttl
            if not stale and len(self._workflows) <= self.max_workflows:
                break
            del self._workflows[workflow_id]
            del self._last_seen[workflow_id]
            dropped.append(workflow)
        return dropped
