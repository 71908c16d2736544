"""End to end through SGLang's real router (sglang-router's ``smg``) in front of two kvflow CPU servers.

The router runs with ``--policy manual`` (the SDK's ``X-SMG-Routing-Key``, the
workflow id, keeps a workflow on one server; ``--assignment-mode min_group``
spreads new keys over both), ``--cb-failure-threshold 3`` (three consecutive
failed attempts open a worker's circuit breaker) and ``--retry-max-retries 5``:
the first request to a dead worker fails there three times, and its fourth
attempt goes to a worker whose breaker is closed (the manual policy moves the
key). The breaker also counts a worker's 4xx answers (never retried) as
failures, a success resetting the count: each malformed request here is
followed by a good one of the same workflow.
Every workflow is driven by the SDK with ``router=True``: hints ride in
``session_params``, the graph with every request.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests

from kvflow.client import Workflow
from kvflow.graph import AgentStepGraph
from kvflow.harness.demo import fixed_prompts
from kvflow.harness.server_process import ServerProcess, free_port
from kvflow.hints import common_prefix_len

pytestmark = pytest.mark.e2e

ROUTER = Path(sys.executable).with_name("smg")
AGENTS, FIXED, DYNAMIC, OUTPUT = ("planner", "coder"), 96, 8, 2
ENDPOINTS = ("generate", "completion", "chat")
WORKFLOWS = [f"{endpoint}-{i}" for endpoint in ENDPOINTS for i in range(2)]
# Each workflow's own fixed prompts, so that no workflow is served from another's cache.
FIXED_TEXT_LEN: dict[str, int] = {}
PROMPTS = {
    w: dict(zip(AGENTS, fixed_prompts(len(AGENTS), FIXED, seed=i), strict=True))
    for i, w in enumerate(WORKFLOWS)
}
# Every workflow's prompts fit in one pool with room to spare: a miss is a cold cache, never an eviction.
SERVER_ARGS = ["--max-total-tokens", "4096", "--random-seed", "0"]


def graph() -> AgentStepGraph:
    cycle = AgentStepGraph(list(AGENTS))
    cycle.add_edge("planner", "coder")
    cycle.add_edge("coder", "planner")
    return cycle


class RouterProcess:
    """The real router on loopback in front of ``workers``; ready once it lists all of them healthy."""

    def __init__(self, workers: list[str], log_path: Path, timeout: float = 120.0) -> None:
        self.port = free_port()
        self.args = [
            str(ROUTER),
            "launch",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--worker-urls",
            *workers,
            "--policy",
            "manual",
            "--assignment-mode",
            "min_group",
            "--cb-failure-threshold",
            "3",
            "--retry-max-retries",
            "5",
            "--retry-initial-backoff-ms",
            "20",
            "--worker-startup-check-interval",
            "1",
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            "warn",
        ]
        self.workers, self.log_path, self.timeout = workers, log_path, timeout
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RouterProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")
            try:
                listed = requests.get(f"{self.url}/workers", timeout=5).json()["workers"]
                if sorted(w["url"] for w in listed if w["is_healthy"]) == sorted(self.workers):
                    return self
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"router not ready; log:\n{self.log_path.read_text(errors='replace')}")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("router")
    servers = [ServerProcess(SERVER_ARGS, logs / f"server{i}.log", timeout=600) for i in range(2)]
    try:
        for server in servers:
            server.start()  # side by side: start-up is mostly imports
        for server in servers:
            server.wait_ready()
        with RouterProcess([s.url for s in servers], logs / "router.log") as router:
            yield servers, router
    finally:
        for server in servers:
            server.stop()


def dynamic(round_index: int, agent_id: str) -> list[int]:
    return [(7 * round_index + 3 * len(agent_id) + j) % 256 for j in range(DYNAMIC)]


def step(workflow: Workflow, agent_id: str, round_index: int) -> str:
    """One call of ``agent_id`` through the workflow's endpoint; returns the text or token ids it produced."""
    endpoint = workflow.workflow_id.split("-")[0]
    sampling = {"max_tokens": OUTPUT, "temperature": 0}
    if endpoint == "generate":
        out = workflow.generate(
            agent_id,
            input_ids=PROMPTS[workflow.workflow_id][agent_id] + dynamic(round_index, agent_id),
            fixed_prefix=FIXED,
            sampling_params={"max_new_tokens": OUTPUT, "temperature": 0, "ignore_eos": True},
        )
        return str(out["output_ids"])
    if endpoint == "completion":  # the router takes text prompts only here
        fixed = fixed_text(workflow.workflow_id, agent_id)
        prompt = f"{fixed}Task {round_index}: go."
        return (
            workflow.completion(agent_id, prompt, fixed_prefix=FIXED_TEXT_LEN[fixed], **sampling)
            .choices[0]
            .text
        )
    messages = [
        {"role": "system", "content": f"You are the {agent_id} of {workflow.workflow_id}; be brief."},
        {"role": "user", "content": f"task {round_index}"},
    ]
    return workflow.chat(agent_id, messages, **sampling).choices[0].message.content


