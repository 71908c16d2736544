"""The workflow-aware eviction order, as an SGLang ``EvictionStrategy``.

SGLang pops the smallest key first, from the current leaves (device or host tier alike):

- nodes with no hinted owner below them first, LRU among themselves; without any hint every key
  is ``(0, 0, 0, last_access_time)``, which orders exactly like SGLang's ``lru``;
- then owned nodes, the one whose subtree's ``next_use`` (``node.kvflow``, the most urgent
  owner's, see :mod:`kvflow.cache.ownership`) is latest first, ties by ``tie_break``;
- nothing is pinned.

Parameters, set through SGLang's own ``--radix-eviction-policy-config``: ``urgency`` (``time``,
the default, or ``hops``), what an owner's ``next_use`` is: the time its steps put it at on the
cache's logical clock, so prompts of different workflows compare by when they are needed
(:mod:`kvflow.cache.urgency`), or the steps themselves (the paper's rule, kept for comparison);
``tie_break`` (``lru`` or ``mru``) among equal ``next_use``. With ``hops``, equal steps in
concurrent workflows advancing in turn mean the workflow that moved on more recently needs its
prompt last, which ``mru`` evicts first; ``time`` orders those by when they are needed already.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.arg_groups.choices import (
    RADIX_EVICTION_POLICY_CHOICES,
    add_radix_eviction_policy_choices,
)
from sglang.srt.mem_cache.evict_policy import EvictionStrategy
from sglang.srt.mem_cache.utils import _EVICTION_POLICY_FACTORIES

from kvflow import NAME
from kvflow.cache.urgency import URGENCY_MODES

POLICY_NAME = NAME
TIE_BREAKS = ("lru", "mru")


class WorkflowAwareStrategy(EvictionStrategy):
    """Un-owned first (LRU), then owned nodes by descending ``next_use``, ties by ``tie_break``."""

    def __init__(self, tie_break: str = "lru", urgency: str = "time") -> None:
        for name, value, choices in (
            ("tie_break", tie_break, TIE_BREAKS),
            ("urgency", urgency, URGENCY_MODES),
        ):
            if value not in choices:
                raise ValueError(
                    f"--radix-eviction-policy-config: {name!r} of the {POLICY_NAME} policy must be one of "
                    f"{', '.join(choices)}, got {value!r}"
                )
        self.tie_break = tie_break
        self.urgency = urgency  # read by the cache: what an owner's next_use means (kvflow.cache.urgency)
        self._tie_sign = 1 if tie_break == "lru" else -1
        # With LRU ties a node's priority only grows when SGLang touches it and otherwise changes
        # only with its next_use, so the tree core can keep one victim heap across evictions
        # (kvflow.cache.victims); an MRU tie falls when touched, so SGLang's per-eviction heap runs.
        self.incremental = tie_break == "lru"

    def get_priority(self, node: Any) -> tuple[int, int, float, float]:
        try:
            next_use = node.kvflow.next_use  # (over_budget, expected time), see AgentState.next_use
        except AttributeError:  # a node of another tree core: un-owned
            next_use = None
        if next_use is None:
            return (0, 0, 0, node.last_access_time)
        over_budget, expected = next_use
        return (1, -over_budget, -expected, self._tie_sign * node.last_access_time)


def register_eviction_policy() -> None:
    """Make ``--radix-eviction-policy kvflow`` valid (CLI choices and factory registry)."""
    _EVICTION_POLICY_FACTORIES.setdefault(POLICY_NAME, WorkflowAwareStrategy)
    if POLICY_NAME not in RADIX_EVICTION_POLICY_CHOICES:
        add_radix_eviction_policy_choices([POLICY_NAME])
