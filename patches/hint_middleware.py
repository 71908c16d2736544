"""Patch: accept the ``kvflow`` hint on ``/generate`` and the OpenAI endpoints.

Target: the FastAPI ``app`` of ``sglang.srt.entrypoints.http_server`` (an ASGI
middleware). SGLang's request models drop unknown fields, and its OpenAI
endpoints drop ``kv_hints``, so the hint is taken from the raw body before
parsing, validated (HTTP 400 naming the field on error), and re-attached as a
canonical JSON string under ``custom_params["kvflow"]``, which SGLang carries
unchanged from every endpoint to the scheduler's ``Req``. Accepted forms, first
found wins: a top-level ``kvflow`` object; ``custom_params.kvflow`` (OpenAI
endpoints; ``sampling_params.custom_params.kvflow`` on ``/generate``); a
``kv_hints`` action with ``action_type`` ``"kvflow"`` (``/generate``);
``session_params.kvflow`` (every endpoint). SGLang's router (sglang-router
0.3.2) re-serializes each request through typed structs and keeps only
``session_params`` as a free JSON object on all three endpoints, so that is the
form that survives it; beside the hint, ``session_params.kvflow_graph`` may
carry the workflow's graph, registered on arrival (idempotent), so whichever
server the router picks knows it. Both keys are removed before SGLang parses
the request (SGLang builds its ``SessionParams`` from that object), and the
field with them when nothing else was in it. Requests without a hint pass
through byte for byte. For registered and learned workflows the workflow
registry (:mod:`kvflow.frontend.registry`) fills in the hint's steps, and the
end of the response marks the agent finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kvflow.frontend.registry import Finish, RegistryError, active_registry
from kvflow.hints import (
    GRAPH_KEY,
    KV_HINTS_ACTION_TYPE,
    ROUTED_FIELD,
    TRANSPORT_KEY,
    HintError,
    WorkflowHint,
    check_fixed_prefix_len,
    parse_hint,
    transport,
)

TARGETS = ("sglang.srt.entrypoints.http_server.app",)
GENERATE_PATH = "/generate"
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")


def _holders(body: dict, path: str) -> tuple[list[Any], bool]:
    """The objects whose ``custom_params`` SGLang forwards, and whether there is one per prompt.

    ``/generate`` with a list of ``sampling_params`` has one per prompt of its batch.
    """
    if path != GENERATE_PATH:
        return [body], False
    sampling = body.get("sampling_params")
    if isinstance(sampling, list):
        return sampling, True
    return [sampling], False


def _pop_own_hint(holder: Any) -> tuple[bool, Any]:
    custom = holder.get("custom_params") if isinstance(holder, dict) else None
    if isinstance(custom, dict) and TRANSPORT_KEY in custom:
        return True, custom.pop(TRANSPORT_KEY)
    return False, None


def _top_level_hint(body: dict) -> tuple[Any, str] | None:
    if TRANSPORT_KEY in body:
        return body.pop(TRANSPORT_KEY), TRANSPORT_KEY
    return None


def _envelope_hint(body: dict, path: str) -> tuple[Any, str] | None:
    """A ``kv_hints`` action of type ``kvflow`` (``/generate`` only); it stays in the envelope."""
    envelope = body.get("kv_hints") if path == GENERATE_PATH else None
    if isinstance(envelope, dict) and isinstance(envelope.get("actions"), list):
        for i, action in enumerate(envelope["actions"]):
            if isinstance(action, dict) and action.get("action_type") == KV_HINTS_ACTION_TYPE:
                return action.get("payload"), f"kv_hints.actions[{i}].payload"
    return None


def _routed_hint(body: dict) -> tuple[tuple[Any, str] | None, Any]:
    """The hint and graph in ``session_params``, both removed (and the field if nothing else was in it)."""
    session = body.get(ROUTED_FIELD)
    if not isinstance(session, dict) or not (TRANSPORT_KEY in session or GRAPH_KEY in session):
        return None, None
    where = f"{ROUTED_FIELD}.{TRANSPORT_KEY}"
    hint = (session.pop(TRANSPORT_KEY), where) if TRANSPORT_KEY in session else None
    graph = session.pop(GRAPH_KEY, None)
    if not session:
        del body[ROUTED_FIELD]
    if graph is not None and hint is None:
        raise HintError(
            f"{ROUTED_FIELD}.{GRAPH_KEY}", f"needs a {ROUTED_FIELD}.{TRANSPORT_KEY} hint beside it"
        )
    return hint, graph


def _token_count(ids: Any) -> int | None:
    if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
        return len(ids)
    return None


def _prompt_lens(body: dict, path: str, count: int, per_prompt: bool) -> list[int | None]:
    """Per holder, its prompt's length when the body gives token ids directly.

    A batch sharing one holder is checked per prompt later, once tokenized
    (``patches/request_checks.py``).
    """
    ids = body.get("input_ids") if path == GENERATE_PATH else body.get("prompt")
    if not per_prompt:
        return [_token_count(ids)]
    if isinstance(ids, list) and len(ids) == count:
        return [_token_count(item) for item in ids]
    return [None] * count


def rewrite_body(
    body: Any,
    path: str,
    resolve: Callable[[WorkflowHint], WorkflowHint] | None = None,
    register: Callable[[str, Any], None] | None = None,
) -> Any:
    """Validate and move every hint into ``custom_params``; raise :class:`HintError` if one is malformed.

    Per prompt, the first found is used: the top-level ``kvflow`` (for every
    prompt), the prompt's own ``custom_params.kvflow`` (on a batch
    ``/generate``, ``sampling_params[i].custom_params.kvflow``), a ``kv_hints``
    action, ``session_params.kvflow`` (both for every prompt); the others are
    dropped unread, but a ``session_params.kvflow_graph`` is always handed to
    ``register`` with the workflow id of the ``session_params`` hint beside it
    (which may raise the registry's error), once every hint is valid.
    ``resolve`` then completes each hint (the workflow registry fills in its
    steps). Returns None when the body holds no hint (it is then passed on
    untouched).
    """
    if not isinstance(body, dict):
        return None
    top, envelope = _top_level_hint(body), _envelope_hint(body, path)
    routed, graph = _routed_hint(body)
    fallback = envelope if envelope is not None else routed
    holders, per_prompt = _holders(body, path)
    own = [_pop_own_hint(holder) for holder in holders]
    if top is None and fallback is None and not any(found for found, _ in own):
        return None
    lens = _prompt_lens(body, path, len(holders), per_prompt)
    hinted: list[tuple[dict, WorkflowHint]] = []
    shared: dict[str, WorkflowHint] = {}  # a hint given for every prompt, parsed once

    def parse_shared(raw_hint: Any, where: str) -> WorkflowHint:
        if where not in shared:
            shared[where] = parse_hint(raw_hint, prefix=where)
        return shared[where]

    for i, (found, raw) in enumerate(own):
        holder_name = f"sampling_params[{i}]" if per_prompt else "sampling_params"
        if top is not None or (not found and fallback is not None):
            raw_hint, where = top if top is not None else fallback
            hint = parse_shared(raw_hint, where)
            check_fixed_prefix_len(hint.fixed_prefix_len, lens[i], where)
        elif found:
            where = f"custom_params.{TRANSPORT_KEY}"
            if path == GENERATE_PATH:
                where = f"{holder_name}.{where}"
            hint = parse_hint(raw, prompt_len=lens[i], prefix=where)
        else:
            continue
        holder = holders[i]
        if holder is None and not per_prompt:
            holder = body["sampling_params"] = {}
        if not isinstance(holder, dict):
            raise HintError(
                holder_name, f"must be an object to carry a kvflow hint, got {type(holder).__name__}"
            )
        hinted.append((holder, hint))
    if graph is not None and register is not None:
        register(parse_shared(*routed).workflow_id, graph)
    # Every hint is valid: only now may the registry count the requests as started.
    for holder, hint in hinted:
        if resolve is not None:
            hint = resolve(hint)
        custom = holder.get("custom_params")
        if not isinstance(custom, dict):
            custom = holder["custom_params"] = {}
        custom.update(transport(hint))
    return body


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
    """ASGI middleware applying :func:`rewrite_body` to hinted JSON requests."""

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
        new_raw = raw
        tracker = RequestTracker()  # registered and learned workflows: steps in, end of response out
        # A key spelled with JSON escapes ("\u006bvflow") holds a backslash-u; anything else is literal.
        # SGLang 0.5.23's OpenAI request models answer a JSON body that is not an object with a 500.
        not_object = path in OPENAI_PATHS and not raw.lstrip().startswith(b"{")
        if b"kvflow" in raw or b"\\u" in raw or not_object:
            try:
                parsed = json.loads(raw)
                if not_object and not isinstance(parsed, dict):
                    raise HintError("body", f"must be a JSON object, got {type(parsed).__name__}")
                body = rewrite_body(parsed, path, tracker.begin, tracker.register)
                if body is not None:
                    new_raw = json.dumps(body).encode()
            except HintError as error:
                tracker.abandon()
                return await _send_error(send, 400, str(error), error.field, "BadRequestError")
            except RegistryError as error:  # a graph carried in session_params, refused
                tracker.abandon()
                return await _send_error(send, error.status, str(error), error.param, type(error).__name__)
            except RecursionError:
                tracker.abandon()
                return await _send_error(send, 400, "body: JSON nested too deeply", "body", "BadRequestError")
            except ValueError:
                pass  # not JSON: SGLang reports it as usual
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


async def _send_error(send, status: int, message: str, param: str | None, kind: str) -> None:
    payload = json.dumps(
        {"object": "error", "message": message, "type": kind, "param": param, "code": status}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def install(app) -> None:
    app.add_middleware(HintMiddleware)
