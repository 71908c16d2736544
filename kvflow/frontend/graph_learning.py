"""Hint-free mode: learn a workflow's step structure from the order its agents run in.

With ``--kvflow-learn-graph``, a workflow whose requests carry only ``workflow_id`` and
``agent_id`` (and that has no registered graph) gets its steps-to-execution from a first-order
model of agent transitions (:class:`TransitionModel`), learned per workflow type.

- Workflows share what they learn per *type* (:func:`workflow_type`).
- Each request of agent ``b`` in a workflow whose previous request was agent ``a`` counts one
  transition ``a -> b`` for the type.
- Steps follow the chain of likely successors (:meth:`TransitionModel.likely_successor`,
  :meth:`TransitionModel.steps`); agents off it get :data:`FAR`.
- While the current agent has no likely successor the model is unsure and derives no steps at
  all, so the cache keeps plain LRU order for the workflow.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvflow.expiring_table import ExpiringTable, WhenFull
from kvflow.hints import MAX_STEPS_VALUE

TYPE_SEPARATOR = ":"
FAR = MAX_STEPS_VALUE  # steps of an agent not expected to run again


def workflow_type(workflow_id: str) -> str:
    """The type a workflow shares its learned transitions with (the id up to its last ``:``).

    ``"review:42"`` and ``"review:43"`` are both of type ``"review"``; an id without ``:`` is its
    own type.
    """
    head, sep, _ = workflow_id.rpartition(TYPE_SEPARATOR)
    return head if sep and head else workflow_id


@dataclass
class TransitionModel:
    """First-order agent transition counts of one workflow type."""

    max_agents: int
    counts: dict[str, Counter[str]] = field(default_factory=dict)

    def observe(self, previous: str, current: str) -> None:
        """Count ``previous -> current``; agents past ``max_agents`` are not learned."""
        for agent_id in (previous, current):
            if agent_id not in self.counts:
                if len(self.counts) >= self.max_agents:
                    return
                self.counts[agent_id] = Counter()
        self.counts[previous][current] += 1

    def likely_successor(self, agent_id: str, min_observations: int) -> str | None:
        """The agent that usually follows ``agent_id``, or None while unsure.

        It is the agent ``agent_id`` was followed by most often, once it has been followed at
        least ``min_observations`` times and that successor holds a strict majority of those
        transitions.
        """
        followers = self.counts.get(agent_id)
        if not followers:
            return None
        total = sum(followers.values())
        successor, count = followers.most_common(1)[0]
        if total < min_observations or 2 * count <= total:
            return None
        return successor

    def steps(self, agent_id: str, running: bool, min_observations: int) -> dict[str, int]:
        """Steps-to-execution of every known agent from ``agent_id``; empty while unsure.

        Walking the likely-successor chain from ``agent_id`` gives 1, 2, 3, ... hops to the agents
        on it; the chain stops at an agent without a likely successor or at an agent already on it
        (a cycle). While ``agent_id`` is running it is at 0; once it has finished it gets the hops
        back to itself if the chain returns to it. Other agents the type has seen are not expected
        to run and get :data:`FAR`. Without a likely successor of ``agent_id`` the model is unsure
        and derives no steps at all.
        """
        chain: dict[str, int] = {agent_id: 0} if running else {}
        current, hops = agent_id, 0
        while (nxt := self.likely_successor(current, min_observations)) is not None and nxt not in chain:
            hops += 1
            chain[nxt] = hops
            if nxt == agent_id:
                break
            current = nxt
        if hops == 0:
            return {}
        return {a: chain.get(a, FAR) for a in self.counts} | chain


@dataclass
class _Instance:
    """What the learner tracks for one workflow: its type and latest agent."""

    type_key: str
    agent_id: str
    running: bool = True


class GraphLearner:
    """Learns transition models per workflow type and derives steps for each workflow."""

    def __init__(
        self,
        min_observations: int = 2,
        max_workflows: int = 4096,
        max_agents: int = 64,
        ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_observations = min_observations
        self.max_agents = max_agents
        # Both least recently used first. Cap rules: past max_workflows the oldest is dropped;
        # an idle workflow goes after the TTL, a type's model only to make room (no TTL).
        self._models: ExpiringTable[TransitionModel] = ExpiringTable(
            max_workflows, WhenFull.DROP_OLDEST, clock=clock
        )
        self._instances: ExpiringTable[_Instance] = ExpiringTable(
            max_workflows, WhenFull.DROP_OLDEST, ttl=ttl, clock=clock
        )

    def started(self, workflow_id: str, agent_id: str) -> dict[str, int]:
        """Record that ``agent_id`` of ``workflow_id`` is running; return the derived steps."""
        type_key = workflow_type(workflow_id)
        model = self._model(type_key)
        instance = self._instances.get(workflow_id)
        if instance is not None:
            model.observe(instance.agent_id, agent_id)
        self._instances.put(workflow_id, _Instance(type_key, agent_id))
        self.expire()
        return model.steps(agent_id, True, self.min_observations)

    def finished(self, workflow_id: str, agent_id: str) -> dict[str, int]:
        """Record that ``agent_id`` finished; return the derived steps (empty if superseded)."""
        instance = self._instances.get(workflow_id)
        if instance is None or instance.agent_id != agent_id:
            return {}
        instance.running = False
        return self.current_steps(workflow_id)

    def current_steps(self, workflow_id: str) -> dict[str, int]:
        """The steps derived from the workflow's latest agent (empty while unsure or unknown)."""
        instance = self._instances.get(workflow_id)
        model = self._models.get(instance.type_key) if instance is not None else None
        if model is None:
            return {}
        return model.steps(instance.agent_id, instance.running, self.min_observations)

    def knows(self, workflow_id: str) -> bool:
        """Whether the learner tracks this workflow."""
        return workflow_id in self._instances

    def forget(self, workflow_id: str) -> bool:
        """Stop tracking a workflow (its type keeps what it learned)."""
        return self._instances.pop(workflow_id) is not None

    def describe(self, workflow_id: str) -> dict[str, Any] | None:
        """JSON-ready view of a tracked workflow and its type's model, or None."""
        instance = self._instances.get(workflow_id)
        model = self._models.get(instance.type_key) if instance is not None else None
        if model is None:
            return None
        return {
            "type": instance.type_key,
            "agent_id": instance.agent_id,
            "running": instance.running,
            "transitions": {a: dict(followers) for a, followers in model.counts.items()},
            "likely_successors": {
                a: successor
                for a in model.counts
                if (successor := model.likely_successor(a, self.min_observations)) is not None
            },
            "steps_to_execution": model.steps(instance.agent_id, instance.running, self.min_observations),
        }

    def expire(self) -> None:
        """Forget workflows idle for longer than the TTL or past the cap."""
        self._instances.expire()

    def _model(self, type_key: str) -> TransitionModel:
        model = self._models.get(type_key)
        if model is None:
            model = TransitionModel(self.max_agents)
        self._models.put(type_key, model)
        self._models.expire()
        return model
