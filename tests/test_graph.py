"""Tests for kvflow.graph: hand-checked graphs, validation, JSON, and a brute-force oracle."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvflow.graph import MAX_AGENTS, MAX_EDGES, AgentStepGraph, GraphError

PAPER_LOOP = ["planner", "executor", "expresser", "reviewer"]


def make_graph(
    edges: Iterable[tuple[str, str]],
    joins: dict[str, str] | None = None,
    agents: Iterable[str] = (),
) -> AgentStepGraph:
    """Graph whose agents are ``agents`` plus the edge endpoints, in first-seen order."""
    edges = list(edges)
    joins = joins or {}
    graph = AgentStepGraph()
    for agent in dict.fromkeys([*agents, *(a for edge in edges for a in edge)]):
        graph.add_agent(agent, joins.get(agent))
    for src, dst in edges:
        graph.add_edge(src, dst)
    return graph


def cycle(names: Sequence[str]) -> list[tuple[str, str]]:
    return [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))]


# --- hand-checked values -------------------------------------------------------


def test_chain() -> None:
    graph = make_graph([("A", "B"), ("B", "C"), ("C", "D")])
    assert graph.steps_to_execution(["A"]) == {"A": 0, "B": 1, "C": 2, "D": 3}
    assert graph.steps_to_execution(["C"], finished=["B"]) == {"C": 0, "D": 1}


def test_cyclic_chain_just_finished_agent_is_farthest() -> None:
    names = [f"a{i}" for i in range(6)]
    graph = make_graph(cycle(names))
    expected = {"a0": 4, "a1": 5, "a2": 0, "a3": 1, "a4": 2, "a5": 3}
    assert graph.steps_to_execution(["a2"], finished=["a1"]) == expected
    assert graph.steps_to_execution(["a2"]) == expected


@pytest.mark.parametrize("running", range(4))
def test_paper_planner_executor_expresser_reviewer_loop(running: int) -> None:
    graph = make_graph(cycle(PAPER_LOOP))
    finished = PAPER_LOOP[running - 1]
    expected = {PAPER_LOOP[(running + k) % 4]: k for k in range(4)}
    assert graph.steps_to_execution([PAPER_LOOP[running]], [finished]) == expected


def test_nothing_running_successors_of_finished_are_next() -> None:
    graph = make_graph(cycle(PAPER_LOOP))
    assert graph.steps_to_execution([], finished=["planner"]) == {
        "planner": 4,
        "executor": 1,
        "expresser": 2,
        "reviewer": 3,
    }


FAN = [("S", "A"), ("S", "B"), ("A", "A2"), ("A2", "J"), ("B", "J")]


def test_fan_out_and_join_waits_for_slowest_branch() -> None:
    graph = make_graph(FAN, joins={"J": "and"})
    assert graph.steps_to_execution(["S"]) == {"S": 0, "A": 1, "B": 1, "A2": 2, "J": 3}


def test_conditional_branch_or_join_takes_fastest_branch() -> None:
    graph = make_graph(FAN, joins={"J": "or"})
    assert graph.steps_to_execution(["S"]) == {"S": 0, "A": 1, "B": 1, "A2": 2, "J": 2}


def test_parallel_running_branches_share_value_zero() -> None:
    graph = make_graph(FAN, joins={"J": "and"})
    assert graph.steps_to_execution(["A2", "B"]) == {"A2": 0, "B": 0, "J": 1}


FAN_IN_LOOP = [("P", "W1"), ("P", "W2"), ("W1", "J"), ("W2", "J"), ("J", "P")]


@pytest.mark.parametrize("finished", [[], ["W2"]])
def test_and_join_in_loop_does_not_wait_for_work_behind_itself(
    finished: list[str],
) -> None:
    graph = make_graph(FAN_IN_LOOP, joins={"J": "and"})
    assert graph.steps_to_execution(["W1"], finished) == {
        "P": 2,
        "W1": 0,
        "W2": 3,
        "J": 1,
    }
    assert graph.steps_to_execution(["P"]) == {"P": 0, "W1": 1, "W2": 1, "J": 2}


def test_and_join_ignores_unreachable_predecessor() -> None:
    graph = make_graph([("E1", "J"), ("E2", "J")], joins={"J": "and"})
    assert graph.steps_to_execution(["E1"]) == {"E1": 0, "J": 1}


def test_mutually_waiting_and_joins_never_run() -> None:
    edges = [("S", "u"), ("S", "v"), ("u", "v"), ("v", "w"), ("w", "u")]
    graph = make_graph(edges, joins={"u": "and", "v": "and"})
    assert graph.steps_to_execution(["S"]) == {"S": 0}


def test_self_loop() -> None:
    graph = make_graph([("a", "a"), ("a", "b")])
    assert graph.steps_to_execution(["a"]) == {"a": 0, "b": 1}
    assert graph.steps_to_execution([], finished=["a"]) == {"a": 1, "b": 1}


def test_unreachable_agents_are_absent() -> None:
    graph = make_graph([("A", "B"), ("X", "Y")], agents=["lonely"])
    assert graph.steps_to_execution(["A"]) == {"A": 0, "B": 1}
    assert graph.steps_to_execution([]) == {}


# --- graph API and validation ------------------------------------------------------


def test_accessors() -> None:
    graph = make_graph([("A", "B"), ("A", "C"), ("C", "B")], joins={"B": "or"})
    assert graph.agents == ("A", "B", "C")
    assert graph.successors("A") == ("B", "C")
    assert graph.predecessors("B") == ("A", "C")
    assert (graph.join("A"), graph.join("B")) == ("and", "or")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda g: g.add_edge("A", "nope"), "unknown agent 'nope'"),
        (lambda g: g.add_edge("A", "B") or g.add_edge("A", "B"), "duplicate edge"),
        (lambda g: g.add_agent("A"), "duplicate agent 'A'"),
        (lambda g: g.add_agent("C", "xor"), "join must be 'and' or 'or'"),
        (lambda g: g.add_agent(7), "non-empty string"),
        (lambda g: g.add_agent(""), "non-empty string"),
        (lambda g: g.predecessors("nope"), "unknown agent 'nope'"),
        (lambda g: g.steps_to_execution(["nope"]), "running: unknown agent 'nope'"),
        (
            lambda g: g.steps_to_execution(["A"], [3]),
            "finished: agent id must be a string",
        ),
        (lambda g: g.steps_to_execution("A"), "running: expected an iterable"),
        (
            lambda g: g.steps_to_execution(["A"], ["A"]),
            "'A' is both running and finished",
        ),
        (lambda g: g.add_agent("C", "and") or g.validate(), "'C' declares join 'and'"),
    ],
)
def test_errors(build, message: str) -> None:
    graph = AgentStepGraph(["A", "B"])
    with pytest.raises(GraphError, match=message):
        build(graph)


def test_validate() -> None:
    with pytest.raises(GraphError, match="no agents"):
        AgentStepGraph().validate()
    graph = make_graph([("A", "B")], joins={"B": "or"})
    graph.validate()  # entry agent "A" without a declared join needs no predecessors
    assert issubclass(GraphError, ValueError)


def test_agent_cap() -> None:
    graph = AgentStepGraph(f"a{i}" for i in range(MAX_AGENTS))
    with pytest.raises(GraphError, match="too many agents"):
        graph.add_agent("one-more")


# --- JSON --------------------------------------------------------------------------


def test_json_round_trip() -> None:
    doc = {
        "agents": [
            {"id": "planner", "join": "or"},
            {"id": "executor"},
            {"id": "reviewer", "join": "and"},
        ],
        "edges": [
            ["planner", "executor"],
            ["executor", "reviewer"],
            ["reviewer", "planner"],
        ],
    }
    graph = AgentStepGraph.from_json(json.loads(json.dumps(doc)))
    assert graph.to_json() == doc
    assert graph.steps_to_execution(["executor"]) == {
        "planner": 2,
        "executor": 0,
        "reviewer": 1,
    }


def _doc(**overrides: object) -> dict[str, object]:
    return {"agents": [{"id": "a"}, {"id": "b"}], "edges": [["a", "b"]], **overrides}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "graph: expected an object"),
        ({"agents": []}, "graph: missing field 'edges'"),
        (_doc(extra=1), "graph: unknown field 'extra'"),
        (_doc(agents={}), "graph.agents: expected a list"),
        (_doc(agents=[{"id": "a"}, "b"]), r"graph.agents\[1\]: expected an object"),
        (
            _doc(agents=[{"id": "a"}, {"name": "b"}]),
            r"graph.agents\[1\]: missing field 'id'",
        ),
        (
            _doc(agents=[{"id": "a"}, {"id": 2}]),
            r"graph.agents\[1\].id: expected a string",
        ),
        (
            _doc(agents=[{"id": "a"}, {"id": "b", "join": "xor"}]),
            r"graph.agents\[1\].join",
        ),
        (
            _doc(agents=[{"id": "a"}, {"id": "a"}]),
            r"graph.agents\[1\]: duplicate agent 'a'",
        ),
        (
            _doc(agents=[{"id": "a"}, {"id": "b", "x": 1}]),
            r"graph.agents\[1\]: unknown field",
        ),
        (
            _doc(edges=[["a", "b"], ["a"]]),
            r"graph.edges\[1\]: expected a \[src, dst\] pair",
        ),
        (
            _doc(edges=[["a", "b"], ["a", None]]),
            r"graph.edges\[1\]\[1\]: expected a string",
        ),
        (_doc(edges=[["a", "b"], ["a", "x"]]), r"graph.edges\[1\]: unknown agent 'x'"),
        (_doc(agents=[], edges=[]), "graph: graph has no agents"),
        (
            _doc(agents=[{"id": "a", "join": "or"}, {"id": "b"}]),
            "graph: agent 'a' declares",
        ),
        (
            _doc(agents=[{"id": str(i)} for i in range(MAX_AGENTS + 1)]),
            f"graph.agents: at most {MAX_AGENTS}",
        ),
        (
            _doc(edges=[["a", "b"]] * (MAX_EDGES + 1)),
            f"graph.edges: at most {MAX_EDGES}",
        ),
    ],
)
def test_from_json_errors_name_the_field(doc: object, message: str) -> None:
    with pytest.raises(GraphError, match=message):
        AgentStepGraph.from_json(doc)  # type: ignore[arg-type]


# --- brute-force oracle ------------------------------------------------------------


def brute_force_steps(
    agents: Sequence[str],
    joins: dict[str, str | None],
    edges: Sequence[tuple[str, str]],
    running: set[str],
    finished: set[str],
) -> dict[str, int]:
    """Step-by-step simulation of the documented semantics, independent of the library."""
    seeds = running | finished
    preds = {v: {u for u, w in edges if w == v} for v in agents}

    def reachable_avoiding(avoid: str) -> set[str]:
        reach = set(seeds)
        while new := {w for u, w in edges if u in reach and w != avoid} - reach:
            reach |= new
        return reach

    and_waits = {v: preds[v] & reachable_avoiding(v) for v in agents if joins[v] != "or"}
    first_run = dict.fromkeys(seeds, 0)  # earliest execution at step >= 0
    value = dict.fromkeys(running, 0)
    for step in range(1, 2 * len(agents) + 2):
        ran = {u for u, t in first_run.items() if t < step}
        firing = [
            v
            for v in agents
            if v not in value
            and (preds[v] & ran if v not in and_waits else and_waits[v] and and_waits[v] <= ran)
        ]
        for v in firing:
            value[v] = step
            first_run.setdefault(v, step)
    return value


@st.composite
def workflows(draw: st.DrawFn, nothing_running: bool = False):
    n = draw(st.integers(1, 7))
    agents = [f"a{i}" for i in range(n)]
    joins = {a: draw(st.sampled_from([None, "and", "or"])) for a in agents}
    pairs = [(u, v) for u in agents for v in agents]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=3 * n))
    if nothing_running:
        running, finished = set(), draw(st.sets(st.sampled_from(agents), min_size=1))
    else:
        running = draw(st.sets(st.sampled_from(agents), min_size=1))
        finished = draw(st.sets(st.sampled_from(agents))) - running
    return agents, joins, edges, running, finished


def _check_against_brute_force(workflow) -> None:
    agents, joins, edges, running, finished = workflow
    graph = make_graph(edges, joins={a: j for a, j in joins.items() if j}, agents=agents)
    expected = brute_force_steps(agents, joins, edges, running, finished)
    assert graph.steps_to_execution(running, finished) == expected


@settings(max_examples=200, deadline=None)
@given(workflows())
def test_matches_brute_force(workflow) -> None:
    _check_against_brute_force(workflow)


@settings(max_examples=100, deadline=None)
@given(workflows(nothing_running=True))
def test_matches_brute_force_when_nothing_runs(workflow) -> None:
    _check_against_brute_force(workflow)


@settings(max_examples=100, deadline=None)
@given(workflows())
def test_json_round_trip_random(workflow) -> None:
    agents, joins, edges, _, _ = workflow
    graph = make_graph(edges, joins={a: j for a, j in joins.items() if j}, agents=agents)
    doc = json.loads(json.dumps(graph.to_json()))
    try:
        graph.validate()
    except GraphError:
        with pytest.raises(GraphError):
            AgentStepGraph.from_json(doc)
        return
    assert AgentStepGraph.from_json(doc).to_json() == doc
