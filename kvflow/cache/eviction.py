"""The workflow-aware eviction order, as an SGLang ``EvictionStrategy``.

SGLang pops the smallest key first, from the current leaves (device or host
tier alike). Nodes with no hinted owner below them come first, LRU among
themselves; then owned nodes, the one whose most urgent owner is needed
latest first (each node caches its owners' minimum rank, see
:mod:`kvflow.cache.ownership`), with a tie-break among equal ranks that is
LRU by default. Nothing is pinned. Without any hint every key is
``(0, 0, 0, last_access_time)``, which orders exactly like SGLang's ``lru``.

Parameters, set through SGLang's own ``--radix-eviction-policy-config``:

- ``urgency`` (``time``, the default, or ``hops``): what a rank is. ``time``
  is the time an owner's steps put it at on the cache's logical clock, so
  prompts of different workflows compare by when they are needed
  (:mod:`kvflow.cache.urgency`); ``hops`` is the steps themselves (the
  paper's rule), kept for comparison.
- ``tie_break`` (``lru`` or ``mru``) among equal ranks. With ``hops``, equal
  steps in concurrent workflows advancing in turn mean the workflow that moved
  on more recently needs its prompt last, which ``mru`` evicts first; ``time``
  already orders those by when they are needed, so ties are rare.
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
    """Un-owned first (LRU), then owned nodes by descending rank, ties by ``tie_break``."""

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
        self.urgency = urgency  # read by the cache: what an owner's rank means (kvflow.cache.urgency)
        self._tie_sign = 1 if tie_break == "lru" else -1
        # With LRU ties a node's priority only grows when SGLang touches it and otherwise changes
        # only with its kvflow_min, so the tree core can keep one victim heap across evictions
        # (kvflow.cache.victims); an MRU tie falls when touched, so SGLang's per-eviction heap runs.
        self.incremental = tie_break == "lru"

    def get_priority(self, node: Any) -> tuple[int, int, float, float]:
        rank = getattr(node, "kvflow_min", None)  # (over_budget, expected time), see AgentState.rank
        if rank is None:
            return (0, 0, 0, node.last_access_time)
        over_budget, expected = rank
        return (1, -over_budget, -expected, self._tie_sign * node.last_access_time)


def register_eviction_policy() -> None:
    """Make ``--radix-eviction-policy kvflow`` valid (CLI choices and factory registry)."""
    _EVICTION_POLICY_FACTORIES.setdefault(POLICY_NAME, WorkflowAwareStrategy)
    if POLICY_NAME not in RADIX_EVICTION_POLICY_CHOICES:
        add_radix_eviction_policy_choices([POLICY_NAME])
