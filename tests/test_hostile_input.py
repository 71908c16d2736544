"""Hostile requests against the HTTP side of kvflow, without a server: each case of issue 10 that
the hint middleware, the tokenizer-side transport check or the registry must answer below 500."""

from __future__ import annotations

import asyncio
import json

import pytest
from kvflow.patches.hint_middleware import HintMiddleware

from kvflow.frontend.hint_rewrite import rewrite_body
from kvflow.frontend.registry import RegistryError, WorkflowRegistry, activate
from kvflow.hints import MAX_STEPS_ENTRIES, SEAL_KEY, HintError, WorkflowHint, check_transport, parse_hint
from kvflow.stats_query import QueryError, StatsQuery, parse_query

GOOD = {"workflow_id": "w", "agent_id": "a"}
CYCLE = {
    "agents": [{"id": "planner"}, {"id": "executor"}],
    "edges": [["planner", "executor"], ["executor", "planner"]],
}


def through_middleware(body: bytes, path: str = "/generate") -> tuple[list[dict], bytes | None]:
    """Send ``body`` through the real middleware; return what it answered and what reached the app."""
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(HintMiddleware(app)(scope, receive, send))
    return sent, (reached[0] if reached else None)


def error_of(sent: list[dict]) -> dict:
    assert sent[0]["status"] == 400
    return json.loads(sent[1]["body"])


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_a_json_escaped_key_is_the_same_key(path):
    inner = '{"\\u006bvflow": {"workflow_id": "w", "agent_id": "a"}}'
    holder = (
        f'"sampling_params": {{"custom_params": {inner}}}'
        if path == "/generate"
        else f'"custom_params": {inner}'
    )
    sent, reached = through_middleware(f'{{"input_ids": [1, 2], {holder}}}'.encode(), path)
    body = json.loads(reached)
    custom = body["sampling_params"]["custom_params"] if path == "/generate" else body["custom_params"]
    assert check_transport(custom) == WorkflowHint("w", "a")


def test_an_escaped_key_holding_garbage_is_a_400_naming_the_field():
    escaped = b'{"\\u006bvflow": {"workflow_id": "w", "agent_id": 3}}'
    raw = b'{"input_ids": [1], "sampling_params": {"custom_params": ' + escaped + b"}}"
    error = error_of(through_middleware(raw)[0])
    assert error["param"] == "sampling_params.custom_params.kvflow.agent_id"


def test_a_transport_the_middleware_did_not_write_is_refused_before_tokenizing():
    # e.g. an endpoint the middleware does not read (/v1/responses), or a forged seal
    forged = {"kvflow": WorkflowHint("w", "a").to_json()}
    for custom in (forged, {**forged, SEAL_KEY: "guess"}, {"kvflow": {"workflow_id": "w"}}):
        with pytest.raises(HintError, match="hints are read only as documented"):
            check_transport(custom)
    assert check_transport({"x": 1}) is None and check_transport(None) is None


def test_a_client_written_transport_string_is_a_400():
    raw = json.dumps({"input_ids": [1], "kvflow": json.dumps(GOOD)}).encode()
    assert error_of(through_middleware(raw)[0])["param"] == "kvflow"


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_deep_nesting_next_to_the_key_is_a_400_not_a_recursion_error(path):
    raw = b'{"kvflow": {"workflow_id": "w", "agent_id": "a"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert error_of(through_middleware(raw, path)[0])["param"] == "body"


def test_deep_nesting_without_the_key_passes_through_untouched():
    raw = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    sent, reached = through_middleware(raw)
    assert reached == raw and sent[0]["status"] == 200


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"0", b"86401"])
@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_a_pause_that_is_not_a_finite_positive_number_of_seconds_is_a_400(path, value):
    raw = b'{"input_ids": [1], "kvflow": {"workflow_id": "w", "agent_id": "a", "expected_pause_s": '
    error = error_of(through_middleware(raw + value + b"}}", path)[0])
    assert error["param"] == "kvflow.expected_pause_s"


@pytest.mark.parametrize("field", ["workflow_id", "agent_id"])
def test_lone_surrogates_in_ids_are_a_400(field):
    raw = json.dumps({"input_ids": [1], "kvflow": {**GOOD, field: "s\ud800"}}).encode()
    error = error_of(through_middleware(raw)[0])
    assert error["param"] == f"kvflow.{field}" and "surrogate" in error["message"]
    with pytest.raises(HintError, match="surrogate"):
        parse_hint({**GOOD, "steps_to_execution": {"b\udfff": 1}})


