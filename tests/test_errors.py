"""Every kvflow error answer has one shape, SGLang's OpenAI-style error (no server)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from kvflow.patches import stats_endpoint
from kvflow.patches.hint_middleware import HintMiddleware
from sglang.srt.entrypoints.openai.serving_base import OpenAIServingBase

from kvflow.frontend.errors import error_response, refusal
from kvflow.frontend.registry import RegistryFull
from kvflow.hints import HintError
from kvflow.stats_query import QueryError


def test_the_payload_is_sglangs_error_response():
    ours = error_response(409, "taken", "graph", "WorkflowConflict")
    sglangs = OpenAIServingBase.create_error_response(None, "taken", "WorkflowConflict", 409, "graph")
    assert ours.status_code == sglangs.status_code == 409
    assert list(json.loads(ours.body).items()) == list(json.loads(sglangs.body).items())


def test_quoted_client_text_has_lone_surrogates_escaped():
    body = json.loads(
        error_response(400, "kvflow.agent_id: s\ud800", "kvflow.s\udfff", "BadRequestError").body
    )
    assert body["message"] == "kvflow.agent_id: s\\ud800" and body["param"] == "kvflow.s\\udfff"


def test_refusals_keep_a_registry_errors_status_and_class():
    cases = [
        (HintError("kvflow.agent_id", "must be a string"), 400, "kvflow.agent_id", "BadRequestError"),
        (QueryError("limit", "must be an integer"), 400, "limit", "BadRequestError"),
        (RegistryFull("full", None), 429, None, "RegistryFull"),
    ]
    for error, status, param, kind in cases:
        response = refusal(error)
        body = json.loads(response.body)
        assert response.status_code == body["code"] == status
        assert (body["object"], body["message"], body["param"], body["type"]) == (
            "error",
            str(error),
            param,
            kind,
        )


def test_the_hint_middleware_answers_in_the_same_shape():
    sent = []

    async def app(scope, receive, send):
        raise AssertionError("a refused request reached SGLang")

    async def receive():
        return {"type": "http.request", "body": b'{"text": "x", "kvflow": {"agent_id": "a"}}'}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": []}
    asyncio.run(HintMiddleware(app)(scope, receive, send))
    assert sent[0]["status"] == 400 and (b"content-type", b"application/json") in sent[0]["headers"]
    expected = refusal(HintError("kvflow.workflow_id", "is required")).body
    assert list(json.loads(sent[1]["body"]).items()) == list(json.loads(expected).items())


def test_stats_on_a_server_without_the_kvflow_cache_is_a_404_in_the_same_shape(monkeypatch):
    async def communicator(request):
        return [SimpleNamespace(internal_state={})]

    manager = SimpleNamespace(
        auto_create_handle_loop=lambda: None, get_internal_state_communicator=communicator
    )
    monkeypatch.setattr(
        "sglang.srt.entrypoints.http_server._global_state", SimpleNamespace(tokenizer_manager=manager)
    )
    response = asyncio.run(stats_endpoint.kvflow_stats(SimpleNamespace(query_params={})))
    body = json.loads(response.body)
    assert response.status_code == body["code"] == 404
    assert body["object"] == "error" and body["type"] == "NotFoundError" and body["param"] is None
    assert "not active" in body["message"]
