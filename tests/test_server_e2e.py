"""End to end: real ``kvflow.launch_server`` processes on CPU, the embedded model."""

from __future__ import annotations

import pytest
import requests

from kvflow import patches
from kvflow.harness.demo import hit_rate, optimum_hit_rate, pool_tokens, run_cyclic_workflow
from kvflow.harness.server_process import ServerProcess

pytestmark = pytest.mark.e2e

AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS, POOL_PROMPTS = 6, 200, 8, 4, 5, 4
COMMON_ARGS = [
    "--max-total-tokens",
    str(pool_tokens(POOL_PROMPTS, FIXED, DYNAMIC, OUTPUT)),
    "--random-seed",
    "0",
]


@pytest.fixture(scope="module")
def kvflow_server():
    with ServerProcess(COMMON_ARGS) as server:
        print(f"kvflow server ready in {server.startup_seconds:.1f}s")
        yield server


def stats(server: ServerProcess) -> dict:
    response = requests.get(f"{server.url}/kvflow/stats", timeout=30)
    response.raise_for_status()
    return response.json()


def workflow_agents(server: ServerProcess, workflow_id: str) -> dict | None:
    """The cache's per-agent stats of one workflow (None when it does not track it)."""
    response = requests.get(f"{server.url}/kvflow/stats", params={"workflow_id": workflow_id}, timeout=30)
    response.raise_for_status()
    detail = response.json()["workflow"]
    return None if detail is None else detail["agents"]


def run(server: ServerProcess, workflow_id: str):
    return run_cyclic_workflow(server.url, AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS, workflow_id=workflow_id)


def test_cyclic_workflow_kvflow_near_optimum_lru_near_zero_same_outputs(kvflow_server):
    kvflow_runs = run(kvflow_server, "cycle")
    kvflow_stats = stats(kvflow_server)
    # Capacity actually used: the pool SGLang allocated, minus one request's varying part.
    capacity = (kvflow_stats["pool_tokens"] - (DYNAMIC + OUTPUT)) // FIXED
    optimum = optimum_hit_rate(AGENTS, capacity)
    kvflow_rate = hit_rate(kvflow_runs)

    with ServerProcess([*COMMON_ARGS, "--radix-eviction-policy", "lru"]) as lru_server:
        lru_runs = run(lru_server, "cycle")
        lru_stats = stats(lru_server)
    lru_rate = hit_rate(lru_runs)
    print(f"capacity {capacity} prompts, optimum {optimum:.2f}, kvflow {kvflow_rate:.2f}, lru {lru_rate:.2f}")

    assert capacity == POOL_PROMPTS
    assert kvflow_rate >= 0.9 * optimum
    assert lru_rate <= 0.10
    assert [r.output_ids for r in kvflow_runs] == [r.output_ids for r in lru_runs]

    workflow = workflow_agents(kvflow_server, "cycle")
    assert sorted(workflow) == [f"agent{i}" for i in range(AGENTS)]
    # What each request took beyond its fixed prompt: its dynamic suffix and its output.
    assert all(agent["request_tokens"] == DYNAMIC + OUTPUT for agent in workflow.values())
    assert kvflow_stats["totals"]["fixed_hit_invocations"] == sum(r.fixed_hit for r in kvflow_runs)
    assert kvflow_stats["totals"]["invocations"] == len(kvflow_runs)
    evictions = kvflow_stats["evictions"]["device"]
    assert evictions["unowned"]["nodes"] > 0 and evictions["owned"]["nodes"] > 0
    assert lru_stats["eviction_policy"] == "lru" and kvflow_stats["eviction_policy"] == "kvflow"
    assert kvflow_stats["tie_break"] == "lru"
    assert lru_stats["totals"]["fixed_tokens_recomputed"] > kvflow_stats["totals"]["fixed_tokens_recomputed"]


def test_patches_are_active_in_the_scheduler_process(kvflow_server):
    # The stats are produced by a hook inside the scheduler process itself.
    # On a machine without CUDA (CI's) the CPU-only patches are active too, after the others.
    modules = [*patches.HOOK_PATCHES, *patches.CPU_ONLY_PATCHES]
    expected = [module.__name__.rsplit(".", 1)[-1] for module in modules]
    assert stats(kvflow_server)["patches_active"] == expected


PROMPT = list(range(40, 90))


def generate_body(hint: object, **extra) -> dict:
    return {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 2, "temperature": 0},
        "kvflow": hint,
        **extra,
    }


