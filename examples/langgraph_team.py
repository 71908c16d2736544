"""A LangGraph planner -> executor -> reviewer loop served by kvflow.

The LangGraph ``StateGraph`` is turned into an Agent Step Graph and registered
as one kvflow workflow; every node's LLM call goes through the kvflow SDK as
that node's agent, with its system prompt marked as the fixed prompt. The
reviewer sends the team back to the planner until the last round.

    python examples/langgraph_team.py                      # starts a CPU kvflow server (embedded model)
    python examples/langgraph_team.py --url http://127.0.0.1:30000 [--api-key KEY]

Needs ``pip install -e '.[langgraph]'``. On the embedded model (dummy weights)
the replies are noise; what the example shows is the plumbing and, per agent,
how often its system prompt was served from the cache.
"""

from __future__ import annotations

import argparse
import operator
from typing import Annotated, Any, Literal, TypedDict

import httpx
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from kvflow.client import Workflow
from kvflow.integrations.langgraph import KVFlowChatModel, agent_step_graph

PROMPTS = {
    "planner": "You are the planner of a small software team. Break the task into two short, concrete "
    "steps for the executor. Reply with the steps only.",
    "executor": "You are the executor of a small software team. Carry out the plan you are given and "
    "report what you did in one sentence.",
    "reviewer": "You are the reviewer of a small software team. Check the executor's report against the "
    "task and answer APPROVE or REVISE with one reason.",
}


class TeamState(TypedDict):
    task: str
    rounds: int
    round: int
    plan: str
    report: str
    review: str
    transcript: Annotated[list[str], operator.add]


def _ask(agent: str, request: str, config: RunnableConfig) -> str:
    llm: KVFlowChatModel = config["configurable"]["llm"]
    reply = llm.invoke([SystemMessage(PROMPTS[agent]), HumanMessage(request)])
    return str(reply.content)


def planner(state: TeamState, config: RunnableConfig) -> dict[str, Any]:
    plan = _ask("planner", f"Task: {state['task']}\nLast review: {state['review'] or 'none'}", config)
    return {"plan": plan, "round": state["round"] + 1, "transcript": [f"planner: {plan!r}"]}


def executor(state: TeamState, config: RunnableConfig) -> dict[str, Any]:
    report = _ask("executor", f"Plan: {state['plan']}", config)
    return {"report": report, "transcript": [f"executor: {report!r}"]}


def reviewer(state: TeamState, config: RunnableConfig) -> dict[str, Any]:
    review = _ask("reviewer", f"Task: {state['task']}\nReport: {state['report']}", config)
    return {"review": review, "transcript": [f"reviewer: {review!r}"]}


def next_step(state: TeamState) -> Literal["planner", "__end__"]:
    """Back to the planner until the last round (a real reviewer would parse its verdict)."""
    return "planner" if state["round"] < state["rounds"] else END


def build_team() -> StateGraph:
    """The team's LangGraph: planner -> executor -> reviewer -> (planner | END)."""
    builder = StateGraph(TeamState)
    builder.add_node("planner", planner)
    builder.add_node("executor", executor)
    builder.add_node("reviewer", reviewer)
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "executor")
    builder.add_edge("executor", "reviewer")
    builder.add_conditional_edges("reviewer", next_step)
    return builder


def run_team(url: str, task: str, rounds: int = 3, api_key: str | None = None) -> dict[str, Any]:
    """Run the team once as one kvflow workflow; return the final state and per-agent cache stats."""
    builder = build_team()
    with Workflow(url, agent_step_graph(builder), workflow_type="team", api_key=api_key) as workflow:
        llm = KVFlowChatModel(workflow=workflow, max_tokens=12, temperature=0)
        initial = {"task": task, "rounds": rounds, "round": 0, "plan": "", "report": "", "review": ""}
        final = builder.compile().invoke(initial, {"configurable": {"llm": llm}})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        params = {"workflow_id": workflow.workflow_id}
        stats = httpx.get(f"{url}/kvflow/stats", params=params, headers=headers, timeout=30).json()
        return {
            "workflow_id": workflow.workflow_id,
            "registered": workflow.info(),
            "state": final,
            "agents": (stats["workflow"] or {}).get("agents", {}),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running kvflow server (default: start one on the embedded model)")
    parser.add_argument("--api-key", help="the server's --api-key, if it has one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task", default="add a --verbose flag to the command line tool")
    args = parser.parse_args(argv)

    if args.url:
        result = run_team(args.url, args.task, args.rounds, args.api_key)
    else:
        from kvflow.harness.server_process import ServerProcess

        print("starting a kvflow server on the embedded model ...", flush=True)
        with ServerProcess([]) as server:
            result = run_team(server.url, args.task, args.rounds)

    graph = result["registered"]["graph"]
    agents = [agent["id"] for agent in graph["agents"]]
    print(f"workflow {result['workflow_id']}: agents {agents}, edges {graph['edges']}")
    for line in result["state"]["transcript"]:
        print(f"  {line}")
    print(f"{'agent':<10} {'calls':>6} {'fixed prompt':>13} {'fixed-prompt hits':>18}")
    for agent, counters in result["agents"].items():
        print(
            f"{agent:<10} {counters['invocations']:>6} {counters['fixed_prefix_len'] or 0:>13} "
            f"{counters['fixed_hit_invocations']:>18}"
        )


if __name__ == "__main__":
    main()
