"""Multi-turn, tool-calling chat on one real CPU server (embedded model): the round trip and the SDK.

What SGLang inserts when a chat turn finishes is its prompt + output token ids; the next turn
hits them only if the chat template renders the conversation back to the same ids. These tests
read both from the server (``return_token_ids``) and ``usage.prompt_tokens_details.cached_tokens``
(``--enable-cache-report``) and assert, per turn:

- the whole previous prompt, assistant ``tool_calls`` and ``tool`` results included, re-renders
  to the same ids (what lets kvflow see the agent resume);
- the reply follows as the template inserts its text: the reply's ids up to the first one that
  does not survive decode -> encode (a special token dropped from the text, a byte of invalid
  UTF-8); with ``tools`` in the request SGLang keeps special tokens, and the greedy replies here
  are valid UTF-8, so the whole reply matches and the server serves it from the cache.
"""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from transformers import AutoTokenizer

from kvflow.client import Workflow
from kvflow.conversation import reply_message
from kvflow.harness.server_process import ServerProcess
from kvflow.hints import common_prefix_len
from kvflow.model import EMBEDDED_MODEL_PATH

pytestmark = pytest.mark.e2e

SYSTEM = "You are a careful research agent. Call the search tool, then answer in one line. "
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }
]
TURNS = 5


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--random-seed", "0", "--enable-cache-report"]) as process:
        yield process.url


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_PATH)


def tool_turn(reply: dict, k: int) -> list[dict]:
    """The reply as an agent that called the search tool keeps it, and the tool's result."""
    call = {
        "id": f"call_{k}",
        "type": "function",
        "function": {"name": "search", "arguments": json.dumps({"q": f"q{k}"})},
    }
    return [
        {**reply, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": f"result {k}"},
    ]


def run_conversation(workflow: Workflow, agent: str, **options) -> list[dict]:
    """``TURNS`` turns alternating tool calls and user messages; per turn the ids and the cache hit."""
    messages = [
        {"role": "system", "content": SYSTEM + agent},
        {"role": "user", "content": "Boiling point at 2 km?"},
    ]
    turns = []
    for k in range(TURNS):
        response = workflow.chat(
            agent, messages, max_tokens=8, extra_body={"return_token_ids": True}, **options
        )
        choice = response.choices[0]
        details = response.usage.prompt_tokens_details
        turns.append(
            {
                "prompt": choice.prompt_token_ids,
                "output": choice.response_token_ids,
                "content": choice.message.content,
                "cached": details.cached_tokens if details else 0,
            }
        )
        reply = reply_message(choice.message)
        messages += (
            tool_turn(reply, k) if k % 2 == 0 else [reply, {"role": "user", "content": f"Go on ({k})."}]
        )
    return turns


def check_round_trip(turns: list[dict], tokenizer) -> list[tuple[int, int, int]]:
    """Assert the module's per-turn properties; per turn: history tokens, matched, cached."""
    figures = []
    for previous, turn in pairwise(turns):
        prompt, output, prompt_next = previous["prompt"], previous["output"], turn["prompt"]
        assert prompt_next[: len(prompt)] == prompt  # the history re-renders, tool calls included
        reencoded = tokenizer.encode(previous["content"], add_special_tokens=False)
        assert prompt_next[len(prompt) :][: len(reencoded)] == reencoded  # the reply's text, verbatim
        matched = common_prefix_len(prompt_next, prompt + output)
        assert matched == len(prompt) + common_prefix_len(output, reencoded)
        # SGLang inserted prompt + output but the last output token (it has no KV yet).
        assert turn["cached"] == min(matched, len(prompt) + len(output) - 1)
        figures.append((len(prompt) + len(output), matched, turn["cached"]))
    return figures


def test_tool_calling_chat_resumes_its_whole_history(server, tokenizer):
    with Workflow(server, workflow_type="chat") as workflow:
        greedy = run_conversation(workflow, "greedy", tools=TOOLS, temperature=0)
        sampled = run_conversation(workflow, "sampled", temperature=1.0, seed=7)
    greedy_figures = check_round_trip(greedy, tokenizer)
    sampled_figures = check_round_trip(sampled, tokenizer)
    print(f"\nper turn (history tokens, matched by the next prompt, cached): greedy+tools {greedy_figures}")
    print(f"sampled, specials skipped {sampled_figures}")
    for turn in greedy[:-1]:
        assert tokenizer.decode(turn["output"], skip_special_tokens=False) == turn["content"]
    assert all(matched == history for history, matched, _ in greedy_figures)


def test_a_conversation_hits_its_history_every_turn(server):
    with Workflow(server, workflow_type="agent") as workflow:
        conversation = workflow.conversation(
            "researcher", system=SYSTEM, tools=TOOLS, max_tokens=8, temperature=0
        )
        usages = [conversation.send("Boiling point at 2 km?").usage]
        usages.append(conversation.send("Go on.").usage)
        usages.append(conversation.send("Thanks.", last_turn=True).usage)
    assert [m["role"] for m in conversation.messages] == ["system", *["user", "assistant"] * 3]
    for previous, usage in pairwise(usages):
        history = previous.prompt_tokens + previous.completion_tokens
        assert usage.prompt_tokens_details.cached_tokens == history - 1
