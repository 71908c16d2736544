"""The client SDK against a fake server (httpx mock transport) and a fake OpenAI client."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from openai.types.chat import ChatCompletion

from kvflow.client import ROUTING_HEADER, AsyncWorkflow, KVFlowError, Workflow
from kvflow.graph import AgentStepGraph
from kvflow.hints import parse_hint

GRAPH = AgentStepGraph(["planner", "coder"])
GRAPH.add_edge("planner", "coder")
SYSTEM = "You are the planner."


class FakeServer:
    """Records requests; ``/tokenize`` is byte-level like the embedded model."""

    def __init__(self, tokenize_status: int = 200, registry_status: int = 201) -> None:
        self.calls: list[tuple[str, str, object]] = []
        self.routing_keys: list[str | None] = []
        self.tokenize_status = tokenize_status
        self.registry_status = registry_status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.raw_path.decode(), body))
        self.routing_keys.append(request.headers.get(ROUTING_HEADER))
        if request.url.path == "/kvflow/workflows" and self.registry_status != 201:
            return httpx.Response(self.registry_status, json={"message": "Not Found"})
        if request.url.path == "/tokenize":
            if self.tokenize_status != 200:
                return httpx.Response(self.tokenize_status, json={"message": "no tokenizer"})
            text = body.get("prompt") or "".join(f"<{m['role']}>{m['content']}" for m in body["messages"])
            return httpx.Response(200, json={"tokens": list(text.encode()), "count": len(text)})
        if request.method == "DELETE":
            return httpx.Response(404, json={"message": "not known"})
        if request.url.path == "/generate" and hint_of(body)["agent_id"] == "intruder":
            return httpx.Response(400, json={"message": "kvflow.agent_id: not an agent"})
        return httpx.Response(200, json={"ok": True})

    def paths(self, method: str | None = None) -> list[str]:
        return [path for m, path, _ in self.calls if method in (None, m)]


class FakeOpenAI:
    """Stands in for ``openai.OpenAI``: records the keyword arguments of each create call."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))
        self.completions = SimpleNamespace(create=self._create)

    def _create(self, **kwargs):
        self.created.append(kwargs)
        return kwargs


def hint_of(body: dict) -> dict:
    """The hint a request body carries (the SDK sends it in ``session_params``)."""
    return body["session_params"]["kvflow"]


def workflow_with(server: FakeServer, graph: AgentStepGraph | None = GRAPH, **options) -> Workflow:
    workflow = Workflow("http://kvflow.test/", graph, openai_client=FakeOpenAI(), **options)
    workflow._http = httpx.Client(base_url=workflow.url, transport=httpx.MockTransport(server))
    return workflow


def test_registers_once_before_the_first_call_and_ends_on_close():
    server = FakeServer()
    with workflow_with(server, workflow_id="team/7") as workflow:
        workflow.generate("planner", input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1})
        workflow.generate("coder", text="hello")
    assert server.paths() == ["/kvflow/workflows", "/generate", "/generate", "/kvflow/workflows/team%2F7"]
    registration = server.calls[0][2]
    assert registration == {"workflow_id": "team/7", "graph": GRAPH.to_json()}
    body = server.calls[1][2]
    assert body["session_params"] == {"kvflow": {"workflow_id": "team/7", "agent_id": "planner"}}
    assert body["input_ids"] == [1, 2, 3] and body["sampling_params"] == {"max_new_tokens": 1}
    assert server.routing_keys == ["team/7"] * 4  # every request of the workflow, registration included


def test_without_a_graph_nothing_is_registered_and_ids_carry_the_type():
    server = FakeServer()
    workflow = workflow_with(server, None, workflow_type="review")
    workflow.generate("a", text="x")
    assert workflow.workflow_id.startswith("review:") and server.paths("POST") == ["/generate"]
    workflow.close()  # the server did not know it: 404 is fine


def test_text_fixed_prefix_is_measured_once_with_tokenize():
    server = FakeServer()
    workflow = workflow_with(server)
    for task in ("one", "two"):
        workflow.generate("planner", text=SYSTEM + task, fixed_prefix=SYSTEM)
    assert server.paths().count("/tokenize") == 2  # two probes, once
    assert [c[2]["prompt"] for c in server.calls if c[1] == "/tokenize"] == [SYSTEM + "0", SYSTEM + "1"]
    assert hint_of(server.calls[-1][2])["fixed_prefix_len"] == len(SYSTEM)
    with pytest.raises(ValueError, match="must start the text prompt"):
        workflow.generate("planner", text="other", fixed_prefix=SYSTEM)
    with pytest.raises(ValueError, match="exactly one of text and input_ids"):
        workflow.generate("planner")


