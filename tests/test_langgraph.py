"""LangGraph integration: StateGraph -> AgentStepGraph, and the chat model's routing (no server).

The example itself runs end to end against a real server in test_workflow_endpoints.py.
"""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Literal, TypedDict

import httpx
import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import HumanMessage, SystemMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langgraph.graph import END, START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode  # noqa: E402
from langgraph.types import Command  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402
from test_client import SEARCH, FakeServer, ToolCallingOpenAI  # noqa: E402

from kvflow.client import AsyncWorkflow, Workflow  # noqa: E402
from kvflow.integrations.langgraph import KVFlowChatModel, agent_step_graph  # noqa: E402


class State(TypedDict):
    n: int
    log: Annotated[list[str], operator.add]


def node(state: State) -> dict:
    return {"n": state["n"] + 1}


def graph_of(builder: StateGraph) -> tuple[dict, list]:
    doc = agent_step_graph(builder).to_json()
    return {a["id"]: a.get("join") for a in doc["agents"]}, sorted(map(tuple, doc["edges"]))


def test_plain_and_conditional_edges_with_a_path_map_make_a_loop():
    builder = StateGraph(State)
    for name in ("planner", "executor", "reviewer"):
        builder.add_node(name, node)
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "executor")
    builder.add_edge("executor", "reviewer")
    builder.add_conditional_edges("reviewer", lambda s: "again", {"again": "planner", "done": END})
    joins, edges = graph_of(builder)
    assert joins == {"planner": None, "executor": None, "reviewer": None}
    assert edges == [("executor", "reviewer"), ("planner", "executor"), ("reviewer", "planner")]
    assert graph_of(builder.compile()) == (joins, edges)  # compiled graphs map the same


def test_conditional_destinations_from_the_literal_annotation_or_every_node_and_or_joins():
    def route(state: State) -> Literal["a", "b"]:
        return "a"

    builder = StateGraph(State)
    for name in ("start", "a", "b", "c"):
        builder.add_node(name, node)
    builder.add_edge(START, "start")
    builder.add_conditional_edges("start", route)
    builder.add_conditional_edges("a", lambda s: "c")  # unannotated: any node
    builder.add_edge("b", "c")
    joins, edges = graph_of(builder)
    assert ("start", "a") in edges and ("start", "b") in edges and ("start", "c") not in edges
    assert {("a", "start"), ("a", "b"), ("a", "c")} <= set(edges) and ("a", "a") not in edges
    assert joins["c"] == "or" and joins["b"] == "or"  # any incoming edge triggers a LangGraph node


def test_waiting_edges_are_and_joins_and_command_destinations_are_edges():
    def fan_out(state: State) -> Command[Literal["left", "right"]]:
        return Command(goto=["left", "right"])

    builder = StateGraph(State)
    builder.add_node("lead", fan_out, destinations=("left", "right"))
    builder.add_node("left", node)
    builder.add_node("right", node)
    builder.add_node("merge", node)
    builder.add_edge(START, "lead")
    builder.add_edge(["left", "right"], "merge")
    builder.add_edge("merge", END)
    joins, edges = graph_of(builder)
    assert edges == [("lead", "left"), ("lead", "right"), ("left", "merge"), ("right", "merge")]
    assert joins["merge"] == "and"
    steps = agent_step_graph(builder).steps_to_execution(running=["left"], finished=["right"])
    assert steps["merge"] == 1


def chat_completion(text: str) -> ChatCompletion:
    return ChatCompletion.model_validate(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "default",
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )


class FakeChat:
    """``openai.OpenAI`` / ``AsyncOpenAI`` stand-in answering every chat call with the agent's name."""

    def __init__(self, is_async: bool = False) -> None:
        self.calls: list[dict] = []

        def create(**kwargs):
            self.calls.append(kwargs)
            return chat_completion(kwargs["extra_body"]["session_params"]["kvflow"]["agent_id"])

        async def acreate(**kwargs):
            return create(**kwargs)

        completions = type("Completions", (), {"create": staticmethod(acreate if is_async else create)})
        self.chat = type("Chat", (), {"completions": completions})


def ask(state: State, config) -> dict:
    reply = config["configurable"]["llm"].invoke([SystemMessage("You are an agent."), HumanMessage("go")])
    return {"log": [reply.content]}


async def aask(state: State, config) -> dict:
    reply = await config["configurable"]["llm"].ainvoke(
        [SystemMessage("You are an agent."), HumanMessage("go")]
    )
    return {"log": [reply.content]}


def two_step(step, with_subgraph: bool = False) -> StateGraph:
    builder = StateGraph(State)
    builder.add_node("first", step)
    if with_subgraph:
        inner = StateGraph(State)
        inner.add_node("inner_node", step)
        inner.add_edge(START, "inner_node")
        builder.add_node("second", inner.compile())
    else:
        builder.add_node("second", step)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    return builder


