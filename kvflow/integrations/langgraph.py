"""LangGraph: a ``StateGraph`` as an Agent Step Graph, and its LLM calls through the SDK.

``pip install 'kvflow[langgraph]'``. :func:`agent_step_graph` turns a ``StateGraph`` (compiled or
not) into an :class:`~kvflow.graph.AgentStepGraph` to register with a
:class:`~kvflow.client.Workflow`; :class:`KVFlowChatModel` is a LangChain chat model whose calls go
through that workflow as the node that makes them, so a node's prompts are served as that agent's.

- Every node is an agent of the same name, every edge LangGraph may take is an edge (the mapping
  in full is in :func:`agent_step_graph`).
- A node with several predecessors is an ``"or"`` join, as LangGraph runs it once any incoming
  edge fires, unless they all come from waiting edges (``"and"``).
- A subgraph node is one agent: the calls made inside it count as the outer node's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.graph.state import CompiledStateGraph, StateGraph

from kvflow.client import DEFAULT_MODEL, AsyncWorkflow, Workflow
from kvflow.graph import AgentStepGraph


def _branch_targets(source: str, ends: dict[Any, str] | None, nodes: Iterable[str]) -> list[str]:
    if ends is None:
        return [node for node in nodes if node != source]
    return list(ends.values())


def agent_step_graph(graph: StateGraph | CompiledStateGraph) -> AgentStepGraph:
    """The Agent Step Graph of a LangGraph ``StateGraph``.

    - every node is an agent of the same name; ``START``, ``END`` and LangGraph's error-handler
      nodes are not agents;
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
    agents = [name for name, spec in builder.nodes.items() if not spec.is_error_handler]
    plain: set[tuple[str, str]] = set(builder.edges)
    for source, branches in builder.branches.items():
        for branch in branches.values():
            plain.update((source, target) for target in _branch_targets(source, branch.ends, agents))
    for name, spec in builder.nodes.items():
        plain.update((name, target) for target in spec.ends or ())
    waiting = {(source, target) for sources, target in builder.waiting_edges for source in sources}

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
    use the async API (``ainvoke``, ``graph.ainvoke``).
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

    @staticmethod
    def _result(response: Any) -> ChatResult:
        choice = response.choices[0]
        message = AIMessage(
            content=choice.message.content or "", response_metadata={"finish_reason": choice.finish_reason}
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
