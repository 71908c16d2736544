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
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import Command  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402
from test_client import FakeServer  # noqa: E402

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