def test_unhinted_bodies_with_escapes_reach_sglang_byte_for_byte():
    raw = b'{"text": "caf\\u00e9", "sampling_params": {"max_new_tokens": 1}}'
    assert through_middleware(raw)[1] == raw


def batch_hints(body: dict) -> list[WorkflowHint | None]:
    sampling = body["sampling_params"]
    return [check_transport(params.get("custom_params")) for params in sampling]


def test_batch_generate_takes_each_prompts_own_hint():
    body = rewrite_body(
        {
            "input_ids": [[1, 2], [3, 4], [5, 6]],
            "sampling_params": [
                {"custom_params": {"kvflow": {**GOOD, "agent_id": "x"}}},
                {"max_new_tokens": 1},
                {"custom_params": {"kvflow": {**GOOD, "agent_id": "y", "fixed_prefix_len": 2}}},
            ],
        },
        "/generate",
    )
    assert batch_hints(body) == [WorkflowHint("w", "x"), None, WorkflowHint("w", "y", 2)]


def test_per_prompt_the_first_hint_found_is_used_top_level_then_own_then_kv_hints():
    envelope = {"actions": [{"action_type": "kvflow", "payload": {**GOOD, "agent_id": "env"}}]}
    own = [{}, {"custom_params": {"kvflow": {**GOOD, "agent_id": "b"}}}]
    body = rewrite_body(
        {"input_ids": [[1, 2], [3, 4]], "kvflow": GOOD, "sampling_params": own, "kv_hints": envelope},
        "/generate",
    )
    assert batch_hints(body) == [WorkflowHint("w", "a"), WorkflowHint("w", "a")]
    own = [{}, {"custom_params": {"kvflow": {**GOOD, "agent_id": "b"}}}]
    body = rewrite_body(
        {"input_ids": [[1, 2], [3, 4]], "sampling_params": own, "kv_hints": envelope}, "/generate"
    )
    assert batch_hints(body) == [WorkflowHint("w", "env"), WorkflowHint("w", "b")]
    # A losing hint is dropped unread, as for a single prompt.
    single = {"input_ids": [1], "kvflow": GOOD, "sampling_params": {"custom_params": {"kvflow": {"x": 7}}}}
    assert (
        check_transport(rewrite_body(single, "/generate")["sampling_params"]["custom_params"]).agent_id == "a"
    )


def test_batch_generate_names_the_item_of_a_bad_hint_and_checks_its_own_prompt_length():
    with pytest.raises(HintError) as error:
        rewrite_body(
            {
                "input_ids": [[1, 2, 3], [4]],
                "sampling_params": [{}, {"custom_params": {"kvflow": {**GOOD, "fixed_prefix_len": 2}}}],
            },
            "/generate",
        )
    assert error.value.field == "sampling_params[1].custom_params.kvflow.fixed_prefix_len"


def test_a_refused_batch_starts_no_registered_request():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "r", "graph": CYCLE})
    activate(registry)
    try:
        raw = json.dumps(
            {
                "input_ids": [[1], [2]],
                "sampling_params": [
                    {"custom_params": {"kvflow": {"workflow_id": "r", "agent_id": "planner"}}},
                    {"custom_params": {"kvflow": {"workflow_id": "r", "agent_id": "stranger"}}},
                ],
            }
        ).encode()
        error = error_of(through_middleware(raw)[0])
        assert error["param"] == "kvflow.agent_id"
        assert registry.get("r").running() == set()
    finally:
        activate(None)


# ---- registration ------------------------------------------------------------------


@pytest.mark.parametrize("agent_id", ["x" * 257, "s\ud800"])
def test_registration_refuses_agent_ids_a_hint_could_not_carry(agent_id):
    graph = {"agents": [{"id": "a"}, {"id": agent_id}], "edges": [["a", agent_id]]}
    with pytest.raises(RegistryError) as error:
        WorkflowRegistry().register({"workflow_id": "w", "graph": graph})
    assert error.value.param == "graph.agents[1].id"


