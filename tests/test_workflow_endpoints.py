"""End to end on one real CPU server: /kvflow/workflows, the SDK, the learned mode, LangGraph.

The server runs with ``--api-key`` (every call here authenticates, and one
test checks that the workflow endpoints refuse calls without it) and with
``--kvflow-learn-graph``. Its pool holds four 200-token fixed prompts, so the
cyclic workflows below run under memory pressure.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
import time
from pathlib import Path

import openai
import pytest
import requests

from kvflow.client import AsyncWorkflow, KVFlowError, Workflow
from kvflow.graph import AgentStepGraph
from kvflow.harness.demo import Invocation, cyclic_steps, fixed_prompts, hit_rate, pool_tokens
from kvflow.harness.server_process import ServerProcess

pytestmark = pytest.mark.e2e

API_KEY = "kvflow-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
AGENTS, FIXED, DYNAMIC, OUTPUT = 6, 200, 8, 4
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "langgraph_team.py"


@pytest.fixture(scope="module")
def server():
    args = [
        "--max-total-tokens",
        str(pool_tokens(4, FIXED, DYNAMIC, OUTPUT)),
        "--random-seed",
        "0",
        "--api-key",
        API_KEY,
        "--kvflow-learn-graph",
    ]
    with ServerProcess(args) as process:
        yield process.url


def call(method: str, url: str, body: object = None, headers: dict | None = AUTH) -> requests.Response:
    return requests.request(method, url, json=body, headers=headers, timeout=120)


def stats(url: str) -> dict:
    response = call("GET", f"{url}/kvflow/stats")
    response.raise_for_status()
    return response.json()


def workflow_agents(url: str, workflow_id: str) -> dict | None:
    """The cache's per-agent stats of one workflow (None when it does not track it)."""
    response = requests.get(
        f"{url}/kvflow/stats", params={"workflow_id": workflow_id, "limit": 1024}, headers=AUTH, timeout=120
    )
    response.raise_for_status()
    detail = response.json()["workflow"]
    return None if detail is None else detail["agents"]


def cycle_graph(agents: list[str]) -> AgentStepGraph:
    graph = AgentStepGraph(agents)
    for i, agent in enumerate(agents):
        graph.add_edge(agent, agents[(i + 1) % len(agents)])
    return graph


def run_cycle(
    url: str, workflow_id: str, rounds: int, seed: int, boundary: bool = False, steps: bool = False
) -> list[Invocation]:
    """A 6-agent cycle through /generate; hints add ``fixed_prefix_len`` and steps on request."""
    prompts = fixed_prompts(AGENTS, FIXED, seed)
    rng = random.Random(seed + 1)
    invocations = []
    for round_index in range(rounds):
        for i in range(AGENTS):
            hint = {"workflow_id": workflow_id, "agent_id": f"agent{i}"}
            if boundary:
                hint["fixed_prefix_len"] = FIXED
            if steps:
                hint["steps_to_execution"] = cyclic_steps(AGENTS, i)
            body = {
                "input_ids": prompts[i] + [rng.randrange(256) for _ in range(DYNAMIC)],
                "sampling_params": {"max_new_tokens": OUTPUT, "temperature": 0, "ignore_eos": True},
                "kvflow": hint,
            }
            out = call("POST", f"{url}/generate", body).json()
            cached = out["meta_info"]["cached_tokens"]
            invocations.append(Invocation(round_index, f"agent{i}", FIXED, cached, out["output_ids"], 0.0))
    assert call("DELETE", f"{url}/kvflow/workflows/{workflow_id}").status_code == 200
    return invocations


def test_learned_and_registered_modes_reach_the_hit_rate_of_explicit_hints(server):
    # First in the module, so that no other workflow holds owned KV in the small pool.
    explicit_runs = run_cycle(server, "explicit", rounds=4, seed=0, boundary=True, steps=True)
    explicit = hit_rate(explicit_runs, warmup_rounds=1)

    # Hint-free: ids only; the server infers the boundaries and learns the cycle in two rounds.
    learned = hit_rate(run_cycle(server, "cycle:learned", rounds=6, seed=1), warmup_rounds=2)

    agents = [f"agent{i}" for i in range(AGENTS)]
    body = {"workflow_id": "cycle-registered", "graph": cycle_graph(agents).to_json()}
    assert call("POST", f"{server}/kvflow/workflows", body).status_code == 201
    registered_runs = run_cycle(server, "cycle-registered", rounds=4, seed=2, boundary=True)
    registered = hit_rate(registered_runs, warmup_rounds=1)
    print(
        f"fixed-prompt hit rates: explicit {explicit:.2f}, learned {learned:.2f}, registered {registered:.2f}"
    )

    assert explicit >= 0.5
    assert learned >= 0.8 * explicit
    assert registered >= 0.8 * explicit