GOOD = {"workflow_id": "w", "agent_id": "a"}
MALFORMED = [
    ("kvflow", "not an object"),
    ("kvflow.workflow_id", {"agent_id": "a"}),
    ("kvflow.workflow_id", {**GOOD, "workflow_id": 7}),
    ("kvflow.agent_id", {**GOOD, "agent_id": ["a"]}),
    ("kvflow.agent_id", {**GOOD, "agent_id": ""}),
    ("kvflow.fixed_prefix_len", {**GOOD, "fixed_prefix_len": "10"}),
    ("kvflow.fixed_prefix_len", {**GOOD, "fixed_prefix_len": -1}),
    ("kvflow.fixed_prefix_len", {**GOOD, "fixed_prefix_len": len(PROMPT) + 1}),
    ("kvflow.steps_to_execution", {**GOOD, "steps_to_execution": [1, 2]}),
    ("kvflow.steps_to_execution.b", {**GOOD, "steps_to_execution": {"b": -1}}),
    ("kvflow.steps_to_execution.b", {**GOOD, "steps_to_execution": {"b": 1.5}}),
    ("kvflow.steps_to_execution", {**GOOD, "steps_to_execution": {f"x{i}": 1 for i in range(1025)}}),
    ("kvflow.expected_pause_s", {**GOOD, "expected_pause_s": "2s"}),
    ("kvflow.expected_pause_s", {**GOOD, "expected_pause_s": 0}),
    ("kvflow.expected_pause_s", {**GOOD, "expected_pause_s": 86_401}),
    ("kvflow.colour", {**GOOD, "colour": "red"}),
]


@pytest.mark.parametrize(("field", "hint"), MALFORMED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MALFORMED)])
def test_malformed_hint_is_a_400_naming_the_field(kvflow_server, field, hint):
    response = requests.post(f"{kvflow_server.url}/generate", json=generate_body(hint), timeout=60)
    assert response.status_code == 400
    assert response.json()["param"] == field and field in response.json()["message"]


def test_malformed_hint_in_the_other_forms_is_a_400_too(kvflow_server):
    url = kvflow_server.url
    envelope = {
        "protocol_version": "1",
        "message_id": "m",
        "actions": [
            {"action_id": "1", "action_type": "kvflow", "action_version": "1", "payload": {"agent_id": "a"}}
        ],
    }
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}, "kv_hints": envelope}
    response = requests.post(f"{url}/generate", json=body, timeout=60)
    assert response.status_code == 400 and "kv_hints.actions[0].payload.workflow_id" in response.text
    chat = {
        "model": "default",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "custom_params": {"kvflow": {**GOOD, "steps_to_execution": {"b": -3}}},
    }
    response = requests.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
    assert response.status_code == 400 and "custom_params.kvflow.steps_to_execution.b" in response.text
    # Text prompts are only measurable after tokenization: the tokenizer-side patch rejects them.
    chat = {**chat, "custom_params": None, "kvflow": {**GOOD, "fixed_prefix_len": 10_000}}
    response = requests.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
    assert response.status_code == 400 and "kvflow.fixed_prefix_len" in response.text


def test_server_keeps_serving_after_bad_hints_and_unhinted_requests_match_hinted_ones(kvflow_server):
    url = kvflow_server.url
    plain = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    unhinted = requests.post(f"{url}/generate", json=plain, timeout=60)
    hinted = requests.post(
        f"{url}/generate", json={**plain, "kvflow": {**GOOD, "fixed_prefix_len": 20}}, timeout=60
    )
    assert unhinted.status_code == 200 and hinted.status_code == 200
    assert unhinted.json()["output_ids"] == hinted.json()["output_ids"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_every_hint_form_reaches_the_cache(kvflow_server):
    from openai import OpenAI

    url = kvflow_server.url
    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    system = {"role": "system", "content": "You are the planner of a small team. " * 4}
    messages = [system, {"role": "user", "content": "Plan step one."}]
    client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=2,
        temperature=0,
        extra_body={"kvflow": {"workflow_id": "forms", "agent_id": "chat", "fixed_prefix_len": 40}},
    )
    client.completions.create(
        model="default",
        prompt="Write the report. " * 4,
        max_tokens=2,
        extra_body={"custom_params": {"kvflow": {"workflow_id": "forms", "agent_id": "completion"}}},
    )
    envelope = {
        "protocol_version": "1",
        "message_id": "m",
        "actions": [
            {
                "action_id": "1",
                "action_type": "kvflow",
                "action_version": "1",
                "payload": {**GOOD, "workflow_id": "forms", "agent_id": "envelope"},
            }
        ],
    }
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}, "kv_hints": envelope}
    assert requests.post(f"{url}/generate", json=body, timeout=60).status_code == 200
    agents = workflow_agents(kvflow_server, "forms")
    assert {"chat", "completion", "envelope"} <= set(agents)
    assert agents["chat"]["fixed_prefix_len"] == 40 and agents["chat"]["invocations"] == 1
