"""The workflow registry, its frontier, the learned mode and the middleware glue (no server)."""

from __future__ import annotations

import asyncio
import random

import pytest
from kvflow.patches.hint_middleware import HintMiddleware, RequestTracker

from kvflow.frontend.graph_learning import FAR, GraphLearner, TransitionModel, workflow_type
from kvflow.frontend.hint_rewrite import rewrite_body
from kvflow.frontend.registry import (
    RegistryError,
    RegistryFull,
    WorkflowConflict,
    WorkflowNotFound,
    WorkflowRegistry,
    activate,
)
from kvflow.harness.demo import cyclic_steps, fixed_prompts, optimum_hit_rate
from kvflow.harness.offline import CacheDriver
from kvflow.hints import HintError, WorkflowHint, decode_transport

CYCLE = {
    "agents": [{"id": "planner"}, {"id": "executor"}, {"id": "reviewer"}],
    "edges": [["planner", "executor"], ["executor", "reviewer"], ["reviewer", "planner"]],
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def begin(registry: WorkflowRegistry, workflow_id: str, agent_id: str, **steps: int):
    return registry.begin_request(WorkflowHint(workflow_id, agent_id, None, steps))


# ---- registration -------------------------------------------------------------


def test_register_is_idempotent_for_the_same_graph_in_any_order():
    registry = WorkflowRegistry()
    workflow, created = registry.register({"workflow_id": "w", "graph": CYCLE})
    assert created and workflow.graph.agents == ("planner", "executor", "reviewer")
    reordered = {"agents": CYCLE["agents"][::-1], "edges": CYCLE["edges"][::-1]}
    again, created = registry.register({"workflow_id": "w", "graph": reordered})
    assert again is workflow and not created


def test_a_different_graph_for_a_live_id_is_a_conflict():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    other = {**CYCLE, "edges": CYCLE["edges"][:2]}
    with pytest.raises(WorkflowConflict) as error:
        registry.register({"workflow_id": "w", "graph": other})
    assert error.value.status == 409
    registry.end("w")
    assert registry.register({"workflow_id": "w", "graph": other})[1]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"graph": CYCLE}, "workflow_id"),
        ({"workflow_id": "", "graph": CYCLE}, "workflow_id"),
        ({"workflow_id": "w"}, "graph"),
        ({"workflow_id": "w", "graph": CYCLE, "colour": 1}, "colour"),
        ({"workflow_id": "w", "graph": {"agents": [{"id": 3}], "edges": []}}, "graph.agents[0].id"),
        ({"workflow_id": "w", "graph": {"agents": [{"id": "a"}], "edges": [["a", "b"]]}}, "graph.edges[0]"),
        (
            {"workflow_id": "w", "graph": {"agents": [{"id": f"a{i}"} for i in range(5)], "edges": []}},
            "graph.agents",
        ),
    ],
)
def test_malformed_registrations_are_400_naming_the_field(body, param):
    with pytest.raises(RegistryError) as error:
        WorkflowRegistry(max_agents=4).register(body)
    assert error.value.status == 400 and error.value.param == param


def test_caps_on_workflows_and_ttl_expiry():
    clock = Clock()
    registry = WorkflowRegistry(ttl=10, max_workflows=2, clock=clock)
    registry.register({"workflow_id": "a", "graph": CYCLE})
    registry.register({"workflow_id": "b", "graph": CYCLE})
    with pytest.raises(RegistryFull) as error:
        registry.register({"workflow_id": "c", "graph": CYCLE})
    assert error.value.status == 429 and "--kvflow-max-workflows" in str(error.value)
    clock.now = 6
    begin(registry, "a", "planner")  # activity keeps "a" alive
    clock.now = 11
    registry.register({"workflow_id": "c", "graph": CYCLE})  # "b" expired
    with pytest.raises(WorkflowNotFound):
        registry.get("b")
    assert registry.get("a") and len(registry) == 2


# ---- frontier and steps -------------------------------------------------------


def test_requests_move_the_frontier_and_fill_in_steps():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    hint, finish = begin(registry, "w", "planner")
    assert hint.steps_to_execution == {"planner": 0, "executor": 1, "reviewer": 2}
    finish(True)  # the planner just finished: the executor is next, the planner farthest
    assert registry.current_steps("w") == {"planner": 3, "executor": 1, "reviewer": 2}
    hint, finish = begin(registry, "w", "executor")
    assert hint.steps_to_execution == {"planner": 2, "executor": 0, "reviewer": 1}
    assert registry.get("w").finished == set()  # the executor's start consumed the planner's finish


