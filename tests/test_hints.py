"""Hint validation and the HTTP body rewrite, without a server."""

from __future__ import annotations

import json

import pytest

from kvflow.frontend.hint_rewrite import rewrite_body
from kvflow.hints import MAX_PAUSE_S, MAX_STEPS_ENTRIES, HintError, WorkflowHint, decode_transport, parse_hint

GOOD = {"workflow_id": "w", "agent_id": "a"}


def test_parse_full_hint_round_trips_through_the_transport():
    hint = parse_hint({**GOOD, "fixed_prefix_len": 12, "steps_to_execution": {"a": 0, "b": 2}}, prompt_len=20)
    assert hint == WorkflowHint("w", "a", 12, {"a": 0, "b": 2})
    assert decode_transport({"kvflow": hint.to_json()}) == hint
    assert decode_transport({"other": 1}) is None and decode_transport(None) is None
    last = parse_hint({**GOOD, "keep_context": False})
    assert not last.keep_context and decode_transport({"kvflow": last.to_json()}) == last
    assert parse_hint(GOOD).keep_context and "keep_context" not in parse_hint(GOOD).to_json()
    paused = parse_hint({**GOOD, "expected_pause_s": 2})
    assert paused.expected_pause_s == 2.0 and decode_transport({"kvflow": paused.to_json()}) == paused
    assert parse_hint({**GOOD, "expected_pause_s": MAX_PAUSE_S}).expected_pause_s == MAX_PAUSE_S
    assert parse_hint(GOOD).expected_pause_s is None and "expected_pause_s" not in parse_hint(GOOD).to_json()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([], "kvflow"),
        ({"agent_id": "a"}, "kvflow.workflow_id"),
        ({"workflow_id": "w"}, "kvflow.agent_id"),
        ({**GOOD, "workflow_id": None}, "kvflow.workflow_id"),
        ({**GOOD, "agent_id": "x" * 257}, "kvflow.agent_id"),
        ({**GOOD, "fixed_prefix_len": True}, "kvflow.fixed_prefix_len"),
        ({**GOOD, "fixed_prefix_len": -2}, "kvflow.fixed_prefix_len"),
        ({**GOOD, "fixed_prefix_len": 21}, "kvflow.fixed_prefix_len"),
        ({**GOOD, "steps_to_execution": "a:1"}, "kvflow.steps_to_execution"),
        ({**GOOD, "steps_to_execution": {"b": -1}}, "kvflow.steps_to_execution.b"),
        ({**GOOD, "steps_to_execution": {"b": 10**7}}, "kvflow.steps_to_execution.b"),
        ({**GOOD, "steps_to_execution": {"": 1}}, "kvflow.steps_to_execution key"),
        (
            {**GOOD, "steps_to_execution": {str(i): 0 for i in range(MAX_STEPS_ENTRIES + 1)}},
            "kvflow.steps_to_execution",
        ),
        ({**GOOD, "keep_context": "no"}, "kvflow.keep_context"),
        ({**GOOD, "keep_context": 0}, "kvflow.keep_context"),
        ({**GOOD, "expected_pause_s": "2"}, "kvflow.expected_pause_s"),
        ({**GOOD, "expected_pause_s": True}, "kvflow.expected_pause_s"),
        ({**GOOD, "expected_pause_s": 0}, "kvflow.expected_pause_s"),
        ({**GOOD, "expected_pause_s": -1.5}, "kvflow.expected_pause_s"),
        ({**GOOD, "expected_pause_s": MAX_PAUSE_S * 2}, "kvflow.expected_pause_s"),
        ({**GOOD, "expected_pause_s": 10**400}, "kvflow.expected_pause_s"),
        ({**GOOD, "expected_pause_s": float("nan")}, "kvflow.expected_pause_s"),
        ({**GOOD, "expected_pause_s": float("inf")}, "kvflow.expected_pause_s"),
        ({**GOOD, "priority": 1}, "kvflow.priority"),
    ],
)
def test_each_malformed_field_is_named(raw, field):
    with pytest.raises(HintError) as error:
        parse_hint(raw, prompt_len=20)
    assert error.value.field == field


def test_generate_body_moves_the_hint_into_custom_params():
    body = rewrite_body({"input_ids": [1, 2, 3], "kvflow": {**GOOD, "fixed_prefix_len": 2}}, "/generate")
    assert "kvflow" not in body
    assert json.loads(body["sampling_params"]["custom_params"]["kvflow"])["fixed_prefix_len"] == 2


def test_generate_body_checks_fixed_prefix_len_against_input_ids():
    with pytest.raises(HintError, match="exceeds the prompt length 3"):
        rewrite_body({"input_ids": [1, 2, 3], "kvflow": {**GOOD, "fixed_prefix_len": 4}}, "/generate")


def test_kv_hints_envelope_action_is_accepted_and_left_in_place():
    envelope = {
        "protocol_version": "1",
        "message_id": "m",
        "actions": [{"action_type": "kvflow", "payload": GOOD}],
    }
    body = rewrite_body({"text": "hi", "kv_hints": envelope}, "/generate")
    assert body["kv_hints"] == envelope
    assert decode_transport(body["sampling_params"]["custom_params"]) == WorkflowHint("w", "a")


def test_openai_forms_land_in_top_level_custom_params():
    for body in (
        {"messages": [], "kvflow": GOOD},
        {"messages": [], "custom_params": {"kvflow": GOOD, "x": 1}},
    ):
        out = rewrite_body(body, "/v1/chat/completions")
        assert decode_transport(out["custom_params"]) == WorkflowHint("w", "a")
    assert out["custom_params"]["x"] == 1


def test_unhinted_bodies_are_untouched():
    body = {"text": "kvflow is a word here", "sampling_params": {"max_new_tokens": 1}}
    assert rewrite_body(json.loads(json.dumps(body)), "/generate") is None  # passed on byte for byte