def test_chat_model_sends_each_call_as_its_node_and_a_subgraph_as_the_outer_node():
    server = FakeServer()
    builder = two_step(ask, with_subgraph=True)
    workflow = Workflow("http://kvflow.test", agent_step_graph(builder), openai_client=FakeChat())
    workflow._http = httpx.Client(base_url=workflow.url, transport=httpx.MockTransport(server))
    llm = KVFlowChatModel(workflow=workflow, max_tokens=4, temperature=0)
    builder.compile().invoke({"n": 0, "log": []}, {"configurable": {"llm": llm}})
    hints = [c["extra_body"]["session_params"]["kvflow"] for c in workflow.openai.calls]
    assert [hint["agent_id"] for hint in hints] == ["first", "second"]
    call = workflow.openai.calls[0]
    assert call["messages"][0] == {"role": "system", "content": "You are an agent."}
    assert call["max_tokens"] == 4 and call["temperature"] == 0 and call["model"] == "default"
    assert hints[0]["fixed_prefix_len"] > 0  # the system message, measured by /tokenize

    with pytest.raises(ValueError, match="inside a LangGraph node"):
        llm.invoke("outside any graph")
    assert KVFlowChatModel(workflow=workflow, agent_id="first").invoke("hi").content == "first"


def test_chat_model_async_path_uses_the_async_workflow():
    server = FakeServer()
    builder = two_step(aask)

    async def scenario() -> dict:
        workflow = AsyncWorkflow(
            "http://kvflow.test", agent_step_graph(builder), openai_client=FakeChat(True)
        )
        workflow._http = httpx.AsyncClient(base_url=workflow.url, transport=httpx.MockTransport(server))
        llm = KVFlowChatModel(workflow=workflow)
        return await builder.compile().ainvoke({"n": 0, "log": []}, {"configurable": {"llm": llm}})

    assert asyncio.run(scenario())["log"] == ["first", "second"]
    assert server.paths("POST").count("/kvflow/workflows") == 1


@tool
def search(q: str) -> str:
    """Search the web."""
    return f"found {q}"


def researcher(state: MessagesState, config) -> dict:
    llm = config["configurable"]["llm"].bind_tools([search], tool_choice="auto")
    return {"messages": [llm.invoke([SystemMessage("You research."), *state["messages"]])]}


def route(state: MessagesState) -> Literal["tools", "writer"]:
    return "tools" if state["messages"][-1].tool_calls else "writer"


def writer(state: MessagesState, config) -> dict:
    reply = config["configurable"]["llm"].invoke([SystemMessage("You write."), state["messages"][-1]])
    return {"messages": [reply]}


def react_team() -> StateGraph:
    """researcher -> (tools -> researcher | writer), the tools a ``ToolNode``."""
    builder = StateGraph(MessagesState)
    builder.add_node("researcher", researcher)
    builder.add_node("tools", ToolNode([search]))
    builder.add_node("writer", writer)
    builder.add_edge(START, "researcher")
    builder.add_conditional_edges("researcher", route)
    builder.add_edge("tools", "researcher")
    builder.add_edge("writer", END)
    return builder


def test_a_tool_node_is_a_pause_of_the_agent_that_called_it():
    builder = react_team()
    assert graph_of(builder) == (
        {"researcher": None, "writer": None},
        [("researcher", "researcher"), ("researcher", "writer")],
    )
    server = FakeServer()
    workflow = Workflow("http://kvflow.test", agent_step_graph(builder), openai_client=ToolCallingOpenAI())
    workflow._http = httpx.Client(base_url=workflow.url, transport=httpx.MockTransport(server))
    llm = KVFlowChatModel(workflow=workflow, max_tokens=4)
    final = builder.compile().invoke({"messages": [HumanMessage("Find it.")]}, {"configurable": {"llm": llm}})

    calls = workflow.openai.created
    hints = [call["extra_body"]["session_params"]["kvflow"] for call in calls]
    assert [hint["agent_id"] for hint in hints] == ["researcher", "researcher", "writer"]
    first, resumed = calls[0]["messages"], calls[1]["messages"]
    assert resumed[: len(first)] == first  # the researcher resumes its own growing context
    assert resumed[len(first)]["tool_calls"][0]["id"] == SEARCH["id"]
    tool_message = {"role": "tool", "tool_call_id": "call_1", "content": "found x", "name": "search"}
    assert resumed[len(first) + 1] == tool_message
    assert calls[0]["tools"][0]["function"]["name"] == "search" and calls[0]["tool_choice"] == "auto"
    assert final["messages"][1].tool_calls[0]["args"] == {"q": "x"}
    assert final["messages"][-1].content == "answer 3"


def test_nodes_named_as_tool_nodes_are_pauses_too():
    builder = StateGraph(MessagesState)
    for name in ("planner", "lookup", "coder"):
        builder.add_node(name, lambda state: {})
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "lookup")
    builder.add_edge("lookup", "coder")
    builder.add_edge("coder", "planner")
    assert graph_of(builder)[1] == [("coder", "planner"), ("lookup", "coder"), ("planner", "lookup")]
    doc = agent_step_graph(builder, tool_nodes=["lookup"]).to_json()
    assert sorted(map(tuple, doc["edges"])) == [("coder", "planner"), ("planner", "coder")]
    with pytest.raises(ValueError, match="tool_nodes"):
        agent_step_graph(builder, tool_nodes=["missing"])