def test_explicit_steps_override_the_derived_ones_for_the_agents_they_name():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    hint, _ = begin(registry, "w", "planner", reviewer=7, outsider=1)
    assert hint.steps_to_execution == {"planner": 0, "executor": 1, "reviewer": 7, "outsider": 1}


def test_agents_that_never_run_again_are_far():
    registry = WorkflowRegistry()
    chain = {"agents": [{"id": "a"}, {"id": "b"}, {"id": "c"}], "edges": [["a", "b"], ["b", "c"]]}
    registry.register({"workflow_id": "w", "graph": chain})
    _, finish = begin(registry, "w", "a")
    finish(True)
    hint, _ = begin(registry, "w", "c")
    assert hint.steps_to_execution == {"a": FAR, "b": FAR, "c": 0}


def test_unknown_agent_of_a_registered_workflow_is_a_hint_error():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    with pytest.raises(HintError) as error:
        begin(registry, "w", "intruder")
    assert error.value.field == "kvflow.agent_id"


def test_parallel_requests_and_failed_requests():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    _, first = begin(registry, "w", "executor")
    _, second = begin(registry, "w", "executor")
    first(True)
    assert registry.get("w").running() == {"executor"}  # one request still in flight
    second(False)  # an error answer: not finished
    assert registry.get("w").running() == set() and registry.get("w").finished == set()


def test_patch_declares_a_tool_call_running_until_its_successor_starts():
    registry = WorkflowRegistry()
    graph = {
        "agents": [{"id": "planner"}, {"id": "tool"}, {"id": "executor"}],
        "edges": [["planner", "tool"], ["tool", "executor"], ["executor", "planner"]],
    }
    registry.register({"workflow_id": "w", "graph": graph})
    _, finish = begin(registry, "w", "planner")
    finish(True)
    workflow = registry.set_frontier("w", {"running": ["tool"]})
    assert workflow.steps() == {"planner": 2, "tool": 0, "executor": 1}
    begin(registry, "w", "executor")
    assert workflow.running() == {"executor"} and workflow.finished == set()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, None),
        ({"running": "tool"}, "running"),
        ({"running": ["nope"]}, "running[0]"),
        ({"finished": [1]}, "finished[0]"),
        ({"running": ["planner"], "finished": ["planner"]}, "finished"),
        ({"next": []}, "next"),
    ],
)
def test_malformed_frontier_is_400(body, param):
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    with pytest.raises(RegistryError) as error:
        registry.set_frontier("w", body)
    assert error.value.status == 400 and error.value.param == param


def test_finish_after_end_is_ignored_and_changes_are_reported():
    registry = WorkflowRegistry()
    changed = []
    registry.on_change = changed.append
    registry.register({"workflow_id": "w", "graph": CYCLE})
    _, finish = begin(registry, "w", "planner")
    finish(True)
    _, finish = begin(registry, "w", "executor")
    assert registry.end("w") and not registry.end("w")
    finish(True)
    assert changed == ["w"]


def test_unregistered_workflows_pass_through_without_a_learner():
    hint = WorkflowHint("w", "a", 3, {"b": 1})
    assert WorkflowRegistry().begin_request(hint) == (hint, None)


# ---- learned mode ----------------------------------------------------------------


def test_workflow_type_is_the_id_up_to_its_last_colon():
    assert workflow_type("review:42") == "review"
    assert workflow_type("team:a:7") == "team:a"
    assert workflow_type("plain") == "plain" and workflow_type(":x") == ":x"


def test_transition_model_is_unsure_until_a_successor_has_a_majority_of_enough_observations():
    model = TransitionModel(max_agents=8)
    model.observe("a", "b")
    assert model.likely_successor("a", 2) is None and model.steps("a", True, 2) == {}
    model.observe("a", "c")
    assert model.likely_successor("a", 2) is None  # a tie is no majority
    model.observe("a", "b")
    assert model.likely_successor("a", 2) == "b"
    assert model.steps("a", True, 2) == {"a": 0, "b": 1, "c": FAR}


def test_learner_follows_a_cycle_and_shares_it_across_a_type():
    learner = GraphLearner(min_observations=2)
    agents = ["p", "e", "r"]
    for _ in range(2):
        for agent in agents:
            learner.started("cycle:1", agent)
            learner.finished("cycle:1", agent)
    assert learner.started("cycle:1", "p") == {"p": 0, "e": 1, "r": 2}
    assert learner.finished("cycle:1", "p") == {"p": 3, "e": 1, "r": 2}
    # A new instance of the same type benefits at once.
    assert learner.started("cycle:2", "e") == {"p": 2, "e": 0, "r": 1}
    assert learner.describe("cycle:2")["likely_successors"] == {"p": "e", "e": "r", "r": "p"}
    assert learner.forget("cycle:2") and learner.describe("cycle:2") is None