def test_registration_refuses_a_surrogate_workflow_id_and_registers_nothing():
    registry = WorkflowRegistry()
    with pytest.raises(RegistryError) as error:
        registry.register({"workflow_id": "s\ud800", "graph": CYCLE})
    assert error.value.param == "workflow_id" and len(registry) == 0


def test_explicit_steps_never_push_a_registered_workflows_hint_past_the_entry_limit():
    agents = [f"a{i}" for i in range(64)]
    graph = {
        "agents": [{"id": a} for a in agents],
        "edges": [[a, b] for a, b in zip(agents, agents[1:], strict=False)],
    }
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": graph})
    explicit = {f"x{i}": 5 for i in range(MAX_STEPS_ENTRIES - 10)}
    hint, _ = registry.begin_request(WorkflowHint("w", "a0", None, explicit))
    steps = hint.steps_to_execution
    assert len(steps) == MAX_STEPS_ENTRIES
    assert all(steps[a] == 5 for a in explicit)
    assert [steps.get(f"a{i}") for i in range(10)] == list(range(10))  # the nearest derived ones kept
    parse_hint(json.loads(hint.to_json()))  # the hint it sends on is one a client may send


# ---- aborted requests ----------------------------------------------------------------


def test_an_aborted_request_leaves_the_frontier_as_it_found_it():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    _, finish = registry.begin_request(WorkflowHint("w", "planner"))
    finish(True)
    before = registry.get("w").steps()
    for _ in range(10):  # streams the client closed after the first chunk
        _, finish = registry.begin_request(WorkflowHint("w", "executor"))
        finish(False)
    workflow = registry.get("w")
    assert workflow.finished == {"planner"} and workflow.running() == set()
    assert workflow.steps() == before == {"planner": 2, "executor": 1}


def test_an_aborted_request_does_not_undo_a_frontier_that_moved_since():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    _, finish_planner = registry.begin_request(WorkflowHint("w", "planner"))
    finish_planner(True)
    _, aborted = registry.begin_request(WorkflowHint("w", "executor"))
    _, finish_executor = registry.begin_request(WorkflowHint("w", "executor"))
    aborted(False)
    finish_executor(True)
    assert registry.get("w").finished == {"executor"}


# ---- stats query -------------------------------------------------------------------


def test_stats_query_parameters():
    assert parse_query({}) is None
    assert parse_query({"workflow_id": "w", "limit": "5"}) == StatsQuery("w", 0, 5)
    assert parse_query({"detail": "workflows", "offset": "10"}) == StatsQuery(None, 10, 100)
    for params, name in (
        ({"verbose": "1"}, "verbose"),
        ({"limit": "5"}, "limit"),
        ({"detail": "agents"}, "detail"),
        ({"workflow_id": "w", "limit": "0"}, "limit"),
        ({"workflow_id": "w", "limit": "100000"}, "limit"),
        ({"workflow_id": "w", "offset": "-1"}, "offset"),
        ({"workflow_id": "w", "offset": "١"}, "offset"),
    ):
        with pytest.raises(QueryError) as error:
            parse_query(params)
        assert error.value.param == name


def test_overlapping_aborted_requests_restore_the_frontier_together():
    registry = WorkflowRegistry()
    registry.register({"workflow_id": "w", "graph": CYCLE})
    _, finish = registry.begin_request(WorkflowHint("w", "planner"))
    finish(True)
    # The next stream starts before the previous one's disconnect is noticed.
    finishes = [registry.begin_request(WorkflowHint("w", "executor"))[1] for _ in range(3)]
    for finish in finishes:
        assert registry.get("w").finished == set()  # moved past while any of them is in flight
        finish(False)
    assert registry.get("w").finished == {"planner"}


@pytest.mark.parametrize("raw", [b"null", b"5", b'"kvflow"', b'[{"messages": []}]'])
def test_an_openai_body_that_is_not_an_object_is_a_400(raw):
    assert error_of(through_middleware(raw, "/v1/chat/completions")[0])["param"] == "body"


def test_control_characters_in_ids_are_a_400_they_could_not_name_a_workflow_route():
    with pytest.raises(HintError, match="control characters"):
        parse_hint({**GOOD, "workflow_id": "nl\nid"})
    with pytest.raises(RegistryError) as error:
        WorkflowRegistry().register({"workflow_id": "tab\tid", "graph": CYCLE})
    assert error.value.param == "workflow_id"


# ---- session_params: the form SGLang's router forwards -------------------------------------

