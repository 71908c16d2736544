"""Agent Step Graph and steps-to-execution values (KVFlow, arXiv 2507.07400).

Agents are vertices; an edge ``u -> v`` means ``v`` may run after ``u``. Each agent has a join kind
that says how it waits for its predecessors. :meth:`AgentStepGraph.steps_to_execution` simulates
the workflow step by step from its running and just finished agents (the rules in full are in its
docstring) and says in how many steps each agent next executes.

- ``"and"``: it runs after all of its *pending* predecessors have run (parallel fan-in, the value
  is ``max(preds) + 1``). It is the default because, with the pending rule, a loop head only
  waits for predecessors that can still run before it, so plain loops need no declaration.
- ``"or"``: it runs after any predecessor has run (conditional branches, the value is
  ``min(preds) + 1``); agents that merge alternative branches should declare it.
- A running agent's value is 0; agents that never execute are absent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

Join = Literal["and", "or"]
JOINS: tuple[Join, ...] = ("and", "or")
DEFAULT_JOIN: Join = "and"
MAX_AGENTS = 1024
MAX_EDGES = 4096


class GraphError(ValueError):
    """An invalid graph, graph operation or JSON document."""


class AgentStepGraph:
    """Directed graph of agents (string ids) with per-agent join semantics.

    A join passed explicitly to ``add_agent`` is *declared*: ``validate`` then
    requires the agent to have predecessors. Agents without a declared join
    use ``DEFAULT_JOIN`` and may be entry agents with no predecessors.
    """

    def __init__(self, agents: Iterable[str] | None = None) -> None:
        self._joins: dict[str, Join | None] = {}
        self._pred: dict[str, dict[str, None]] = {}
        self._succ: dict[str, dict[str, None]] = {}
        self._edges: dict[tuple[str, str], None] = {}
        for agent_id in agents or ():
            self.add_agent(agent_id)

    @property
    def agents(self) -> tuple[str, ...]:
        """All agent ids, in insertion order."""
        return tuple(self._joins)

    def add_agent(self, agent_id: str, join: Join | None = None) -> None:
        """Add an agent; ``join=None`` means the undeclared default join."""
        if not isinstance(agent_id, str) or not agent_id:
            raise GraphError(f"agent id must be a non-empty string, got {agent_id!r}")
        if agent_id in self._joins:
            raise GraphError(f"duplicate agent {agent_id!r}")
        if join is not None and join not in JOINS:
            raise GraphError(f"agent {agent_id!r}: join must be 'and' or 'or', got {join!r}")
        if len(self._joins) >= MAX_AGENTS:
            raise GraphError(f"too many agents (at most {MAX_AGENTS})")
        self._joins[agent_id] = join
        self._pred[agent_id] = {}
        self._succ[agent_id] = {}

    def add_edge(self, src: str, dst: str) -> None:
        """Add the dependency ``src -> dst`` (``dst`` may run after ``src``)."""
        for agent_id in (src, dst):
            self._check_known(agent_id)
        if (src, dst) in self._edges:
            raise GraphError(f"duplicate edge {src!r} -> {dst!r}")
        if len(self._edges) >= MAX_EDGES:
            raise GraphError(f"too many edges (at most {MAX_EDGES})")
        self._edges[(src, dst)] = None
        self._succ[src][dst] = None
        self._pred[dst][src] = None

    def join(self, agent_id: str) -> Join:
        """The effective join kind of an agent."""
        self._check_known(agent_id)
        return self._joins[agent_id] or DEFAULT_JOIN

    def predecessors(self, agent_id: str) -> tuple[str, ...]:
        """Agents with an edge into ``agent_id``."""
        self._check_known(agent_id)
        return tuple(self._pred[agent_id])

    def successors(self, agent_id: str) -> tuple[str, ...]:
        """Agents with an edge from ``agent_id``."""
        self._check_known(agent_id)
        return tuple(self._succ[agent_id])

    def validate(self) -> None:
        """Raise GraphError if the graph is empty or a declared join has no predecessors."""
        if not self._joins:
            raise GraphError("graph has no agents")
        for agent_id, join in self._joins.items():
            if join is not None and not self._pred[agent_id]:
                raise GraphError(f"agent {agent_id!r} declares join {join!r} but has no predecessors")

    def steps_to_execution(self, running: Iterable[str], finished: Iterable[str] = ()) -> dict[str, int]:
        """Steps until each agent next executes, defined by a discrete-time simulation.

        - At step 0 the *seeds* execute: the ``running`` agents and the just ``finished`` ones (a
          finished agent has just executed, so its successors are next, at step 1, whether or not
          other agents are still running).
        - A non-running agent executes at the first step ``s >= 1`` at which its join holds,
          counting executions of predecessors at steps ``0 .. s-1``. For an AND-join the pending
          predecessors are those reachable from a seed by a path that does not enter the join
          itself: predecessors outside the current run (unreachable entry agents) or only
          reachable around a loop through the join are treated as already done. An AND-join with
          no pending predecessor never runs.
        - An agent's value is 0 if it is running, else the first step ``s >= 1`` at which it
          executes; agents that never execute are absent. A finished agent therefore only has a
          value when a loop leads back to it, and it is then the farthest agent on that loop.

        Costs O(V + E) plus one graph search per AND-join with several predecessors.
        """
        running_set = self._agent_set("running", running)
        finished_set = self._agent_set("finished", finished)
        if both := running_set & finished_set:
            raise GraphError(f"agent {min(both)!r} is both running and finished")
        seeds = running_set | finished_set
        # An AND-join with a single predecessor behaves exactly like an OR-join,
        # so pending sets are only needed for AND-joins with several.
        pending = {
            v: self._pending_predecessors(v, seeds)
            for v in self._joins
            if v not in running_set and self.join(v) == "and" and len(self._pred[v]) > 1
        }
        # Bellman-Ford-like relaxation downwards from "never": `first` is each
        # agent's earliest execution at step >= 0, `upcoming` at step >= 1.
        first = dict.fromkeys(seeds, 0)
        upcoming: dict[str, int] = {}
        queue = deque(v for v in self._joins if v not in running_set)
        queued = set(queue)
        while queue:
            v = queue.popleft()
            queued.discard(v)
            step = self._next_step(v, first, pending.get(v))
            if step is None or (v in upcoming and upcoming[v] <= step):
                continue
            upcoming[v] = step
            if v in seeds:
                continue  # a seed's step-0 execution already triggered its successors
            first[v] = step
            for w in self._succ[v]:
                if w not in running_set and w not in queued:
                    queue.append(w)
                    queued.add(w)
        values = dict.fromkeys(running_set, 0) | upcoming
        return {a: values[a] for a in self._joins if a in values}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; ``"join"`` is present only for declared joins."""
        agents = [{"id": a} if j is None else {"id": a, "join": j} for a, j in self._joins.items()]
        return {"agents": agents, "edges": [[src, dst] for src, dst in self._edges]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentStepGraph:
        """Build and validate a graph; errors name the offending field."""
        doc = _fields(data, "graph", required={"agents", "edges"})
        graph = cls()
        for i, item in enumerate(_array(doc["agents"], "graph.agents", MAX_AGENTS)):
            where = f"graph.agents[{i}]"
            agent = _fields(item, where, required={"id"}, optional={"join"})
            _require_str(agent["id"], f"{where}.id")
            if "join" in agent and agent["join"] not in JOINS:
                raise GraphError(f"{where}.join: must be 'and' or 'or', got {agent['join']!r}")
            _wrap(where, graph.add_agent, agent["id"], agent.get("join"))
        for i, edge in enumerate(_array(doc["edges"], "graph.edges", MAX_EDGES)):
            where = f"graph.edges[{i}]"
            if not isinstance(edge, list) or len(edge) != 2:
                raise GraphError(f"{where}: expected a [src, dst] pair, got {edge!r}")
            for j, end in enumerate(edge):
                _require_str(end, f"{where}[{j}]")
            _wrap(where, graph.add_edge, *edge)
        _wrap("graph", graph.validate)
        return graph

    def _check_known(self, agent_id: str) -> None:
        if not isinstance(agent_id, str):
            raise GraphError(f"agent id must be a string, got {agent_id!r}")
        if agent_id not in self._joins:
            raise GraphError(f"unknown agent {agent_id!r}")

    def _agent_set(self, name: str, agent_ids: Iterable[str]) -> set[str]:
        if isinstance(agent_ids, str):
            raise GraphError(f"{name}: expected an iterable of agent ids, not the string {agent_ids!r}")
        result: set[str] = set()
        for agent_id in agent_ids:
            _wrap(name, self._check_known, agent_id)
            result.add(agent_id)
        return result

    def _pending_predecessors(self, join_id: str, seeds: set[str]) -> list[str]:
        """Predecessors reachable from ``seeds`` by paths that never enter ``join_id``."""
        seen = set(seeds)
        queue = deque(seeds)
        while queue:
            for nxt in self._succ[queue.popleft()]:
                if nxt != join_id and nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        return [u for u in self._pred[join_id] if u in seen]

    def _next_step(self, v: str, first: dict[str, int], pending: list[str] | None) -> int | None:
        """First step >= 1 at which ``v`` can execute given ``first``; None if never."""
        if pending is None:  # OR semantics
            times = [first[u] for u in self._pred[v] if u in first]
            return min(times) + 1 if times else None
        if pending and all(u in first for u in pending):
            return max(first[u] for u in pending) + 1
        return None


def _fields(value: Any, where: str, required: set[str], optional: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise GraphError(f"{where}: expected an object, got {type(value).__name__}")
    if missing := required - value.keys():
        raise GraphError(f"{where}: missing field {min(missing)!r}")
    if unknown := value.keys() - required - (optional or set()):
        raise GraphError(f"{where}: unknown field {min(map(str, unknown))!r}")
    return dict(value)


def _array(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise GraphError(f"{where}: expected a list, got {type(value).__name__}")
    if len(value) > limit:
        raise GraphError(f"{where}: at most {limit} entries allowed, got {len(value)}")
    return value


def _require_str(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise GraphError(f"{where}: expected a string, got {value!r}")


def _wrap(where: str, func: Callable[..., object], *args: Any) -> None:
    """Call ``func(*args)``, prefixing any GraphError message with ``where``."""
    try:
        func(*args)
    except GraphError as exc:
        raise GraphError(f"{where}: {exc}") from None