def test_workflow_endpoints_require_the_api_key(server):
    item = f"{server}/kvflow/workflows/w"
    for method, url in (
        ("POST", f"{server}/kvflow/workflows"),
        ("GET", item),
        ("PATCH", item),
        ("DELETE", item),
    ):
        assert call(method, url, {}, headers=None).status_code == 401, method
        assert call(method, url, {}, headers={"Authorization": "Bearer wrong"}).status_code == 401, method


def test_register_is_idempotent_conflicts_are_409_and_errors_name_the_field(server):
    url = f"{server}/kvflow/workflows"
    graph = cycle_graph(["planner", "executor", "reviewer"]).to_json()
    first = call("POST", url, {"workflow_id": "team/1", "graph": graph})
    assert first.status_code == 201 and first.json()["mode"] == "registered"
    assert call("POST", url, {"workflow_id": "team/1", "graph": graph}).status_code == 200
    other = {**graph, "edges": graph["edges"][:2]}
    conflict = call("POST", url, {"workflow_id": "team/1", "graph": other})
    assert conflict.status_code == 409 and conflict.json()["param"] == "graph"

    inspected = call("GET", f"{url}/team%2F1").json()  # ids may contain "/"
    assert inspected["graph"] == graph and inspected["running"] == [] and inspected["finished"] == []
    assert call("GET", f"{url}/nobody").status_code == 404

    too_big = {"agents": [{"id": f"a{i}"} for i in range(65)], "edges": []}
    for body, param in (
        ({"workflow_id": "big", "graph": too_big}, "graph.agents"),
        ({"workflow_id": "bad", "graph": {"agents": [{"id": "a"}], "edges": [["a", "b"]]}}, "graph.edges[0]"),
        ({"graph": graph}, "workflow_id"),
    ):
        response = call("POST", url, body)
        assert response.status_code == 400 and response.json()["param"] == param, response.text
    assert call("DELETE", f"{url}/team%2F1").status_code == 200


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (result := predicate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return result


def test_requests_patch_and_delete_move_the_cache_at_once(server):
    url = f"{server}/kvflow/workflows"
    graph = cycle_graph(["planner", "executor", "reviewer"]).to_json()
    call("POST", url, {"workflow_id": "frontier", "graph": graph})
    body = {
        "input_ids": list(range(30, 90)),
        "sampling_params": {"max_new_tokens": 2, "temperature": 0},
        "kvflow": {"workflow_id": "frontier", "agent_id": "planner", "fixed_prefix_len": 50},
    }
    assert call("POST", f"{server}/generate", body).status_code == 200

    def cache_steps():
        agents = workflow_agents(server, "frontier") or {}
        return {agent: counters["steps_to_execution"] for agent, counters in agents.items()}

    # The planner finished: the executor is next and the planner farthest, pushed after the response.
    assert wait_for(lambda: cache_steps() == {"planner": 3, "executor": 1, "reviewer": 2}), cache_steps()
    assert call("GET", f"{url}/frontier").json()["finished"] == ["planner"]

    # A tool call of the executor: declared running with PATCH, in the cache when PATCH returns.
    patched = call("PATCH", f"{url}/frontier", {"running": ["executor"]})
    assert patched.status_code == 200 and patched.json()["cache_updated"]
    assert cache_steps() == {"planner": 2, "executor": 0, "reviewer": 1}
    bad = call("PATCH", f"{url}/frontier", {"running": ["ghost"]})
    assert bad.status_code == 400 and bad.json()["param"] == "running[0]"

    # An agent outside the registered graph is refused like any malformed hint.
    intruder = {**body, "kvflow": {"workflow_id": "frontier", "agent_id": "intruder"}}
    response = call("POST", f"{server}/generate", intruder)
    assert response.status_code == 400 and response.json()["param"] == "kvflow.agent_id"

    deleted = call("DELETE", f"{url}/frontier")
    assert deleted.json() == {"workflow_id": "frontier", "registry": True, "cache": True}
    assert workflow_agents(server, "frontier") is None
    assert call("DELETE", f"{url}/frontier").status_code == 404


SYSTEM = "You are the planner of a small team. Answer with a short numbered plan. " * 2


def test_sdk_sync_every_call_style(server):
    graph = cycle_graph(["planner", "coder", "writer"])
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    with Workflow(server, graph, api_key=API_KEY, openai_client=client) as workflow:
        assert workflow.info()["mode"] == "registered"
        out = workflow.generate(
            "planner",
            text=SYSTEM + "Task: ship it.",
            fixed_prefix=SYSTEM,
            sampling_params={"max_new_tokens": 2},
        )
        assert out["meta_info"]["completion_tokens"] == 2
        workflow.generate(
            "coder", input_ids=list(range(40, 100)), fixed_prefix=32, sampling_params={"max_new_tokens": 2}
        )
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Plan the release."}]
        chat = workflow.chat("planner", messages, max_tokens=2, temperature=0)
        assert chat.choices[0].message.content is not None
        completion = workflow.completion(
            "writer", SYSTEM + "Write the notes.", fixed_prefix=SYSTEM, max_tokens=2
        )
        assert completion.choices[0].text is not None

        agents = workflow_agents(server, workflow.workflow_id)
        system_tokens = len(SYSTEM.encode())  # the embedded tokenizer is byte-level
        assert agents["coder"]["fixed_prefix_len"] == 32
        assert agents["writer"]["fixed_prefix_len"] == system_tokens
        # Chat: the rendered system message and the fixed header of the next turn.
        assert agents["planner"]["fixed_prefix_len"] > system_tokens
        assert agents["planner"]["invocations"] == 2
        assert workflow.info()["finished"] == ["writer"]
        with pytest.raises(KVFlowError) as error:
            workflow.generate("stranger", text="hi")
        assert error.value.status == 400
    assert workflow_agents(server, workflow.workflow_id) is None


def test_sdk_async_parallel_agents_and_learned_mode(server):
    graph = AgentStepGraph(["lead", "left", "right"])
    graph.add_agent("merge", "and")
    for src, dst in (("lead", "left"), ("lead", "right"), ("left", "merge"), ("right", "merge")):
        graph.add_edge(src, dst)

    async def scenario() -> tuple[dict, dict, str]:
        async with AsyncWorkflow(server, graph, api_key=API_KEY) as workflow:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Split the work."}]
            await workflow.chat("lead", messages, max_tokens=2)
            await asyncio.gather(
                workflow.generate("left", text="left " * 20, sampling_params={"max_new_tokens": 2}),
                workflow.completion("right", "right " * 20, max_tokens=2),
            )
            fan_in = await workflow.info()
        # No graph: the learned (hint-free) mode, ids only.
        async with AsyncWorkflow(server, workflow_type="solo", api_key=API_KEY) as solo:
            await solo.generate("alone", input_ids=list(range(50, 80)), sampling_params={"max_new_tokens": 1})
            learned = await solo.info()
        return fan_in, learned, solo.workflow_id

    fan_in, learned, solo_id = asyncio.run(scenario())
    assert fan_in["finished"] == ["left", "right"] and fan_in["steps_to_execution"]["merge"] == 1
    assert learned["mode"] == "learned" and learned["type"] == "solo" and learned["agent_id"] == "alone"
    assert workflow_agents(server, solo_id) is None


def test_langgraph_example_end_to_end(server, monkeypatch):
    pytest.importorskip("langgraph")
    spec = importlib.util.spec_from_file_location("langgraph_team", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # LangGraph resolves the state's type hints
    spec.loader.exec_module(example)

    result = example.run_team(server, "add a --verbose flag", rounds=3, api_key=API_KEY)
    graph = result["registered"]["graph"]
    assert [a["id"] for a in graph["agents"]] == ["planner", "executor", "reviewer"]
    assert sorted(graph["edges"]) == [
        ["executor", "reviewer"],
        ["planner", "executor"],
        ["reviewer", "planner"],
    ]
    assert len(result["state"]["transcript"]) == 9
    for agent in ("planner", "executor", "reviewer"):
        counters = result["agents"][agent]
        assert counters["invocations"] == 3 and counters["fixed_prefix_len"] > len(example.PROMPTS[agent])
        assert counters["fixed_hit_invocations"] >= 1  # the system prompt is reused from the cache
    assert workflow_agents(server, result["workflow_id"]) is None
