"""Workflows registered on the server, and the frontier that drives their steps.

``POST /kvflow/workflows`` registers ``{workflow_id, graph}`` (an
:class:`~kvflow.graph.AgentStepGraph` document). From then on requests need only ``{workflow_id,
agent_id}`` in their hint: the hint middleware asks the registry
(:meth:`WorkflowRegistry.begin_request`) to fill in ``steps_to_execution`` for every agent of the
graph.

- The registry lives in the HTTP process; the scheduler's cache only ever sees complete hints.
- Steps are ``graph.steps_to_execution(running, finished)`` at the workflow's frontier (the rules
  are in :class:`RegisteredWorkflow`); explicit ``steps_to_execution`` in a request override the
  derived value of each agent they name.
- Unregistered workflows get steps from the :class:`~kvflow.frontend.graph_learning.GraphLearner`
  when the server runs with ``--kvflow-learn-graph``, and are passed through unchanged otherwise.
- Workflows and graphs are bounded, idle ones forgotten (:class:`WorkflowRegistry`).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kvflow.expiring_table import ExpiringTable, WhenFull
from kvflow.frontend.graph_learning import FAR, GraphLearner
from kvflow.graph import MAX_AGENTS, AgentStepGraph, GraphError
from kvflow.hints import MAX_STEPS_ENTRIES, HintError, WorkflowHint, id_error

_MEMO_SIZE = 32  # frontiers whose steps are kept per workflow (a cycle revisits the same few)

Finish = Callable[[bool], None]  # reports the end of a request: True when it completed


class RegistryError(ValueError):
    """A refused registry operation; ``status`` is its HTTP status, ``param`` the offending field."""

    status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class WorkflowNotFound(RegistryError):
    """The workflow is not registered (or learned)."""

    status = 404


class WorkflowConflict(RegistryError):
    """A live workflow id registered again with a different graph."""

    status = 409


class RegistryFull(RegistryError):
    """As many workflows are registered as the server allows."""

    status = 429


def _graph_key(graph: AgentStepGraph) -> tuple[frozenset, frozenset]:
    """Order-independent identity of a graph: its agents with joins and its edges."""
    doc = graph.to_json()
    agents = frozenset((a["id"], a.get("join")) for a in doc["agents"])
    return agents, frozenset(map(tuple, doc["edges"]))


def _agent_list(value: Any, name: str, known: frozenset[str]) -> set[str]:
    if not isinstance(value, list):
        raise RegistryError(f"{name}: expected a list of agent ids, got {type(value).__name__}", name)
    for i, agent_id in enumerate(value):
        if not isinstance(agent_id, str) or agent_id not in known:
            raise RegistryError(f"{name}[{i}]: {agent_id!r} is not an agent of the graph", f"{name}[{i}]")
    return set(value)


@dataclass(frozen=True)
class Undo:
    """What one request's start took off a workflow's frontier, at which frontier generation."""

    generation: int
    finished: frozenset[str] | set[str]
    declared_running: frozenset[str] | set[str]


class RegisteredWorkflow:
    """One registered workflow: its graph and its current frontier.

    A workflow's *running* agents are those with a request in flight plus those declared running
    with ``PATCH`` (e.g. while a tool runs); its *finished* agents are those whose last request
    has just completed. When a request of agent ``x`` arrives, ``x`` runs, and the finish (or
    declared run) of every agent ``x`` is reachable from is consumed: the workflow has moved past
    it. When the response has been sent, ``x`` is finished. Steps are
    ``graph.steps_to_execution(running, finished)``; agents the graph says will not run again get
    :data:`~kvflow.frontend.graph_learning.FAR`, so stale values never linger in the cache.
    """

    def __init__(self, workflow_id: str, graph: AgentStepGraph, document: Any = None) -> None:
        self.workflow_id = workflow_id
        self.graph = graph
        self.document = document  # the graph document as registered, to recognize it again cheaply
        self.key = _graph_key(graph)
        self.agents = frozenset(graph.agents)
        self.in_flight: Counter[str] = Counter()
        self.declared_running: set[str] = set()
        self.finished: set[str] = set()
        self.generation = 0  # bumped by every completed request and PATCH: an older undo is out of date
        # What aborted requests took off the frontier that a request still in flight keeps off.
        self._undo_finished: set[str] = set()
        self._undo_running: set[str] = set()
        self._ancestors: dict[str, frozenset[str]] = {}
        self._memo: OrderedDict[tuple[frozenset[str], frozenset[str]], dict[str, int]] = OrderedDict()

    def running(self) -> set[str]:
        """Agents with a request in flight or declared running."""
        return self.declared_running | {a for a, n in self.in_flight.items() if n > 0}

    def start(self, agent_id: str) -> Undo:
        """A request of ``agent_id`` arrived: it runs, and the agents it follows are past.

        Returns what :meth:`finish` needs to put the frontier back if the request fails.
        """
        undo = self._move_past(agent_id)
        self.in_flight[agent_id] += 1
        return undo

    def _past(self, agent_id: str) -> frozenset[str]:
        return self.ancestors(agent_id) | {agent_id}

    def _move_past(self, agent_id: str) -> Undo:
        past = self._past(agent_id)
        undo = Undo(self.generation, self.finished & past, self.declared_running & past)
        self.finished -= past
        self.declared_running -= past
        return undo

    def finish(self, agent_id: str, ok: bool, undo: Undo | None = None) -> None:
        """A request of ``agent_id`` ended; ``ok`` when it completed (not an error).

        A failed or aborted request (a client that disconnected) did not move
        the workflow: unless a request completed or the frontier was set since
        it started, the agents its start moved past are put back (``undo``),
        but for those a request still in flight has moved past as well.
        """
        self.in_flight[agent_id] -= 1
        if self.in_flight[agent_id] <= 0:
            del self.in_flight[agent_id]
            if ok:
                self.finished.add(agent_id)
        if ok:
            self._new_generation()
        elif undo is not None and undo.generation == self.generation:
            self._undo_finished |= undo.finished
            self._undo_running |= undo.declared_running
            still_past = set().union(*(self._past(other) for other in self.in_flight))
            self.finished |= self._undo_finished - still_past
            self.declared_running |= self._undo_running - still_past
            self._undo_finished &= still_past
            self._undo_running &= still_past

    def _new_generation(self) -> None:
        self.generation += 1
        self._undo_finished, self._undo_running = set(), set()

    def set_frontier(self, running: set[str] | None, finished: set[str] | None) -> None:
        """Replace the declared running and/or the finished agents.

        Newly declared running agents move the workflow past the agents they
        follow, as a request would, unless ``finished`` is given as well.
        """
        if running is not None:
            for agent_id in running - self.declared_running:
                self._move_past(agent_id)
            self.declared_running = running
        if finished is not None:
            self.finished = finished
            self.declared_running -= finished
        self._new_generation()

    def steps(self) -> dict[str, int]:
        """Steps-to-execution of every agent of the graph at the current frontier."""
        running = frozenset(self.running())
        key = (running, frozenset(self.finished - running))
        steps = self._memo.get(key)
        if steps is None:
            derived = self.graph.steps_to_execution(*key)
            steps = {a: derived.get(a, FAR) for a in self.graph.agents}
            self._memo[key] = steps
            if len(self._memo) > _MEMO_SIZE:
                self._memo.popitem(last=False)
        self._memo.move_to_end(key)
        return dict(steps)

    def ancestors(self, agent_id: str) -> frozenset[str]:
        """Agents from which ``agent_id`` is reachable (itself included if it is on a cycle)."""
        found = self._ancestors.get(agent_id)
        if found is None:
            seen: set[str] = set()
            queue = deque([agent_id])
            while queue:
                for pred in self.graph.predecessors(queue.popleft()):
                    if pred not in seen:
                        seen.add(pred)
                        queue.append(pred)
            found = self._ancestors[agent_id] = frozenset(seen)
        return found

    def describe(self) -> dict[str, Any]:
        """JSON-ready view: graph, frontier and current steps."""
        return {
            "workflow_id": self.workflow_id,
            "mode": "registered",
            "graph": self.graph.to_json(),
            "running": sorted(self.running()),
            "finished": sorted(self.finished),
            "in_flight": dict(self.in_flight),
            "steps_to_execution": self.steps(),
        }


class WorkflowRegistry:
    """Registered workflows of one HTTP process, plus the learner for unregistered ones.

    A workflow idle (no request, registration or ``PATCH``) for the TTL is forgotten; at most
    ``max_workflows`` are registered at once (past it registration is refused with 429) and a
    graph has at most ``max_agents`` agents (past it, 400).
    """

    def __init__(
        self,
        ttl: float = 300.0,
        max_workflows: int = 4096,
        max_agents: int = 64,
        learner: GraphLearner | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= max_agents <= MAX_AGENTS:
            raise ValueError(f"max_agents must be in [1, {MAX_AGENTS}], got {max_agents}")
        self.max_agents = max_agents
        self.learner = learner
        self.on_change: Callable[[str], None] | None = None
        # Oldest activity first. Cap rule: a full registry refuses new registrations (429), drops nothing.
        self._workflows: ExpiringTable[RegisteredWorkflow] = ExpiringTable(
            max_workflows, WhenFull.REFUSE, ttl=ttl, clock=clock
        )

    def __len__(self) -> int:
        return len(self._workflows)

    # ---- endpoints ---------------------------------------------------------

    def register(self, body: Any) -> tuple[RegisteredWorkflow, bool]:
        """Register ``{workflow_id, graph}``; return the workflow and whether it is new.

        The same graph again (agents, joins and edges, in any order) is accepted
        as is; a different graph for a live workflow id is a conflict.
        """
        self.expire()
        if not isinstance(body, Mapping):
            raise RegistryError(f"body: expected an object, got {type(body).__name__}")
        if unknown := set(body) - {"workflow_id", "graph"}:
            raise RegistryError(f"{min(map(str, unknown))}: unknown field", min(map(str, unknown)))
        workflow_id = body.get("workflow_id")
        if (error := id_error(workflow_id)) is not None:
            raise RegistryError(f"workflow_id: {error}", "workflow_id")
        if "graph" not in body:
            raise RegistryError("graph: is required", "graph")
        existing = self._workflows.get(workflow_id)
        if existing is not None and existing.document == body["graph"]:
            # The very document again (a client behind a router sends it with every request).
            self._workflows.touch(workflow_id)
            return existing, False
        try:
            graph = AgentStepGraph.from_json(body["graph"])
        except GraphError as error:
            raise RegistryError(str(error), str(error).split(":", 1)[0]) from None
        for i, agent_id in enumerate(graph.agents):
            # The ids hints will name: a graph must not hold one a hint could not carry.
            if (error := id_error(agent_id)) is not None:
                raise RegistryError(f"graph.agents[{i}].id: {error}", f"graph.agents[{i}].id")
        if len(graph.agents) > self.max_agents:
            raise RegistryError(
                f"graph.agents: at most {self.max_agents} agents per workflow (--kvflow-max-agents), "
                f"got {len(graph.agents)}",
                "graph.agents",
            )
        if existing is not None:
            if existing.key != _graph_key(graph):
                raise WorkflowConflict(
                    f"workflow {workflow_id!r} is registered with a different graph; "
                    "DELETE it first or use another workflow_id",
                    "graph",
                )
            self._workflows.touch(workflow_id)
            return existing, False
        if self._workflows.full:
            raise RegistryFull(
                f"at most {self._workflows.capacity} workflows may be registered at once "
                "(--kvflow-max-workflows); DELETE finished ones or wait for them to expire"
            )
        workflow = RegisteredWorkflow(workflow_id, graph, body["graph"])
        self._workflows.put(workflow_id, workflow)
        return workflow, True

    def get(self, workflow_id: str) -> RegisteredWorkflow:
        """The registered workflow, or :class:`WorkflowNotFound`."""
        self.expire()
        workflow = self._workflows.get(workflow_id)
        if workflow is None:
            raise WorkflowNotFound(f"workflow {workflow_id!r} is not registered")
        return workflow

    def describe(self, workflow_id: str) -> dict[str, Any]:
        """JSON-ready view of a registered or learned workflow."""
        self.expire()
        registered = self._workflows.get(workflow_id)
        if registered is not None:
            return registered.describe()
        learned = self.learner.describe(workflow_id) if self.learner is not None else None
        if learned is None:
            raise WorkflowNotFound(f"workflow {workflow_id!r} is neither registered nor being learned")
        return {"workflow_id": workflow_id, "mode": "learned", **learned}

    def set_frontier(self, workflow_id: str, body: Any) -> RegisteredWorkflow:
        """Apply ``{"running": [...], "finished": [...]}`` (either may be omitted)."""
        workflow = self.get(workflow_id)
        if not isinstance(body, Mapping):
            raise RegistryError(f"body: expected an object, got {type(body).__name__}")
        if unknown := set(body) - {"running", "finished"}:
            raise RegistryError(f"{min(map(str, unknown))}: unknown field", min(map(str, unknown)))
        if not body:
            raise RegistryError("body: give 'running' and/or 'finished'")
        running = _agent_list(body["running"], "running", workflow.agents) if "running" in body else None
        finished = _agent_list(body["finished"], "finished", workflow.agents) if "finished" in body else None
        if running and finished and (both := running & finished):
            raise RegistryError(f"agent {min(both)!r} is both running and finished", "finished")
        workflow.set_frontier(running, finished)
        self._workflows.touch(workflow_id)
        return workflow

    def end(self, workflow_id: str) -> bool:
        """Forget a registered or learned workflow; False if neither knew it."""
        registered = self._workflows.pop(workflow_id) is not None
        learned = self.learner is not None and self.learner.forget(workflow_id)
        return registered or learned

    def current_steps(self, workflow_id: str) -> dict[str, int]:
        """The steps the cache should hold for a workflow now (empty if unknown or unsure)."""
        workflow = self._workflows.get(workflow_id)
        if workflow is not None:
            return workflow.steps()
        return self.learner.current_steps(workflow_id) if self.learner is not None else {}

    # ---- requests ----------------------------------------------------------

    def begin_request(self, hint: WorkflowHint) -> tuple[WorkflowHint, Finish | None]:
        """Fill ``hint``'s steps for a registered or learned workflow and mark its agent running.

        Returns the completed hint and a callback to call once with ``ok`` when
        the response has ended (None when the registry does not track the workflow).
        """
        self.expire()
        workflow_id, agent_id = hint.workflow_id, hint.agent_id
        workflow = self._workflows.get(workflow_id)
        if workflow is not None:
            if agent_id not in workflow.agents:
                raise HintError(
                    "kvflow.agent_id", f"{agent_id!r} is not an agent of registered workflow {workflow_id!r}"
                )
            undo = workflow.start(agent_id)
            self._workflows.touch(workflow_id)
            derived = workflow.steps()

            def finish(ok: bool) -> None:
                if self._workflows.get(workflow_id) is workflow:
                    workflow.finish(agent_id, ok, undo)
                    self._changed(workflow_id)

        elif self.learner is not None:
            derived = self.learner.started(workflow_id, agent_id)

            def finish(ok: bool) -> None:
                if ok and self.learner.finished(workflow_id, agent_id):
                    self._changed(workflow_id)

        else:
            return hint, None
        return replace(hint, steps_to_execution=_merge_steps(derived, hint.steps_to_execution)), finish

    # ---- lifetime ----------------------------------------------------------

    def expire(self) -> None:
        """Forget registered workflows idle for longer than the TTL."""
        self._workflows.expire()
        if self.learner is not None:
            self.learner.expire()

    def _changed(self, workflow_id: str) -> None:
        if self.on_change is not None:
            self.on_change(workflow_id)


def _merge_steps(derived: Mapping[str, int], explicit: Mapping[str, int]) -> dict[str, int]:
    """Explicit steps over derived ones, within the entries a hint may carry (nearest derived kept)."""
    room = MAX_STEPS_ENTRIES - len(explicit)
    extra = [(value, agent) for agent, value in derived.items() if agent not in explicit]
    if len(extra) > room:
        extra = sorted(extra)[:room]
    return {agent: value for value, agent in extra} | dict(explicit)


_active: WorkflowRegistry | None = None


def activate(registry: WorkflowRegistry | None) -> None:
    """Make ``registry`` the one the hint middleware of this process uses (None: no registry)."""
    global _active
    _active = registry


def active_registry() -> WorkflowRegistry | None:
    """The registry of this process, if the workflow endpoints are installed."""
    return _active
