"""End to end with data parallelism: one real CPU server with ``--dp-size 2`` (two schedulers, two caches).

Without hints SGLang's round robin sends an agent's calls to both ranks in turn, so each fixed
prompt is computed once per rank. With hints every request of a workflow goes to one rank
(patches/dp_routing.py), on /generate, /v1/completions and /v1/chat/completions and for a
registered workflow alike, so each fixed prompt is computed once; PATCH and DELETE reach the rank
that holds the workflow, and ``/kvflow/stats`` shows each rank's cache.
"""

from __future__ import annotations

import random

import pytest
import requests
from transformers import AutoTokenizer

from kvflow.harness.server_process import ServerProcess
from kvflow.hints import common_prefix_len
from kvflow.launch_server import CPU_THREADS_BIND_ENV
from kvflow.model import BYTE_TOKENS, EMBEDDED_MODEL_PATH

pytestmark = pytest.mark.e2e

DP, FIXED, CALLS, OUTPUT = 2, 64, 3, 2
TASKS = [f"Task {i}: {word}" for i, word in enumerate(("sort the list", "fix the bug", "plan the week"))]


@pytest.fixture(scope="module")
def server():
    # The pool holds every prompt of the module: no eviction, so every miss is a cold one.
    args = ["--dp-size", str(DP), "--max-total-tokens", "4096", "--random-seed", "0", "--enable-cache-report"]
    # Three processes import SGLang one after another (HTTP server, DP controller, schedulers).
    with ServerProcess(args, timeout=600) as process:
        print(f"dp={DP} server ready in {process.startup_seconds:.1f}s")
        yield process


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_PATH)


def post(url: str, body: dict) -> dict:
    response = requests.post(url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def rank_stats(server: ServerProcess, **params) -> list[dict]:
    response = requests.get(f"{server.url}/kvflow/stats", params=params, timeout=60)
    response.raise_for_status()
    ranks = response.json()["ranks"]
    assert [rank["dp_rank"] for rank in ranks] == list(range(DP))
    return ranks


def holders(server: ServerProcess, workflow_id: str) -> dict[int, dict]:
    """Per rank, the agents of ``workflow_id`` its cache tracks (ranks that do not track it left out)."""
    return {
        rank["dp_rank"]: rank["workflow"]["agents"]
        for rank in rank_stats(server, workflow_id=workflow_id)
        if rank["workflow"] is not None
    }


def token_prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(BYTE_TOKENS) for _ in range(FIXED)]


class Agent:
    """One agent: a fixed prompt and the variants it is called with, on one or two endpoints."""

    def __init__(self, url: str, name: str, variants: list[list[int]], chat: list[list[dict]] | None = None):
        self.url, self.name, self.variants, self.chat = url, name, variants, chat
        self.fixed_len = min(common_prefix_len(variants[0], v) for v in variants[1:])
        self.calls = 0

    def call(self, hint: dict | None, **extra) -> int:
        """Call the agent once (its next variant); return the prompt tokens served from the cache."""
        i = self.calls % CALLS
        self.calls += 1
        body = {**extra, **({} if hint is None else {"kvflow": {**hint, "fixed_prefix_len": self.fixed_len}})}
        if self.chat is not None:
            out = post(
                f"{self.url}/v1/chat/completions",
                {"messages": self.chat[i], "max_tokens": OUTPUT, "temperature": 0, **body},
            )
            return out["usage"]["prompt_tokens_details"]["cached_tokens"]
        ids = self.variants[i]
        if i % 2:
            out = post(
                f"{self.url}/v1/completions", {"prompt": ids, "max_tokens": OUTPUT, "temperature": 0, **body}
            )
            return out["usage"]["prompt_tokens_details"]["cached_tokens"]
        sampling = {"max_new_tokens": OUTPUT, "temperature": 0}
        return post(f"{self.url}/generate", {"input_ids": ids, "sampling_params": sampling, **body})[
            "meta_info"
        ]["cached_tokens"]


def token_agent(server: ServerProcess, name: str, seed: int) -> Agent:
    """An agent called with token ids, alternately on /generate and /v1/completions."""
    fixed = token_prompt(seed)
    variants = [fixed + [10 + i, 20 + i, 30 + i] for i in range(CALLS)]
    return Agent(server.url, name, variants)


def chat_agent(server: ServerProcess, tokenizer, name: str, system: str) -> Agent:
    """An agent called on /v1/chat/completions; its fixed prompt is the system message."""
    chats = [
        [{"role": "system", "content": system}, {"role": "user", "content": task}] for task in TASKS[:CALLS]
    ]
    variants = [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        for chat in chats
    ]
    return Agent(server.url, name, variants, chat=chats)


def test_the_launcher_split_the_cores_between_the_ranks(server):
    assert f"kvflow: {CPU_THREADS_BIND_ENV}=" in server.log_path.read_text(errors="replace")


REGISTERED = "wf-registered"
GRAPH = {
    "agents": [{"id": "writer"}, {"id": "critic"}],
    "edges": [["writer", "critic"], ["critic", "writer"]],
}