def test_without_tokenize_the_boundary_is_left_to_the_server():
    server = FakeServer(tokenize_status=404)
    workflow = workflow_with(server)
    workflow.completion("planner", SYSTEM + "go", fixed_prefix=SYSTEM)
    assert "fixed_prefix_len" not in hint_of(workflow.openai.created[0]["extra_body"])


def test_chat_marks_the_system_messages_and_rides_extra_body():
    server = FakeServer()
    workflow = workflow_with(server)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Plan."},
    ]
    workflow.chat("planner", messages, max_tokens=3, extra_body={"top_k": 1})
    kwargs = workflow.openai.created[0]
    assert kwargs["model"] == "default" and kwargs["max_tokens"] == 3 and kwargs["messages"] == messages
    fixed = len(f"<system>{SYSTEM}<developer>Be brief.<user>")
    hint = {"workflow_id": workflow.workflow_id, "agent_id": "planner", "fixed_prefix_len": fixed}
    assert kwargs["extra_body"] == {"top_k": 1, "session_params": {"kvflow": hint}}
    assert kwargs["extra_headers"] == {ROUTING_HEADER: workflow.workflow_id}
    probe = next(c[2] for c in server.calls if c[1] == "/tokenize")
    assert probe["messages"][-1] == {"role": "user", "content": "0"}

    workflow.chat("planner", [{"role": "user", "content": "hi"}])  # no system prompt: nothing to mark
    workflow.chat("planner", messages, fixed_prefix=None)
    workflow.chat("planner", messages, fixed_prefix=5)
    hints = [hint_of(created["extra_body"]) for created in workflow.openai.created[1:]]
    assert [h.get("fixed_prefix_len") for h in hints] == [None, None, 5]
    with pytest.raises(ValueError, match="fixed_prefix"):
        workflow.chat("planner", messages, fixed_prefix="user")


def test_server_errors_raise_with_their_status_and_message():
    workflow = workflow_with(FakeServer())
    with pytest.raises(KVFlowError, match="kvflow.agent_id") as error:
        workflow.generate("intruder", text="x")
    assert error.value.status == 400


def test_frontier_and_info_use_the_quoted_item_path():
    server = FakeServer()
    workflow = workflow_with(server, workflow_id="a b")
    workflow.set_frontier(running=["coder"])
    workflow.info()
    assert server.calls[1] == ("PATCH", "/kvflow/workflows/a%20b", {"running": ["coder"]})
    assert server.calls[2][:2] == ("GET", "/kvflow/workflows/a%20b")


def test_async_workflow_registers_once_under_concurrency():
    server = FakeServer()

    async def scenario() -> None:
        workflow = AsyncWorkflow("http://kvflow.test", GRAPH)
        workflow._http = httpx.AsyncClient(base_url=workflow.url, transport=httpx.MockTransport(server))
        async with workflow:
            await asyncio.gather(
                workflow.generate("planner", text=SYSTEM + "a", fixed_prefix=SYSTEM),
                workflow.generate("coder", input_ids=[1, 2], fixed_prefix=1),
            )

    asyncio.run(scenario())
    assert server.paths("POST").count("/kvflow/workflows") == 1
    hints = {hint_of(c[2])["agent_id"]: hint_of(c[2]) for c in server.calls if c[1] == "/generate"}
    assert hints["planner"]["fixed_prefix_len"] == len(SYSTEM) and hints["coder"]["fixed_prefix_len"] == 1
    assert server.calls[-1][0] == "DELETE"


def test_behind_a_router_the_graph_rides_in_every_request_beside_the_callers_session_params():
    server = FakeServer()
    with workflow_with(server, workflow_id="caf\u00e9:1", router=True) as workflow:
        workflow.generate("planner", text=SYSTEM + "go", fixed_prefix=SYSTEM, session_params={"id": "s"})
        workflow.completion("coder", "x", extra_body={"session_params": {"rid": "r"}})
    # No registration, no /tokenize probe, no DELETE: the router forwards none of them.
    assert server.paths() == ["/generate"]
    session = server.calls[0][2]["session_params"]
    assert session == {
        "id": "s",
        "kvflow": {"workflow_id": "caf\u00e9:1", "agent_id": "planner"},
        **graph_doc(),
    }
    assert server.routing_keys == ["caf%C3%A9%3A1"]  # a header value is ASCII; still one key per workflow
    created = workflow.openai.created[0]
    assert created["extra_body"]["session_params"] == {
        "rid": "r",
        "kvflow": hint_of(created["extra_body"]),
        **graph_doc(),
    }
    assert created["extra_headers"] == {ROUTING_HEADER: "caf%C3%A9%3A1"}


def graph_doc() -> dict:
    return {"kvflow_graph": GRAPH.to_json()}


