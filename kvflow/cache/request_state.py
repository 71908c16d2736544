"""kvflow's state on one SGLang ``Req``: ``req.kvflow``, a :class:`RequestState`.

SGLang's ``Req`` has no field for a cache's own per-request data, so the cache
sets one attribute on it, created on first use by :func:`request_state`; every
read goes through that function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvflow.cache.workflow_table import AgentState


@dataclass
class RequestState:
    """What the cache knows about one request."""

    admitted: bool = False  # its hint was read (once, when the scheduler first matched it)
    agent: AgentState | None = None  # the hinted agent it runs, if any
    fixed_len: int = 0  # its fixed prompt: min(the agent's fixed_prefix_len at admission, prompt length)
    held: bool = False  # held back at least once by a prefetch in flight
    keep_context: bool = True  # its hint's: its context may become its agent's
    context_len: int = 0  # tokens the finished request inserted into the tree (its prompt + output)
    expected_pause_s: float | None = None  # its hint's: the pause after it, in seconds
    admitted_at: int = 0  # the logical clock when it was admitted (its agent's pauses' last request)


def request_state(req: Any) -> RequestState:
    """``req.kvflow``, created on first use."""
    state = getattr(req, "kvflow", None)
    if state is None:
        state = req.kvflow = RequestState()
    return state