def fixed_text(workflow_id: str, agent_id: str) -> str:
    return f"You are the {agent_id} of {workflow_id}. " * 3


def measure_fixed_texts(server: ServerProcess) -> None:
    """Each fixed text's token count, measured on a server as the SDK does (the router has no /tokenize)."""
    for workflow_id in WORKFLOWS:
        for agent_id in AGENTS:
            text = fixed_text(workflow_id, agent_id)
            tokens = [
                requests.post(f"{server.url}/tokenize", json={"prompt": text + probe}, timeout=60).json()[
                    "tokens"
                ]
                for probe in ("0", "1")
            ]
            FIXED_TEXT_LEN[text] = common_prefix_len(*tokens)


def run_round(workflows: list[Workflow], round_index: int) -> None:
    for workflow in workflows:
        for agent_id in AGENTS:
            step(workflow, agent_id, round_index)


def workflow_stats(server: ServerProcess, workflow_id: str) -> dict | None:
    response = requests.get(f"{server.url}/kvflow/stats", params={"workflow_id": workflow_id}, timeout=60)
    response.raise_for_status()
    return response.json()["workflow"]


def misses(agents: dict) -> int:
    """Invocations whose fixed prompt was not wholly served from the cache."""
    return sum(a["invocations"] - a["fixed_hit_invocations"] for a in agents.values())


