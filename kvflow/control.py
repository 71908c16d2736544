"""The control channel: kvflow's commands from the HTTP process to every scheduler's cache.

A command rides SGLang's internal-state update (``SetInternalStateReq``) as one key of its
``server_args`` map, whose values must be numbers while its keys may be any string. The HTTP
process encodes (``patches/workflow_endpoints.py``); each scheduler decodes and applies, and the
DP controller decodes on the way to forget the rank of an ended workflow (``patches/dp_routing.py``).

- A key is ``"kvflow:" + JSON``, compact with sorted keys: ``{"at", "op", ...}``.
- ``op`` is ``clock`` (expire stale workflows), ``end`` (a workflow becomes plain LRU at once) or
  ``steps`` (a moved frontier); ``at`` is the HTTP process's ``time.monotonic()`` when sent, the
  only time the cache reads (:mod:`kvflow.cache.stamped_clock`). An unreadable ``at`` decodes as
  None: the command still applies, its time unread.
- :func:`decode` is the one validation: anything else under the prefix is a :class:`ControlError`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from kvflow import NAME
from kvflow.hints import read_stamp

COMMAND_PREFIX = f"{NAME}:"


@dataclass(frozen=True)
class Clock:
    """The HTTP process's time: workflows past their TTL are forgotten."""

    op: ClassVar[str] = "clock"
    at: float | None = None


@dataclass(frozen=True)
class End:
    """A workflow ended (``DELETE``): its KV becomes plain LRU at once."""

    op: ClassVar[str] = "end"
    workflow_id: str
    at: float | None = None


@dataclass(frozen=True)
class Steps:
    """A workflow's moved frontier: the steps of its agents."""

    op: ClassVar[str] = "steps"
    workflow_id: str
    steps: Mapping[str, int]
    at: float | None = None


Command = Clock | End | Steps


class ControlError(ValueError):
    """A ``server_args`` key under the kvflow prefix that is not a command."""


def is_command(key: str) -> bool:
    """Whether ``key`` is addressed to kvflow (a command, or a malformed one)."""
    return key.startswith(COMMAND_PREFIX)


def encode(command: Command) -> str:
    """The ``server_args`` key that carries ``command``."""
    fields = {"op": command.op, **dataclasses.asdict(command)}
    return COMMAND_PREFIX + json.dumps(fields, separators=(",", ":"), sort_keys=True)


def decode(key: str) -> Command:
    """The command ``key`` carries; :class:`ControlError` naming what is malformed."""
    if not is_command(key):
        raise ControlError(f"not a kvflow command (no {COMMAND_PREFIX!r} prefix)")
    try:
        fields = json.loads(key[len(COMMAND_PREFIX) :])
    except (ValueError, RecursionError) as error:
        raise ControlError(f"not JSON: {error}") from None
    if not isinstance(fields, dict):
        raise ControlError(f"expected a JSON object, got {type(fields).__name__}")
    op, at = fields.get("op"), read_stamp(fields.get("at"))
    if op == Clock.op:
        return Clock(at)
    if op not in (End.op, Steps.op):
        raise ControlError(f"op: expected 'clock', 'end' or 'steps', got {op!r}")
    workflow_id = fields.get("workflow_id")
    if not isinstance(workflow_id, str):
        raise ControlError(f"{op}: workflow_id must be a string, got {type(workflow_id).__name__}")
    if op == End.op:
        return End(workflow_id, at)
    steps = fields.get("steps")
    if not isinstance(steps, dict) or not all(
        type(value) is int
        for value in steps.values()  # JSON object keys are strings already
    ):
        raise ControlError("steps: must be an object of agent id -> integer")
    return Steps(workflow_id, steps, at)
