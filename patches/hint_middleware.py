"""Patch: accept the ``kvflow`` hint on ``/generate`` and the OpenAI endpoints.

Target: the FastAPI ``app`` of ``sglang.srt.entrypoints.http_server`` (an ASGI
middleware). SGLang's request models drop unknown fields, and its OpenAI
endpoints drop ``kv_hints``, so the hint is taken from the raw body before
parsing, validated (HTTP 400 naming the field on error), and re-attached as a
canonical JSON string under ``custom_params["kvflow"]``, which SGLang carries
unchanged from every endpoint to the scheduler's ``Req``. Accepted forms, first
found wins: a top-level ``kvflow`` object; ``custom_params.kvflow`` (OpenAI
endpoints; ``sampling_params.custom_params.kvflow`` on ``/generate``); a
``kv_hints`` action with ``action_type`` ``"kvflow"`` (``/generate``).
Requests without a hint pass through byte for byte. For registered and learned
workflows the workflow registry (:mod:`kvflow.workflow_registry`) fills in the
hint's steps, and the end of the response marks the agent finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kvflow.hints import KV_HINTS_ACTION_TYPE, TRANSPORT_KEY, HintError, WorkflowHint, parse_hint
from kvflow.workflow_registry import RequestTracker

TARGETS = ("sglang.srt.entrypoints.http_server.app",)
GENERATE_PATH = "/generate"
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")


def _custom_params_holders(body: dict, path: str, create: bool = False) -> list[dict]:
    """The dicts whose ``custom_params`` SGLang forwards for this endpoint."""
    if path != GENERATE_PATH:
        return [body]
    sampling = body.get("sampling_params")
    if isinstance(sampling, list):
        return [params for params in sampling if isinstance(params, dict)]
    if not isinstance(sampling, dict):
        if not create:
            return []
        sampling = body["sampling_params"] = {}
    return [sampling]


def _find_hint(body: dict, path: str) -> tuple[Any, str] | None:
    if TRANSPORT_KEY in body:
        return body.pop(TRANSPORT_KEY), "kvflow"
    for holder in _custom_params_holders(body, path):
        custom = holder.get("custom_params")
        if isinstance(custom, dict) and TRANSPORT_KEY in custom:
            where = (
                "custom_params.kvflow" if path != GENERATE_PATH else "sampling_params.custom_params.kvflow"
            )
            return custom.pop(TRANSPORT_KEY), where
    envelope = body.get("kv_hints") if path == GENERATE_PATH else None
    if isinstance(envelope, dict):
        for i, action in enumerate(envelope.get("actions") or []):
            if isinstance(action, dict) and action.get("action_type") == KV_HINTS_ACTION_TYPE:
                return action.get("payload"), f"kv_hints.actions[{i}].payload"
    return None


def _prompt_len(body: dict, path: str) -> int | None:
    """The prompt length when the body gives token ids directly."""
    ids = body.get("input_ids") if path == GENERATE_PATH else body.get("prompt")
    if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
        return len(ids)
    return None


def rewrite_body(body: Any, path: str, resolve: Callable[[WorkflowHint], WorkflowHint] | None = None) -> Any:
    """Validate and move the hint into ``custom_params``; raise :class:`HintError` if malformed.

    ``resolve`` completes a valid hint first (the workflow registry fills in its steps).
    """
    if not isinstance(body, dict):
        return body
    found = _find_hint(body, path)
    if found is None:
        return body
    raw, where = found
    hint = parse_hint(raw, prompt_len=_prompt_len(body, path), prefix=where)
    if resolve is not None:
        hint = resolve(hint)
    for holder in _custom_params_holders(body, path, create=True):
        custom = holder.get("custom_params")
        if not isinstance(custom, dict):
            custom = holder["custom_params"] = {}
        custom[TRANSPORT_KEY] = hint.to_json()
    return body


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
        if b'"kvflow"' in raw:
            try:
                body = json.loads(raw)
                new_raw = json.dumps(rewrite_body(body, path, tracker.begin)).encode()
            except HintError as error:
                return await _send_error(send, error)
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


async def _send_error(send, error: HintError) -> None:
    payload = json.dumps(
        {
            "object": "error",
            "message": str(error),
            "type": "BadRequestError",
            "param": error.field,
            "code": 400,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def install(app) -> None:
    app.add_middleware(HintMiddleware)
