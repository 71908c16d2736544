"""The control channel's wire format (kvflow.control) and the scheduler applying its commands (no server)."""

from __future__ import annotations

import json
import logging

import pytest
from kvflow.patches.workflow_endpoints import _apply_command

from kvflow import control
from kvflow.control import COMMAND_PREFIX, Clock, ControlError, End, Steps


def test_keys_are_the_prefix_and_compact_sorted_json():
    assert control.encode(Clock(3.0)) == 'kvflow:{"at":3.0,"op":"clock"}'
    assert control.encode(End("wf-1", 12.5)) == 'kvflow:{"at":12.5,"op":"end","workflow_id":"wf-1"}'
    steps = Steps("w", {"b": 2, "a": 0}, 1.0)
    assert control.encode(steps) == 'kvflow:{"at":1.0,"op":"steps","steps":{"a":0,"b":2},"workflow_id":"w"}'
    fields = {"op": "steps", "workflow_id": "w", "steps": {"b": 2, "a": 0}, "at": 1.0}
    assert control.encode(steps) == COMMAND_PREFIX + json.dumps(fields, separators=(",", ":"), sort_keys=True)


@pytest.mark.parametrize(
    "command", [Clock(7.0), End("w", 1.5), Steps("w\u00e9", {"a": 0, "b": 3}, 2.0), Clock()]
)
def test_decode_inverts_encode(command):
    assert control.decode(control.encode(command)) == command


@pytest.mark.parametrize("at", ['"soon"', "true", "null", "[1]", "1e999"])
def test_an_unreadable_stamp_decodes_as_no_time(at):
    assert control.decode(COMMAND_PREFIX + f'{{"at":{at},"op":"end","workflow_id":"w"}}') == End("w")


@pytest.mark.parametrize(
    ("key", "names"),
    [
        ("max_running_requests", "prefix"),
        ("kvflow:{broken", "not JSON"),
        ("kvflow:[1]", "object"),
        ('kvflow:{"op":"nap","at":1}', "op"),
        ('kvflow:{"op":"end"}', "workflow_id"),
        ('kvflow:{"op":"end","workflow_id":3}', "workflow_id"),
        ('kvflow:{"op":"steps","workflow_id":"w"}', "steps"),
        ('kvflow:{"op":"steps","workflow_id":"w","steps":{"a":true}}', "steps"),
        ('kvflow:{"op":"steps","workflow_id":"w","steps":{"a":1.5}}', "steps"),
    ],
)
def test_a_malformed_key_is_a_control_error_naming_what(key, names):
    with pytest.raises(ControlError, match=names):
        control.decode(key)


class RecordingCache:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def advance_clock(self, stamp):
        self.calls.append(("advance_clock", stamp))

    def end_workflow(self, workflow_id):
        self.calls.append(("end_workflow", workflow_id))
        return workflow_id == "known"

    def set_steps(self, workflow_id, steps):
        self.calls.append(("set_steps", workflow_id, steps))
        return workflow_id == "known"


def test_the_scheduler_advances_the_clock_then_applies_the_command(caplog):
    cache = RecordingCache()
    assert _apply_command(cache, control.encode(Clock(1.0)))
    assert _apply_command(cache, control.encode(End("known", 2.0)))
    assert not _apply_command(cache, control.encode(End("other", 3.0)))
    assert _apply_command(cache, control.encode(Steps("known", {"a": 1}, 4.0)))
    assert cache.calls == [
        ("advance_clock", 1.0),
        ("advance_clock", 2.0),
        ("end_workflow", "known"),
        ("advance_clock", 3.0),
        ("end_workflow", "other"),
        ("advance_clock", 4.0),
        ("set_steps", "known", {"a": 1}),
    ]
    with caplog.at_level(logging.WARNING):
        assert not _apply_command(cache, "kvflow:{broken")
    assert len(cache.calls) == 7 and "malformed kvflow command" in caplog.text


def test_a_cache_without_kvflow_applies_nothing():
    for command in (Clock(1.0), End("w", 1.0), Steps("w", {"a": 1}, 1.0)):
        assert not _apply_command(object(), control.encode(command))