def test_registering_through_a_router_says_to_pass_router_true():
    workflow = workflow_with(FakeServer(registry_status=404))
    with pytest.raises(KVFlowError, match="router=True") as error:
        workflow.generate("planner", text="x")
    assert error.value.status == 404


def test_last_turn_sends_keep_context_false_on_every_call_style():
    server = FakeServer()
    workflow = workflow_with(server)
    workflow.generate("planner", text="x", last_turn=True)
    workflow.chat("planner", [{"role": "user", "content": "x"}], last_turn=True)
    workflow.completion("coder", "x", last_turn=True)
    workflow.completion("coder", "x")
    hints = [hint_of(server.calls[-1][2])] + [hint_of(c["extra_body"]) for c in workflow.openai.created]
    assert [hint.get("keep_context") for hint in hints] == [False, False, False, None]


def test_expected_pause_s_is_sent_on_every_call_style_and_a_conversation_turn():
    server = FakeServer()
    workflow = workflow_with(server)
    workflow.generate("planner", text="x", expected_pause_s=2.5)
    workflow.chat("planner", [{"role": "user", "content": "x"}], expected_pause_s=30)
    workflow.completion("coder", "x", last_turn=True, expected_pause_s=0.5)
    workflow.completion("coder", "x")
    hints = [hint_of(server.calls[-1][2])] + [hint_of(c["extra_body"]) for c in workflow.openai.created]
    workflow._openai = ToolCallingOpenAI()
    workflow.conversation("planner").send("x", expected_pause_s=4.0)  # passed through to chat
    hints.append(hint_of(workflow.openai.created[0]["extra_body"]))
    assert [hint.get("expected_pause_s") for hint in hints] == [2.5, 30, 0.5, None, 4.0]
    assert [parse_hint(hint).expected_pause_s for hint in hints] == [2.5, 30.0, 0.5, None, 4.0]
    assert hints[2]["keep_context"] is False


SEARCH = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}


class ToolCallingOpenAI:
    """``openai`` stand-in: the first chat reply calls a tool, later ones answer; ``fail`` raises."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.fail = False
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs):
        if self.fail:
            raise RuntimeError("server down")
        self.created.append(kwargs)
        message = {"role": "assistant", "content": None, "tool_calls": [SEARCH]}
        if len(self.created) > 1:
            message = {"role": "assistant", "content": f"answer {len(self.created)}"}
        return ChatCompletion.model_validate(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "default",
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            }
        )


def test_a_conversation_keeps_replies_as_returned_and_answers_tool_calls():
    server = FakeServer()
    workflow = workflow_with(server)
    workflow._openai = ToolCallingOpenAI()
    conversation = workflow.conversation("planner", system=SYSTEM, max_tokens=4)
    conversation.send("Find it.")
    assert conversation.messages[-1] == {"role": "assistant", "tool_calls": [SEARCH]}
    assert conversation.pending_tool_calls == [SEARCH]
    conversation.tool_result("call_1", "found")
    assert conversation.pending_tool_calls == []
    workflow.openai.fail = True
    with pytest.raises(RuntimeError):
        conversation.send("lost")
    workflow.openai.fail = False
    conversation.send(temperature=0, last_turn=True)  # resumes after the tool's result

    first, last = workflow.openai.created
    assert first["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Find it."},
    ]
    assert last["messages"] == [
        *first["messages"],
        {"role": "assistant", "tool_calls": [SEARCH]},
        {"role": "tool", "tool_call_id": "call_1", "content": "found"},
    ]
    assert first["max_tokens"] == last["max_tokens"] == 4 and last["temperature"] == 0
    assert hint_of(first["extra_body"])["fixed_prefix_len"] > 0  # the system message
    assert "keep_context" not in hint_of(first["extra_body"])
    assert hint_of(last["extra_body"])["keep_context"] is False
    assert conversation.messages[-1] == {"role": "assistant", "content": "answer 2"}


def test_an_async_conversation_sends_through_the_async_workflow():
    server = FakeServer()

    async def scenario() -> list[dict]:
        workflow = AsyncWorkflow("http://kvflow.test", None, openai_client=SimpleNamespace())
        workflow._http = httpx.AsyncClient(base_url=workflow.url, transport=httpx.MockTransport(server))
        fake = ToolCallingOpenAI()

        async def create(**kwargs):
            return fake._create(**kwargs)

        workflow._openai.chat = SimpleNamespace(completions=SimpleNamespace(create=create))
        conversation = workflow.conversation("solo", messages=[{"role": "user", "content": "hi"}])
        await conversation.send()
        conversation.tool_result("call_1", "done")
        await conversation.send("and?")
        return conversation.messages

    roles = [message["role"] for message in asyncio.run(scenario())]
    assert roles == ["user", "assistant", "tool", "user", "assistant"]