def workload(server: ServerProcess, tokenizer, seed: int) -> dict[str, list[Agent]]:
    """Four workflows (the last one registered), each with a writer (/generate and /v1/completions)
    and a critic (/v1/chat/completions); ``seed`` makes every fixed prompt distinct."""
    return {
        workflow_id: [
            token_agent(server, "writer", seed=seed + w),
            chat_agent(
                server, tokenizer, "critic", f"You are critic {seed + w}. Review the answer carefully. " * 2
            ),
        ]
        for w, workflow_id in enumerate(["wf0", "wf1", "wf2", REGISTERED])
    }


def cold_misses(workflows: dict[str, list[Agent]], hinted: bool) -> int:
    """Call every agent CALLS times in a row (as a workflow retrying one step would); count the calls
    whose fixed prompt was not cached. Round robin sends such calls to every rank in turn."""
    misses = 0
    for workflow_id, agents in workflows.items():
        for agent in agents:
            hint = {"workflow_id": workflow_id, "agent_id": agent.name} if hinted else None
            if hinted and workflow_id != REGISTERED:  # a registered workflow's steps come from the registry
                hint["steps_to_execution"] = {agent.name: 0}
            for _ in range(CALLS):
                misses += agent.call(hint) < agent.fixed_len
    return misses


def test_without_hints_round_robin_computes_each_fixed_prompt_on_every_rank(server, tokenizer):
    # First in the module, on prompts no other test uses: stock SGLang's dispatch.
    workflows = workload(server, tokenizer, seed=100)
    misses = cold_misses(workflows, hinted=False)
    prompts = sum(len(agents) for agents in workflows.values())
    print(f"without hints: {misses} cold misses for {prompts} fixed prompts on {DP} ranks")
    assert misses == DP * prompts
    assert all(rank["totals"]["hinted_requests"] == 0 for rank in rank_stats(server))


def test_a_workflow_stays_on_one_rank_on_every_endpoint(server, tokenizer):
    response = requests.post(
        f"{server.url}/kvflow/workflows", json={"workflow_id": REGISTERED, "graph": GRAPH}, timeout=60
    )
    assert response.status_code == 201, response.text
    workflows = workload(server, tokenizer, seed=0)
    before = [rank["totals"] for rank in rank_stats(server)]
    misses = cold_misses(workflows, hinted=True)

    prompts = sum(len(agents) for agents in workflows.values())
    after = [rank["totals"] for rank in rank_stats(server)]
    per_rank = [
        a["invocations"] - a["fixed_hit_invocations"] - (b["invocations"] - b["fixed_hit_invocations"])
        for a, b in zip(after, before, strict=True)
    ]
    print(f"with hints: {misses} cold misses for {prompts} fixed prompts; per rank {per_rank}")
    assert misses == prompts and sum(per_rank) == prompts
    placed = {}
    for workflow_id, agents in workflows.items():
        held = holders(server, workflow_id)
        assert len(held) == 1, (workflow_id, sorted(held))
        rank, tracked = held.popitem()
        placed[workflow_id] = rank
        for agent in agents:
            counters = tracked[agent.name]
            assert counters["invocations"] == CALLS
            assert counters["invocations"] - counters["fixed_hit_invocations"] == 1
    # Least loaded at first sight: four workflows started one after another use both ranks.
    assert set(placed.values()) == set(range(DP)), placed


def test_a_routed_dp_rank_the_client_gives_wins(server):
    agent = token_agent(server, "pinned", seed=20)
    for rank in range(DP):
        agent.call({"workflow_id": "wf-user-routed", "agent_id": "pinned"}, routed_dp_rank=rank)
    held = holders(server, "wf-user-routed")
    assert sorted(held) == list(range(DP))
    assert all(agents["pinned"]["invocations"] == 1 for agents in held.values())


def test_patch_and_delete_reach_the_rank_that_holds_the_workflow(server):
    [(rank, agents)] = holders(server, REGISTERED).items()
    waiting = next(name for name, agent in agents.items() if agent["steps_to_execution"] != 0)
    response = requests.patch(
        f"{server.url}/kvflow/workflows/wf-registered", json={"running": [waiting]}, timeout=60
    )
    assert response.status_code == 200 and response.json()["cache_updated"] is True, response.text
    steps = response.json()["steps_to_execution"]
    assert steps[waiting] == 0
    [(patched_rank, patched)] = holders(server, REGISTERED).items()
    assert patched_rank == rank
    assert {name: agent["steps_to_execution"] for name, agent in patched.items()} == steps

    for workflow_id, registered in ((REGISTERED, True), ("wf0", False)):
        [held_rank] = holders(server, workflow_id)
        response = requests.delete(f"{server.url}/kvflow/workflows/{workflow_id}", timeout=60)
        assert response.status_code == 200, response.text
        assert response.json() == {"workflow_id": workflow_id, "registry": registered, "cache": True}
        assert holders(server, workflow_id) == {}, held_rank
