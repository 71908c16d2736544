"""LangGraph: a ``StateGraph`` as an Agent Step Graph, and its LLM calls through the SDK.

``pip install 'kvflow[langgraph]'``. :func:`agent_step_graph` turns a ``StateGraph`` (compiled or
not) into an :class:`~kvflow.graph.AgentStepGraph` to register with a
:class:`~kvflow.client.Workflow`; :class:`KVFlowChatModel` is a LangChain chat model whose calls go
through that workflow as the node that makes them, so a node's prompts are served as that agent's.

- Every node but a tool node is an agent of the same name, every edge LangGraph may take is an
  edge (the mapping in full is in :func:`agent_step_graph`).
- A node with several predecessors is an ``"or"`` join, as LangGraph runs it once any incoming
  edge fires, unless they all come from waiting edges (``"and"``).
- A subgraph node is one agent: the calls made inside it count as the outer node's.
- A tool node (LangGraph's ``ToolNode``, or any node named in ``tool_nodes``) is no agent: the
  agent that called the tools is paused while it runs and resumes after it, its growing
  message list (tool calls and results) re-sent, so its context stays its own (docs/design.md,
  "Resumed contexts"). :class:`KVFlowChatModel` binds tools and returns tool calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, convert_to_openai_messages
from langchain_core.output_parsers.openai_tools import make_invalid_tool_call, parse_tool_call
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph.state import CompiledStateGraph, StateGraph
from langgraph.prebuilt import ToolNode

from kvflow.client import DEFAULT_MODEL, AsyncWorkflow, Workflow
from kvflow.graph import AgentStepGraph


def _branch_targets(source: str, ends: dict[Any, str] | None, nodes: Iterable[str]) -> list[str]:
    if ends is None:
        return [node for node in nodes if node != source]
    return list(ends.values())


def _through_tools(
    edges: set[tuple[str, str]], waiting: set[tuple[str, str]], tools: set[str]
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """``edges`` and ``waiting`` with every path through tool nodes made one edge between agents."""
    successors: dict[str, list[tuple[str, bool]]] = {}
    for source, target in edges | waiting:
        successors.setdefault(source, []).append((target, (source, target) in waiting))
    plain_out: set[tuple[str, str]] = set()
    waiting_out: set[tuple[str, str]] = set()
    for source in {source for source, _ in edges | waiting} - tools:
        stack, seen = list(successors.get(source, ())), set()
        while stack:
            target, waits = stack.pop()
            if (target, waits) in seen:
                continue
            seen.add((target, waits))
            if target in tools:
                stack.extend(successors.get(target, ()))
            else:
                (waiting_out if waits else plain_out).add((source, target))
    return plain_out, waiting_out


def agent_step_graph(
    graph: StateGraph | CompiledStateGraph, tool_nodes: Sequence[str] = ()
) -> AgentStepGraph:
    """The Agent Step Graph of a LangGraph ``StateGraph``.

    - every node is an agent of the same name; ``START``, ``END``, LangGraph's error-handler
      nodes and tool nodes (``ToolNode`` instances and the nodes named in ``tool_nodes``) are
      not agents;
    - a path through tool nodes is an edge between the agents at its ends (``agent -> tools ->
      agent`` is ``agent -> agent``): the calling agent is paused while its tools run;
    - ``add_edge(a, b)`` is the edge ``a -> b``; edges from ``START`` (entry points) and to
      ``END`` carry no dependency;
    - ``add_conditional_edges(src, path, path_map)`` is an edge from ``src`` to every possible
      destination: the values of ``path_map``, else the ``Literal`` return annotation of
      ``path``, else every other node (as LangGraph itself assumes); ``Command`` destinations
      declared with ``add_node(..., destinations=...)`` likewise;
    - ``add_edge([a, b], c)`` (a waiting edge) is ``a -> c`` and ``b -> c``;
    - joins: LangGraph runs a node once any of its incoming edges fires, so a node with several
      predecessors is an ``"or"`` join, except that a node whose predecessors all come from
      waiting edges waits for all of them (``"and"``);
    - a subgraph node is one agent: the calls made inside it count as the outer node's.
    """
    builder = graph.builder if isinstance(graph, CompiledStateGraph) else graph
    nodes = [name for name, spec in builder.nodes.items() if not spec.is_error_handler]
    unknown = set(tool_nodes) - set(nodes)
    if unknown:
        raise ValueError(f"tool_nodes: not nodes of the graph: {sorted(unknown)}")
    tools = {name for name in nodes if isinstance(builder.nodes[name].runnable, ToolNode)}
    tools.update(tool_nodes)
    plain: set[tuple[str, str]] = set(builder.edges)
    for source, branches in builder.branches.items():
        for branch in branches.values():
            plain.update((source, target) for target in _branch_targets(source, branch.ends, nodes))
    for name, spec in builder.nodes.items():
        plain.update((name, target) for target in spec.ends or ())
    waiting = {(source, target) for sources, target in builder.waiting_edges for source in sources}
    plain, waiting = _through_tools(plain, waiting, tools)

    agents = [name for name in nodes if name not in tools]
    known = set(agents)
    edges = sorted(edge for edge in plain | waiting if edge[0] in known and edge[1] in known)
    preds: dict[str, set[str]] = {agent: set() for agent in agents}
    for source, target in edges:
        preds[target].add(source)
    waits = {target for _, target in waiting} - {target for _, target in plain}

    step_graph = AgentStepGraph()
    for agent in agents:
        join = None if len(preds[agent]) < 2 else ("and" if agent in waits else "or")
        step_graph.add_agent(agent, join)
    for source, target in edges:
        step_graph.add_edge(source, target)
    step_graph.validate()
    return step_graph


def _node_of(metadata: dict[str, Any]) -> str | None:
    """The top-level LangGraph node a call runs in (the outer node, inside a subgraph)."""
    namespace = metadata.get("langgraph_checkpoint_ns")
    if namespace:
        return namespace.split("|", 1)[0].split(":", 1)[0]
    return metadata.get("langgraph_node")


class KVFlowChatModel(BaseChatModel):
    """A LangChain chat model calling a kvflow server through a :class:`~kvflow.client.Workflow`.

    Each call is sent as the agent named ``agent_id`` or, by default, as the
    LangGraph node it runs in. With a :class:`~kvflow.client.AsyncWorkflow`,
    use the async API (``ainvoke``, ``graph.ainvoke``). :meth:`bind_tools` sends
    OpenAI-style tools; replies carry the server's tool calls as ``AIMessage.tool_calls``.
    """

    workflow: Any
    agent_id: str | None = None
    model: str = DEFAULT_MODEL
    max_tokens: int | None = None
    temperature: float | None = None
    model_kwargs: dict[str, Any] = {}

    @property
    def _llm_type(self) -> str:
        return "kvflow"

    def _agent(self, run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None) -> str:
        agent_id = self.agent_id or (_node_of(run_manager.metadata) if run_manager is not None else None)
        if agent_id is None:
            raise ValueError("KVFlowChatModel: call it inside a LangGraph node, or set agent_id")
        return agent_id

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, **self.model_kwargs}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if stop:
            params["stop"] = stop
        return {**params, **kwargs}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """This model with ``tools`` (anything ``convert_to_openai_tool`` takes) sent on every call.

        ``tool_choice``: ``"auto"``, ``"none"``, ``"required"`` (or LangChain's ``"any"``), a
        tool's name, or an OpenAI ``tool_choice`` object.
        """
        if tool_choice == "any":
            tool_choice = "required"
        elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)

    @staticmethod
    def _result(response: Any) -> ChatResult:
        choice = response.choices[0]
        calls, invalid = [], []
        for raw in choice.message.tool_calls or []:
            raw_call = raw.model_dump()
            try:
                calls.append(parse_tool_call(raw_call, return_id=True))
            except OutputParserException as error:
                invalid.append(make_invalid_tool_call(raw_call, str(error)))
        message = AIMessage(
            content=choice.message.content or "",
            tool_calls=calls,
            invalid_tool_calls=invalid,
            response_metadata={"finish_reason": choice.finish_reason},
        )
        usage = response.usage.model_dump() if response.usage is not None else {}
        return ChatResult(
            generations=[ChatGeneration(message=message)],
            llm_output={"token_usage": usage, "model_name": response.model},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if not isinstance(self.workflow, Workflow):
            raise TypeError("KVFlowChatModel: a blocking call needs a kvflow.client.Workflow")
        openai_messages = convert_to_openai_messages(messages)
        response = self.workflow.chat(self._agent(run_manager), openai_messages, **self._params(stop, kwargs))
        return self._result(response)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if not isinstance(self.workflow, AsyncWorkflow):
            return await super()._agenerate(messages, stop, run_manager, **kwargs)
        openai_messages = convert_to_openai_messages(messages)
        response = await self.workflow.chat(
            self._agent(run_manager), openai_messages, **self._params(stop, kwargs)
        )
        return self._result(response)
