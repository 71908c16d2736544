"""The workflow hint a request carries: schema, validation and transport.

A hint is a JSON object::

    {"workflow_id": "wf-1", "agent_id": "planner",
     "fixed_prefix_len": 812,                       # optional
     "steps_to_execution": {"planner": 0, "coder": 1},  # optional
     "keep_context": false,                          # optional, default true
     "expected_pause_s": 2.5}                        # optional

- Clients send it in one of the forms of docs/design.md, "Hint rules", or as
  ``session_params.kvflow`` (:data:`ROUTED_FIELD`; see :func:`parse_hint`).
- The HTTP layer validates it (:func:`parse_hint`) and hands it to the scheduler as a canonical
  JSON string under ``sampling_params.custom_params["kvflow"]`` (:data:`TRANSPORT_KEY`), the one
  request field SGLang carries unchanged from every endpoint to ``Req``.
- A transport is accepted only with the seal the HTTP layer writes beside it (:func:`check_transport`).
- The scheduler's :func:`decode_transport` never raises: whatever it cannot read is an un-hinted
  request.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvflow import NAME

TRANSPORT_KEY = NAME  # also the request field a client puts a hint in
SEAL_KEY = f"{NAME}_seal"
ROUTED_FIELD = "session_params"  # forwarded as a free JSON object by SGLang's router on every endpoint
GRAPH_KEY = f"{NAME}_graph"  # beside a hint in ROUTED_FIELD: its workflow's graph, registered on arrival
TIME_KEY = f"{NAME}_time"  # when the HTTP process wrote the transport (kvflow.cache.stamped_clock)
_SEAL = secrets.token_hex(16)  # per process: the HTTP process writes and checks it
KV_HINTS_ACTION_TYPE = NAME
MAX_ID_LEN = 256
MAX_STEPS_ENTRIES = 1024
MAX_STEPS_VALUE = 1_000_000
MAX_PAUSE_S = 86_400.0  # one day: an expected pause beyond it is a mistake, not a plan
HINT_FIELDS = (  # every field a hint may carry
    "workflow_id",
    "agent_id",
    "fixed_prefix_len",
    "steps_to_execution",
    "keep_context",
    "expected_pause_s",
)


class HintError(ValueError):
    """A malformed hint; ``field`` names the offending field (e.g. ``kvflow.agent_id``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class WorkflowHint:
    """One request's validated view of its workflow."""

    workflow_id: str
    agent_id: str
    fixed_prefix_len: int | None = None
    steps_to_execution: Mapping[str, int] = field(default_factory=dict)
    # False: this request's context (prompt + output) will not be resumed (its agent's last turn,
    # or an opt-out), so it stays plain LRU (kvflow.cache.contexts).
    keep_context: bool = True
    # Seconds from this request's end to its agent's next request (e.g. its tool's typical
    # latency): the client's estimate of the pause after it (kvflow.cache.pauses).
    expected_pause_s: float | None = None

    def to_json(self) -> str:
        """Canonical JSON, the form carried to the scheduler."""
        body: dict[str, Any] = {"workflow_id": self.workflow_id, "agent_id": self.agent_id}
        if self.fixed_prefix_len is not None:
            body["fixed_prefix_len"] = self.fixed_prefix_len
        if self.steps_to_execution:
            body["steps_to_execution"] = dict(self.steps_to_execution)
        if not self.keep_context:
            body["keep_context"] = False
        if self.expected_pause_s is not None:
            body["expected_pause_s"] = self.expected_pause_s
        return json.dumps(body, separators=(",", ":"), sort_keys=True)


def id_error(value: Any) -> str | None:
    """Why ``value`` is not a valid workflow or agent id, or None."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value or len(value) > MAX_ID_LEN:
        return f"must be 1 to {MAX_ID_LEN} characters long"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON "\ud800") cannot be written back in any JSON answer.
        return "must be valid Unicode (no lone surrogates)"
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        # A workflow id is also a URL path segment (/kvflow/workflows/{id}), which cannot hold one.
        return "must not contain control characters"
    return None


def _check_id(value: Any, name: str) -> str:
    error = id_error(value)
    if error is not None:
        raise HintError(name, error)
    return value


def _check_count(value: Any, name: str) -> int:
    # bool is an int subclass in Python; a JSON true is not a token count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise HintError(name, f"must be an integer, got {type(value).__name__}")
    if value < 0:
        raise HintError(name, f"must be >= 0, got {value}")
    return value


def parse_hint(raw: Any, *, prompt_len: int | None = None, prefix: str = NAME) -> WorkflowHint:
    """Validate a hint object; raise :class:`HintError` naming the first bad field.

    ``prompt_len``, when known, bounds ``fixed_prefix_len``. Clients send a hint as a top-level
    ``kvflow`` field (``/generate`` and the OpenAI endpoints), as ``custom_params.kvflow`` (OpenAI
    endpoints), as an action of ``action_type`` ``"kvflow"`` inside SGLang's ``kv_hints``
    envelope (``/generate``), or as ``session_params.kvflow`` (:data:`ROUTED_FIELD`, all three
    endpoints: the one field SGLang's router forwards on each of them, where :data:`GRAPH_KEY`
    beside it may carry the workflow's graph to register).
    """
    if not isinstance(raw, Mapping):
        raise HintError(prefix, f"must be a JSON object, got {type(raw).__name__}")
    for key in raw:
        if key not in HINT_FIELDS:
            raise HintError(f"{prefix}.{key}", f"unknown field (expected one of {', '.join(HINT_FIELDS)})")
    for required in ("workflow_id", "agent_id"):
        if required not in raw:
            raise HintError(f"{prefix}.{required}", "is required")
    workflow_id = _check_id(raw["workflow_id"], f"{prefix}.workflow_id")
    agent_id = _check_id(raw["agent_id"], f"{prefix}.agent_id")

    fixed_prefix_len = raw.get("fixed_prefix_len")
    if fixed_prefix_len is not None:
        fixed_prefix_len = _check_count(fixed_prefix_len, f"{prefix}.fixed_prefix_len")
        check_fixed_prefix_len(fixed_prefix_len, prompt_len, prefix)

    steps_raw = raw.get("steps_to_execution")
    steps: dict[str, int] = {}
    if steps_raw is not None:
        name = f"{prefix}.steps_to_execution"
        if not isinstance(steps_raw, Mapping):
            raise HintError(
                name, f"must be an object mapping agent_id to steps, got {type(steps_raw).__name__}"
            )
        if len(steps_raw) > MAX_STEPS_ENTRIES:
            raise HintError(name, f"at most {MAX_STEPS_ENTRIES} agents allowed, got {len(steps_raw)}")
        for agent, value in steps_raw.items():
            _check_id(agent, f"{name} key")
            value = _check_count(value, f"{name}.{agent}")
            if value > MAX_STEPS_VALUE:
                raise HintError(f"{name}.{agent}", f"must be <= {MAX_STEPS_VALUE}, got {value}")
            steps[agent] = value
    keep_context = raw.get("keep_context", True)
    if not isinstance(keep_context, bool):
        raise HintError(f"{prefix}.keep_context", f"must be true or false, got {type(keep_context).__name__}")
    pause = raw.get("expected_pause_s")
    if pause is not None:
        pause = _check_pause(pause, f"{prefix}.expected_pause_s")
    return WorkflowHint(workflow_id, agent_id, fixed_prefix_len, steps, keep_context, pause)


def _check_pause(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HintError(name, f"must be a number of seconds, got {type(value).__name__}")
    if not 0 < value <= MAX_PAUSE_S:  # also false for NaN
        raise HintError(name, f"must be > 0 and <= {MAX_PAUSE_S:g} seconds, got {value}")
    return float(value)


def check_fixed_prefix_len(fixed_prefix_len: int | None, prompt_len: int | None, prefix: str = NAME) -> None:
    """Reject a fixed prefix longer than the prompt it claims to prefix."""
    if fixed_prefix_len is not None and prompt_len is not None and fixed_prefix_len > prompt_len:
        raise HintError(
            f"{prefix}.fixed_prefix_len",
            f"{fixed_prefix_len} exceeds the prompt length {prompt_len}",
        )


def transport(hint: WorkflowHint) -> dict[str, Any]:
    """The ``custom_params`` entries that carry ``hint`` to the scheduler, stamped now (HTTP process)."""
    return {TRANSPORT_KEY: hint.to_json(), SEAL_KEY: _SEAL, TIME_KEY: time.monotonic()}


def check_transport(custom_params: Any, prefix: str = f"custom_params.{NAME}") -> WorkflowHint | None:
    """The hint of a request about to be tokenized; :class:`HintError` unless kvflow's HTTP layer wrote it.

    A client could write the transport form itself, on an endpoint kvflow does not read hints
    on, or with its key JSON-escaped. So the HTTP layer also writes :data:`SEAL_KEY` beside it,
    holding a secret of this process (:func:`transport`); a transport without it is refused
    here, before SGLang tokenizes the request.
    """
    if not isinstance(custom_params, Mapping) or TRANSPORT_KEY not in custom_params:
        return None
    encoded = custom_params[TRANSPORT_KEY]
    if custom_params.get(SEAL_KEY) != _SEAL or not isinstance(encoded, str):
        raise HintError(
            prefix,
            "hints are read only as documented (a top-level kvflow object, custom_params.kvflow or a "
            "kv_hints action) on /generate, /v1/chat/completions and /v1/completions",
        )
    return parse_hint(json.loads(encoded), prefix=prefix)


def decode_transport(custom_params: Any) -> WorkflowHint | None:
    """The hint a request carries to the scheduler, or None for an un-hinted or unreadable one."""
    if not isinstance(custom_params, Mapping):
        return None
    encoded = custom_params.get(TRANSPORT_KEY)
    if not isinstance(encoded, str):
        return None
    try:
        return parse_hint(json.loads(encoded))
    except (ValueError, RecursionError):  # HintError and JSONDecodeError are ValueErrors
        return None


def read_stamp(raw: Any) -> float | None:
    """A time stamp as written by the HTTP process (finite seconds), or None."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        return None
    return float(raw)


def transport_time(custom_params: Any) -> float | None:
    """The stamp :func:`transport` wrote beside a hint, or None where there is none readable."""
    return read_stamp(custom_params.get(TIME_KEY)) if isinstance(custom_params, Mapping) else None


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
