"""The control channel's wire format (kvflow.control) and the scheduler applying its commands (no server)."""

from __future__ import annotations

import json
import logging

import pytest
from kvflow.patches.workflow_endpoints import _apply_command
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvflow import control
from kvflow.control import COMMAND_PREFIX, Clock, ControlError, End, Steps
from kvflow.harness.offline import CacheDriver
from kvflow.hints import WorkflowHint


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


def _hinted_driver() -> CacheDriver:
    """A real kvflow cache tracking workflow "known" (agents a and b), its clock at 0."""
    driver = CacheDriver(size=64)
    hint = WorkflowHint("known", "a", 4, {"a": 0, "b": 1})
    driver.serve(list(range(8)), hint=hint)
    return driver


def test_the_scheduler_advances_the_clock_then_applies_the_command(caplog):
    driver = _hinted_driver()
    core = driver.cache.kvflow
    assert _apply_command(driver.cache, control.encode(Clock(1.0)))
    assert core.clock() == 1.0
    assert _apply_command(driver.cache, control.encode(Steps("known", {"a": 3, "b": 0}, 2.0)))
    assert core.clock() == 2.0
    assert {a.agent_id: a.steps for a in core.workflows.get("known").agents.values()} == {"a": 3, "b": 0}
    assert not _apply_command(driver.cache, control.encode(Steps("other", {"a": 1}, 3.0)))
    assert not _apply_command(driver.cache, control.encode(End("other", 4.0)))
    assert core.clock() == 4.0 and core.workflows.get("known") is not None
    assert _apply_command(driver.cache, control.encode(End("known", 5.0)))
    assert core.clock() == 5.0 and core.workflows.get("known") is None
    with caplog.at_level(logging.WARNING):
        assert not _apply_command(driver.cache, "kvflow:{broken")
    assert core.clock() == 5.0 and "malformed kvflow command" in caplog.text
    core.check_integrity()


def test_a_cache_without_kvflow_applies_nothing():
    stock = CacheDriver(size=64, cache_class=UnifiedRadixCache, policy="lru")
    for command in (Clock(1.0), End("w", 1.0), Steps("w", {"a": 1}, 1.0)):
        assert not _apply_command(stock.cache, control.encode(command))