def test_learner_caps_agents_and_workflows_and_expires():
    clock = Clock()
    learner = GraphLearner(max_workflows=2, max_agents=2, ttl=5, clock=clock)
    for agent in ("a", "b", "c", "a", "b", "c"):
        learner.started("t:1", agent)
    assert set(learner.describe("t:1")["transitions"]) == {"a", "b"}
    learner.started("t:2", "a")
    learner.started("t:3", "a")
    assert not learner.knows("t:1")  # past the cap, the least recent is dropped
    clock.now = 6
    learner.expire()
    assert not learner.knows("t:2") and not learner.knows("t:3")


def test_registry_uses_the_learner_for_unregistered_workflows():
    changed = []
    registry = WorkflowRegistry(learner=GraphLearner(min_observations=1))
    registry.on_change = changed.append
    for agent in ("a", "b", "a"):
        hint, finish = begin(registry, "t:1", agent)
        finish(True)
    assert hint.steps_to_execution == {"a": 0, "b": 1}
    assert registry.current_steps("t:1") == {"a": 2, "b": 1}
    assert registry.describe("t:1")["mode"] == "learned" and changed


def learned_vs_explicit(rounds: int, warmup: int) -> tuple[float, float, float]:
    """Fixed-prompt hit rates of a 6-agent cycle in a 4-prompt pool, on the real cache."""
    agents, fixed, dynamic, capacity = 6, 40, 4, 4
    prompts = fixed_prompts(agents, fixed)
    rates = []
    for mode in ("explicit", "learned"):
        driver = CacheDriver(capacity * fixed + 2 * dynamic)
        registry = WorkflowRegistry(learner=GraphLearner())
        rng = random.Random(1)
        hits = total = 0
        for round_index in range(rounds):
            for i in range(agents):
                steps = cyclic_steps(agents, i) if mode == "explicit" else {}
                hint, finish = registry.begin_request(WorkflowHint("cycle:1", f"agent{i}", None, steps))
                tokens = prompts[i] + [rng.randrange(256) for _ in range(dynamic)]
                hit = driver.serve(tokens, hint)
                if finish is not None:
                    finish(True)
                if round_index >= warmup:
                    hits += hit >= fixed
                    total += 1
        rates.append(hits / total)
    return rates[0], rates[1], optimum_hit_rate(agents, capacity)


def test_learned_mode_reaches_the_explicit_hit_rate_on_the_real_cache():
    explicit, learned, optimum = learned_vs_explicit(rounds=8, warmup=3)
    assert explicit >= 0.9 * optimum
    assert learned >= 0.8 * explicit


# ---- middleware glue ---------------------------------------------------------------


def test_rewrite_body_carries_the_registry_steps():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    tracker = RequestTracker()
    activate(registry)
    try:
        body = rewrite_body(
            {"input_ids": [1, 2], "kvflow": {"workflow_id": "w", "agent_id": "planner"}},
            "/generate",
            tracker.begin,
        )
    finally:
        activate(None)
    hint = decode_transport(body["sampling_params"]["custom_params"])
    assert hint.steps_to_execution == {"planner": 0, "executor": 1, "reviewer": 2}


def run_middleware(app, body: bytes) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(
        HintMiddleware(app)(
            {"type": "http", "method": "POST", "path": "/generate", "headers": []}, receive, send
        )
    )
    return sent


def test_middleware_marks_the_agent_finished_before_the_last_body_chunk_is_sent():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    seen = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        seen.append(registry.get("w").running())
        await send({"type": "http.response.body", "body": b"b"})

    activate(registry)
    try:
        run_middleware(app, b'{"input_ids": [1], "kvflow": {"workflow_id": "w", "agent_id": "planner"}}')
        assert seen == [{"planner"}] and registry.get("w").finished == {"planner"}
        # A request that fails in the app is no longer running, but not finished either.
        registry.set_frontier("w", {"finished": []})

        async def failing(scope, receive, send):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            run_middleware(
                failing, b'{"input_ids": [1], "kvflow": {"workflow_id": "w", "agent_id": "executor"}}'
            )
        assert registry.get("w").running() == set() and registry.get("w").finished == set()
    finally:
        activate(None)
