"""Patch: accept the ``kvflow`` hint on ``/generate`` and the OpenAI endpoints.

Target: the FastAPI ``app`` of ``sglang.srt.entrypoints.http_server`` (an ASGI
middleware). It reads the raw body of every ``POST`` to those paths before SGLang
parses it and replays the body :func:`kvflow.frontend.hint_rewrite.rewrite_request`
returns (hints validated and moved into ``custom_params``).

- A malformed hint, or a ``session_params.kvflow_graph`` the registry refuses, is
  answered here (:func:`kvflow.frontend.errors.refusal`); nothing reaches SGLang.
- Requests without a hint pass through byte for byte.
- For registered and learned workflows the registry (:mod:`kvflow.frontend.registry`)
  fills in each hint's steps, and the end of the response marks the agent finished.
"""

from __future__ import annotations

from typing import Any

from kvflow.frontend.errors import refusal
from kvflow.frontend.hint_rewrite import GENERATE_PATH, OPENAI_PATHS, rewrite_request
from kvflow.frontend.registry import Finish, RegistryError, active_registry
from kvflow.hints import GRAPH_KEY, ROUTED_FIELD, HintError, WorkflowHint

TARGETS = ("sglang.srt.entrypoints.http_server.app",)


def _graph_error(error: RegistryError) -> RegistryError:
    """The registry's error about ``graph``, naming ``session_params.kvflow_graph`` instead."""
    carried, param, message = f"{ROUTED_FIELD}.{GRAPH_KEY}", error.param or "graph", str(error)
    if param.startswith("graph"):
        if message.startswith(param):
            message = carried + message[len("graph") :]
        param = carried + param[len("graph") :]
    return type(error)(message, param)


class RequestTracker:
    """Per-request glue between the hint middleware and the active registry.

    :meth:`begin` completes a hint of the request (a batch ``/generate`` has
    one per prompt); :meth:`run` calls the ASGI app and reports the end of the
    response (the last ``http.response.body`` message, or the app returning
    without one) back to the registry, before the final body reaches the client.
    """

    def __init__(self) -> None:
        self._finishes: list[Finish] = []

    def begin(self, hint: WorkflowHint) -> WorkflowHint:
        """The hint with the registry's steps filled in (unchanged without a registry)."""
        registry = active_registry()
        if registry is None:
            return hint
        hint, finish = registry.begin_request(hint)
        if finish is not None:
            self._finishes.append(finish)
        return hint

    def register(self, workflow_id: str, graph: Any) -> None:
        """Register ``graph`` for ``workflow_id`` as ``POST /kvflow/workflows`` would.

        Raises the registry's error (its HTTP status kept) naming the field
        under ``session_params.kvflow_graph``; without a registry the graph is ignored.
        """
        registry = active_registry()
        if registry is None:
            return
        try:
            registry.register({"workflow_id": workflow_id, "graph": graph})
        except RegistryError as error:
            raise _graph_error(error) from None

    def abandon(self) -> None:
        """The request is refused before reaching SGLang: undo every :meth:`begin`."""
        self._end(False)

    async def run(self, app, scope, receive, send) -> None:
        """``await app(scope, receive, send)``, reporting the end of the response."""
        if not self._finishes:
            return await app(scope, receive, send)
        status = 500

        async def tracked_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                self._end(status < 400)
            await send(message)

        try:
            await app(scope, receive, tracked_send)
        finally:
            self._end(False)

    def _end(self, ok: bool) -> None:
        finishes, self._finishes = self._finishes, []
        for finish in finishes:
            finish(ok)


class HintMiddleware:
    """ASGI middleware applying :func:`~kvflow.frontend.hint_rewrite.rewrite_request` to hinted requests."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or path not in (GENERATE_PATH, *OPENAI_PATHS)
        ):
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        tracker = RequestTracker()  # registered and learned workflows: steps in, end of response out
        try:
            new_raw = rewrite_request(raw, path, tracker.begin, tracker.register)
        except (HintError, RegistryError) as error:  # RegistryError: a session_params graph refused
            tracker.abandon()
            return await refusal(error)(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new_raw)).encode()))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": new_raw, "more_body": False}

        return await tracker.run(self.app, {**scope, "headers": headers}, replay, send)


def install(app) -> None:
    app.add_middleware(HintMiddleware)
