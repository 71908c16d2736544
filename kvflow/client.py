"""Client SDK: run one workflow against a kvflow server, hints attached to every call.

:class:`Workflow` (blocking) and :class:`AsyncWorkflow` (``asyncio``) wrap one workflow instance,
one method per call style: :meth:`Workflow.generate` (SGLang's ``/generate`` with ``text`` or
``input_ids``), :meth:`Workflow.chat` and :meth:`Workflow.completion` (the stock ``openai``
client, given or built from ``url``; ``extra_body`` carries the hint). Usage: docs/design.md,
"Client SDK and LangGraph in detail".

- A graph is registered before the first call, so each call only names its agent; closing (or
  leaving the ``with`` block) ends the workflow.
- Every request carries the hint as ``session_params.kvflow`` and the workflow id as the
  ``X-SMG-Routing-Key`` header, the form SGLang's router forwards (``router=True`` behind one).
- ``fixed_prefix`` marks the agent's fixed prompt, measured once per distinct value with the
  server's ``/tokenize`` or left to the server. Details: :class:`Workflow`.
- ``last_turn=True`` on any call says the agent will not resume it (``keep_context: false``);
  ``expected_pause_s=`` how long after it the agent's next call comes (e.g. its tool's typical
  latency); :meth:`Workflow.conversation` keeps a multi-turn, tool-calling chat (``kvflow.conversation``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from kvflow import WORKFLOWS_ROUTE
from kvflow.conversation import AsyncConversation, Conversation
from kvflow.graph import AgentStepGraph
from kvflow.hints import GRAPH_KEY, ROUTED_FIELD, TRANSPORT_KEY, common_prefix_len

DEFAULT_MODEL = "default"
ROUTING_HEADER = "X-SMG-Routing-Key"  # SGLang router's key for --policy manual (and consistent_hashing)
SYSTEM_ROLES = ("system", "developer")
_PROBES = ("0", "1")  # two continuations that differ in their first character


class KVFlowError(RuntimeError):
    """An error answer from the server (``status`` is the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class _Probe:
    """Two ``/tokenize`` bodies whose common token prefix is a fixed prompt's length."""

    key: str
    bodies: tuple[dict[str, Any], dict[str, Any]]


def _check_response(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
            message = body.get("message") or body.get("error") or response.text
        except ValueError:
            message = response.text
        raise KVFlowError(response.status_code, str(message))
    return response.json()


class _WorkflowBase:
    """What the blocking and the async workflow share: ids, hints, request bodies."""

    def __init__(
        self,
        url: str,
        graph: AgentStepGraph | None = None,
        *,
        workflow_id: str | None = None,
        workflow_type: str = "workflow",
        api_key: str | None = None,
        openai_client: Any = None,
        timeout: float = 300.0,
        router: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.graph = graph
        self.workflow_id = workflow_id or f"{workflow_type}:{uuid.uuid4().hex[:16]}"
        self.api_key = api_key
        self.timeout = timeout
        self.router = router
        self._openai = openai_client
        self._owns_openai = openai_client is None
        self._registered = graph is None or router  # behind a router the graph rides in every request
        self._prefix_lens: dict[str, int | None] = {}
        # A header value must be ASCII; any stable key keeps a workflow on one server.
        self.routing_key = (
            self.workflow_id if self.workflow_id.isascii() else quote(self.workflow_id, safe="")
        )

    @property
    def _path(self) -> str:
        return f"{WORKFLOWS_ROUTE}/{quote(self.workflow_id, safe='')}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _routing_headers(self) -> dict[str, str]:
        return {ROUTING_HEADER: self.routing_key}

    def _openai_args(self) -> dict[str, Any]:
        return {"base_url": f"{self.url}/v1", "api_key": self.api_key or "none", "timeout": self.timeout}

    def _registration(self) -> dict[str, Any]:
        return {"workflow_id": self.workflow_id, "graph": self.graph.to_json()}

    def hint(
        self,
        agent_id: str,
        fixed_prefix_len: int | None = None,
        last_turn: bool = False,
        expected_pause_s: float | None = None,
    ) -> dict[str, Any]:
        """The ``kvflow`` hint this workflow attaches to a call of ``agent_id``.

        ``last_turn``: the agent will not resume this call's prompt + output (``keep_context:
        false``), so the server keeps it as plain LRU at once. ``expected_pause_s``: seconds from
        this call's end to the agent's next call, ranking its context in between.
        """
        hint: dict[str, Any] = {"workflow_id": self.workflow_id, "agent_id": agent_id}
        if fixed_prefix_len is not None:
            hint["fixed_prefix_len"] = fixed_prefix_len
        if last_turn:
            hint["keep_context"] = False
        if expected_pause_s is not None:
            hint["expected_pause_s"] = expected_pause_s
        return hint

    def _session_params(
        self, given: Any, agent_id: str, fixed_prefix_len: int | None, turn: tuple[bool, float | None]
    ) -> dict[str, Any]:
        """``session_params`` carrying the hint (and behind a router the graph), beside ``given``'s keys;
        ``turn`` is the call's ``(last_turn, expected_pause_s)``."""
        carried = {**(given or {}), TRANSPORT_KEY: self.hint(agent_id, fixed_prefix_len, *turn)}
        if self.router and self.graph is not None:
            carried[GRAPH_KEY] = self.graph.to_json()
        return carried

    def _missing_registry(self, error: KVFlowError) -> KVFlowError:
        if error.status != 404:
            return error
        return KVFlowError(
            404, f"{error}; no /kvflow/workflows here (behind SGLang's router? pass router=True)"
        )

    # ---- fixed-prompt boundary ---------------------------------------------

    def _text_prefix(
        self, prompt: str | Sequence[int], fixed_prefix: int | str | None
    ) -> int | _Probe | None:
        if fixed_prefix is None or isinstance(fixed_prefix, int):
            return fixed_prefix
        if not isinstance(prompt, str) or not prompt.startswith(fixed_prefix):
            raise ValueError("fixed_prefix: a string fixed prefix must start the text prompt")
        if self.router:
            return None  # the router has no /tokenize: the server infers the boundary
        bodies = tuple({"prompt": fixed_prefix + probe} for probe in _PROBES)
        return self._cached(_Probe("text\0" + fixed_prefix, bodies))

    def _chat_prefix(
        self, messages: Sequence[Mapping[str, Any]], fixed_prefix: int | str | None
    ) -> int | _Probe | None:
        if fixed_prefix is None or isinstance(fixed_prefix, int):
            return fixed_prefix
        if fixed_prefix != "system":
            raise ValueError(f"fixed_prefix: expected 'system', a token count or None, got {fixed_prefix!r}")
        count = 0
        while count < len(messages) and messages[count].get("role") in SYSTEM_ROLES:
            count += 1
        if count == 0 or count == len(messages) or self.router:
            # No system prompt, nothing after it to tell the fixed part from, or no /tokenize (router).
            return None
        system = [dict(m) for m in messages[:count]]
        role = messages[count].get("role", "user")
        bodies = tuple(
            {"model": DEFAULT_MODEL, "messages": [*system, {"role": role, "content": probe}]}
            for probe in _PROBES
        )
        return self._cached(_Probe(f"chat\0{role}\0{json.dumps(system, sort_keys=True)}", bodies))

    def _cached(self, probe: _Probe) -> int | _Probe | None:
        return self._prefix_lens[probe.key] if probe.key in self._prefix_lens else probe

    def _measured(self, probe: _Probe, results: list[Any]) -> int | None:
        """Record the length two tokenizations share (None when ``/tokenize`` failed)."""
        length = None if None in results else common_prefix_len(*(r["tokens"] for r in results))
        self._prefix_lens[probe.key] = length
        return length

    # ---- request bodies ----------------------------------------------------

    def _generate_body(
        self,
        agent_id: str,
        text: str | None,
        input_ids: Sequence[int] | None,
        fixed_prefix_len: int | None,
        sampling_params: Mapping[str, Any] | None,
        turn: tuple[bool, float | None],
        fields: dict[str, Any],
    ) -> dict[str, Any]:
        prompt = {"text": text} if text is not None else {"input_ids": list(input_ids)}
        given = fields.pop(ROUTED_FIELD, None)
        session = self._session_params(given, agent_id, fixed_prefix_len, turn)
        return {**prompt, "sampling_params": dict(sampling_params or {}), **fields, ROUTED_FIELD: session}

    def _openai_kwargs(
        self,
        agent_id: str,
        fixed_prefix_len: int | None,
        turn: tuple[bool, float | None],
        kwargs: dict[str, Any],
    ) -> dict:
        kwargs.setdefault("model", DEFAULT_MODEL)
        extra_body = dict(kwargs.get("extra_body") or {})
        extra_body[ROUTED_FIELD] = self._session_params(
            extra_body.get(ROUTED_FIELD), agent_id, fixed_prefix_len, turn
        )
        kwargs["extra_body"] = extra_body
        kwargs["extra_headers"] = {**(kwargs.get("extra_headers") or {}), **self._routing_headers()}
        return kwargs

    @staticmethod
    def _prompt(text: str | None, input_ids: Sequence[int] | None) -> str | Sequence[int]:
        if (text is None) == (input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        return text if text is not None else input_ids


class Workflow(_WorkflowBase):
    """One workflow instance on a kvflow server (blocking calls).

    ``graph`` (an :class:`~kvflow.graph.AgentStepGraph`) is registered with ``POST
    /kvflow/workflows`` before the first call, so every call only needs to name its agent: the
    server derives the steps-to-execution from the graph and the requests it sees. Without a graph
    (the learned or plain mode) calls send ``workflow_id`` and ``agent_id`` only: the server
    learns the structure with ``--kvflow-learn-graph``, or keeps plain LRU order for the workflow.
    ``workflow_id`` defaults to ``"<workflow_type>:<random>"``, so that learned workflows of one
    type share what the server learns. ``openai_client`` defaults to an ``openai.OpenAI`` for
    ``url``. Closing (or leaving the ``with`` block) ends the workflow: ``DELETE`` makes its KV
    plain LRU at once.

    Routing: every request carries the hint as ``session_params.kvflow`` and the workflow id as
    the ``X-SMG-Routing-Key`` header. That is what SGLang's router (``sglang-router``, ``smg``)
    forwards on all three endpoints (it drops other body fields and headers), and its ``--policy
    manual`` keeps every request with one key on one server; a server reached directly reads the
    same form. Behind a router (``router=True``) nothing but those three endpoints reaches a
    server: the graph rides in every request (``session_params.kvflow_graph``, registered
    idempotently by whichever server gets it, also the one a failed server's workflows move to),
    ``/tokenize`` is not probed, and :meth:`close` cannot end the workflow (it expires after the
    server's ``--kvflow-hint-ttl``); :meth:`set_frontier` and :meth:`info` need the server's URL.

    Fixed-prompt boundary (``fixed_prefix``): an ``int`` is a token count; a string (text prompts)
    is the agent's fixed text, which must start the prompt; ``"system"`` (chat, the default) is
    the leading system/developer messages. Strings and system messages are measured once per
    distinct value with the server's ``/tokenize``, as the longest token prefix shared by two
    renderings that differ right after the fixed part. ``None``, or a server without
    ``/tokenize``, leaves the boundary to the server, which infers it from the prefix the agent's
    requests repeat.
    """

    def __init__(self, url: str, graph: AgentStepGraph | None = None, **options: Any) -> None:
        super().__init__(url, graph, **options)
        self._http = httpx.Client(base_url=self.url, headers=self._headers(), timeout=self.timeout)

    def __enter__(self) -> Workflow:
        self.register()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def openai(self) -> Any:
        """The ``openai.OpenAI`` client calls go through."""
        if self._openai is None:
            import openai

            self._openai = openai.OpenAI(**self._openai_args())
        return self._openai

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        return _check_response(self._http.request(method, path, json=body, headers=self._routing_headers()))

    def register(self) -> None:
        """Register the graph (once; a no-op without a graph)."""
        if not self._registered:
            try:
                self._request("POST", WORKFLOWS_ROUTE, self._registration())
            except KVFlowError as error:
                raise self._missing_registry(error) from None
            self._registered = True

    def _resolve(self, plan: int | _Probe | None) -> int | None:
        if not isinstance(plan, _Probe):
            return plan
        results = []
        for body in plan.bodies:
            try:
                results.append(self._request("POST", "/tokenize", body))
            except KVFlowError:
                results.append(None)
        return self._measured(plan, results)

    def generate(
        self,
        agent_id: str,
        *,
        text: str | None = None,
        input_ids: Sequence[int] | None = None,
        fixed_prefix: int | str | None = None,
        sampling_params: Mapping[str, Any] | None = None,
        last_turn: bool = False,
        expected_pause_s: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """``POST /generate`` as ``agent_id``; ``fields`` are further body fields."""
        fixed_len = self._resolve(self._text_prefix(self._prompt(text, input_ids), fixed_prefix))
        self.register()
        turn = (last_turn, expected_pause_s)
        body = self._generate_body(agent_id, text, input_ids, fixed_len, sampling_params, turn, fields)
        return self._request("POST", "/generate", body)

    def chat(
        self,
        agent_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        fixed_prefix: int | str | None = "system",
        last_turn: bool = False,
        expected_pause_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``client.chat.completions.create`` as ``agent_id`` (``kwargs`` go to it)."""
        fixed_len = self._resolve(self._chat_prefix(messages, fixed_prefix))
        self.register()
        return self.openai.chat.completions.create(
            **self._openai_kwargs(
                agent_id, fixed_len, (last_turn, expected_pause_s), {"messages": list(messages), **kwargs}
            )
        )

    def conversation(self, agent_id: str, system: str | None = None, **defaults: Any) -> Conversation:
        """A growing chat of ``agent_id`` (``defaults``: ``chat`` arguments of every turn)."""
        return Conversation(self, agent_id, system=system, **defaults)

    def completion(
        self,
        agent_id: str,
        prompt: str,
        *,
        fixed_prefix: int | str | None = None,
        last_turn: bool = False,
        expected_pause_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``client.completions.create`` as ``agent_id`` (``kwargs`` go to it)."""
        fixed_len = self._resolve(self._text_prefix(prompt, fixed_prefix))
        self.register()
        return self.openai.completions.create(
            **self._openai_kwargs(
                agent_id, fixed_len, (last_turn, expected_pause_s), {"prompt": prompt, **kwargs}
            )
        )

    def set_frontier(
        self, running: Sequence[str] | None = None, finished: Sequence[str] | None = None
    ) -> dict:
        """Move the frontier explicitly (e.g. ``running=["tool"]`` while a tool runs)."""
        self.register()
        body = {k: list(v) for k, v in (("running", running), ("finished", finished)) if v is not None}
        return self._request("PATCH", self._path, body)

    def info(self) -> dict[str, Any]:
        """The server's view of this workflow (graph, frontier, steps)."""
        return self._request("GET", self._path)

    def close(self) -> None:
        """End the workflow on the server (not behind a router) and release the HTTP client."""
        try:
            if not self.router:
                self._request("DELETE", self._path)
        except KVFlowError as error:
            if error.status != 404:
                raise
        finally:
            self._http.close()
            if self._owns_openai and self._openai is not None:
                self._openai.close()


class AsyncWorkflow(_WorkflowBase):
    """:class:`Workflow` for ``asyncio``: the same methods, awaitable, with ``openai.AsyncOpenAI``."""

    def __init__(self, url: str, graph: AgentStepGraph | None = None, **options: Any) -> None:
        super().__init__(url, graph, **options)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers(), timeout=self.timeout)
        self._register_lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncWorkflow:
        await self.register()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def openai(self) -> Any:
        """The ``openai.AsyncOpenAI`` client calls go through."""
        if self._openai is None:
            import openai

            self._openai = openai.AsyncOpenAI(**self._openai_args())
        return self._openai

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        return _check_response(
            await self._http.request(method, path, json=body, headers=self._routing_headers())
        )

    async def register(self) -> None:
        """Register the graph (once; a no-op without a graph)."""
        async with self._register_lock:
            if not self._registered:
                try:
                    await self._request("POST", WORKFLOWS_ROUTE, self._registration())
                except KVFlowError as error:
                    raise self._missing_registry(error) from None
                self._registered = True

    async def _resolve(self, plan: int | _Probe | None) -> int | None:
        if not isinstance(plan, _Probe):
            return plan

        async def tokenize(body: dict[str, Any]) -> Any:
            try:
                return await self._request("POST", "/tokenize", body)
            except KVFlowError:
                return None

        return self._measured(plan, list(await asyncio.gather(*map(tokenize, plan.bodies))))

    async def generate(
        self,
        agent_id: str,
        *,
        text: str | None = None,
        input_ids: Sequence[int] | None = None,
        fixed_prefix: int | str | None = None,
        sampling_params: Mapping[str, Any] | None = None,
        last_turn: bool = False,
        expected_pause_s: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """``POST /generate`` as ``agent_id``; ``fields`` are further body fields."""
        fixed_len = await self._resolve(self._text_prefix(self._prompt(text, input_ids), fixed_prefix))
        await self.register()
        turn = (last_turn, expected_pause_s)
        body = self._generate_body(agent_id, text, input_ids, fixed_len, sampling_params, turn, fields)
        return await self._request("POST", "/generate", body)

    async def chat(
        self,
        agent_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        fixed_prefix: int | str | None = "system",
        last_turn: bool = False,
        expected_pause_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``client.chat.completions.create`` as ``agent_id`` (``kwargs`` go to it)."""
        fixed_len = await self._resolve(self._chat_prefix(messages, fixed_prefix))
        await self.register()
        return await self.openai.chat.completions.create(
            **self._openai_kwargs(
                agent_id, fixed_len, (last_turn, expected_pause_s), {"messages": list(messages), **kwargs}
            )
        )

    def conversation(self, agent_id: str, system: str | None = None, **defaults: Any) -> AsyncConversation:
        """A growing chat of ``agent_id`` (``defaults``: ``chat`` arguments of every turn)."""
        return AsyncConversation(self, agent_id, system=system, **defaults)

    async def completion(
        self,
        agent_id: str,
        prompt: str,
        *,
        fixed_prefix: int | str | None = None,
        last_turn: bool = False,
        expected_pause_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``client.completions.create`` as ``agent_id`` (``kwargs`` go to it)."""
        fixed_len = await self._resolve(self._text_prefix(prompt, fixed_prefix))
        await self.register()
        return await self.openai.completions.create(
            **self._openai_kwargs(
                agent_id, fixed_len, (last_turn, expected_pause_s), {"prompt": prompt, **kwargs}
            )
        )

    async def set_frontier(
        self, running: Sequence[str] | None = None, finished: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Move the frontier explicitly (e.g. ``running=["tool"]`` while a tool runs)."""
        await self.register()
        body = {k: list(v) for k, v in (("running", running), ("finished", finished)) if v is not None}
        return await self._request("PATCH", self._path, body)

    async def info(self) -> dict[str, Any]:
        """The server's view of this workflow (graph, frontier, steps)."""
        return await self._request("GET", self._path)

    async def close(self) -> None:
        """End the workflow on the server (not behind a router) and release the HTTP client."""
        try:
            if not self.router:
                await self._request("DELETE", self._path)
        except KVFlowError as error:
            if error.status != 404:
                raise
        finally:
            await self._http.aclose()
            if self._owns_openai and self._openai is not None:
                await self._openai.close()