ROUTED_PATHS = ["/generate", "/v1/chat/completions", "/v1/completions"]


def custom_params_of(body: dict, path: str) -> dict:
    return body["sampling_params"]["custom_params"] if path == "/generate" else body["custom_params"]


@pytest.mark.parametrize("path", ROUTED_PATHS)
def test_a_session_params_hint_is_moved_and_sglang_sees_what_an_unhinted_request_would(path):
    only_hint = {"prompt": "x", "session_params": {"kvflow": GOOD}}
    body = json.loads(through_middleware(json.dumps(only_hint).encode(), path)[1])
    assert "session_params" not in body and check_transport(custom_params_of(body, path)) == WorkflowHint(
        "w", "a"
    )
    beside = {"prompt": "x", "session_params": {"id": "s", "kvflow": GOOD}}
    body = json.loads(through_middleware(json.dumps(beside).encode(), path)[1])
    assert body["session_params"] == {"id": "s"}  # SGLang's own keys stay
    raw = b'{"prompt": "x", "session_params": {"id": "s"}}'
    assert through_middleware(raw, path)[1] == raw


@pytest.mark.parametrize("path", ROUTED_PATHS)
def test_a_malformed_session_params_hint_is_a_400_naming_the_field(path):
    raw = json.dumps({"prompt": "x", "session_params": {"kvflow": {**GOOD, "agent_id": 3}}}).encode()
    sent, reached = through_middleware(raw, path)
    assert error_of(sent)["param"] == "session_params.kvflow.agent_id" and reached is None


def test_a_top_level_hint_wins_but_the_session_params_one_is_still_removed():
    body = rewrite_body(
        {"input_ids": [1, 2], "kvflow": GOOD, "session_params": {"kvflow": {**GOOD, "agent_id": "b"}}},
        "/generate",
    )
    assert "session_params" not in body
    assert check_transport(body["sampling_params"]["custom_params"]).agent_id == "a"


def status_and_error(sent: list[dict]) -> tuple[int, dict]:
    return sent[0]["status"], json.loads(sent[1]["body"])


def routed_request(graph: object, agent_id: str = "planner", workflow_id: str = "r") -> bytes:
    hint = {"workflow_id": workflow_id, "agent_id": agent_id}
    return json.dumps({"input_ids": [1], "session_params": {"kvflow": hint, "kvflow_graph": graph}}).encode()


def test_a_graph_beside_the_hint_registers_the_workflow_once_and_fills_in_its_steps():
    registry = WorkflowRegistry(max_workflows=1)
    activate(registry)
    try:
        for _ in range(2):  # the same document with every request: registered once, accepted again
            body = json.loads(through_middleware(routed_request(CYCLE))[1])
            assert "session_params" not in body
        hint = check_transport(body["sampling_params"]["custom_params"])
        assert hint.steps_to_execution == {"planner": 0, "executor": 1}
        assert len(registry) == 1 and registry.get("r").graph.to_json() == CYCLE
        bad = {**CYCLE, "edges": [["planner", "nobody"]]}
        status, error = status_and_error(through_middleware(routed_request(bad, workflow_id="s"))[0])
        assert status == 400 and error["param"] == "session_params.kvflow_graph.edges[0]"
        assert error["message"].startswith("session_params.kvflow_graph.edges[0]: ")
        other = {"agents": [{"id": "planner"}], "edges": []}
        status, error = status_and_error(through_middleware(routed_request(other))[0])
        assert (status, error["param"], error["type"]) == (
            409,
            "session_params.kvflow_graph",
            "WorkflowConflict",
        )
        status, error = status_and_error(through_middleware(routed_request(CYCLE, workflow_id="t"))[0])
        assert (status, error["type"]) == (429, "RegistryFull")
        status, error = status_and_error(through_middleware(routed_request(CYCLE, agent_id="stranger"))[0])
        assert (status, error["param"]) == (400, "kvflow.agent_id")
        assert registry.get("r").running() == set() and len(registry) == 1  # refused requests started nothing
    finally:
        activate(None)


def test_a_graph_without_a_session_params_hint_beside_it_is_a_400():
    raw = json.dumps({"input_ids": [1], "kvflow": GOOD, "session_params": {"kvflow_graph": CYCLE}}).encode()
    assert error_of(through_middleware(raw)[0])["param"] == "session_params.kvflow_graph"