def test_workflows_stick_to_one_server_with_their_hints_and_survive_a_killed_server(cluster):
    servers, router = cluster
    oai = openai.OpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0, timeout=120)
    measure_fixed_texts(servers[0])
    workflows = [
        Workflow(router.url, graph(), workflow_id=w, router=True, openai_client=oai) for w in WORKFLOWS
    ]
    for round_index in range(2):
        run_round(workflows, round_index)

    holders: dict[str, list[int]] = {}
    before: dict[str, dict] = {}
    for workflow_id in WORKFLOWS:
        seen = {i: workflow_stats(server, workflow_id) for i, server in enumerate(servers)}
        holders[workflow_id] = [i for i, detail in seen.items() if detail is not None]
        assert len(holders[workflow_id]) == 1, f"{workflow_id} on servers {holders[workflow_id]}"
        holder = holders[workflow_id][0]
        agents = seen[holder]["agents"]
        before[workflow_id] = agents
        print(f"server {holder} {workflow_id}: {agents}")
        assert sorted(agents) == sorted(AGENTS) and all(a["invocations"] == 2 for a in agents.values())
        # The hints reached the cache: steps derived from the graph the request carried.
        assert all(a["steps_to_execution"] is not None for a in agents.values())
        if workflow_id.startswith("generate"):
            assert all(a["fixed_prefix_len"] == FIXED for a in agents.values())
        if not workflow_id.startswith("chat"):
            assert misses(agents) == len(AGENTS)  # round 0 cold, round 1 served from the cache
        # The server the router picked knows the graph; the other never saw the workflow.
        for i, server in enumerate(servers):
            known = requests.get(f"{server.url}/kvflow/workflows/{workflow_id}", timeout=30)
            assert known.status_code == (200 if i == holder else 404)
            if i == holder:
                assert known.json()["mode"] == "registered"
    # Where each workflow lands is the router's choice (min_group), not kvflow's: usually both servers
    # hold some, but a clean-clone CI run saw all six on one. The failover checks below cover a
    # workflow that stayed only when one did.
    print(f"placement: {dict((w, h[0]) for w, h in holders.items())}")

    # Greedy outputs through the router with hints equal the holder's own without them.
    holder = servers[holders["generate-0"][0]]
    unhinted = {
        "input_ids": PROMPTS["generate-0"]["planner"] + dynamic(9, "planner"),
        "sampling_params": {"max_new_tokens": OUTPUT, "temperature": 0, "ignore_eos": True},
    }
    direct = requests.post(f"{holder.url}/generate", json=unhinted, timeout=120).json()["output_ids"]
    assert step(workflows[0], "planner", 9) == str(direct)

    # A malformed hint or graph is a 400 through the router too, naming the field.
    bad_hint = {"session_params": {"kvflow": {"workflow_id": "generate-0", "agent_id": 5}}}
    bad_graph = {
        "session_params": {
            "kvflow": {"workflow_id": "generate-x", "agent_id": "planner"},
            "kvflow_graph": {"agents": [{"id": "planner"}], "edges": [["planner", "ghost"]]},
        }
    }
    chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    cases = [
        ("/generate", {"input_ids": [1, 2, 3], **bad_hint}, "session_params.kvflow.agent_id"),
        ("/v1/chat/completions", {**chat, **bad_hint}, "session_params.kvflow.agent_id"),
        (
            "/v1/completions",
            {"model": "default", "prompt": "hi", **bad_hint},
            "session_params.kvflow.agent_id",
        ),
        ("/generate", {"input_ids": [1, 2, 3], **bad_graph}, "session_params.kvflow_graph.edges[0]"),
    ]
    routed = {"X-SMG-Routing-Key": "generate-0"}
    for path, body, field in cases:
        response = requests.post(f"{router.url}{path}", json=body, headers=routed, timeout=60)
        assert response.status_code == 400, (path, response.text)
        assert field in response.text
        step(workflows[0], "planner", 10)  # the server keeps serving (and the breaker's count is reset)
    assert workflow_stats(servers[1 - holders["generate-0"][0]], "generate-0") is None  # still on one server

    # Kill the server holding generate-0; every further request is answered.
    dead = holders["generate-0"][0]
    survivor = servers[1 - dead]
    os.killpg(servers[dead].process.pid, signal.SIGKILL)
    servers[dead].process.wait()
    for round_index in (2, 3):
        run_round(workflows, round_index)

    for workflow_id in WORKFLOWS:
        agents = workflow_stats(survivor, workflow_id)["agents"]
        moved = holders[workflow_id][0] == dead
        new_misses = misses(agents) - (0 if moved else misses(before[workflow_id]))
        print(f"after the kill, server {1 - dead} {workflow_id} ({'moved' if moved else 'stayed'}): {agents}")
        print(f"  misses since the kill: {new_misses}")
        registered = requests.get(f"{survivor.url}/kvflow/workflows/{workflow_id}", timeout=30).json()
        assert registered["mode"] == "registered"  # a moved workflow's graph came with its requests
        assert all(a["steps_to_execution"] is not None for a in agents.values())
        if workflow_id.startswith("chat"):
            continue
        # Only the dead server's cache is lost: a moved workflow misses once per agent, then hits.
        assert new_misses == (len(AGENTS) if moved else 0)
